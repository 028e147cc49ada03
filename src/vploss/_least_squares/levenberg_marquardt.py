import math
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Real, Scalar, Shaped

from .._core.checks import (
    as_alpha,
    as_batch,
    as_flag,
    as_targets,
    as_weights,
    batch_size,
    concrete_value,
    drop_zero_weight_samples,
)
from .._core.numerics import all_finite, matmul
from .._core.penalty import as_penalty
from .._core.readout import readout_from_coefficients, VPLinear
from .._core.stats import AbstractStats, RESULTS
from .._ridge.gcv import GCVStats
from .reduced import (
    dense_jacobian,
    JacobianName,
    Linearisation,
    linearise,
    ravel,
    reduced_residual,
    ReducedProblem,
)


DampedSystemName: TypeAlias = Literal["auto", "primal", "dual", "cg"]
Termination: TypeAlias = Literal[
    "loss", "gradient", "step", "reduction", "no_reduction", "max_steps", "callback", "validation"
]

#: Dense Jacobians larger than this many entries make `"auto"` choose the matrix-free
#: form (2**26 float64 entries: 512 MiB).
_DENSE_ENTRIES = 2**26


class LeastSquaresStats(AbstractStats):
    r"""How `vploss.least_squares` ended.

    - `result`: `vploss.RESULTS.successful` when a stopping test fired (every
        `termination` but `"max_steps"`), else `nonlinear_max_steps_reached`.
    - `termination`: the test that stopped it: `"loss"` (loss $\le$ `atol`),
        `"gradient"` ($\|\nabla L\|_\infty \le$ `gtol`), `"step"` (an accepted step
        $\|\delta\| \le$ `rtol` $(\|\theta\| +$ `rtol`$)$), `"reduction"` (an accepted
        step's actual and predicted relative reductions of the loss both $\le$ `rtol`),
        `"no_reduction"` (the damping grew past $10^{16}$ times its scale: no step
        reduces the loss at this precision), `"max_steps"`, `"callback"` or
        `"validation"`.
    - `num_steps`, `num_accepted`: steps tried and accepted.
    - `loss`: the final reduced loss $L = \frac12\|r\|^2$; `gradient_norm`: the max
        norm of its gradient; `damping`: the final damping $\lambda$; `alpha2`: the
        readout penalty at the end (the one GCV chose, with `alpha2="gcv"`).
    """

    result: RESULTS
    num_steps: Int[Array, ""]
    num_accepted: Int[Array, ""]
    loss: Float[Array, ""]
    gradient_norm: Float[Array, ""]
    damping: Float[Array, ""]
    alpha2: Float[Array, ""]
    termination: Termination = eqx.field(static=True)


class LeastSquaresProgress(eqx.Module):
    r"""What a `callback` of `vploss.least_squares` receives after every step: the step
    number (from 1), the loss at the current point, the damping for the next step,
    whether this step was accepted, whether it used the geodesic acceleration, the
    gradient's max norm and the step's length, and the current `model` and fitted
    `readout` (a `VPLinear`)."""

    step: int
    loss: float
    damping: float
    accepted: bool
    accelerated: bool
    gradient_norm: float
    step_norm: float
    model: Any
    readout: VPLinear


class LeastSquaresSolution(eqx.Module):
    """The result of `vploss.least_squares`: the trained `model`, the `readout` fitted
    to it (a `VPLinear`, as `vploss_msereg` of that model returns), and `stats`
    (`LeastSquaresStats`)."""

    model: Any
    readout: VPLinear
    stats: LeastSquaresStats


class _Proposal(eqx.Module):
    params: Float[Array, " P"]
    loss: Float[Array, ""]
    predicted: Float[Array, ""]  # the Gauss–Newton model's reduction of the loss
    step_norm: Float[Array, ""]
    accelerated: Bool[Array, ""]


