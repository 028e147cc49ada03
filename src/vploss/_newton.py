"""The inner solver of the logistic and softmax losses: optimistix minimisers that stop
on the gradient norm of the inner objective, and a damped Newton method on its exact
Hessian."""

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Float, PyTree, Scalar

from ._checks import as_alpha, as_flag, check_finite
from ._diagnostics import check_converged, InnerStats
from ._envelope import Args, envelope_minimise, Objective
from ._features import augment, evaluate_features, parameter_penalty
from ._misc import matmul
from ._readout import coefficients_from_readout, readout_from_coefficients, VPLinear


Hessian: TypeAlias = Callable[[Float[Array, "p k"], Args], lx.AbstractLinearOperator]
SolverName: TypeAlias = Literal["auto", "newton", "newton-cg", "bfgs", "lbfgs"]
_SOLVER_NAMES = ("auto", "newton", "newton-cg", "bfgs", "lbfgs")

#: `solver="auto"` uses the exact Newton method while the readout has at most this
#: many coefficients `p·k`, and Newton–CG beyond (see `select_minimiser`). Newton–CG
#: is much cheaper per step, but in float32 at small `alpha2` it was measured to stop
#: after one step without converging (K = 10, m = 64, alpha2 <= 1e-4), so the exact
#: method is kept up to this size, where its `(p·k)²` Hessian still fits easily.
MAX_EXACT_NEWTON_SIZE = 1024


def default_gtol(dtype: Any) -> float:
    """The default gradient tolerance, `sqrt(eps)` of the dtype (3.5e-4 in float32,
    1.5e-8 in float64). A line search compares objective values, which it cannot
    resolve below `eps·|J|`, so it stalls once `|∇J|²/λ_max(H)` falls below that:
    tighter tolerances are reached by the quadratic convergence of the last Newton
    step (typically far below this), not certified by the search. The objectives are
    means over samples, so the gradient does not grow with the batch size."""
    return float(jnp.finfo(dtype).eps) ** 0.5


class DampedNewton(optx.AbstractQuasiNewton):
    """Newton's method on the exact Hessian with a backtracking Armijo line search.

    A quasi-Newton minimiser whose "Hessian update" evaluates the true Hessian at each
    accepted iterate, so the optimistix machinery (line search, descent, linear
    solver) is reused as it is. Stop it with `GradientNormTermination`: its own
    Cauchy criterion is switched off (`rtol = atol = 0`).
    """

    hessian: Callable[[PyTree[Array]], lx.AbstractLinearOperator]
    descent: optx.NewtonDescent
    search: optx.BacktrackingArmijo = optx.BacktrackingArmijo()
    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    use_inverse: bool = False
    verbose: Callable[..., None] = lambda **kwargs: None

    def init_hessian(self, y, f, grad):
        # A placeholder of the right structure; the first accepted step replaces it.
        operator = eqx.filter_eval_shape(self.hessian, y)
        operator = jtu.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype) if _is_struct(s) else s,
            operator,
            is_leaf=_is_struct,
        )
        return optx.FunctionInfo.EvalGradHessian(f, grad, operator), None

    def update_hessian(self, y, y_eval, f_info, f_eval_info, hessian_update_state):
        operator = self.hessian(y_eval)
        # An operator built from a function carries a jaxpr; keep the first one so the
        # loop state has a fixed structure (as optimistix's L-BFGS does).
        static = eqx.filter(f_info.hessian, eqx.is_array, inverse=True)
        operator = eqx.combine(static, eqx.filter(operator, eqx.is_array))
        return optx.FunctionInfo.EvalGradHessian(f_eval_info.f, f_eval_info.grad, operator), None


def _is_struct(leaf):
    return isinstance(leaf, jax.ShapeDtypeStruct)


class GradientNormTermination(optx.AbstractMinimiser):
    """Runs a quasi-Newton `minimiser` (any `optx.AbstractQuasiNewton`: `DampedNewton`,
    `optx.BFGS`, `optx.LBFGS`, ...) until the max-norm of the gradient at the accepted
    iterate is at most `gtol`, in place of its own Cauchy criterion (which stops on
    small steps, not on optimality)."""

    minimiser: optx.AbstractQuasiNewton
    gtol: float

    @property
    def rtol(self):
        return self.minimiser.rtol

    @property
    def atol(self):
        return self.minimiser.atol

    @property
    def norm(self):
        return self.minimiser.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self.minimiser.init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self.minimiser.step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        # Before the first step `f_info` holds placeholders, not the gradient at `y`.
        small = optx.max_norm(state.f_info.grad) <= self.gtol
        return ~state.first_step & small, state.result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.minimiser.postprocess(fn, y, aux, args, options, state, tags, result)


