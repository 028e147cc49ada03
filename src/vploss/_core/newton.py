"""Newton's method for the convex inner problems, one damped Newton method for all of
them (the readout losses' solvers, `LogBarrier`'s centering steps; the streaming
refit, which cannot run in one jitted loop, takes the same direction, line-search test
and constants): the stopping tests (scaled gradient and loss-error bound; Newton
decrement), a backtracking line search that allows for the objective's rounding, the
Newton direction by Cholesky with fallbacks, and the truncated Newton direction by
preconditioned CG; as optimistix pieces (`DampedNewton`, descents, search,
`GradientNormTermination`, `DecrementTermination`), run with a budget of updates
(`minimise_updates`)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Scalar


def newton_cg_max_steps(gtol: float) -> int:
    """The CG iterations per Newton–CG step at most (truncated Newton: the line search
    accepts any CG iterate, each a descent direction): 5 for tolerances like float32's
    default (3.5e-4), 20 below 1e-5 (float64's default 1.5e-8).

    A small cap gives the fastest warm-started steps in float32 (the training loop's
    case), at the price of more Newton steps from a cold start; at float64's tight
    tolerances a small cap takes many more Newton steps. The timings behind these
    values are on the benchmark page, 'CG iterations per Newton–CG step'."""
    return 5 if gtol >= 1e-5 else 20


def default_gtol(dtype: Any) -> float:
    """The default gradient tolerance, `sqrt(eps)` of the dtype (3.5e-4 in float32,
    1.5e-8 in float64). The Newton methods' line search allows for the rounding of
    the objective (`RoundingArmijo`), so they reach tighter tolerances too, down to
    the rounding of the gradient itself; a plain Armijo search (BFGS, L-BFGS) stalls
    once `|∇J|²/λ_max(H)` falls below the rounding of `J`. The objectives are means
    over samples, so the gradient does not grow with the batch size."""
    return float(jnp.finfo(dtype).eps) ** 0.5


#: How many roundings `eps (1 + |J|)` of the objective are taken as its rounding error
#: (`RoundingArmijo`, `loss_tolerance`).
ROUNDING = 16.0


def loss_tolerance(value: Scalar) -> Scalar:
    r"""The loss error the inner solve allows: $\sqrt{\varepsilon}\,|J| + \rho\,
    \varepsilon\,(1 + |J|)$, a relative tolerance of $\sqrt\varepsilon$ of the
    objective's dtype (3.5e-4 in float32, 1.5e-8 in float64) plus the rounding of the
    computed $J$ itself (the `ROUNDING` $\rho = 16$ of `RoundingArmijo`), below which
    no solver can resolve the loss."""
    eps = jnp.finfo(value.dtype).eps
    return jnp.sqrt(eps) * jnp.abs(value) + ROUNDING * eps * (1 + jnp.abs(value))


def loss_error_bound(
    gradient: Float[Array, "p k"], alpha2: Scalar, decrement: Scalar | None = None
) -> Scalar:
    r"""$\|\nabla J\|_2^2 / (2\alpha_2) \ge J(\hat W) - J^*$: the inner objective is
    $\alpha_2$-strongly convex, so its excess over the minimum is at most this (a
    rigorous bound, at any point, for any solver). An orthogonal change of basis of
    the coefficients leaves it unchanged.

    With the `newton_decrement_bound` $\bar\lambda^2$ of the Newton methods'
    direction at the same point, the smaller of the two: $\lambda^2$ estimates $J -
    J^*$ from the local curvature, far more tightly at small `alpha2` (where the
    float32 gradient cannot reach $\sqrt{2\alpha_2 \cdot \mathrm{tol}}$)."""
    bound = jnp.sum(gradient**2) / (2 * alpha2)
    return bound if decrement is None else jnp.minimum(bound, decrement)


def inner_converged(
    value: Scalar,
    gradient: Float[Array, "p k"],
    scale: Float[Array, "p 1"],
    alpha2: Scalar,
    gtol: float,
    decrement: Scalar | None = None,
) -> Bool[Array, ""]:
    r"""The stopping test of the inner solve: the scaled gradient is at most `gtol`
    (`scaled_gradient_norm`) AND the loss is within `loss_tolerance` of its minimum
    by `loss_error_bound`. The gradient test alone leaves a loss error up to
    $|\nabla J|^2/(2\alpha_2)$, a sizeable part of the loss in float32 at small
    `alpha2`, so that the reduced loss depended on the warm start (see the benchmark
    page, 'The inner stopping test')."""
    small_gradient = scaled_gradient_norm(gradient, scale) <= gtol
    small_loss_error = loss_error_bound(gradient, alpha2, decrement) <= loss_tolerance(value)
    return small_gradient & small_loss_error


def scaled_gradient_norm(gradient: Float[Array, "p k"], scale: Float[Array, "p 1"]) -> Scalar:
    """The max-norm of the gradient in units of `ReadoutObjective.gradient_scale`, the
    quantity `gtol` bounds."""
    return optx.max_norm(gradient / scale)


#: The sufficient-decrease fraction $c$ of every Newton method's backtracking line
#: search (`RoundingArmijo`, `armijo_accepts`; optimistix's default), and the factor
#: each rejected trial step is shortened by.
ARMIJO_SLOPE = 0.1
BACKTRACK_FACTOR = 0.5

#: Rejected trial steps in a row (halvings of the step) after which a line search
#: has found no acceptable step and the solve ends (`UpdateBudget`, the refit): the
#: trial step is then 2^-60 (about 1e-18) of the first.
MAX_BACKTRACKS = 60


def armijo_accepts(
    value: Scalar, trial: Scalar, predicted: Scalar, slope: ArrayLike = ARMIJO_SLOPE
) -> Bool[Array, ""]:
    r"""The sufficient-decrease test of every line search here (`RoundingArmijo`, which
    the solvers of the readout losses and `LogBarrier` run, and the streaming refit's
    own loop): a step with predicted change $\nabla J^\top d \le 0$ is accepted when
    $J(y + d) - J(y) \le c\,\nabla J^\top d + \tau$, $\tau = \rho\,\varepsilon\,(1 +
    |J(y)|)$ (`ARMIJO_SLOPE` $c$ and `ROUNDING` $\rho$; see `RoundingArmijo` for why).
    A non-finite trial value (outside the objective's domain) is never accepted."""
    tolerance = ROUNDING * jnp.finfo(jnp.result_type(value)).eps * (1 + jnp.abs(value))
    return (predicted <= 0) & (trial - value <= slope * predicted + tolerance)


class RoundingArmijo(optx.AbstractSearch):
    r"""Optimistix's backtracking Armijo search, allowing for the rounding of the
    objective: a step $d$ from $y$ is accepted when

    $$J(y + d) - J(y) \le c\,\nabla J(y)^\top d + \tau, \qquad \nabla J(y)^\top d
    \le 0, \qquad \tau = \rho\,\varepsilon\,(1 + |J(y)|),$$

    with the slope $c$ of `armijo` (`ARMIJO_SLOPE`), the machine epsilon $\varepsilon$ of the
    objective's dtype and `ROUNDING` $\rho$ (16) (`armijo_accepts`). With $\tau = 0$
    this is `armijo`'s own test, which runs first and whose step sizes are kept.

    Why: the objectives are means of per-sample terms computed with cancellation
    ($\operatorname{softplus}(z) - yz$), so the rounding error of the computed $J$
    is a few $\varepsilon|J|$ for $J$ of order 1 but many $\varepsilon|J|$ for a
    small $J$, still below $\varepsilon$; $\tau$ bounds both. The Newton step $d =
    -H^{-1}g$ predicts the change $\nabla J^\top d = -\lambda^2$, $\lambda^2 = g^\top H^{-1}g \ge
    |g|^2/\lambda_{\max}(H)$. Once $\lambda^2$ is below the rounding, $J(y + d) -
    J(y)$ is rounding noise: the plain test ($\tau = 0$) rejects the step and every
    shorter one, and the solve stalls for good at $|g| \approx
    \sqrt{\varepsilon\lambda_{\max}(H)}$, above the default `gtol` of float64 for
    features of size 5-10, and far above for features of size 1e6. The figures are
    on the benchmark page, 'The rounding allowance of the line search'.

    The tolerance is safe:

    - it changes nothing while the predicted decrease is well above the rounding
        ($\lambda^2 \gg \tau$): a true decrease of about $c\lambda^2$ is still
        required;
    - an accepted step raises the objective by at most $\tau$, i.e. not
        measurably;
    - a step is accepted for it only when the whole remaining decrease, $J(y) - J^*
        \approx \lambda^2/2$ for Newton's method, is within a few roundings: deep in
        the region where the full Newton step converges quadratically ($\lambda$
        small against $\sqrt{\alpha_2}/\max_j|\hat f_j|$, the scale of the
        regularised logistic loss's generalised self-concordance), so the next
        gradient is of order $|g|^2$;
    - convergence is certified by the gradient alone (`GradientNormTermination`),
        never by this test, so a step accepted in vain cannot stop a solve early.

    It costs one dot product per trial step, no evaluation of the objective.
    """

    armijo: optx.BacktrackingArmijo = optx.BacktrackingArmijo(
        decrease_factor=BACKTRACK_FACTOR, slope=ARMIJO_SLOPE
    )

    def init(self, y, f_info_struct):
        return self.armijo.init(y, f_info_struct)

    def step(self, first_step, y, y_eval, f_info, f_eval_info, state):
        step_size, accept, result, state = self.armijo.step(
            first_step, y, y_eval, f_info, f_eval_info, state
        )
        predicted = f_info.compute_grad_dot(jtu.tree_map(jnp.subtract, y_eval, y))
        within_rounding = armijo_accepts(
            f_info.as_min(), f_eval_info.as_min(), predicted, self.armijo.slope
        )
        # After an accepted step the next search starts from the full step again.
        step_size = jnp.where(within_rounding, self.armijo.step_init, step_size)
        state = eqx.tree_at(lambda s: s.step_size, state, step_size)
        return step_size, accept | within_rounding, result, state


class DampedNewton(optx.AbstractQuasiNewton):
    """Newton's method on the exact Hessian with a backtracking Armijo line search
    that allows for the objective's rounding (`RoundingArmijo`).

    A quasi-Newton minimiser whose "Hessian update" evaluates the true Hessian at each
    accepted iterate, so the optimistix machinery (line search, descent, linear
    solver) is reused as it is. Stop it with `GradientNormTermination`: its own
    Cauchy criterion is switched off (`rtol = atol = 0`). Each optimistix step
    evaluates one point (the start, then one trial step size), so run it with
    `minimise_updates`, whose budget counts Newton updates (accepted iterates).
    """

    hessian: Callable[[PyTree[Array]], lx.AbstractLinearOperator]
    descent: optx.AbstractDescent
    search: optx.AbstractSearch = RoundingArmijo()
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


class AtArgs(eqx.Module):
    """`function(y, args)` as a function of `y` alone: the `hessian` of a
    `DampedNewton` whose Hessian depends on the data (optimistix passes it `y` only)."""

    function: Callable
    args: PyTree

    def __call__(self, y):
        return self.function(y, self.args)


class _AbstractWrappedMinimiser(optx.AbstractMinimiser):
    """An optimistix minimiser that runs another, `minimiser`, with its tolerances and
    norm; a subclass replaces the parts it changes."""

    minimiser: eqx.AbstractVar[optx.AbstractMinimiser]

    # The abstract `rtol`, `atol`, `norm` are properties here, not fields; pyright
    # counts them as constructor arguments, hence the ignores where subclasses are built.
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
        return self.minimiser.terminate(fn, y, args, options, state, tags)

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.minimiser.postprocess(fn, y, aux, args, options, state, tags, result)


class GradientNormTermination(_AbstractWrappedMinimiser):
    """Runs a quasi-Newton `minimiser` (any `optx.AbstractQuasiNewton`: `DampedNewton`,
    `optx.BFGS`, `optx.LBFGS`, ...) until `inner_converged` holds at the accepted
    iterate: the max-norm of the gradient, divided row-wise by `scale`
    (`ReadoutObjective.gradient_scale`), is at most `gtol`, and the loss is within
    `loss_tolerance` of its minimum. It replaces the minimiser's own Cauchy criterion
    (which stops on small steps, not on optimality). It checks the test at each
    accepted iterate, the start included (which may end a solve with no update); the
    budget of updates is `UpdateBudget`'s."""

    minimiser: optx.AbstractQuasiNewton
    gtol: float
    scale: Float[Array, "p 1"]
    alpha2: Scalar

    def terminate(self, fn, y, args, options, state, tags):
        # Before the first step `f_info` holds placeholders, not the gradient at `y`.
        converged = inner_converged(
            state.f_info.f,
            state.f_info.grad,
            self.scale,
            self.alpha2,
            self.gtol,
            descent_loss_error(state),
        )
        return ~state.first_step & converged, state.result


class DecrementTermination(_AbstractWrappedMinimiser):
    r"""Runs a `DampedNewton` (with `FallbackNewtonDescent`) until the Newton decrement
    at the accepted iterate is small: $\lambda^2/2 \le$ `tol`, $\lambda^2 = \nabla
    J^\top H^{-1}\nabla J$, an estimate of $J - \min J$ for a self-concordant $J$
    (Boyd and Vandenberghe, 9.5). A fallback direction (decrement `inf`) never meets
    it. The start counts too, as for `GradientNormTermination`; the budget of updates
    is `UpdateBudget`'s."""

    minimiser: DampedNewton
    tol: float

    def terminate(self, fn, y, args, options, state, tags):
        centred = state.descent_state.decrement / 2 <= self.tol
        return ~state.first_step & centred, state.result


class _BudgetState(eqx.Module):
    inner: Any
    updates: Int[Array, ""]
    # Steps since the last update (or since the start).
    stalled: Int[Array, ""]


class UpdateBudget(_AbstractWrappedMinimiser):
    r"""Runs any optimistix `minimiser` until it terminates or has taken
    `max_updates` updates: steps that move the iterate.

    An optimistix step is one evaluation of the objective, and `optx.minimise`'s
    `max_steps` counts them all: a quasi-Newton minimiser's (`DampedNewton`,
    `optx.BFGS`) first step only evaluates the start, and a rejected line-search trial
    leaves the iterate where it is, so `max_steps=1` never moved and each rejection
    took an update's place. Here steps that do not move are free; more than
    `max_backtracks` (`MAX_BACKTRACKS`) of them in a row end the solve (a line search
    that finds no acceptable step). A budget that ends the solve reports
    `optx.RESULTS.nonlinear_max_steps_reached`, unless the minimiser's own test ends
    it at the same point. The state holds the minimiser's (`inner`) and the number of
    updates (`updates`). `max_updates` may be traced (a budget left over from earlier
    solves). Use it through `minimise_updates`."""

    minimiser: optx.AbstractMinimiser
    max_updates: int | Int[Array, ""]
    max_backtracks: int = MAX_BACKTRACKS

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        inner = self.minimiser.init(fn, y, args, options, f_struct, aux_struct, tags)
        zero = jnp.zeros((), jnp.int32)
        return _BudgetState(inner, zero, zero)

    def step(self, fn, y, args, options, state, tags):
        new_y, inner, aux = self.minimiser.step(fn, y, args, options, state.inner, tags)
        moved = ~jnp.asarray(eqx.tree_equal(new_y, y))
        updates = state.updates + moved.astype(jnp.int32)
        stalled = jnp.where(moved, 0, state.stalled + 1)
        return new_y, _BudgetState(inner, updates, stalled), aux

    def terminate(self, fn, y, args, options, state, tags):
        done, result = self.minimiser.terminate(fn, y, args, options, state.inner, tags)
        spent = (state.updates >= self.max_updates) | (state.stalled > self.max_backtracks)
        result = optx.RESULTS.where(done | ~spent, result, optx.RESULTS.nonlinear_max_steps_reached)
        return done | spent, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.minimiser.postprocess(fn, y, aux, args, options, state.inner, tags, result)


def minimise_updates(
    fn: Callable[..., Scalar],
    minimiser: optx.AbstractMinimiser,
    y0: PyTree[Array],
    args: PyTree,
    *,
    max_updates: int | Int[Array, ""],
    max_backtracks: int = MAX_BACKTRACKS,
    throw: bool,
    adjoint: optx.AbstractAdjoint | None = None,
) -> optx.Solution:
    """`optx.minimise` of `fn` by `minimiser` from `y0`, with at most `max_updates`
    updates and `max_backtracks` rejected steps in a row (`UpdateBudget`);
    `solution.state.updates` is the number of updates and `solution.state.inner` the
    minimiser's final state."""
    # The budget ends the loop first; `max_steps` only bounds the optimistix loop,
    # which a checkpointed loop needs (a traced budget leaves it unbounded, for the
    # default adjoint's loop).
    max_steps = None
    if isinstance(max_updates, int):
        max_steps = (max_updates + 1) * (max_backtracks + 1)
    return optx.minimise(
        fn,
        # pyright counts the abstract `rtol`, `atol`, `norm` as constructor arguments.
        UpdateBudget(minimiser, max_updates, max_backtracks),  # pyright: ignore[reportCallIssue]
        y0,
        args,
        max_steps=max_steps,
        throw=throw,
        adjoint=optx.ImplicitAdjoint() if adjoint is None else adjoint,
    )


class _NewtonState(eqx.Module):
    newton: Float[Array, "*shape"]
    fallbacks: Int[Array, ""]
    # `newton_decrement_bound` of `newton`, or its `gᵀd` without `alpha2` (inf for a
    # fallback direction).
    decrement: Float[Array, ""]
    # CG iterations of the directions so far (0 for the Cholesky directions).
    cg_steps: Int[Array, ""]


def _initial_state(y: Float[Array, "*shape"]) -> _NewtonState:
    zero = jnp.zeros((), jnp.int32)
    return _NewtonState(y, zero, jnp.full((), jnp.inf, y.dtype), zero)


def newton_decrement_bound(
    gradient: Float[Array, "p k"],
    hessian: lx.AbstractLinearOperator,
    direction: Float[Array, "p k"],
    alpha2: Scalar,
) -> Scalar:
    r"""An upper bound of the squared Newton decrement $\lambda^2 = g^\top H^{-1} g$
    from an approximate Newton direction $d$ (Cholesky, or CG stopped early): with
    the residual $r = g - Hd$,

    $$\lambda^2 = g^\top d + d^\top r + r^\top H^{-1} r \le g^\top d + |d^\top r| +
    |r|^2/\alpha_2,$$

    as $H \succeq \alpha_2 I$. Near the minimum $J - J^* \approx \lambda^2/2$ (exact
    for a quadratic), and $J - J^* \le \lambda^2$ for a self-concordant $J$ with
    $\lambda \le 0.68$ (Boyd and Vandenberghe, 9.6.3), far tighter than the
    strong-convexity bound $|g|^2/(2\alpha_2)$ at small `alpha2`. One more product
    with the Hessian."""
    residual = gradient - hessian.mv(direction)
    return (
        jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST)
        + jnp.abs(jnp.vdot(direction, residual, precision=jax.lax.Precision.HIGHEST))
        + jnp.sum(residual**2) / alpha2
    )


def descent_loss_error(state) -> Scalar | None:
    """The Newton decrement bound an optimistix state's descent holds, if any."""
    decrement = getattr(getattr(state, "descent_state", None), "decrement", None)
    return decrement


def _is_descent(gradient, direction):
    """Whether `-direction` is a finite descent direction for `gradient`."""
    return jnp.all(jnp.isfinite(direction)) & (
        jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST) > 0
    )


