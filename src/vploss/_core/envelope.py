import abc
from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, PyTree, Scalar


Args: TypeAlias = PyTree[Any]
Params: TypeAlias = PyTree[Array]
Stats: TypeAlias = PyTree[Array]
Objective: TypeAlias = Callable[[Params, Args], Scalar]
Tangent: TypeAlias = PyTree[Array | None]
#: `check(value, solution, stats) -> (value, solution)`: runtime checks attached to the
#: optimal value and the minimiser inside the solve (see `envelope_minimise`).
Check: TypeAlias = Callable[[Scalar, Params, Stats], tuple[Scalar, Params]]


class AbstractInnerSolver(eqx.Module):
    r"""An inner solver for `envelope_minimise`: it minimises a convex objective
    $J(w; a)$ over $w$, and says how its minimiser moves with the data $a$.

    Both methods are abstract (Equinox's abstract/final pattern: no default is
    overridden). Most solvers implement `solution_jvp` by the implicit function
    theorem, `implicit_solution_jvp`, with their own Hessian solve (the dense
    `autodiff_hessian_solve` suits a few hundred unknowns); the ridge solvers exploit
    their closed form instead.
    """

    @abc.abstractmethod
    def __call__(
        self, objective: Objective, args: Args, init: Params | None
    ) -> tuple[Params, Stats]:
        """Returns `(w_star, stats)`: the minimiser of `objective(w, args)` (passed in,
        as optimistix passes `fn`, never stored), from the warm start `init` (or a
        default start when `None`), and diagnostics (a pytree of arrays)."""

    @abc.abstractmethod
    def solution_jvp(
        self, objective: Objective, solution: Params, stats: Stats, args: Args, t_args: Tangent
    ) -> Params:
        r"""The tangent $\dot w$ of the minimiser for the tangent `t_args` of the data
        (`None` leaves: symbolic zeros)."""


def implicit_solution_jvp(
    hessian_solve: Callable[[Params], Params],
    objective: Objective,
    solution: Params,
    args: Args,
    t_args: Tangent,
) -> Params:
    r"""The tangent of the minimiser by the implicit function theorem applied to
    $\nabla_w J(w^*(a); a) = 0$: $\dot w = -H^{-1}\,\partial_a \nabla_w J(w^*;
    a)\,\dot a$, with `hessian_solve` $r \mapsto H^{-1}r$ for the Hessian $H =
    \partial_w^2 J(w^*; a)$ (positive definite)."""
    _, mixed = partial_jvp(lambda a: jax.grad(objective)(solution, a), args, t_args)
    if mixed is None:
        return jtu.tree_map(jnp.zeros_like, solution)
    return jtu.tree_map(jnp.negative, hessian_solve(mixed))


def autodiff_hessian_solve(
    objective: Objective, solution: Params, args: Args
) -> Callable[[Params], Params]:
    """`rhs ↦ H⁻¹ rhs` with the dense Hessian of `objective` at `solution` formed by
    autodiff (`dense_hessian_solve`): fine for a few hundred unknowns."""
    flat, unravel = jfu.ravel_pytree(solution)
    hessian = jax.hessian(lambda v: objective(unravel(v), args))(flat)
    return dense_hessian_solve(hessian, unravel)


def dense_hessian_solve(
    hessian: Float[Array, "n n"], unravel: Callable[[Float[Array, " n"]], Params]
) -> Callable[[Params], Params]:
    """`rhs ↦ hessian⁻¹ rhs` by Cholesky (`lx.Cholesky`), for a positive definite
    Hessian of the parameters flattened by `ravel_pytree` (`unravel` undoes it): the
    one dense solve of the implicit derivatives (`autodiff_hessian_solve`,
    the log-barrier's, the readout losses' up to `MAX_DENSE_SOLVE_SIZE`). A Hessian
    that is not numerically positive definite gives NaN tangents, not an error."""
    operator = lx.MatrixLinearOperator(hessian, lx.positive_semidefinite_tag)

    def solve(rhs):
        flat_rhs, _ = jfu.ravel_pytree(rhs)
        return unravel(lx.linear_solve(operator, flat_rhs, lx.Cholesky(), throw=False).value)

    return solve


@eqx.filter_custom_jvp
def _envelope_minimise(args, init, *, objective, solver, check):
    solution, stats = solver(objective, args, init)
    value = objective(solution, args)
    if check is not None:
        # The derivative rule below reads this (checked) minimiser, so the checks are
        # live in every derivative, the gradient alone included.
        value, solution = check(value, solution, stats)
    return value, solution, stats


