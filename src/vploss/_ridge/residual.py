from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree, Real, Shaped

from .._core.checks import concrete_value
from .._core.features import augment
from .._core.numerics import matmul
from .._core.penalty import is_penalty_rule
from .._core.readout import readout_from_coefficients, VPLinear
from .loss import DEFAULT_RIDGE_ALPHA2, fit_ridge, RidgeFit, RidgeSolverName
from .lstsq import AbstractRidgeSolver, sample_scale


def vpresidual_msereg(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike | str = DEFAULT_RIDGE_ALPHA2,
    use_bias: bool = True,
    solver: RidgeSolverName | str | AbstractRidgeSolver = "auto",
    weights: Real[ArrayLike, " _N"] | None = None,
) -> tuple[Float[Array, " R"], VPLinear]:
    r"""The reduced residual of the ridge loss, for Gauss–Newton and
    Levenberg–Marquardt training of the model (Golub and Pereyra, 1973).

    With the notation of `vploss_msereg` and its fitted readout $\hat W^*(\theta)$,

    $$r(\theta) = \begin{bmatrix} (\hat F \hat W^{*\top} - Y)/\sqrt N \\
    \sqrt{\alpha_2}\,\hat W^* \\ \sqrt{\alpha_1}\,\theta \end{bmatrix}, \qquad
    \tfrac12\|r(\theta)\|^2 = L(\theta),$$

    and with per-sample `weights` $w_j \ge 0$ of total $S$ the data block's row $j$ is
    $\sqrt{w_j/S}\,(\hat W^*\hat f_j - y_j)$, so that $\frac12\|r\|^2$ is still the
    weighted loss of `vploss_msereg` (a zero weight gives zero rows; the residual keeps
    its length).

    flattened into one vector (row-major: the `(N, k)` data block, then the `(p, k)`
    coefficients $\hat W^{*\top}$, then the model's inexact-array leaves in
    `jax.tree_util` order). A block is left out when its weight is concretely zero
    (`alpha1 = 0`, the default, or `alpha2 = 0`), so the residual has
    $Nk + pk\,[\alpha_2 \ne 0] + |\theta|\,[\alpha_1 \ne 0]$ entries.

    Its derivative in $\theta$ is the full Jacobian of the reduced residual (the
    readout moves with $\theta$, by the implicit function theorem; see
    `vploss_msereg`), not the partial one at a fixed readout. Both modes work:
    `jax.jacfwd` (one implicit solve per parameter direction, all with one
    factorisation) and `jax.jacrev`; so `optimistix.least_squares` works with either
    `options={"jac": "fwd"}` (its default) or `{"jac": "bwd"}`. Forward mode is the
    faster when the residual has more entries than the model has parameters. To train a
    model by Levenberg–Marquardt on this residual, `vploss.least_squares` does it in one
    call, with a Jacobian assembled from the problem's structure; for another
    least-squares solver:

    ```python
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def residual(params, args):
        return vploss.vpresidual_msereg(eqx.combine(params, static), x, y)

    solution = optx.least_squares(
        residual, optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8), params, has_aux=True
    )
    ```

    **Arguments:** as `vploss_msereg`.

    **Returns:**

    `(residual, readout)`: the residual vector and the fitted `VPLinear` (with
    `alpha2="gcv"`, the chosen penalty is in `readout.stats`; it is held fixed in the
    derivative).

    The residual and the readout are in the working dtype: the features' dtype, promoted
    by floating-point targets and to at least float32 (a bfloat16 or float16 model is
    solved in float32); gradients come back in the dtype of each parameter.
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
        what="`vpresidual_msereg`",
    )
    residual = _stacked_residual(fit, model, alpha1, alpha2)
    return residual, readout_from_coefficients(fit.coef, fit.use_bias, fit.scalar_output, fit.stats)


def _data_rows(fit: RidgeFit, rows: Array) -> Array:
    """`rows` (sample j's first, along axis 0) times each sample's factor in the
    residual: `1/sqrt(N)`, or `sqrt(w_j/S)` with weights."""
    if fit.weights is None:
        return rows / jnp.sqrt(jnp.asarray(rows.shape[0], fit.coef.dtype))
    scale = sample_scale(fit.weights)
    return rows * scale.reshape(-1, *(1,) * (rows.ndim - 1))


def _stacked_residual(fit: RidgeFit, model: Any, alpha1: Any, alpha2: Any) -> Array:
    data = _data_rows(fit, matmul(fit.features, fit.coef) - fit.targets)
    blocks = [data.ravel()]
    # Decided on the caller's arguments (checked by `fit_ridge`), not on `fit.alpha*`:
    # under `jit` every array computed inside the trace is a tracer, so a concrete zero
    # would count as non-zero and the residual's length would depend on `jit`.
    if _maybe_nonzero(alpha2):
        blocks.append(jnp.sqrt(fit.alpha2) * fit.coef.ravel())
    if _maybe_nonzero(alpha1):
        params, _ = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
        blocks.append(jnp.sqrt(fit.alpha1) * params.astype(fit.coef.dtype))
    # `fit.coef` carries the runtime checks (finite data, features and readout), so
    # the residual and every derivative of it do too.
    return jnp.concatenate(blocks)


def _maybe_nonzero(alpha: ArrayLike | str) -> bool:
    """Whether a penalty weight may be non-zero: traced weights and `"gcv"` count as
    non-zero."""
    return is_penalty_rule(alpha) or concrete_value(alpha) != 0


def vpjacobian_msereg(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike | str = DEFAULT_RIDGE_ALPHA2,
    use_bias: bool = True,
    solver: RidgeSolverName | str | AbstractRidgeSolver = "auto",
    weights: Real[ArrayLike, " _N"] | None = None,
) -> tuple[Float[Array, "R P"], Float[Array, " R"], VPLinear]:
    r"""The Jacobian of `vpresidual_msereg` in the model's parameters, assembled from
    the structure of the problem rather than by pushing every parameter direction through
    the batch.

    By the chain rule, with $\theta$ the model's inexact-array leaves flattened by
    `jax.flatten_util.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))` (`P`
    entries), the data rows are

    $$\frac{\partial r_j}{\partial\theta} = \frac1{\sqrt N}\Big(
    \hat W^*\frac{\partial \hat f_j}{\partial\theta}\Big|_{\hat W^*} +
    \hat f_j^\top \frac{\mathrm{d}\hat W^{*\top}}{\mathrm{d}\theta}\Big),$$

    (with `weights`, $\sqrt{w_j/S}$ in place of $1/\sqrt N$), the first term one
    reverse pass per sample and output (vectorised over the batch:
    sample $j$'s rows depend on sample $j$ only), the second the derivative of the
    fitted readout by reverse mode through the implicit derivative, $p k$ passes over
    the batch for the $p k$ coefficients. The penalty rows are
    $\sqrt{\alpha_2}\,\mathrm{d}\hat W^*/\mathrm{d}\theta$ and $\sqrt{\alpha_1}\,I$.
    In all, about $k + pk$ reverse passes of the model over the batch, against $P$
    forward passes for `jax.jacfwd` of the residual, and $N k$ full-batch reverse passes
    for `jax.jacrev`.

    The result equals `jax.jacfwd` of `vpresidual_msereg` in the flattened parameters
    (tested). `vploss.least_squares` trains by Levenberg–Marquardt without it: it
    assembles Kaufman's or this Jacobian from per-sample gradients, far cheaper than the
    $pk$ passes above.

    **Arguments:** as `vploss_msereg`.

    **Returns:**

    `(jacobian, residual, readout)`: the `(R, P)` Jacobian, the residual of
    `vpresidual_msereg` (`R` entries) and the fitted `VPLinear`.
    """
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fit_of(p):
        fit = fit_ridge(
            eqx.combine(p, static),
            x,
            y,
            alpha1=alpha1,
            alpha2=alpha2,
            use_bias=use_bias,
            solver=solver,
            weights=weights,
            what="`vpjacobian_msereg`",
        )
        return fit.coef, fit

    # One inner solve: the readout's Jacobian by reverse mode over its p·k entries.
    coef, coef_vjp, fit = jax.vjp(fit_of, params, has_aux=True)
    basis = jnp.eye(coef.size, dtype=coef.dtype).reshape(-1, *coef.shape)
    (d_coef,) = jax.vmap(coef_vjp)(basis)
    d_coef = _flat_rows(d_coef, 1).reshape(*coef.shape, -1)  # (p, k, P)
    coef = jax.lax.stop_gradient(coef)

    def sample_rows(sample):
        def outputs(p):
            features = jnp.reshape(eqx.combine(p, static)(sample), (1, -1)).astype(coef.dtype)
            return matmul(augment(features, fit.use_bias), coef)[0]

        return _flat_rows(jax.jacrev(outputs)(params), 1)

    frozen = jax.vmap(sample_rows)(fit.inputs)  # (N, k, P): sample j's rows
    through_readout = jnp.einsum(
        "jq,qkP->jkP", fit.features, d_coef, precision=jax.lax.Precision.HIGHEST
    )
    num_params = d_coef.shape[-1]
    blocks = [_data_rows(fit, frozen + through_readout).reshape(-1, num_params)]
    if _maybe_nonzero(alpha2):
        blocks.append(jnp.sqrt(fit.alpha2) * d_coef.reshape(-1, num_params))
    if _maybe_nonzero(alpha1):
        blocks.append(jnp.sqrt(fit.alpha1) * jnp.eye(num_params, dtype=coef.dtype))
    residual = _stacked_residual(fit, model, alpha1, alpha2)
    readout = readout_from_coefficients(fit.coef, fit.use_bias, fit.scalar_output, fit.stats)
    return jnp.concatenate(blocks), residual, readout


def _flat_rows(jacobian: Any, num_axes: int) -> Array:
    """A Jacobian pytree (leaves shaped `(*out, *leaf)`) as one array `(*out, P)`, its
    last axis in `ravel_pytree` order."""
    flat = lambda tree: jfu.ravel_pytree(tree)[0]  # noqa: E731
    for _ in range(num_axes):
        flat = jax.vmap(flat)
    return flat(jacobian)