def newton_direction(
    hessian: lx.AbstractLinearOperator, gradient: Float[Array, "*shape"]
) -> tuple[Float[Array, "*shape"], Bool[Array, ""]]:
    r"""The Newton direction $H^{-1}g$ by Cholesky (`jax.scipy.linalg.cho_factor`, as
    `lx.Cholesky`), with fallbacks for a Hessian that is not numerically positive
    definite (rounding of large or uneven features in float32): where the Newton
    direction is not finite or not a descent direction ($g^\top d \le 0$), the shifted
    Newton direction $(H + \delta I)^{-1}g$ with $\delta = n\,\varepsilon \max_i H_{ii}$
    for $n$ unknowns (above the rounding of the computed Hessian's eigenvalues), and
    where that fails too, the gradient step $g/\operatorname{tr} H$ (a step no longer
    than $1/L$). Returns the direction and whether it is the plain Newton direction.
    The one Cholesky solve of every Newton method here (the one-shot losses, the
    streaming refit, `LogBarrier`); `gradient` has the shape of the operator's input
    (`(p, k)` coefficients, or a flat vector)."""
    matrix = hessian.as_matrix()
    n = matrix.shape[0]
    diagonal = jnp.diag(matrix)
    shift = n * jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(diagonal))

    # The plain and the shifted factorisation are the two passes of one loop, so that
    # XLA compiles one Cholesky solve, not two (compile time); the second pass runs
    # only where the first fails. Adding a zero shift leaves the Hessian as it is.
    def retry(carry):
        tries, _, found = carry
        return ~found & (tries < 2)

    def solve(carry):
        tries, _, _ = carry
        delta = jnp.where(tries == 0, 0, shift)
        factor, lower = jax.scipy.linalg.cho_factor(matrix + delta * jnp.eye(n, dtype=matrix.dtype))
        flat = jax.scipy.linalg.cho_solve((factor, lower), gradient.reshape(-1))
        direction = flat.reshape(gradient.shape)
        return tries + 1, direction, _is_descent(gradient, direction)

    start = (jnp.zeros((), jnp.int32), jnp.zeros_like(gradient), jnp.array(False))
    tries, direction, found = jax.lax.while_loop(retry, solve, start)
    steepest = gradient / jnp.sum(jnp.abs(diagonal))
    return jnp.where(found, direction, steepest), found & (tries == 1)


