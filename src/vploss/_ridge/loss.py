from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree, Real, Scalar, Shaped

from .._core.checks import (
    as_alpha,
    as_batch,
    as_flag,
    as_targets,
    as_weights,
    batch_size,
    concrete_value,
    drop_zero_weight_samples,
    RuntimeChecks,
)
from .._core.envelope import AbstractInnerSolver, envelope_minimise, Objective, partial_jvp, Tangent
from .._core.features import parameter_penalty, readout_features
from .._core.numerics import matmul, row_mean
from .._core.penalty import as_penalty, is_penalty_rule
from .._core.readout import readout_from_coefficients, VPLinear
from .gcv import gcv_penalty, GCVStats
from .intercept import centre
from .lstsq import (
    AbstractLstsqMethod,
    AbstractRidgeSolver,
    AutoRidge,
    centred_problem,
    CholeskyRidge,
    DualRidge,
    ridge_lstsq,
    SVDRidge,
)


RidgeArgs: TypeAlias = tuple[
    Float[Array, "N p"], Float[Array, "N k"], Scalar, Float[Array, " N"] | None
]

#: Default readout penalty of `vploss_msereg`; see its docstring for the reasoning.
DEFAULT_RIDGE_ALPHA2 = 1e-6


class RidgeObjective(eqx.Module):
    r"""$J(\hat W; \hat F, Y, \alpha_2, w) = \frac{1}{2S}\sum_j w_j\|\hat W\hat f_j -
    y_j\|^2 + \frac{\alpha_2}{2}\|\hat W\|_F^2$, with `coef` $= \hat W^\top$ and $S =
    \sum_j w_j$; without weights ($w$ `None`) $w_j = 1$, $S = N$.

    With an intercept (the last column of $\hat F$ is ones) the residual is evaluated
    as $(F - \mathbf 1\mu^\top)W - (Y - \mathbf 1\bar y^\top) + \mathbf 1(b + W^\top\mu -
    \bar y)^\top$ with the (weighted) column means $\mu$, $\bar y$: the same value,
    without the cancellation of a large common offset of the features (its rounding
    would otherwise swamp the residual, and the gradient, in float32). The weights are
    data: the envelope derivative in them comes from this function."""

    intercept: bool = eqx.field(static=True)

    def __call__(self, coef: Float[Array, "p k"], args: RidgeArgs) -> Scalar:
        features, targets, alpha2, weights = args
        if self.intercept:
            data = centre(features[:, :-1], targets, weights)
            weight, bias = coef[:-1], coef[-1]
            offset = bias + matmul(data.mean, weight) - data.target_mean
            residual = matmul(data.features, weight) - data.targets + offset
        else:
            residual = matmul(features, coef) - targets
        data = 0.5 * row_mean(jnp.sum(residual**2, axis=1), weights)
        return data + 0.5 * alpha2 * jnp.sum(coef**2)


class RidgeInnerSolver(AbstractInnerSolver):
    r"""The ridge readout in closed form through the centred problem (`intercept.py`):
    exact for features with any offset, solved by `method`, and differentiable in the
    data (the readout's derivative differentiates the solution formula, whose linear
    solves carry their own implicit derivatives)."""

    method: AbstractLstsqMethod
    intercept: bool = eqx.field(static=True)
    # Whether alpha2 > 0, decided on the argument as passed (`concrete_value`), so the
    # same eagerly and under `jit`; `None` where it is traced.
    regularised: bool | None = eqx.field(static=True)

    def coefficients(self, args: RidgeArgs) -> Float[Array, "p k"]:
        features, targets, alpha2, weights = args

        def solve(eliminate):
            design, response, coefficients = centred_problem(
                features, targets, alpha2, self.intercept, eliminate, weights
            )
            return coefficients(ridge_lstsq(self.method, design, response, alpha2))

        # Eliminating the intercept keeps the offset out of the normal equations, the
        # kernel and the SVD (all resolved relative to their largest value; the
        # uneliminated row [μ, 1] holds the offset itself, the eliminated one only
        # sqrt(alpha2) times it). With alpha2 = 0 it would not give the minimum-norm
        # [W; b] (it minimises |W| alone), so the SVD and the kernel take the
        # equivalent uneliminated rows there.
        if isinstance(self.method, CholeskyRidge):
            return solve(True)
        if self.regularised is not None:
            return solve(self.regularised)
        return jax.lax.cond(alpha2 > 0, lambda: solve(True), lambda: solve(False))

    def __call__(
        self, objective: Objective, args: RidgeArgs, init: Any
    ) -> tuple[Float[Array, "p k"], None]:
        del objective, init
        return self.coefficients(args), None

    def solution_jvp(
        self, objective: Objective, solution: Any, stats: Any, args: RidgeArgs, t_args: Tangent
    ) -> Float[Array, "p k"]:
        del objective, stats
        _, t_solution = partial_jvp(self.coefficients, args, t_args)
        return jnp.zeros_like(solution) if t_solution is None else t_solution


