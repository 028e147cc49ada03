import math
from collections.abc import Callable
from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, Real, Scalar

from .._core.checks import (
    as_alpha,
    as_flag,
    as_float_batch,
    as_weights,
    drop_zero_weight_samples,
    RuntimeChecks,
)
from .._core.features import feature_map, parameter_penalty, working_dtype
from .._core.newton import minimise_updates
from .._core.numerics import matmul, normalised_weights, weighted_mean
from .barrier import barrier_minimise, BarrierStats, LogBarrier


#: The readout `(w, c, a)` as the inner solver sees it.
FlowParams: TypeAlias = tuple[Float[Array, " m"], Float[Array, ""], Float[Array, " n"]]
#: The per-sample feature derivatives `∂u/∂x` `(N, n, m)`, `∂²u/∂x²` `(N, n, n, m)`, the
#: samples `(N, n)`, `alpha2` and the sample weights normalised to mean 1 (or `None`).
FlowArgs: TypeAlias = tuple[
    Float[Array, "N n m"], Float[Array, "N n n m"], Float[Array, "N n"], Scalar, Any
]

# Only the nonnegative weights and the quadratic coefficient are constrained.
_CONSTRAINED = (True, True, False)
# How far a warm start is pulled towards the centre of the feasible set.
_WARM_START_MIX = 0.05


def _cholesky_diagonal(matrices: Float[Array, "*batch n n"]) -> Float[Array, "*batch n"]:
    """The diagonal of the Cholesky factor of each symmetric matrix in a batch, NaN
    from the first non-positive pivot on (not positive definite).

    A column-by-column factorisation in array operations over the batch rather than
    `jnp.linalg.cholesky`: inside the barrier's `while_loop` under differentiation,
    LAPACK's batched Cholesky deadlocked the XLA CPU runtime at random (observed:
    some runs never returned), and for the small n of a flow this is also faster (see
    the benchmark page, 'The flow's Cholesky factorisation'). Cost O(N n³) elementwise
    operations.
    """
    n = matrices.shape[-1]
    rows = jnp.arange(n)
    factor = jnp.zeros_like(matrices)
    for j in range(n):
        # Column j of L: (A[:, j] − L[:, :j] L[j, :j]ᵀ) / L[j, j]; the entries of L at
        # and right of column j are still zero, so full-width products are exact.
        column = matrices[..., :, j] - jnp.sum(factor * factor[..., j : j + 1, :], axis=-1)
        pivot = jnp.sqrt(column[..., j])  # NaN for a non-positive pivot
        column = jnp.where(rows > j, column / pivot[..., None], 0.0)
        column = column.at[..., j].set(pivot)
        factor = factor.at[..., :, j].set(column)
    return jnp.diagonal(factor, axis1=-2, axis2=-1)


def _negative_log_likelihood(
    transport: Float[Array, "*batch n"], hessian: Float[Array, "*batch n n"]
) -> Float[Array, " *batch"]:
    r"""$\ell = \frac12\|\nabla\Phi\|^2 - \log\det\nabla^2\Phi + \frac n2 \log 2\pi$,
    `+inf` where the Hessian is not positive definite (its Cholesky factor is NaN)."""
    n = transport.shape[-1]
    log_det = 2 * jnp.sum(jnp.log(_cholesky_diagonal(hessian)), axis=-1)
    value = 0.5 * jnp.sum(transport**2, axis=-1) - log_det + 0.5 * n * math.log(2 * math.pi)
    return jnp.where(jnp.isnan(value), jnp.inf, value)


def cpflow_objective(params: FlowParams, args: FlowArgs) -> Scalar:
    r"""$J(w, c, a) = \frac1N\sum_j \omega_j\ell(x_j) + \frac{\alpha_2}{2}(\|w\|^2 + c^2 +
    \|a\|^2)$ (weights $\omega_j$ of mean 1, or all 1) with $\nabla\Phi(x_j) = J_u(x_j)^\top w +
    c\,x_j + a$ and $\nabla^2\Phi(x_j) = \sum_i w_i \nabla^2 u_i(x_j) + c I$; `+inf` where some
    $\nabla^2\Phi(x_j)$ is not positive definite."""
    weight, quadratic, linear = params
    jacobians, hessians, x, alpha2, weights = args
    identity = jnp.eye(x.shape[1], dtype=x.dtype)
    transport = matmul(jacobians, weight) + quadratic * x + linear
    hessian = matmul(hessians, weight) + quadratic * identity
    penalty = jnp.sum(weight**2) + quadratic**2 + jnp.sum(linear**2)
    nll = weighted_mean(_negative_log_likelihood(transport, hessian), weights)
    return nll + 0.5 * alpha2 * penalty