class FallbackNewtonDescent(optx.AbstractDescent):
    r"""The Newton direction of `newton_direction` on the exact Hessian operator. The
    state counts the fallbacks (`InnerStats.fallback_steps`) and holds the
    `newton_decrement_bound` of the Newton direction, or with `alpha2=None` (an
    objective with no known strong convexity) its squared Newton decrement
    $\nabla J^\top H^{-1}\nabla J$ from the Cholesky direction."""

    alpha2: Scalar | None = None

    def init(self, y, f_info_struct):
        del f_info_struct
        return _initial_state(y)

    def query(self, y, f_info, state):
        gradient = f_info.grad
        newton, ok = newton_direction(f_info.hessian, gradient)
        if self.alpha2 is None:
            decrement = jnp.vdot(gradient, newton, precision=jax.lax.Precision.HIGHEST)
        else:
            decrement = newton_decrement_bound(gradient, f_info.hessian, newton, self.alpha2)
        decrement = jnp.where(ok, decrement, jnp.inf)
        fallbacks = state.fallbacks + (~ok).astype(jnp.int32)
        return _NewtonState(newton, fallbacks, decrement, state.cg_steps)

    def step(self, step_size, state):
        return -step_size * state.newton, optx.RESULTS.successful


class TruncatedNewtonDescent(optx.AbstractDescent):
    """The Newton direction from preconditioned CG (`lx.CG`) on the Hessian operator,
    stopped early (inexact Newton): at the relative residual
    `eta = min(0.5, max(sqrt(|g|), 0.5 gtol/|g|))`, superlinear far from `gtol` and no
    tighter than the last step needs (and a residual small enough for the loss test of
    `inner_converged`), or after `max_cg_steps` iterations. Any CG
    iterate is a descent direction, so the line search accepts a truncated one.

    `preconditioner(y)` gives a positive definite approximation of the inverse
    Hessian at `y`. Without one, float32 CG breaks down at small `alpha2` (the
    Hessian's condition number exceeds lineax's breakdown test); where it still
    does (a direction that is not finite or not a descent direction), the
    preconditioned gradient is used, and counted (`InnerStats.fallback_steps`)."""

    preconditioner: Callable[[Float[Array, "p k"]], lx.AbstractLinearOperator]
    gtol: float
    scale: Float[Array, "p 1"]
    alpha2: Scalar
    max_cg_steps: int

    def init(self, y, f_info_struct):
        del f_info_struct
        return _initial_state(y)

    def query(self, y, f_info, state):
        gradient = f_info.grad
        # `|g|` is scaled as in the stopping test (`ReadoutObjective.gradient_scale`).
        gradient_norm = scaled_gradient_norm(gradient, self.scale)
        preconditioner = self.preconditioner(y)
        forcing = jnp.minimum(
            0.5, jnp.maximum(jnp.sqrt(gradient_norm), 0.5 * self.gtol / gradient_norm)
        )
        # `atol` makes lineax's elementwise test a max-norm one (no division by tiny
        # gradient entries); it is also small enough that the residual's share
        # `|r|^2/alpha2` of `newton_decrement_bound` meets `loss_tolerance`.
        loss_atol = jnp.sqrt(self.alpha2 * loss_tolerance(f_info.f) / gradient.size)
        atol = jnp.minimum(forcing * optx.max_norm(gradient), 0.5 * loss_atol)
        options = {"preconditioner": preconditioner}

        def solve(max_steps):
            # lineax annotates the tolerances as floats; traced scalars work the same.
            cg = lx.CG(rtol=forcing, atol=atol, max_steps=max_steps)  # pyright: ignore[reportArgumentType]
            # A truncated solve is a valid step here, so CG's `max_steps_reached` is
            # not an error.
            solution = lx.linear_solve(f_info.hessian, gradient, cg, options=options, throw=False)
            return solution.value, solution.stats["num_steps"]

        # Once the gradient test holds and only the loss test is left, the residual
        # must be small against `alpha2`: allow ten times the CG iterations.
        polish = gradient_norm <= self.gtol
        newton, cg_steps = jax.lax.cond(
            polish,
            lambda: solve(10 * self.max_cg_steps),
            lambda: solve(self.max_cg_steps),
        )
        ok = _is_descent(gradient, newton)
        newton = jnp.where(ok, newton, preconditioner.mv(gradient))
        decrement = newton_decrement_bound(gradient, f_info.hessian, newton, self.alpha2)
        decrement = jnp.where(ok, decrement, jnp.inf)
        fallbacks = state.fallbacks + (~ok).astype(jnp.int32)
        cg_steps = state.cg_steps + cg_steps.astype(jnp.int32)
        return _NewtonState(newton, fallbacks, decrement, cg_steps)

    def step(self, step_size, state):
        return -step_size * state.newton, optx.RESULTS.successful