RidgeSolverName: TypeAlias = Literal["auto", "cholesky", "dual", "svd"]
#: The shorthands `solver="..."` for the ridge solver objects (the keys are
#: `RidgeSolverName`'s).
_RIDGE_SOLVERS: dict[str, AbstractRidgeSolver] = {
    "auto": AutoRidge(),
    "cholesky": CholeskyRidge(),
    "dual": DualRidge(),
    "svd": SVDRidge(),
}


def as_ridge_solver(solver: object) -> AbstractRidgeSolver:
    """A ridge solver object from `solver=`: an instance as it is, a string by the one
    table of shorthands."""
    if isinstance(solver, AbstractRidgeSolver):
        return solver
    if isinstance(solver, str) and solver in _RIDGE_SOLVERS:
        return _RIDGE_SOLVERS[solver]
    names = ", ".join(repr(name) for name in _RIDGE_SOLVERS)
    objects = ", ".join(f"`vploss.{type(s).__name__}()`" for s in _RIDGE_SOLVERS.values())
    raise ValueError(
        f"`solver` must be one of {names} or a ridge solver object ({objects}); got {solver!r}."
    )


def _ridge_solver(
    solver: object, num_samples: int, num_coefficients: int, alpha2: object, intercept: bool
) -> RidgeInnerSolver:
    """The inner solver for `alpha2` as passed (a number, a traced array, or `"gcv"`,
    whose penalty is positive)."""
    penalty = 1.0 if is_penalty_rule(alpha2) else concrete_value(alpha2)
    regularised = None if penalty is None else penalty > 0
    method = as_ridge_solver(solver).select(num_samples, num_coefficients, regularised is False)
    return RidgeInnerSolver(method, intercept, regularised)