def _feature_derivatives(
    features: Callable[[Array], Array], x: Float[Array, "N n"]
) -> tuple[Float[Array, "N n m"], Float[Array, "N n n m"]]:
    """Per-sample Jacobians and Hessians of the features in `x`, by forward mode: for
    each sample, `jacfwd(jacfwd(u))` pushes `n + n²` tangents through the network."""
    jacobian = jax.jacfwd(features)

    def one_sample(xj):
        hessian, jac = jax.jacfwd(lambda v: (jacobian(v), jacobian(v)), has_aux=True)(xj)
        return jnp.moveaxis(jac, 0, -1), jnp.moveaxis(hessian, 0, -1)

    return jax.vmap(one_sample)(x)


def _convexity_violation(hessians: Float[Array, "N n n m"]) -> Array:
    """Whether some feature Hessian at some sample has a clearly negative eigenvalue."""
    hessians = jax.lax.stop_gradient(jnp.moveaxis(hessians, -1, 1))
    eigenvalues = jnp.linalg.eigvalsh(hessians)
    scale = jnp.max(jnp.abs(eigenvalues))
    tol = jnp.sqrt(jnp.finfo(hessians.dtype).eps) * scale
    return jnp.min(eigenvalues) < -tol


class CPFlow(eqx.Module):
    r"""A convex potential flow fitted by `vploss_cpflow`: the readout $(w, c, a)$ of
    the potential

    $$\Phi(x) = \sum_i w_i u_i(x) + \frac c2 \|x\|^2 + a^\top x, \qquad w \ge 0,\ c \ge 0,$$

    of the features $u = $ `model`. The flow $z = \nabla\Phi(x)$ maps the data onto a
    standard normal; its density is
    $\log p(x) = \log\mathcal N(\nabla\Phi(x); 0, I) + \log\det\nabla^2\Phi(x)$.

    The readout does not hold the model (it is trained separately): every method takes
    it as its first argument and, like the model, ONE sample; `jax.vmap` them over a
    batch (`sample` draws a batch itself).

    **Fields:**

    - `weight`: $w \ge 0$, shape `(m,)`.
    - `quadratic`: $c \ge 0$, a scalar.
    - `linear`: $a$, shape `(n,)`.
    - `stats`: the diagnostics of the barrier solve (`vploss.BarrierStats`), or
        `None`.
    """

    weight: Float[Array, " m"]
    quadratic: Float[Array, ""]
    linear: Float[Array, " n"]
    stats: BarrierStats | None = None

    def potential(self, model: Callable[..., Any], x: Float[Array, " n"]) -> Scalar:
        r"""$\Phi(x)$, convex in `x`, for one sample `x` of shape `(n,)`."""
        features = jnp.reshape(model(x), (-1,))
        return (
            matmul(self.weight, features)
            + 0.5 * self.quadratic * jnp.sum(x**2)
            + matmul(self.linear, x)
        )

    def transport(self, model: Callable[..., Any], x: Float[Array, " n"]) -> Float[Array, " n"]:
        r"""The flow $z = \nabla\Phi(x)$ of one sample `x` of shape `(n,)`."""
        return jax.grad(self.potential, argnums=1)(model, x)

    def log_prob(self, model: Callable[..., Any], x: Float[Array, " n"]) -> Scalar:
        r"""The log-density of the flow at one sample `x` of shape `(n,)`:
        $-\frac12\|\nabla\Phi(x)\|^2 + \log\det\nabla^2\Phi(x) - \frac n2\log 2\pi$,
        or `-inf` where $\nabla^2\Phi(x)$ is not positive definite."""
        transport = self.transport(model, x)
        hessian = jax.hessian(self.potential, argnums=1)(model, x)
        return -_negative_log_likelihood(transport, hessian)

    def inverse(
        self,
        model: Callable[..., Any],
        z: Float[Array, " n"],
        *,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 256,
        throw: bool = True,
    ) -> Float[Array, " n"]:
        r"""The inverse flow $x = (\nabla\Phi)^{-1}(z)$ of one point `z` of shape
        `(n,)`: the minimiser of the convex $\Phi(x) - z^\top x$, by `optimistix.BFGS`
        from $x = z$. The problem is strongly convex, and the inverse unique, when
        $c > 0$ (or the features are strongly convex); with $c = 0$ a $z$ outside the
        range of $\nabla\Phi$ has no inverse and the solve fails.

        **Arguments:**

        - `model`: the feature map the readout was fitted with.
        - `z`: one point, shape `(n,)`.
        - `rtol`, `atol`: the tolerances of the BFGS solve; default
            $\varepsilon^{2/3}$ of the dtype (about 4e-11 in float64).
        - `max_steps`: the most BFGS updates (steps its line search accepted; the
            evaluation of the start and rejected trial steps do not count).
        - `throw`: whether a failed solve raises (as `optimistix.minimise`).

        **Returns:**

        `x`, shape `(n,)`, with $\nabla\Phi(x) \approx z$.
        """
        tol = float(jnp.finfo(jnp.result_type(z)).eps) ** (2 / 3)
        solver = optx.BFGS(rtol=tol if rtol is None else rtol, atol=tol if atol is None else atol)
        solution = minimise_updates(
            _dual_objective, solver, z, (self, model, z), max_updates=max_steps, throw=throw
        )
        return solution.value

    def sample(
        self,
        model: Callable[..., Any],
        key: PRNGKeyArray,
        num: int,
        **inverse_options: Any,
    ) -> Float[Array, "num n"]:
        r"""Draws `num` samples: $z \sim \mathcal N(0, I)$, then
        $x = (\nabla\Phi)^{-1}(z)$ by `inverse` (vmapped; `inverse_options` are passed
        on). Returns an array of shape `(num, n)`."""
        z = jax.random.normal(key, (num, self.linear.shape[0]), self.linear.dtype)
        return jax.vmap(lambda zj: self.inverse(model, zj, **inverse_options))(z)