@_envelope_minimise.def_jvp
def _envelope_minimise_jvp(primals, tangents, *, objective, solver, check):
    args, init = primals
    t_args, _ = tangents
    # Recursive: when this rule is differentiated again (a second derivative), the
    # minimiser carries its own implicit tangent, so `t_value` below (a function of
    # it) differentiates correctly. The warm start never affects the minimiser.
    _, solution, stats = _envelope_minimise(
        args, jax.lax.stop_gradient(init), objective=objective, solver=solver, check=check
    )
    # The envelope theorem: ∂_w J(w*) = 0, so the value moves only through the data.
    # It does not involve the minimiser's tangent, so when only the loss is
    # differentiated, the implicit solve below is dead code and is never run.
    value, t_value = partial_jvp(lambda a: objective(solution, a), args, t_args)
    t_solution = solver.solution_jvp(objective, solution, stats, args, t_args)
    t_stats = jtu.tree_map(lambda _: None, stats)
    return (value, solution, stats), (t_value, t_solution, t_stats)


def partial_jvp(fn: Callable[[Args], Any], args: Args, t_args: Tangent) -> tuple[Any, Any]:
    """`jax.jvp(fn, (args,), (t_args,))`, where `t_args` has `None` for symbolic zeros;
    the tangent is `None` when every leaf's is.

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
    solver: AbstractInnerSolver,
    args: Args,
    init: Params | None = None,
    *,
    check: Check | None = None,
) -> tuple[Scalar, Params, Stats]:
    r"""The reduced objective $L(a) = \min_w J(w; a)$ with its envelope derivative,
    and the minimiser $w^*(a)$ with its implicit derivative.

    This is the one mechanism behind every `vploss_*` function. Given a convex objective
    $J(w; a)$ of the readout parameters $w$ and the data $a$ (features, targets,
    hyperparameters) and an inner solver returning $w^* = \operatorname{argmin}_w J(w; a)$,
    it returns $L(a) = J(w^*; a)$ together with $w^*$.

    Derivatives are given by a custom JVP rule, so they serve forward and reverse mode
    alike, and the solver's iterations are never differentiated:

    - the value, by the envelope theorem ($\partial_w J(w^*; a) = 0$):
        $\mathrm{d}L = \partial_a J(w^*; a)\,\mathrm{d}a$, one Jacobian-vector product
        of $J$ in the data at the fixed minimiser;
    - the minimiser, by the implicit function theorem applied to $\nabla_w J(w^*(a);
        a) = 0$: $\mathrm{d}w^* = -H^{-1}\,\partial_a\nabla_w J(w^*; a)\,\mathrm{d}a$ with
        the Hessian $H = \partial^2_w J(w^*; a)$ (the solver's `solution_jvp`).

    The two are independent: when only the value is differentiated (the training
    loop's case), the linear solve with $H$ is dead code, removed when traced
    (`jax.grad`, `jax.linearize`) or compiled. Second derivatives of $L$ are exact:
    the rule is differentiated through its own minimiser, whose tangent is the
    implicit one.

    The rule holds for constrained problems too when the solver minimises a barrier
    objective $J - \frac1t\sum\log w_i$ whose barrier term does not depend on $a$ (its
    implicit derivative includes the barrier's curvature).

    **Arguments:**

    - `objective`: `objective(w, args) -> scalar`, convex in `w`. Must be hashable (a
        module-level function or an `eqx.Module`), since it is part of the static
        structure of the computation.
    - `solver`: an `AbstractInnerSolver`: `solver(objective, args, init) -> (w_star, stats)`;
        `init` is `None` or a pytree like `w_star` to warm-start from. `stats` is any
        pytree of arrays (diagnostics), passed through without derivative.
    - `args`: the data, a pytree. Its floating-point array leaves are differentiable.
    - `init`: an optional warm start for the solver.
    - `check`: optional runtime checks, `check(value, w_star, stats) -> (value,
        w_star)` returning its inputs with `eqx.error_if` attached (e.g. a
        `RuntimeChecks`; hashable, or an `eqx.Module` whose arrays are the flags). It
        runs on the solver's output inside this function, so the derivative rule
        reads the checked minimiser and the checks fire when only a derivative is
        used (a gradient-only step never uses the returned value or minimiser, so
        `eqx.error_if` on those is dead code there).

    **Returns:**

    `(value, w_star, stats)`: the optimal value (carrying the envelope derivative), the
    minimiser (carrying its implicit derivative) and the solver's diagnostics.
    """
    return _envelope_minimise(args, init, objective=objective, solver=solver, check=check)