class _Point(eqx.Module):
    """The loss, its gradient and the readout at the current point, with what the dense
    forms keep across rejected steps."""

    params: Float[Array, " P"]
    residual: Float[Array, " R"]
    loss: Float[Array, ""]
    gradient: Float[Array, " P"]
    gradient_max: Float[Array, ""]  # its max norm
    params_norm: Float[Array, ""]
    coef: Float[Array, "p k"]
    alpha2: Float[Array, ""]
    damping_scale: Float[Array, ""]
    gcv_stats: GCVStats | None
    jacobian: Float[Array, "R P"] | None
    gram: Float[Array, "n n"] | None  # JᵀJ (primal) or JJᵀ (dual)


class VarProLevenbergMarquardt(eqx.Module):
    r"""Levenberg–Marquardt on the reduced residual of the ridge loss: variable
    projection (Golub and Pereyra, 1973) trained by a second-order method, with the
    readout solved exactly at every point.

    At the parameters $\theta$ the readout $c(\theta)$ minimises the ridge objective of
    `vploss_msereg`, and the reduced residual $r(\theta)$ (that of
    `vpresidual_msereg`, whose $\frac12\|r\|^2$ is the loss) is linearised by its
    Jacobian $J$. A step solves the damped problem

    $$\delta = \operatorname{argmin}_\delta \|J\delta + r\|^2 + \lambda\|\delta\|^2,$$

    in the **primal** form $(J^\top J + \lambda I)\delta = -J^\top r$ ($P \times P$,
    for $P$ parameters) or the **dual** form $\delta = -J^\top(JJ^\top + \lambda I)^{-1}r$
    ($R \times R$, for $R$ residual entries), whichever is smaller, each by a Cholesky
    factorisation (lineax); or **matrix-free** by conjugate gradients on the primal form
    with products $Jv$, $J^\top u$ only, when the dense Jacobian would not fit. The
    damping follows Nielsen's rule (1999) on the gain ratio $\rho$ of actual to predicted
    reduction: an accepted step ($\rho > 0$) multiplies $\lambda$ by $\max(1/3, 1 -
    (2\rho - 1)^3)$, a rejected one by $\nu$ (then $\nu \leftarrow 2\nu$); the first is
    `initial_damping` times the curvature of the model along the gradient $g = J^\top
    r$, $\|Jg\|^2/\|g\|^2$. With `geodesic_acceleration` (Transtrum and Sethna, 2012)
    the step becomes $\delta + \frac12 a$, $a$ the damped solution for the residual's
    second directional derivative $r''[\delta, \delta] \approx 2(r(\theta + \delta) -
    r - J\delta)$ (from the trial point the step evaluates anyway), when $2\|a\| \le$
    `acceleration_ratio` $\|\delta\|$ and it lowers the loss further.

    **The Jacobian** (`jacobian`), from the structure of the problem: with the centred
    design $Z$ (features, `N + 1` rows), its thin SVD, the readout $c$, the data
    residual $\rho$ and, for a direction $v$, the features' tangent $\dot Z$ and $a =
    \dot Zc$:

    - `"kaufman"` (default): Kaufman's (1975) Jacobian, $J \approx [a + Z\dot c;
        \sqrt\alpha\,\dot c]$ with $\dot c = -H^{-1}Z^\top a$: the term of the
        readout's derivative proportional to the residual, $\dot Z^\top\rho$, is
        dropped. It gives the exact gradient $J^\top r$ and the exact Jacobian where the
        residual vanishes, and costs $k$ reverse passes of one sample per sample.
    - `"golub_pereyra"`: the exact Jacobian of the reduced residual, with $\dot c =
        -H^{-1}(Z^\top\dot Zc + \dot Z^\top\rho)$. The extra term costs $pk$ reverse
        passes over the whole batch ($p$ readout coefficients): about $p$ times
        Kaufman's, for steps that were not better per second on the benchmarks.

    The dense forms assemble $J$ from per-sample gradients; the matrix-free form uses
    one forward and one reverse pass over the batch per product. A dense step costs
    one Jacobian, one Gram matrix ($RP\min(P, R)$ flops), one Cholesky factorisation
    and two or three evaluations of the residual (each a forward pass and a thin SVD of
    the design); a rejected step keeps the Jacobian and its Gram matrix.

    **Arguments:**

    - `jacobian`: `"kaufman"` (default) or `"golub_pereyra"`.
    - `linear_solver`: the damped system's form: `"auto"` (the smaller dense form, or
        `"cg"` past $2^{26}$ Jacobian entries), `"primal"`, `"dual"` or `"cg"`.
    - `geodesic_acceleration`, `acceleration_ratio`: as above.
    - `initial_damping`: $\tau$ of the first damping $\tau\|Jg\|^2/\|g\|^2$ ($g = J^\top r$).
    - `rtol`: the relative tolerance of the step and reduction tests (default
        $\sqrt\varepsilon$ of the working dtype).
    - `atol`: stop when the loss is at most this (default 0, off).
    - `gtol`: stop when the gradient's max norm is at most this (default 0, off).
    - `cg_rtol`, `cg_max_steps`: the conjugate-gradient solves of `"cg"`.
    """

    jacobian: JacobianName | str = eqx.field(static=True, default="kaufman")
    linear_solver: DampedSystemName | str = eqx.field(static=True, default="auto")
    geodesic_acceleration: bool = eqx.field(static=True, default=True)
    acceleration_ratio: float = eqx.field(static=True, default=0.75)
    initial_damping: float = eqx.field(static=True, default=1e-3)
    rtol: float | None = eqx.field(static=True, default=None)
    atol: float = eqx.field(static=True, default=0.0)
    gtol: float = eqx.field(static=True, default=0.0)
    cg_rtol: float = eqx.field(static=True, default=1e-8)
    cg_max_steps: int = eqx.field(static=True, default=500)

    def __check_init__(self):
        if self.jacobian not in ("golub_pereyra", "kaufman"):
            raise ValueError(
                f"`jacobian` must be 'golub_pereyra' or 'kaufman'; got {self.jacobian!r}."
            )
        if self.linear_solver not in ("auto", "primal", "dual", "cg"):
            raise ValueError(
                "`linear_solver` must be 'auto', 'primal', 'dual' or 'cg'; got "
                f"{self.linear_solver!r}."
            )
        for name in ("acceleration_ratio", "initial_damping", "cg_rtol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0; got {getattr(self, name)!r}.")
        for name in ("atol", "gtol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")
        if self.rtol is not None and not self.rtol >= 0:
            raise ValueError(f"`rtol` must be >= 0 or None; got {self.rtol!r}.")
        if not (isinstance(self.cg_max_steps, int) and self.cg_max_steps > 0):
            raise ValueError(f"`cg_max_steps` must be a positive int; got {self.cg_max_steps!r}.")

    def form(self, num_residuals: int, num_params: int) -> Literal["primal", "dual", "cg"]:
        """The damped system's form for a Jacobian of shape `(num_residuals, num_params)`."""
        if self.linear_solver in ("primal", "dual", "cg"):
            return self.linear_solver  # pyright: ignore[reportReturnType]
        if num_residuals * num_params > _DENSE_ENTRIES:
            return "cg"
        return "primal" if num_params <= num_residuals else "dual"