def _dual_objective(x: Array, args: tuple[CPFlow, Any, Array]) -> Scalar:
    flow, model, z = args
    return flow.potential(model, x) - matmul(z, x)


def _starting_point(init: CPFlow | None, m: int, n: int, dtype: Any) -> FlowParams:
    """The centre `w = 1/m, c = 1, a = 0`, or a warm start pulled slightly towards it.

    Both are strictly feasible for convex features: `∇²Φ ⪰ c I ≻ 0`.
    """
    centre = (jnp.full((m,), 1 / m, dtype), jnp.ones((), dtype), jnp.zeros((n,), dtype))
    if init is None:
        return centre
    if not isinstance(init, CPFlow):
        raise TypeError(f"`init` must be a CPFlow or None; got {type(init).__name__}.")
    shapes = (jnp.shape(init.weight), jnp.shape(init.quadratic), jnp.shape(init.linear))
    if shapes != ((m,), (), (n,)):
        raise ValueError(
            f"The warm start `init` has shapes (weight, quadratic, linear) = {shapes}; "
            f"expected {((m,), (), (n,))} for m = {m} features and n = {n} dimensions."
        )
    weight = jnp.maximum(init.weight, 0).astype(dtype)
    quadratic = jnp.maximum(init.quadratic, 0).astype(dtype)
    mix = _WARM_START_MIX
    return (
        (1 - mix) * weight + mix * centre[0],
        (1 - mix) * quadratic + mix * centre[1],
        init.linear.astype(dtype),
    )


