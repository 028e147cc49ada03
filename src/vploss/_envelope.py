from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar


Args: TypeAlias = PyTree[Any]
Params: TypeAlias = PyTree[Array]
Stats: TypeAlias = PyTree[Array]
Objective: TypeAlias = Callable[[Params, Args], Scalar]
InnerSolver: TypeAlias = Callable[[Args, Params | None], tuple[Params, Stats]]


_SECOND_ORDER = (
    "vploss: a reduced loss has first derivatives only (the envelope rule). Its second "
    "derivative needs the derivative of the fitted readout, which is not available; "
    "differentiate it once (grad, jvp, vjp, jacfwd or jacrev), not twice."
)


@eqx.filter_custom_jvp
def _envelope_minimise(args, init, *, objective, solver):
    solution, stats = solver(args, init)
    return objective(solution, args), solution, stats


@_envelope_minimise.def_jvp
def _envelope_minimise_jvp(primals, tangents, *, objective, solver):
    args, init = primals
    t_args, _ = tangents
    # The inner solve is never differentiated. A second derivative would need the
    # derivative of the minimiser, which this rule does not provide: it raises rather
    # than silently dropping that term.
    solution, stats = solver(
        eqxi.nondifferentiable(args, msg=_SECOND_ORDER),
        eqxi.nondifferentiable(init, msg=_SECOND_ORDER),
    )
    value, t_value = _partial_jvp(lambda a: objective(solution, a), args, t_args)
    # The minimiser and the diagnostics are returned with zero tangents (a `None` per
    # leaf, as equinox expects for a pytree): only the optimal value carries the
    # envelope derivative.
    no_tangent = jtu.tree_map(lambda _: None, (solution, stats))
    return (value, solution, stats), (t_value, *no_tangent)


def _partial_jvp(fn, args, t_args):
    """`jax.jvp(fn, (args,), (t_args,))`, where `t_args` has `None` for symbolic zeros.

    Only the leaves with a tangent are differentiated, so no zero tangent is ever
    materialised (the backward pass of a large batch would otherwise carry N×m zeros).
    """
    leaves, treedef = jtu.tree_flatten(args)
    t_leaves = treedef.flatten_up_to(t_args)
    index = [i for i, t in enumerate(t_leaves) if t is not None]
    if not index:
        return fn(args), None

    def fn_of_differentiated(*diff_leaves):
        full = list(leaves)
        for i, leaf in zip(index, diff_leaves, strict=True):
            full[i] = leaf
        return fn(jtu.tree_unflatten(treedef, full))

    return jax.jvp(
        fn_of_differentiated,
        tuple(leaves[i] for i in index),
        tuple(t_leaves[i] for i in index),
    )


def envelope_minimise(
    objective: Objective,
    solver: InnerSolver,
    args: Args,
    init: Params | None = None,
) -> tuple[Scalar, Params, Stats]:
    r"""The reduced objective $L(a) = \min_w J(w; a)$ with its envelope derivative.

    This is the one mechanism behind every `vploss_*` function. Given a convex objective
    $J(w; a)$ of the readout parameters $w$ and the data $a$ (features, targets,
    hyperparameters) and an inner solver returning $w^* = \operatorname{argmin}_w J(w; a)$,
    it returns $L(a) = J(w^*; a)$ together with $w^*$.

    Its derivative is given by a custom JVP rule, so it serves forward and reverse mode
    alike. By the envelope theorem ($\partial_w J(w^*; a) = 0$),

    $$\mathrm{d}L = \partial_a J(w^*; a)\,\mathrm{d}a,$$

    the partial derivative of $J$ in the data at the fixed minimiser: the backward pass
    costs one vector-Jacobian product of $J$ in $a$, and the solver is never
    differentiated. The rule holds for constrained problems too when $J$ is the barrier
    objective the solver minimised.

    **Arguments:**

    - `objective`: `objective(w, args) -> scalar`, convex in `w`. Must be hashable (a
        module-level function or an `eqx.Module`), since it is part of the static
        structure of the computation.
    - `solver`: `solver(args, init) -> (w_star, stats)`; `init` is `None` or a pytree like
        `w_star` to warm-start from. `stats` is any pytree of arrays (diagnostics), passed
        through without derivative.
    - `args`: the data, a pytree. Its floating-point array leaves are differentiable.
    - `init`: an optional warm start for the solver.

    **Returns:**

    `(value, w_star, stats)`: the optimal value (carrying the envelope derivative), the
    minimiser (carrying a zero tangent) and the solver's diagnostics. Differentiating
    twice raises an error instead of returning a second derivative without the
    minimiser's dependence on the data.
    """
    return _envelope_minimise(args, init, objective=objective, solver=solver)
