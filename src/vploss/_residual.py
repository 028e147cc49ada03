from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Shaped

from ._misc import matmul
from ._readout import readout_from_coefficients, VPLinear
from ._ridge import DEFAULT_RIDGE_ALPHA2, fit_ridge, RidgeSolverName


def vpresidual_msereg(
    model: Callable[..., Any],
    x: Shaped[ArrayLike, "N ..."],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike | str = DEFAULT_RIDGE_ALPHA2,
    use_bias: bool = True,
    solver: RidgeSolverName | str = "auto",
) -> tuple[Float[Array, " R"], VPLinear]:
    r"""The reduced residual of the ridge loss, for Gauss–Newton and
    Levenberg–Marquardt training of the model (Golub and Pereyra, 1973).

    With the notation of `vploss_msereg` and its fitted readout $\hat W^*(\theta)$,

    $$r(\theta) = \begin{bmatrix} (\hat F \hat W^{*\top} - Y)/\sqrt N \\
    \sqrt{\alpha_2}\,\hat W^* \\ \sqrt{\alpha_1}\,\theta \end{bmatrix}, \qquad
    \tfrac12\|r(\theta)\|^2 = L(\theta),$$

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
    faster when the residual has more entries than the model has parameters.

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
    """
    fit = fit_ridge(model, x, y, alpha1=alpha1, alpha2=alpha2, use_bias=use_bias, solver=solver)
    num_samples = fit.features.shape[0]
    data = (matmul(fit.features, fit.coef) - fit.targets) / jnp.sqrt(
        jnp.asarray(num_samples, fit.coef.dtype)
    )
    blocks = [data.ravel()]
    # Decided on the caller's arguments (checked by `fit_ridge`), not on `fit.alpha*`:
    # under `jit` every array computed inside the trace is a tracer, so a concrete zero
    # would count as non-zero and the residual's length would depend on `jit`.
    if _maybe_nonzero(alpha2):
        blocks.append(jnp.sqrt(fit.alpha2) * fit.coef.ravel())
    if _maybe_nonzero(alpha1):
        params, _ = jfu.ravel_pytree(eqx.filter(model, eqx.is_inexact_array))
        blocks.append(jnp.sqrt(fit.alpha1) * params.astype(fit.coef.dtype))
    # `fit.value` carries the runtime checks (finite data, features and readout).
    residual = jnp.concatenate(blocks)
    residual = eqx.error_if(residual, ~jnp.isfinite(fit.value), "the ridge loss is not finite")
    return residual, readout_from_coefficients(fit.coef, fit.use_bias, fit.scalar_output, fit.stats)


def _maybe_nonzero(alpha: ArrayLike | str) -> bool:
    """Whether a penalty weight may be non-zero: traced weights and `"gcv"` count as
    non-zero."""
    if isinstance(alpha, (jax.core.Tracer, str)):
        return True
    return float(np.asarray(alpha)) != 0