def vploss_cpflow(
    model: Callable[..., Any],
    x: Real[ArrayLike, "N ..."],
    *,
    alpha1: Real[ArrayLike, ""] = 0.0,
    alpha2: Real[ArrayLike, ""],
    weights: Real[ArrayLike, " _N"] | None = None,
    init: CPFlow | None = None,
    solver: LogBarrier | None = None,
    check_convexity: bool = True,
    throw: bool = True,
) -> tuple[Float[Array, ""], CPFlow]:
    r"""Variable projection loss of a convex potential flow (Huang et al., 2021) with
    an input-convex feature map, the readout fitted by a log-barrier method.

    With features $u = $ `model` $: \mathbb{R}^n \to \mathbb{R}^m$, each convex in
    $x$ (e.g. a `vploss.ICNN`), the potential $\Phi(x) = \sum_i w_i u_i(x) +
    \frac c2\|x\|^2 + a^\top x$ is convex for $w \ge 0$, $c \ge 0$, and its gradient
    pushes the data onto a standard normal. The per-sample negative log-likelihood

    $$\ell(x) = \tfrac12\|\nabla\Phi(x)\|^2 - \log\det\nabla^2\Phi(x) + \tfrac n2 \log
    2\pi, \quad \nabla\Phi = J_u^\top w + c\,x + a,\quad \nabla^2\Phi = \sum_i w_i
    \nabla^2 u_i + c I,$$

    is convex in the readout (a convex quadratic of an affine map, minus the concave
    $\log\det$ of an affine map), so

    $$L(\theta) = \min_{w \ge 0,\, c \ge 0,\, a}\ \frac1N\sum_j \ell(x_j) +
    \frac{\alpha_2}{2}\big(\|w\|^2 + c^2 + \|a\|^2\big) + \frac{\alpha_1}{2}\|\theta\|^2$$

    is solved by `LogBarrier` on $t J - \sum_i \log w_i - \log c$, keeping every
    $\nabla^2\Phi(x_j)$ positive definite. The returned loss is $J$ at the barrier
    solution, within the duality gap $(m+1)/t \le$ `solver.gap_tol` of the constrained
    minimum; its gradient is the envelope gradient $\partial_\theta J$ there (through
    the feature derivatives, which are differentiated once more in $\theta$), which
    differs from the derivative of the exact minimum by $O((m+1)/t)$.

    **Cost.** Per sample, the Jacobian $J_u(x_j)$ and the Hessians $\nabla^2
    u_i(x_j)$ come from `jacfwd(jacfwd(model))`, about $(1 + n + n^2)$ forward passes,
    and take $O(m n^2)$ memory: $O(N n^2)$ network passes and $O(N m n^2)$ memory in
    all, meant for low-dimensional data. One evaluation of $J$ costs $O(N(m n^2 + n^3))$;
    each Newton step of the barrier forms the Hessian of $J$ in the $m + n + 1$ readout
    entries by autodiff, about $(m + n + 1)$ such evaluations.

    **Convexity** of the features is checked where it is cheap: at the samples, every
    $\nabla^2 u_i(x_j)$ (computed anyway) must have no eigenvalue below
    $-\sqrt\varepsilon$ times the largest in magnitude; a model convex at the samples
    but not elsewhere goes undetected (an `ICNN` is convex by construction).

    **Arguments:**

    - `model`: a callable mapping ONE sample `x[j]` of shape `(n,)` to its `m`
        features, each convex in `x`.
    - `x`: the data, shape `(N, n)`, floating point.
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout, `> 0` (required; it makes the inner
        problem strictly convex).
    - `weights`: per-sample weights $w_j \ge 0$, shape `(N,)`, not all zero, or
        `None`: the data term becomes the weighted mean $\sum_j w_j\ell(x_j) /
        \sum_j w_j$ (integer weights equal repeated samples, zero weights dropped
        ones).
    - `init`: a previous `CPFlow` to warm-start from (pulled 5% of the way to the
        centre $w = 1/m$, $c = 1$, $a = 0$ to be strictly feasible), or `None` to
        start at that centre.
    - `solver`: the `LogBarrier` and its tolerances; `LogBarrier()` if `None`.
    - `check_convexity`: whether to check the feature Hessians at the samples.
    - `throw`: whether a barrier solve that did not converge raises a runtime error;
        with `throw=False` read `readout.stats.converged`.

    **Returns:**

    `(loss, flow)`: the reduced loss (a scalar; the mean NLL in nats, with the
    $\frac n2\log 2\pi$ constant, plus the penalties) and the fitted `CPFlow`, whose
    methods evaluate $\Phi$, $\nabla\Phi$, `log_prob`, the inverse flow and samples.
    The loss and the flow are in the working dtype: the features' dtype, promoted
    by floating-point data and to at least float32 (a bfloat16 or float16 model is
    solved in float32); gradients come back in the dtype of each parameter.

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes or
    hyperparameters; a runtime error (`eqx.error_if`) when the features are not
    convex at the samples, the data or the loss are not finite, or (with `throw`) the
    barrier solve did not converge.
    """
    x = as_float_batch("x", x)
    if x.ndim != 2:
        raise ValueError(
            f"`x` must have shape (N, n): a batch of n-dimensional points; got shape {x.shape}."
        )
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=True)
    check_convexity = as_flag("check_convexity", check_convexity)
    throw = as_flag("throw", throw)
    solver = LogBarrier() if solver is None else solver
    if not isinstance(solver, LogBarrier):
        raise TypeError(f"`solver` must be a vploss.LogBarrier; got {solver!r}.")
    weights, weight_errors = as_weights(weights, x.shape[0], what="`vploss_cpflow`")
    weights, x = drop_zero_weight_samples(weights, x)
    features = feature_map(model, x)
    jacobians, hessians = _feature_derivatives(features, x)
    dtype = working_dtype(jacobians.dtype, x.dtype)
    n, m = jacobians.shape[1:]
    jacobians, hessians = jacobians.astype(dtype), hessians.astype(dtype)
    if weights is not None:
        weights = normalised_weights(weights.astype(dtype))
    args = (jacobians, hessians, x.astype(dtype), alpha2.astype(dtype), weights)
    start = jax.lax.stop_gradient(_starting_point(init, m, n, dtype))
    errors = list(weight_errors)
    if check_convexity:
        errors.append(
            (
                _convexity_violation(hessians),
                "`model` is not convex in x: a feature Hessian has a negative eigenvalue "
                "at a sample. `vploss_cpflow` needs input-convex features, e.g. "
                "`vploss.ICNN`.",
            )
        )
    checks = RuntimeChecks(
        "the flow loss `vploss_cpflow`", errors=errors, finite={"x": x}, throw=throw
    )
    value, (weight, quadratic, linear), stats = barrier_minimise(
        cpflow_objective, args, start, constrained=_CONSTRAINED, solver=solver, check=checks
    )
    loss = value + parameter_penalty(model, alpha1.astype(dtype))
    return loss, CPFlow(weight, quadratic, linear, stats)