def _point(
    solver: VarProLevenbergMarquardt, problem: ReducedProblem, params: Array
) -> tuple[_Point, Linearisation]:
    """The linearisation at `params`, with the dense Jacobian and its Gram matrix in the
    form the shapes call for (known when tracing)."""
    lin, gcv_stats = linearise(problem, params, solver.jacobian)
    form = solver.form(lin.residual.size, params.size)
    if form == "cg":
        jacobian = gram = None
        gradient = lin.rmv(lin.residual)
        mv = lin.mv
    else:
        jacobian = dense_jacobian(problem, lin)
        gram = matmul(jacobian.T, jacobian) if form == "primal" else matmul(jacobian, jacobian.T)
        gradient = matmul(jacobian.T, lin.residual)
        mv = lambda v: matmul(jacobian, v)  # noqa: E731
    point = _Point(
        params,
        lin.residual,
        0.5 * jnp.sum(lin.residual**2),
        gradient,
        jnp.max(jnp.abs(gradient)),
        jnp.linalg.norm(params),
        lin.coef,
        lin.alpha2,
        _damping_scale(gradient, mv),
        gcv_stats,
        jacobian,
        gram,
    )
    return point, lin


def _damping_scale(gradient: Array, mv: Callable[[Array], Array]) -> Scalar:
    r"""The scale of the damping: the curvature $g^\top J^\top Jg/g^\top g$ of the
    Gauss–Newton model along the gradient $g$ (the same for every form of the damped
    system, and one product for the matrix-free one)."""
    norm = jnp.linalg.norm(gradient)
    direction = gradient / jnp.where(norm > 0, norm, 1)
    return jnp.sum(mv(direction) ** 2)


