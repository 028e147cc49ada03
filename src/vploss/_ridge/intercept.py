r"""Eliminating the penalised intercept of the ridge readout: one split of the data into
their means and centred rows, for the loss, its solvers, GCV and the streamed refit.

With features $F$ `(N, m)`, targets $Y$ `(N, k)` and the bias penalised with the
weights,

$$\min_{W, b}\ \frac1{2N}\|FW + \mathbf 1 b^\top - Y\|^2 + \frac\alpha2(\|W\|^2 +
\|b\|^2).$$

Write $F = F_c + \mathbf 1\mu^\top$ with the column means $\mu$, and $Y = Y_c +
\mathbf 1\bar y^\top$. Since $\mathbf 1^\top F_c = 0$, the data term splits into
$\frac1{2N}\|F_cW - Y_c\|^2 + \frac12\|b + W^\top\mu - \bar y\|^2$, and minimising over
$b$ exactly, $b = (\bar y - W^\top\mu)/(1 + \alpha)$, leaves

$$\min_W\ \frac12\|ZW - T\|^2 + \frac\alpha2\|W\|^2, \qquad
Z = \begin{bmatrix}F_c/\sqrt N\\ \gamma\mu^\top\end{bmatrix},\quad
T = \begin{bmatrix}Y_c/\sqrt N\\ \gamma\bar y^\top\end{bmatrix},\quad
\gamma = \sqrt{\alpha/(1 + \alpha)},$$

an isotropic ridge problem without intercept, the same minimum. The change is exact; it
removes the common offset (a feature around $10^6$, pixels 0-255, kelvin) that the
uncentred Gram matrix $\hat F^\top\hat F/N$ is made of, whose shifted Cholesky factor
otherwise leaves every direction with an eigenvalue below $\varepsilon\,\mathrm{tr}$
unsolved. The means are sums over samples, so a sharded batch stays sharded. With
per-sample weights $w_j \ge 0$ (total $S$) the same holds with the weighted means and
each row's $1/\sqrt N$ replaced by $\sqrt{w_j/S}$.
"""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._core.numerics import column_mean


class Centred(eqx.Module):
    r"""Features and targets split as $F = F_c + \mathbf 1\mu^\top$, $Y = Y_c +
    \mathbf 1\bar y^\top$ (`centre`)."""

    features: Float[Array, "N m"]
    targets: Float[Array, "N k"]
    mean: Float[Array, " m"]
    target_mean: Float[Array, " k"]


def centre(
    features: Float[Array, "N m"],
    targets: Float[Array, "N k"],
    weights: Float[Array, " N"] | None = None,
    intercept: bool = True,
) -> Centred:
    r"""The (weighted) column means $\mu$, $\bar y$ of the features (without the ones
    column) and the targets, and the centred rows $F_c$, $Y_c$. The means are
    corrected by a second pass (`column_mean`), so that the centred columns sum to zero
    in float32 for a large offset, as the exact elimination needs. Without an
    `intercept`, the data as they are with zero means (the uncentred problem)."""
    if not intercept:
        zeros = lambda a: jnp.zeros(a.shape[1], a.dtype)  # noqa: E731
        return Centred(features, targets, zeros(features), zeros(targets))
    mean, target_mean = column_mean(features, weights), column_mean(targets, weights)
    return Centred(features - mean, targets - target_mean, mean, target_mean)


def eliminated_row(
    mean: Float[Array, " m"], target_mean: Float[Array, " k"], alpha2: Scalar
) -> tuple[Float[Array, " m"], Float[Array, " k"]]:
    r"""$(\gamma\mu, \gamma\bar y)$, $\gamma = \sqrt{\alpha/(1 + \alpha)}$: the extra row
    of the design and of the targets that the eliminated intercept leaves."""
    gamma = jnp.sqrt(alpha2 / (1 + alpha2))
    return gamma * mean, gamma * target_mean


def with_intercept(
    weight: Float[Array, "m k"], residual_mean: Float[Array, " k"], alpha2: Scalar
) -> Float[Array, "p k"]:
    r"""$[W; b^\top]$ with the optimal penalised intercept given $W$, $b = \bar r/(1 +
    \alpha)$, where $\bar r = \bar y - W^\top\mu$ is the (weighted) mean residual of
    the weights alone. (From the samples, $\bar r = \frac1N\sum_j (y_j - W^\top f_j)$
    is the accurate form: each difference is taken before the sum, whereas $\bar y$ and
    $W^\top\mu$ of features with a large offset cancel in their leading digits.)"""
    bias = residual_mean / (1 + alpha2)
    return jnp.concatenate([weight, bias[None, :]])