#: Step halvings of `BudgetedTruncatedNewton`'s line search at most: past them its step is
#: 2^-20 (about 1e-6) of the full one, and the solve ends as a failed line search.
BUDGETED_BACKTRACKS = 20


class _BudgetedState(eqx.Module):
    value: Scalar
    gradient: PyTree[Array]
    converged: Bool[Array, ""]
    # The last line search found no acceptable step.
    stuck: Bool[Array, ""]
    fallbacks: Int[Array, ""]
    cg_steps: Int[Array, ""]


class BudgetedTruncatedNewton(optx.AbstractMinimiser):
    r"""Newton–CG in a fixed budget of work: each optimistix step is one whole update,
    so that a solve of `max_updates` steps (`minimise_updates`) does a known amount
    of work, with few and large operations (the training loop's inner solve, where a
    solve's fixed costs, not its arithmetic, set its time).

    A step at $y$ with gradient $g$ (kept from the previous step: one evaluation of the
    objective and its gradient per accepted point):

    1. the direction $d = Lu$ from at most `max_cg_steps` iterations of CG (`lx.CG`)
        on $L^\top HL\,u = L^\top g$, with the Hessian operator `hessian(y)` and the
        factor `(L, Lᵀ) = preconditioner(y)` of an approximate inverse Hessian
        $LL^\top$ (CG preconditioned by $LL^\top$, with its stopping test in the
        preconditioned coordinates), stopped at the
        relative residual $\min(0.5, \|g\|_s)$ ($\|g\|_s$ the scaled gradient
        norm); any CG iterate is a descent direction, so a truncated one is a step.
        Where rounding makes it unusable (not finite, or $g^\top d \le 0$), the Cauchy
        step $d = g\,g^\top g / g^\top Hg$ replaces it (counted as a fallback);
    2. a backtracking line search from the full step, $y - td$ with $t = 1, 1/2,
        \dots$, accepted by `armijo_accepts` (which allows for the objective's
        rounding), at most `BUDGETED_BACKTRACKS` halvings: one evaluation of the
        objective per trial. A search that accepts nothing, or only a step below the
        rounding of $y$, ends the solve (`stuck`): the rounding floor, or a start
        outside the objective's domain.

    It stops early once `inner_converged` holds without a Newton decrement (the scaled
    gradient within `gtol` and the strong-convexity bound $\|g\|^2/(2\alpha_2)$ within
    the loss tolerance), the start included. Unlike `DampedNewton` it never computes a
    direction it does not take, and it does no Kronecker or Gram set-up.
    """

    hessian: Callable[[PyTree[Array]], lx.AbstractLinearOperator]
    preconditioner: Callable[[PyTree[Array]], tuple[Callable, Callable]]
    gtol: float
    scale: Float[Array, "p 1"]
    alpha2: Scalar
    max_cg_steps: int
    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable[[PyTree], Scalar] = optx.max_norm

    def _evaluate(self, fn, y, args):
        (value, aux), gradient = jax.value_and_grad(lambda z: fn(z, args), has_aux=True)(y)
        converged = inner_converged(value, gradient, self.scale, self.alpha2, self.gtol)
        return value, gradient, aux, converged

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        value, gradient, _, converged = self._evaluate(fn, y, args)
        zero = jnp.zeros((), jnp.int32)
        return _BudgetedState(value, gradient, converged, jnp.array(False), zero, zero)

    def step(self, fn, y, args, options, state, tags):
        gradient = state.gradient
        operator = self.hessian(y)
        factor, factor_transpose = self.preconditioner(y)
        # CG on LᵀHL: its stopping test then measures the residual in the
        # preconditioner's coordinates, where no direction dwarfs the others.
        scaled = lx.FunctionLinearOperator(
            lambda u: factor_transpose(operator.mv(factor(u))),
            jax.ShapeDtypeStruct(y.shape, y.dtype),
            lx.positive_semidefinite_tag,
        )
        rhs = factor_transpose(gradient)
        # The forcing term |g| (quadratic convergence near the optimum; Eisenstat and
        # Walker's choice 1): a budget is for the whole of its CG iterations far from it.
        forcing = jnp.minimum(0.5, scaled_gradient_norm(gradient, self.scale))
        # `atol` makes lineax's elementwise test a max-norm one: without it, an entry of
        # the gradient that is exactly zero (a basis's last column) ends CG at once.
        atol = forcing * optx.max_norm(rhs)
        # lineax annotates the tolerances as floats; traced scalars work the same.
        cg = lx.CG(rtol=forcing, atol=atol, max_steps=self.max_cg_steps)  # pyright: ignore[reportArgumentType]
        # A truncated CG solve is a valid step here, so `max_steps_reached` is no error.
        solution = lx.linear_solve(scaled, rhs, cg, throw=False)
        newton = factor(solution.value)
        ok = _is_descent(gradient, newton)

        def cauchy():
            highest = jax.lax.Precision.HIGHEST
            curvature = jnp.vdot(gradient, operator.mv(gradient), precision=highest)
            return gradient * (jnp.vdot(gradient, gradient, precision=highest) / curvature)

        direction = jax.lax.cond(ok, lambda: newton, cauchy)
        predicted = -jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST)
        trial = lambda t: fn(y - t * direction, args)[0]

        def rejected(carry):
            t, value, halvings = carry
            accepted = armijo_accepts(state.value, value, t * predicted)
            return ~accepted & (halvings < BUDGETED_BACKTRACKS)

        def halve(carry):
            t, _, halvings = carry
            t = t * BACKTRACK_FACTOR
            return t, trial(t), halvings + 1

        # The loop's first pass evaluates the full step (one copy of the objective in
        # the compiled loop, not two).
        before = jnp.asarray(1 / BACKTRACK_FACTOR, state.value.dtype)
        infinite = jnp.full((), jnp.inf, state.value.dtype)
        t, value, _ = jax.lax.while_loop(rejected, halve, (before, infinite, -1))
        accepted = armijo_accepts(state.value, value, t * predicted)
        new_y = jnp.where(accepted, y - t * direction, y)
        # A step below the rounding of `y` is no progress either (the rounding floor).
        accepted = accepted & ~jnp.array_equal(new_y, y)
        value, gradient, aux, converged = self._evaluate(fn, new_y, args)
        new_state = _BudgetedState(
            value,
            gradient,
            converged,
            ~accepted,
            state.fallbacks + (~ok).astype(jnp.int32),
            state.cg_steps + solution.stats["num_steps"].astype(jnp.int32),
        )
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        return state.converged | state.stuck, optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}