def _propose(
    solver: VarProLevenbergMarquardt,
    problem: ReducedProblem,
    point: _Point,
    mv: Callable[[Array], Array],
    damped_solve: Callable[[Array], Array],
) -> _Proposal:
    r"""The step from `point`: `damped_solve(e)` is $\operatorname{argmin}_\delta
    \|J\delta + e\|^2 + \lambda\|\delta\|^2$, `mv` is $v \mapsto Jv$."""
    params, residual = point.params, point.residual

    def loss_at(p):
        trial, _ = reduced_residual(problem, p, point.alpha2)
        loss = 0.5 * jnp.sum(trial**2)
        return trial, jnp.where(jnp.isfinite(loss), loss, jnp.inf)

    def model_loss(step):
        return 0.5 * jnp.sum((residual + mv(step)) ** 2)

    velocity = damped_solve(residual)
    trial, trial_loss = loss_at(params + velocity)
    step, loss, accelerated = velocity, trial_loss, jnp.asarray(False)
    if solver.geodesic_acceleration:
        # r''[v, v] by the second difference through the trial point (h = 1).
        curvature = 2 * (trial - residual - mv(velocity))
        acceleration = damped_solve(curvature)
        ratio = 2 * jnp.linalg.norm(acceleration) / jnp.linalg.norm(velocity)
        usable = (ratio <= solver.acceleration_ratio) & jnp.isfinite(trial_loss)
        accelerated_step = velocity + 0.5 * acceleration
        accelerated_loss = jax.lax.cond(
            usable,
            lambda: loss_at(params + accelerated_step)[1],
            lambda: jnp.asarray(jnp.inf, trial_loss.dtype),
        )
        accelerated = usable & (accelerated_loss < trial_loss)
        step = jnp.where(accelerated, accelerated_step, velocity)
        loss = jnp.where(accelerated, accelerated_loss, trial_loss)
    # The gain ratio compares with the velocity's predicted reduction (Transtrum and
    # Sethna): the acceleration is a correction the linear model does not see.
    predicted = point.loss - model_loss(velocity)
    return _Proposal(params + step, loss, predicted, jnp.linalg.norm(step), accelerated)


def _cholesky_solver(matrix: Array, damping: Scalar) -> Callable[[Array], Array]:
    """`b ↦ (matrix + damping I)⁻¹ b`, one Cholesky factorisation (lineax) for all."""
    shifted = matrix + damping * jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    operator = lx.MatrixLinearOperator(shifted, lx.positive_semidefinite_tag)
    cholesky = lx.Cholesky()
    state = cholesky.init(operator, {})
    return lambda b: cholesky.compute(state, b, {})[0]


@eqx.filter_jit
def _start(solver, problem, params):
    return _point(solver, problem, params)[0]