class _AtData(eqx.Module):
    """`hessian(coef, args)` as a function of `coef` alone."""

    hessian: Hessian
    args: Args

    def __call__(self, coef):
        return self.hessian(coef, self.args)


def autodiff_hessian(objective: Objective) -> Hessian:
    """The Hessian of `objective` in `coef` as an operator of Hessian-vector products
    (forward over reverse mode; the linearisation is computed once per iterate)."""
    return jtu.Partial(_autodiff_hessian, objective)


def _autodiff_hessian(objective, coef, args):
    gradient = lambda c, a: jax.grad(objective)(c, a)
    jacobian = lx.JacobianLinearOperator(gradient, coef, args, tags=lx.positive_semidefinite_tag)
    return lx.linearise(jacobian)


def block_gram(
    features: Float[Array, "N p"], weights: Float[Array, "N k"]
) -> tuple[Float[Array, "p k p k"], Float[Array, "N pk"]]:
    r"""The block-diagonal Hessian term $H_{(p,c),(q,e)} = \delta_{ce}\sum_j w_{jc}
    \hat f_{jp}\hat f_{jq}/N$ of a generalised linear model, and the weighted features
    $X_{j,(p,c)} = w_{jc}\hat f_{jp}$ it is made of. One matmul, a sum over samples."""
    num_samples, p = features.shape
    k = weights.shape[1]
    weighted = (features[:, :, None] * weights[:, None, :]).reshape(num_samples, p * k)
    blocks = matmul(weighted.T, features).reshape(p, k, p) / num_samples
    gram = blocks[:, :, :, None] * jnp.eye(k, dtype=features.dtype)[None, :, None, :]
    return gram, weighted


def hessian_operator(matrix: Float[Array, "p k p k"], alpha2: Scalar) -> lx.PyTreeLinearOperator:
    """`matrix + alpha2 I` as a positive definite operator on `(p, k)` coefficients."""
    p, k = matrix.shape[:2]
    identity = jnp.eye(p * k, dtype=matrix.dtype).reshape(p, k, p, k)
    return lx.PyTreeLinearOperator(
        matrix + alpha2 * identity,
        jax.ShapeDtypeStruct((p, k), matrix.dtype),
        lx.positive_semidefinite_tag,
    )


class InnerMinimise(eqx.Module):
    """The inner solver handed to `envelope_minimise`: minimises `objective(coef, args)`
    over the readout coefficients `coef` of shape `(p, k)`, where `args = (features
    (N, p), targets (N, k), alpha2)`, from `init` or from zero, with an optimistix
    minimiser, and reports `InnerStats`."""

    objective: Objective
    minimiser: Callable[[Args], optx.AbstractMinimiser]
    gtol: float
    max_steps: int

    def __call__(self, args: Args, init: Float[Array, "p k"] | None):
        features, targets, _ = args
        if init is None:
            init = jnp.zeros((features.shape[1], targets.shape[1]), features.dtype)
        solution = optx.minimise(
            self.objective,
            self.minimiser(args),
            init,
            args,
            max_steps=self.max_steps,
            throw=False,
            # The solve is never differentiated (the envelope rule replaces it).
            adjoint=optx.RecursiveCheckpointAdjoint(),
        )
        coef = solution.value
        gradient_norm = optx.max_norm(jax.grad(self.objective)(coef, args))
        converged = (solution.result == optx.RESULTS.successful) & (gradient_norm <= self.gtol)
        return coef, InnerStats(solution.stats["num_steps"], gradient_norm, converged)


#: Relative residual at which Newton–CG stops its inner CG iterations (a fixed forcing
#: term: the outer iteration then converges linearly with about this rate).
NEWTON_CG_RTOL = 1e-2


class _Newton(eqx.Module):
    hessian: Hessian
    linear_solver: lx.AbstractLinearSolver
    gtol: float

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        descent = optx.NewtonDescent(linear_solver=self.linear_solver)
        newton = DampedNewton(_AtData(self.hessian, args), descent)
        return GradientNormTermination(newton, self.gtol)