def vploss_msereg(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike | str = DEFAULT_RIDGE_ALPHA2,
    use_bias: bool = True,
    solver: RidgeSolverName | str | AbstractRidgeSolver = "auto",
    weights: Real[ArrayLike, " _N"] | None = None,
) -> tuple[Float[Array, ""], VPLinear]:
    r"""Variable projection loss for least squares with a ridge-penalised affine readout.

    With features $F = $ `jax.vmap(model)(x)` of shape `(N, m)`, $\hat F = [F, 1]$ and
    targets $Y$ of shape `(N, k)`,

    $$L(\theta) = \min_{\hat W}\ \frac{1}{2N}\sum_{j=1}^N \|\hat W \hat f_j - y_j\|^2
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    where $\hat W = [W, b]$ (the bias is penalised with the weights) and $\theta$ are
    the model's inexact-array leaves. The minimiser is
    $\hat W^{*\top} = (\hat F^\top \hat F/N + \alpha_2 I)^{+}\hat F^\top Y/N$.

    **Derivatives** (a custom JVP rule: forward and reverse mode, `jit`, `vmap`; the
    solver is never differentiated):

    - the loss: the envelope gradient $\nabla L = \partial_\theta J(\theta, \hat W^*)$,
        one vector-Jacobian product of the model;
    - the readout: $\dot{\hat W}^{*} = -H^{-1}\partial_\theta\nabla_{\hat W}J\,\dot\theta$
        with $H = \hat F^\top\hat F/N + \alpha_2 I$ (implicit function theorem), solved
        like the readout itself (the dual solver differentiates its kernel formula; no
        factorisation is ever differentiated, so second derivatives are finite at
        repeated singular values), so
        that a loss computed from the readout (a validation error, a meta-objective)
        has its exact gradient. It costs nothing when only the loss is differentiated
        (the solve is dead code). Second derivatives of the loss are exact too.

    **Per-sample weights** (`weights=`). With weights $w_j \ge 0$ of total $S =
    \sum_j w_j > 0$ the data term is their weighted mean,

    $$L(\theta) = \min_{\hat W}\ \frac{1}{2S}\sum_{j=1}^N w_j\|\hat W \hat f_j - y_j\|^2
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    with minimiser $\hat W^{*\top} = (\hat F^\top D\hat F/S + \alpha_2 I)^{+}\hat
    F^\top DY/S$, $D = \operatorname{diag}(w)$. A mean, not a sum, so integer weights
    give exactly the loss and readout of the data set with sample $j$ repeated $w_j$
    times, and zero weights those of the data set without those samples (and
    `alpha2="gcv"` the same penalty, see below). Every solver takes them: the centred
    problem below uses the weighted means and the rows scaled by $\sqrt{w_j/S}$ (a
    zero weight is a zero row). The weights are data, differentiable like the
    targets: the loss's derivative in them is the envelope one, $\partial L/\partial
    w_j = (\frac12\|\hat W^*\hat f_j - y_j\|^2 - \text{data term})/S$; the readout's
    derivative in a weight that is exactly zero (the boundary of their domain) treats
    the sample as absent. `weights=None` (the default) is $w_j = 1$, computed as
    without weights.

    **Solvers** (`solver=`): a string, or the equivalent solver object
    (`vploss.CholeskyRidge()`, `vploss.DualRidge()`, `vploss.SVDRidge()`,
    `vploss.AutoRidge()`; see their pages). Every solver works on the exactly equivalent
    *centred* problem (see `vploss._ridge.intercept`): with the column means $\mu$ of $F$ and
    $\bar y$ of $Y$, the optimal penalised bias is $b = \frac1N\sum_j(y_j - W^\top
    f_j)/(1 + \alpha_2)$, and $W$ solves a ridge problem on $F - \mathbf 1\mu^\top$ plus
    one row $\sqrt{\alpha_2/(1 + \alpha_2)}\,\mu^\top$. A common offset of the features
    (time stamps, kelvin, pixels 0-255) never enters a Gram matrix, so no direction is
    lost to it (tested against NumPy's backward-stable `lstsq` in the same precision;
    see the page 'Hostile and edge inputs').

    - `"cholesky"` (`CholeskyRidge`): the `(m, m)` Gram matrix of the centred
        features, a Cholesky factor scaled by its diagonal and shifted by
        $\varepsilon m$, and three steps of iterative refinement with the residual
        $Z^\top(T - ZW) - \alpha_2 W$ of the tall problem, so its error is that of a QR
        solve. Its only reductions over samples are the means and a matmul, so it
        shards along the batch.
    - `"dual"` (`DualRidge`): the `(N+1, N+1)` kernel matrix of the centred rows, for
        `N < m + 1` (overparameterised features): its eigendecomposition, with the
        directions it cannot resolve dropped (so a rank-deficient kernel, e.g. repeated
        inputs, is right; with `alpha2 = 0`, the pseudo-inverse), and three steps of
        refinement. It couples all samples, so a batch sharded over devices is
        gathered: use `"cholesky"` there.
    - `"svd"` (`SVDRidge`): the regularised SVD of the centred rows; with `alpha2 = 0`,
        singular values below a relative cut-off are dropped. It gathers a sharded
        batch too.
    - `"auto"` (`AutoRidge`, default): `"svd"` when `alpha2` is (concretely) zero, else
        `"dual"` when `N < m + 1`, else `"cholesky"`.

    With `alpha2 = 0` and rank-deficient features every solver gives the least-squares
    value and finite gradients, never a NaN; `"svd"` (and so `"auto"`) and `"dual"`
    return the minimum-norm (pseudo-inverse) readout, while `"cholesky"` returns a
    least-squares readout whose component in the null space of $\hat F$ is set by
    rounding (the Gram matrix cannot tell that null space from noise).

    **Default `alpha2 = 1e-6`.** Small enough not to bias the fit of features of order
    one (it shrinks a direction of $\hat F^\top \hat F/N$ with eigenvalue $\lambda$ by
    $\lambda/(\lambda + \alpha_2)$), large enough to keep the inner problem strictly
    convex. With it the float32 gradient of an MLP's reduced loss stays close to the
    float64 one, well inside mini-batch noise (see the benchmark page, 'Ridge
    readout'). Raise it (1e-4) for more float32 accuracy or as a genuine regulariser.

    **`alpha2="gcv"`** chooses the penalty by generalised cross-validation (Golub, Heath
    & Wahba, 1979): with the hat matrix $H_\alpha = \hat F(\hat F^\top\hat F/N + \alpha
    I)^{-1}\hat F^\top/N$ of the ridge readout,

    $$\alpha^* = \operatorname{argmin}_{\alpha > 0}\ \mathrm{GCV}(\alpha) =
    \frac{N\,\|(I - H_\alpha)Y\|_F^2}{(N - \mathrm{tr}\,H_\alpha)^2},$$

    a rotation-invariant estimate of the leave-one-out prediction error. With
    `weights`, GCV is that of the weighted problem, with the sample count $N$ replaced
    by the total weight $S$: $H_\alpha = D^{1/2}\hat F(\hat F^\top D\hat F/S + \alpha
    I)^{-1}\hat F^\top D^{1/2}/S$ and $\mathrm{GCV}(\alpha) = S\,\|(I -
    H_\alpha)D^{1/2}Y\|_F^2/S\,/\,(S - \mathrm{tr}\,H_\alpha)^2$, so that repeated samples
    (integer weights) and dropped ones (zero weights) give the same penalty as the
    data set they stand for. Unlike the loss for a given penalty, the chosen penalty
    therefore depends on the weights' overall scale ($S$ counts samples): pass
    frequencies, not weights normalised to sum to 1. One
    eigendecomposition of the `(p, p)` Gram matrix $\hat F^\top\hat F/N$ (of the `(N, N)`
    kernel matrix when $N \le p$), at the cost of the Cholesky solver, makes GCV cheap
    for every $\alpha$; it is minimised over a grid of $\log\alpha$ from
    $\varepsilon\,\mathrm{tr}(\hat F^\top\hat F/N)$, the smallest penalty the working
    precision resolves (the rounding of the Gram matrix; of the centred one with a
    bias), to $100\lambda_{\max}$ and refined by golden-section search. Where GCV is
    flat to within its rounding error (targets the features fit exactly, or an
    interpolating fit with $N \le p$), the largest grid penalty on that flat part is
    taken, so the choice and the loss are reproducible (samples permuted, eager or
    jitted) and the solve is the best-conditioned one GCV cannot tell from the best.
    The loss is then the ridge loss at $\alpha^*$, solved by `solver`, and
    $\alpha^*$ is held fixed: the gradient is the envelope gradient at $\alpha^*$,
    with no term for $\mathrm{d}\alpha^*/\mathrm{d}\theta$ (the loss is not minimised
    over $\alpha$). The choice is in `readout.stats`, a `vploss.GCVStats` (the penalty,
    the GCV value and $\mathrm{tr}\,H_{\alpha^*}$). In float32 the penalty cannot be
    resolved below about $10^{-7}\,\mathrm{tr}(\hat F^\top\hat F/N)$, and GCV is flat
    further up (its rounding is about $p\varepsilon$ relative), where the float64 choice
    may lie for features that fit the targets well: float32 then chooses a larger
    penalty.

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`: an array or any pytree of arrays
        the model takes (of any dtype: token ids, pixels, masks), with one batch size N.
    - `y`: the targets, shape `(N,)` or `(N, k)`.
    - `alpha1`: penalty weight on the model's parameters, `>= 0`. It is compared with
        the data term, so it has the units of the targets squared: choose it as
        $\lambda\,\mathrm{var}(y)$, $\lambda$ on a validation split (the page
        "Choosing the penalties"); with the default 0 on noisy targets the features
        fit the noise within tens of steps.
    - `alpha2`: penalty weight on the readout, `>= 0`, or `"gcv"` to choose it by
        generalised cross-validation, as above.
    - `use_bias`: whether the readout has a bias $b$ (a column of ones in $\hat F$).
    - `solver`: `"auto"`, `"cholesky"`, `"dual"` or `"svd"`, or a solver object
        (`vploss.AutoRidge()`, `vploss.CholeskyRidge(refine_steps=...)`, ...), as
        above. A traced `alpha2` (a JAX array under `jit`) counts as non-zero for
        `"auto"`.
    - `weights`: per-sample weights $w_j \ge 0$, shape `(N,)`, floating or integer,
        with a positive total; `None` (default) for equal weights. See above.

    **Returns:**

    `(loss, readout)`: the reduced loss (a scalar) and the fitted `VPLinear`, so that
    `readout(model(x[j]))` predicts `y[j]`. Both are differentiable: the loss by the
    envelope theorem, the readout by the implicit function theorem (see "Derivatives"
    above).

    The loss and the readout are in the working dtype: the features' dtype, promoted
    by floating-point targets and to at least float32 (a bfloat16 or float16 model is
    solved in float32); gradients come back in the dtype of each parameter.

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes or
    hyperparameters (`weights` not of shape `(N,)`, or not of a real dtype); a runtime
    error (`eqx.error_if`) when `x`, `y`, the features or the loss are not finite, or
    the weights are negative, not finite or sum to zero.
    """
    fit = fit_ridge(
        model,
        x,
        y,
        alpha1=alpha1,
        alpha2=alpha2,
        use_bias=use_bias,
        solver=solver,
        weights=weights,
    )
    loss = fit.value + parameter_penalty(model, fit.alpha1)
    return loss, readout_from_coefficients(fit.coef, fit.use_bias, fit.scalar_output, fit.stats)