@eqx.filter_jit
def _step(solver, problem, point: _Point, damping):
    """A proposed step from `point`. The dense forms reuse its Jacobian and Gram matrix
    (kept across rejected steps); the matrix-free form linearises again."""
    form = solver.form(point.residual.size, point.params.size)
    if form == "cg":
        _, lin = _point(solver, problem, point.params)
        operator = lx.FunctionLinearOperator(
            lambda v: lin.rmv(lin.mv(v)) + damping * v,
            jax.ShapeDtypeStruct(point.params.shape, point.params.dtype),
            lx.positive_semidefinite_tag,
        )
        cg = lx.CG(rtol=solver.cg_rtol, atol=0.0, max_steps=solver.cg_max_steps)

        def damped_solve(e):
            return lx.linear_solve(operator, -lin.rmv(e), cg, throw=False).value

        return _propose(solver, problem, point, lin.mv, damped_solve)
    jacobian, gram = point.jacobian, point.gram
    assert jacobian is not None and gram is not None
    solve = _cholesky_solver(gram, damping)
    if form == "primal":
        damped_solve = lambda e: -solve(matmul(jacobian.T, e))  # noqa: E731
    else:
        damped_solve = lambda e: -matmul(jacobian.T, solve(e))  # noqa: E731
    return _propose(solver, problem, point, lambda v: matmul(jacobian, v), damped_solve)


def _problem(
    model: Any,
    x: Any,
    y: Any,
    alpha1: Any,
    alpha2: Any,
    use_bias: Any,
    weights: Any,
) -> tuple[ReducedProblem, Array]:
    what = "`least_squares`"
    x = as_batch("x", x)
    num_samples = batch_size(x)
    targets, scalar_output = as_targets("y", y, num_samples)
    weights, weight_errors = as_weights(weights, num_samples, what=what)
    for failed, message in weight_errors:
        if bool(failed):
            raise ValueError(message)
    weights, x, targets = drop_zero_weight_samples(weights, x, targets)
    use_bias = as_flag("use_bias", use_bias)
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    rule_or_penalty = as_penalty(alpha2, ("gcv", "rounding"), positive=False)
    for name, value in (("x", x), ("y", targets)):
        if not bool(all_finite(value)):
            raise ValueError(f"`{name}` of {what} is not finite: it contains NaN or inf.")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = ravel(params)
    if flat.size == 0:
        raise ValueError(
            f"The model given to {what} has no trainable parameters (no inexact-array "
            "leaves): there is nothing to train. Pass the feature map whose parameters "
            "are to be fitted."
        )
    penalty = None if rule_or_penalty == "gcv" else rule_or_penalty
    problem = ReducedProblem(
        static,
        x,
        targets,
        weights,
        alpha1,
        None if isinstance(penalty, str) else penalty,
        unravel,
        use_bias,
        scalar_output,
        isinstance(penalty, str) or penalty is None or concrete_value(penalty) != 0,
        concrete_value(alpha1) != 0,
    )
    if penalty == "rounding":
        problem = eqx.tree_at(
            lambda p: p.alpha2,
            problem,
            _rounding_penalty(problem, flat),
            is_leaf=lambda a: a is None,
        )
    return problem, flat


#: The "rounding" penalty, in units of eps times the largest squared singular value.
_ROUNDING_PENALTY = 10


@eqx.filter_jit
def _rounding_penalty(problem: ReducedProblem, params: Array) -> Scalar:
    r"""$10\,\varepsilon\,s_{\max}^2$ of the design at `params`: the rounding level of
    its Gram matrix $Z^\top Z$, the smallest penalty that keeps $H$ invertible and the
    reduced loss smooth as features become collinear."""
    design, _ = problem.design(params)
    largest = jnp.linalg.norm(design, ord=2)
    return _ROUNDING_PENALTY * jnp.finfo(design.dtype).eps * largest**2


_NU_START = 2.0
#: Past this damping (times its scale) no step can change the loss at this precision.
_DAMPING_LIMIT = 1e16