class _Given(eqx.Module):
    minimiser: optx.AbstractMinimiser

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        del args
        return self.minimiser


def select_minimiser(
    solver: SolverName | optx.AbstractMinimiser,
    objective: Objective,
    hessian: Hessian,
    gtol: float,
    num_coefficients: int,
) -> Callable[[Args], optx.AbstractMinimiser]:
    """The minimiser for `InnerMinimise`, as a function of the data (the exact Newton
    method evaluates its Hessian from them)."""
    if isinstance(solver, optx.AbstractMinimiser):
        return _Given(solver)
    if solver == "auto":
        solver = "newton" if num_coefficients <= MAX_EXACT_NEWTON_SIZE else "newton-cg"
    if solver == "newton":
        return _Newton(hessian, lx.Cholesky(), gtol)
    if solver == "newton-cg":
        cg = lx.CG(rtol=NEWTON_CG_RTOL, atol=gtol)
        return _Newton(autodiff_hessian(objective), cg, gtol)
    # Cauchy criteria off: `GradientNormTermination` stops them.
    if solver == "bfgs":
        return _Given(GradientNormTermination(optx.BFGS(rtol=0.0, atol=0.0), gtol))
    if solver == "lbfgs":
        return _Given(GradientNormTermination(optx.LBFGS(rtol=0.0, atol=0.0), gtol))
    raise ValueError(
        f"`solver` must be one of {_SOLVER_NAMES} or an `optimistix.AbstractMinimiser`; "
        f"got {solver!r}."
    )


def fit_readout(
    what: str,
    objective: Objective,
    hessian: Hessian,
    model: Callable[..., Any],
    x: Array,
    labels: Float[Array, "N k"],
    *,
    label_error: tuple[Bool[Array, ""], str],
    scalar_output: bool,
    alpha1: Any,
    alpha2: Any,
    use_bias: Any,
    solver: Any,
    gtol: Any,
    max_steps: Any,
    throw: Any,
    init: Any,
) -> tuple[Scalar, VPLinear]:
    """The body shared by `vploss_bce` and `vploss_ce` once their labels are checked:
    features, inner solve through `envelope_minimise`, runtime checks, readout."""
    use_bias = as_flag("use_bias", use_bias)
    throw = as_flag("throw", throw)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive Python int; got {max_steps!r}.")
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=True)
    features = evaluate_features(model, x)
    dtype = features.dtype
    if jnp.issubdtype(labels.dtype, jnp.floating):
        dtype = jnp.result_type(dtype, labels.dtype)
    features = augment(features.astype(dtype), use_bias)
    shape = (features.shape[1], labels.shape[1])
    if gtol is None:
        gtol = default_gtol(dtype)
    elif isinstance(gtol, bool) or not isinstance(gtol, (int, float)) or not gtol > 0:
        raise ValueError(f"`gtol` must be a positive Python float or None; got {gtol!r}.")
    if init is not None:
        if not isinstance(init, VPLinear):
            raise TypeError(
                "`init` must be the `VPLinear` readout returned by a previous call (or "
                f"None); got {type(init).__name__}."
            )
        init = coefficients_from_readout(init, use_bias)
        if init.shape != shape:
            raise ValueError(
                f"`init` has {init.shape[1]} output(s) and {init.shape[0]} coefficients "
                f"per output; this problem has {shape[1]} and {shape[0]}."
            )
        init = init.astype(dtype)
    minimiser = select_minimiser(solver, objective, hessian, float(gtol), shape[0] * shape[1])
    value, coef, stats = envelope_minimise(
        objective,
        InnerMinimise(objective, minimiser, float(gtol), max_steps),
        (features, labels.astype(dtype), alpha2.astype(dtype)),
        init,
    )
    # Value checks act on scalars outside the solve, so a sharded batch stays sharded.
    value = eqx.error_if(value, label_error[0], label_error[1])
    value = check_finite(value, coef, f"The readout of {what}")
    value = check_converged(value, stats, throw, what)
    loss = value + parameter_penalty(model, alpha1.astype(dtype))
    return loss, readout_from_coefficients(coef, use_bias, scalar_output, stats)