class RidgeFit(eqx.Module):
    r"""What `fit_ridge` computed: the ridge objective's optimal value `value` (without
    the `alpha1` penalty) and minimiser `coef` (`[W, b]ᵀ`), both differentiable, the
    checked `inputs` (samples of weight zero replaced, `drop_zero_weight_samples`), the
    augmented `features`, the `targets` and the per-sample `weights` (or `None`) in the
    working dtype, the checked penalty weights (`alpha2` as chosen, with
    `alpha2="gcv"`), the diagnostics of that choice (else `None`), and the static
    flags."""

    value: Scalar
    coef: Float[Array, "p k"]
    inputs: PyTree[Array]
    features: Float[Array, "N p"]
    targets: Float[Array, "N k"]
    weights: Float[Array, " N"] | None
    alpha1: Scalar
    alpha2: Scalar
    stats: GCVStats | None
    use_bias: bool = eqx.field(static=True)
    scalar_output: bool = eqx.field(static=True)


def fit_ridge(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: ArrayLike,
    *,
    alpha1: ArrayLike,
    alpha2: ArrayLike | str,
    use_bias: bool,
    solver: object,
    weights: ArrayLike | None,
    what: str = "`vploss_msereg`",
) -> RidgeFit:
    r"""The body shared by `vploss_msereg`, `vpresidual_msereg` and
    `vpjacobian_msereg` (named by `what` in messages): checks, features, the inner
    solve through `envelope_minimise`, runtime checks."""
    x = as_batch("x", x)
    num_samples = batch_size(x)
    targets, scalar_output = as_targets("y", y, num_samples)
    weights, weight_errors = as_weights(weights, num_samples, what=what)
    weights, x, targets = drop_zero_weight_samples(weights, x, targets)
    use_bias = as_flag("use_bias", use_bias)
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    solver = as_ridge_solver(solver)
    rule_or_penalty = as_penalty(alpha2, ("gcv",), positive=False)
    features, targets = readout_features(model, x, targets, use_bias)
    dtype = features.dtype
    if weights is not None:
        weights = weights.astype(dtype)
    if isinstance(rule_or_penalty, str):  # "gcv"
        # alpha* is held fixed: the loss is the ridge loss at alpha*, so its gradient is
        # the envelope gradient at alpha* (no derivative of the eigendecomposition).
        penalty, stats = gcv_penalty(
            jax.lax.stop_gradient(features),
            jax.lax.stop_gradient(targets),
            use_bias,
            None if weights is None else jax.lax.stop_gradient(weights),
        )
    else:
        penalty, stats = rule_or_penalty.astype(dtype), None
    inner_solver = _ridge_solver(solver, num_samples, features.shape[1], alpha2, use_bias)
    checks = RuntimeChecks(
        f"the ridge loss {what}", errors=weight_errors, finite={"x": x, "y": targets}
    )
    value, coef, _ = envelope_minimise(
        RidgeObjective(use_bias),
        inner_solver,
        (features, targets, penalty, weights),
        check=checks,
    )
    return RidgeFit(
        value,
        coef,
        x,
        features,
        targets,
        weights,
        alpha1.astype(dtype),
        penalty,
        stats,
        use_bias,
        scalar_output,
    )