def least_squares(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    solver: VarProLevenbergMarquardt | None = None,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike | str = "rounding",
    use_bias: bool = True,
    weights: Real[ArrayLike, " _N"] | None = None,
    max_steps: int = 100,
    callback: Callable[[LeastSquaresProgress], Any] | None = None,
    validation: Callable[[Any, VPLinear], ArrayLike] | None = None,
    patience: int = 10,
) -> LeastSquaresSolution:
    r"""Trains `model` by second-order variable projection: minimises the reduced ridge
    loss $L(\theta) = \frac12\|r(\theta)\|^2$ of `vpresidual_msereg` over the model's
    parameters with `solver` (a `VarProLevenbergMarquardt`), the readout solved
    exactly at every point.

    ```python
    solution = vploss.least_squares(model, x, y, max_steps=200)
    prediction = jax.vmap(solution.readout)(jax.vmap(solution.model)(x_test))
    ```

    The loop runs in Python over compiled steps (one compilation per problem shape),
    so that `callback` and `validation` are plain Python. It stops at the first of
    `solver`'s tests (see `LeastSquaresStats.termination`), `max_steps`, a `callback`
    returning true, or `validation` failing to improve for `patience` accepted steps.

    **The penalty** (`alpha2`, held fixed within a step, so that the acceptance test
    compares losses of one objective):

    - `"rounding"` (default): $\alpha_2 = 10\,\varepsilon\,s_{\max}^2$, with $s_{\max}$
        the largest singular value of the (weighted, centred) features at the initial
        parameters: the rounding level of their Gram matrix, fixed for the solve. It
        keeps the reduced loss smooth and its derivative exact when features become
        nearly collinear, which they do as the fit improves, and is far below any
        accuracy the features reach.
    - `0`: the least-squares readout (the pseudo-inverse through the SVD, small singular
        values cut). Where the cut-off binds, the reduced loss has kinks and its
        derivative misses the cut directions: the iteration stalls at a point whose
        gradient is not small.
    - a number: a fixed penalty caps the relative error near
        $\sqrt{\alpha_2}\|\hat W\|/\mathrm{rms}(y)$, where training starts trading the
        fit for a smaller readout; for noisy targets, with early stopping
        (`validation`).
    - `"gcv"`: chosen by generalised cross-validation at every new point; on noiseless
        targets it chooses penalties that level the error off early.

    **Arguments:**

    - `model`, `x`, `y`, `alpha1`, `use_bias`, `weights`: as `vploss_msereg` (the model
        maps one sample to its features).
    - `alpha2`: `"rounding"` (default), a number $\ge 0$ or `"gcv"`.
    - `solver`: a `VarProLevenbergMarquardt` (default: `VarProLevenbergMarquardt()`).
    - `max_steps`: the most steps (accepted or rejected).
    - `callback`: called after every step with a `LeastSquaresProgress`; a true return
        value stops the solve (`termination="callback"`).
    - `validation`: `validation(model, readout)`, a number to minimise (e.g. the error
        on held-out data), evaluated after every accepted step; the solve returns the
        model and readout of its best value and stops after `patience` accepted steps
        without improvement (`termination="validation"`).

    **Returns:** a `LeastSquaresSolution`: `model`, `readout` and `stats`.

    **Raises:** `ValueError` for a model without trainable parameters, mismatched
    shapes, non-finite `x`, `y` or weights, and a non-finite residual or Jacobian at an
    accepted point (the model's output overflowed); a trial step with a non-finite
    loss is rejected, never taken.
    """
    if solver is None:
        solver = VarProLevenbergMarquardt()
    if not isinstance(solver, VarProLevenbergMarquardt):
        raise TypeError(
            f"`solver` must be a `vploss.VarProLevenbergMarquardt`; got {type(solver).__name__}."
        )
    if not (isinstance(max_steps, int) and max_steps >= 0):
        raise ValueError(f"`max_steps` must be an int >= 0; got {max_steps!r}.")
    if not (isinstance(patience, int) and patience > 0):
        raise ValueError(f"`patience` must be a positive int; got {patience!r}.")
    problem, params = _problem(model, x, y, alpha1, alpha2, use_bias, weights)

    start = lambda p: _start(solver, problem, p)  # noqa: E731
    point = _checked(start(params), 0)
    dtype = point.residual.dtype
    params = params.astype(dtype)
    rtol = math.sqrt(float(jnp.finfo(dtype).eps)) if solver.rtol is None else solver.rtol
    damping = solver.initial_damping * float(point.damping_scale)
    damping_floor = float(jnp.finfo(dtype).eps) * float(point.damping_scale)
    nu = _NU_START
    num_accepted = 0
    best = None
    best_value = np.inf
    since_best = 0
    termination: Termination = "max_steps"
    step = 0

    current = lambda point: _model_and_readout(problem, point)  # noqa: E731

    first = _first_stop(point, solver)
    if first is not None:
        termination = first
    for step in range(1, max_steps + 1) if first is None else ():
        proposal = _step(solver, problem, point, jnp.asarray(damping, dtype))
        loss_old = float(point.loss)
        new_loss = float(proposal.loss)
        predicted = float(proposal.predicted)
        gain = (loss_old - new_loss) / predicted if predicted > 0 else -1.0
        accepted = np.isfinite(new_loss) and new_loss < loss_old and gain > 0
        if accepted:
            num_accepted += 1
            step_norm = float(proposal.step_norm)
            point = _checked(start(proposal.params), step)
            damping = max(damping * max(1 / 3, 1 - (2 * gain - 1) ** 3), damping_floor)
            nu = _NU_START
        else:
            step_norm = 0.0
            damping *= nu
            nu *= 2
        model_now, readout_now = current(point)
        if callback is not None:
            progress = LeastSquaresProgress(
                step,
                float(point.loss),
                damping,
                bool(accepted),
                bool(proposal.accelerated) and bool(accepted),
                float(point.gradient_max),
                step_norm,
                model_now,
                readout_now,
            )
            if callback(progress):
                termination = "callback"
                break
        if accepted and validation is not None:
            value = float(jnp.asarray(validation(model_now, readout_now)))
            if value < best_value:
                best, best_value, since_best = (model_now, readout_now), value, 0
            else:
                since_best += 1
                if since_best >= patience:
                    termination = "validation"
                    break
        if accepted:
            reason = _first_stop(point, solver)
            if reason is None and step_norm <= rtol * (float(point.params_norm) + rtol):
                reason = "step"
            if (
                reason is None
                and loss_old - float(point.loss) <= rtol * loss_old
                and predicted <= rtol * loss_old
            ):
                reason = "reduction"
            if reason is not None:
                termination = reason
                break
        elif damping > _DAMPING_LIMIT * float(point.damping_scale):
            termination = "no_reduction"
            break
    if best is not None:
        model_out, readout_out = best
    else:
        model_out, readout_out = current(point)
    failed = termination == "max_steps"
    result = RESULTS.nonlinear_max_steps_reached if failed else RESULTS.successful
    stats = LeastSquaresStats(
        result,
        jnp.asarray(step),
        jnp.asarray(num_accepted),
        point.loss,
        point.gradient_max,
        jnp.asarray(damping, dtype),
        point.alpha2,
        termination,
    )
    return LeastSquaresSolution(model_out, readout_out, stats)


@eqx.filter_jit
def _model_and_readout(problem: ReducedProblem, point: _Point) -> tuple[Any, VPLinear]:
    """The model at the point and its fitted readout (compiled: the loop's only other
    work on arrays)."""
    readout = readout_from_coefficients(
        point.coef, problem.use_bias, problem.scalar_output, point.gcv_stats
    )
    return problem.model(point.params), readout


def _first_stop(point: _Point, solver: VarProLevenbergMarquardt) -> Termination | None:
    if float(point.loss) <= solver.atol:
        return "loss"
    if float(point.gradient_max) <= solver.gtol:
        return "gradient"
    return None


def _checked(point: _Point, step: int) -> _Point:
    if not bool(all_finite((point.residual, point.gradient))):
        where = "the initial parameters" if step == 0 else f"step {step}"
        raise ValueError(
            f"The reduced residual or its Jacobian is not finite at {where} of "
            "`least_squares`: the model's features or their derivatives overflowed or are "
            "NaN there. Check the model's initialisation and the scale of `x`."
        )
    return point
