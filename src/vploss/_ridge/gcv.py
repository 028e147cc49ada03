r"""Generalised cross-validation (GCV) for the readout penalty of the ridge loss.

For the ridge readout with penalty $\frac{\alpha}{2}\|\hat W\|_F^2$ the fitted values are
$H_\alpha Y$ with the hat matrix $H_\alpha = \hat F(\hat F^\top\hat F/N + \alpha I)^{-1}
\hat F^\top/N$, and (Golub, Heath & Wahba, 1979)

$$\mathrm{GCV}(\alpha) = \frac{N\,\|(I - H_\alpha)Y\|_F^2}{(N - \mathrm{tr}\,H_\alpha)^2}.$$

With per-sample weights $w_j \ge 0$ of total $S = \sum_j w_j$ it is the GCV of the
weighted problem, with the sample count $N$ replaced by $S$:

$$\mathrm{GCV}(\alpha) = \frac{S\,\|(I - H_\alpha)D^{1/2}Y\|_F^2}{(S -
\mathrm{tr}\,H_\alpha)^2}, \qquad H_\alpha = D^{1/2}\hat F(\hat F^\top D\hat F/S +
\alpha I)^{-1}\hat F^\top D^{1/2}/S, \quad D = \operatorname{diag}(w).$$

The weighted residual $\|(I - H_\alpha)D^{1/2}Y\|_F^2$, $\mathrm{tr}\,H_\alpha$ (from the
eigenvalues of $\hat F^\top D\hat F/S$) and $S$ are those of the data set with sample $j$
repeated $w_j$ times (dropped when $w_j = 0$), so such a data set has the same GCV curve
and the same penalty. (The weighted problem is computed as the unweighted formulas on the
rows scaled by $\sqrt{w_j N/S}$, centred at the weighted means, with $S$ in place of $N$
in the trace term.)

One symmetric eigendecomposition makes it cheap for every $\alpha$: `O(p)` per value.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._core.numerics import matmul
from .._core.penalty import choose_log_penalty, gcv_quotient
from .._core.stats import AbstractStats, RESULTS
from .intercept import centre
from .lstsq import sample_scale


class GCVStats(AbstractStats):
    r"""The readout penalty chosen by generalised cross-validation, carried by the readout
    of `vploss_msereg(..., alpha2="gcv")` as `readout.stats`.

    **Fields:**

    - `alpha2`: the chosen penalty $\alpha^*$, the minimiser of $\mathrm{GCV}$ over
        $\alpha \ge \varepsilon\,\mathrm{tr}\,G$, the smallest penalty the working
        precision resolves ($G$ the Gram matrix $\hat F^\top\hat F/N$; see
        `gcv_penalty`). Where GCV is flat to within its rounding error (targets the
        features fit exactly, an interpolating fit), the largest penalty on that flat
        part, a point of the search grid (set by $\mathrm{tr}\,G$ and $\lambda_{\max}$
        alone): a resolution limit, reproducible (samples permuted, eager or jitted),
        not a sharp optimum. In float32 that part reaches higher than in float64.
    - `gcv`: the value $\mathrm{GCV}(\alpha^*) = N\|(I - H_{\alpha^*})Y\|_F^2 /
        (N - \mathrm{tr}\,H_{\alpha^*})^2$.
    - `dof`: the effective number of parameters (per output) $\mathrm{tr}\,H_{\alpha^*}$,
        between 0 and $\min(N, p)$.

    - `result`: `vploss.RESULTS.successful`, or `nonfinite` where the data made
        $\mathrm{GCV}$ not finite (the search itself always ends).
    """

    alpha2: Float[Array, ""]
    gcv: Float[Array, ""]
    dof: Float[Array, ""]
    result: RESULTS

    def __init__(self, alpha2: Float[Array, ""], gcv: Float[Array, ""], dof: Float[Array, ""]):
        self.alpha2 = alpha2
        self.gcv = gcv
        self.dof = dof
        self.result = RESULTS.where(jnp.isfinite(gcv), RESULTS.successful, RESULTS.nonfinite)


class _GCVSpectrum(eqx.Module):
    r"""What GCV needs of $(\hat F, Y)$, from the eigendecomposition of the smaller of the
    Gram matrix $\hat F^\top\hat F/N$ (when $N > p$) and the kernel matrix $\hat F\hat
    F^\top/N$ (when $N \le p$): both have the nonzero eigenvalues $\lambda_i = s_i^2$ of
    $\hat F/\sqrt N = U S V^\top$."""

    eigenvalues: Float[Array, " r"]
    # Primal: ‖b_i‖² with b = Vᵀ F̂ᵀY/N = S c; dual and centred: ‖c_i‖² with c = UᵀY/√N.
    weights: Float[Array, " r"]
    # Primal: ‖Y‖²/N; centred: ‖Y_⊥‖²/N, the part of Y outside the range of F̂; dual: 0.
    total: Scalar
    # The trace of the Gram matrix (of diag(C, 1) for centred features: the offset
    # direction is exact), the scale of the rounding in forming and factoring it.
    trace: Scalar
    # The size of the terms whose difference gave the residual's part outside the sum
    # over directions (‖Y‖²/N in the primal form, ‖Y_c‖²/N centred, 0 dual): the
    # residual is lost below eps times it.
    cancelled: Scalar
    # n in GCV's formula: N, or the total weight S.
    count: Scalar | int
    # The residual as a sum of non-negative terms (dual and centred forms), not as ‖Y‖²
    # minus the fitted part (primal).
    spectral: bool = eqx.field(static=True)

    def __call__(self, log_alpha: Float[Array, "*g"]) -> tuple[Float[Array, "*g"], ...]:
        """`(GCV, tr H, rounding)` at `alpha = exp(log_alpha)`, elementwise: `rounding`
        bounds the rounding error of GCV, `r·eps` relative to it and to the cancelled
        part of the residual (r eigenvalues summed)."""
        alpha = jnp.exp(log_alpha)[..., None]
        lam = self.eigenvalues
        eps = jnp.finfo(lam.dtype).eps
        shrink = alpha / (lam + alpha)  # α/(λ+α), the part of each direction not fitted
        if self.spectral:
            # ‖(I−H)Y‖²/N = ‖Y_⊥‖²/N + Σ (α/(λ_i + α))² ‖c_i‖²: sums of non-negative terms,
            # no cancellation, so it stays accurate as the fit interpolates (N ≤ p,
            # α → 0) and for targets with a large mean (the centred form), where the
            # primal residual below is the difference of two nearly equal numbers.
            residual = self.total + jnp.sum(shrink**2 * self.weights, axis=-1)
        else:
            # ‖(I−H)Y‖²/N = ‖Y‖²/N − Σ ‖b_i‖²(λ_i + 2α)/(λ_i + α)², written without the
            # division by λ_i that ‖c_i‖² = ‖b_i‖²/λ_i would need.
            fitted = jnp.sum(self.weights * (lam + 2 * alpha) / (lam + alpha) ** 2, axis=-1)
            # The subtraction rounds at the level eps·‖Y‖²/N: clip there, so that rounding
            # cannot produce a zero (or negative) residual and with it a spurious minimum.
            residual = jnp.maximum(self.total - fitted, eps * self.cancelled)
        # n − tr H = (n − r) + Σ α/(λ_i + α) over the r eigenvalues (r = p, or N in the
        # dual form, where n − r is 0 without weights), exact for every α > 0.
        slack = (self.count - lam.shape[-1]) + jnp.sum(shrink, axis=-1)
        slack = slack / self.count
        # n − tr H > 0 for every α > 0 (a sum of positive terms, plus N − p > 0 in the
        # primal form), but it underflows as α/λ_max → 0 with N ≤ p.
        gcv, safe = gcv_quotient(residual, slack)
        rounding = lam.shape[-1] * eps * (gcv + self.cancelled / safe)
        return gcv, self.count * (1 - slack), rounding


def _gcv_spectrum(
    features: Float[Array, "N p"],
    targets: Float[Array, "N k"],
    intercept: bool,
    weights: Float[Array, " N"] | None,
) -> _GCVSpectrum:
    num_samples, num_coefficients = features.shape
    if weights is None:
        count = num_samples
        rows = lambda a: a  # noqa: E731
    else:
        # The rows scaled by sqrt(w_j N / S): the formulas' 1/N then weigh by w_j / S.
        count = jnp.sum(weights)
        scale = math.sqrt(num_samples) * sample_scale(weights)[:, None]
        rows = lambda a: a * scale  # noqa: E731
    if num_samples <= num_coefficients:
        features, targets = rows(features), rows(targets)
        kernel = matmul(features, features.T) / num_samples
        eigenvalues, vectors = jnp.linalg.eigh(kernel)
        projected = matmul(vectors.T, targets) / math.sqrt(num_samples)
        return _GCVSpectrum(
            # Rounding can make the eigenvalues of a singular matrix slightly negative.
            eigenvalues=jnp.maximum(eigenvalues, 0),
            weights=jnp.sum(projected**2, axis=1),
            # Every direction of the targets is in the kernel's range (up to its null
            # space, whose terms are in the sum with λ = 0).
            total=jnp.zeros((), targets.dtype),
            trace=jnp.trace(kernel),
            cancelled=jnp.zeros((), targets.dtype),
            count=count,
            spectral=True,
        )
    if intercept:
        data = centre(features[:, :-1], targets, weights)
        centred, targets = rows(data.features), rows(data.targets)
        return centred_spectrum(
            matmul(centred.T, centred) / num_samples,
            matmul(centred.T, targets) / num_samples,
            jnp.sum(targets**2) / num_samples,
            data.mean,
            data.target_mean,
            count,
        )
    # The Gram matrix is a sum over samples (a matmul), so it shards along the batch
    # like the Cholesky solver.
    features, targets = rows(features), rows(targets)
    return primal_spectrum(
        matmul(features.T, features) / num_samples,
        matmul(features.T, targets) / num_samples,
        jnp.sum(targets**2) / num_samples,
        count,
    )


def centred_spectrum(
    centred_gram: Float[Array, "m m"],
    centred_cross: Float[Array, "m k"],
    target_squares: Scalar,
    mean: Float[Array, " m"],
    target_mean: Float[Array, " k"],
    count: Scalar | int,
) -> _GCVSpectrum:
    r"""The GCV spectrum of features with an intercept from their (weighted) means and
    centred mean sums: $C = F_c^\top\Omega F_c/S$, $F_c^\top\Omega Y_c/S$ and
    $\|\Omega^{1/2}Y_c\|_F^2/S$ ($\Omega$ the weights, $S$ = `count` their total), so
    that batches streamed through `refit_readout` give the same curve as one array.

    With a large common offset the Gram matrix of $\hat F = [F, 1]$ is dominated by it,
    and its small eigenvalues are lost in float32. It factors exactly as $L^\top BL$
    with $B = \operatorname{diag}(C, 1)$, $L = [[I, 0], [\mu^\top, 1]]$: so $\hat
    F/\sqrt S$ has the singular values and right singular vectors of the small matrix
    $[[\Lambda^{1/2}U^\top, 0], [\mu^\top, 1]]$ ($C = U\Lambda U^\top$), with no
    cancellation, and the offsets never enter a sum."""
    centred_eigenvalues, centred_vectors = jnp.linalg.eigh(centred_gram)
    root = jnp.sqrt(jnp.maximum(centred_eigenvalues, 0))[:, None] * centred_vectors.T
    factor = jnp.block(
        [
            [root, jnp.zeros_like(root[:, :1])],
            [mean[None, :], jnp.ones_like(mean[:1])[None, :]],
        ]
    )
    left, singular_values, _ = jnp.linalg.svd(factor)
    # Ascending, as `eigh` would give them.
    singular_values, left = singular_values[::-1], left[:, ::-1]
    # F̂/√S = Q̃·factor with orthonormal Q̃ = [F_c U Λ^-½/√S, 1/√S], so the coefficients
    # of Y in the left singular vectors are c = leftᵀ Q̃ᵀY/√S and b = s·c: the centred
    # cross products, never the offset's.
    projected_cross = matmul(centred_vectors.T, centred_cross)
    safe = jnp.where(centred_eigenvalues > 0, centred_eigenvalues, 1)
    whitened = jnp.where(
        centred_eigenvalues[:, None] > 0, projected_cross / jnp.sqrt(safe)[:, None], 0
    )
    projected = matmul(left.T, jnp.concatenate([whitened, target_mean[None]]))
    return _GCVSpectrum(
        eigenvalues=singular_values**2,
        weights=jnp.sum(projected**2, axis=1),
        # The part of Y outside the range of F̂ = span(F_c, 1): of Y_c outside that of
        # F_c (the offset ȳ never enters).
        total=jnp.maximum(target_squares - jnp.sum(whitened**2), 0),
        trace=jnp.trace(centred_gram) + 1,
        cancelled=target_squares,
        count=count,
        spectral=True,
    )


def primal_spectrum(
    gram: Float[Array, "p p"],
    cross: Float[Array, "p k"],
    target_squares: Scalar,
    count: Scalar | int,
) -> _GCVSpectrum:
    r"""The GCV spectrum of features without an intercept from their (weighted) mean
    sums $G = \hat F^\top\Omega\hat F/S$, $\hat F^\top\Omega Y/S$ and
    $\|\Omega^{1/2}Y\|_F^2/S$ ($S$ = `count`): the residual is $\|Y\|^2/S$ less the
    fitted part, exact for $N \le p$ too (the zero eigenvalues count in the trace)."""
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    projected = matmul(vectors.T, cross)
    return _GCVSpectrum(
        # Rounding can make the eigenvalues of a singular matrix slightly negative.
        eigenvalues=jnp.maximum(eigenvalues, 0),
        weights=jnp.sum(projected**2, axis=1),
        total=target_squares,
        trace=jnp.trace(gram),
        cancelled=target_squares,
        count=count,
        spectral=False,
    )


def spectrum_penalty(spectrum: _GCVSpectrum) -> tuple[Scalar, GCVStats]:
    r"""The minimiser of the GCV curve `spectrum` (see `gcv_penalty`) and its
    `GCVStats`."""
    top = spectrum.eigenvalues[-1]  # eigh sorts in ascending order
    # All-zero features: every alpha fits nothing, and any scale will do.
    top = 100 * jnp.where(top > 0, top, 1)
    log_alpha = choose_log_penalty(spectrum, spectrum.trace, top)
    gcv, dof, _ = spectrum(log_alpha)
    alpha = jnp.exp(log_alpha)
    return alpha, GCVStats(alpha2=alpha, gcv=gcv, dof=dof)


# Compiled once per shape and dtype: called eagerly, the golden-section loop would
# otherwise be traced and compiled again on every call.
@functools.partial(jax.jit, static_argnames="intercept")
def gcv_penalty(
    features: Float[Array, "N p"],
    targets: Float[Array, "N k"],
    intercept: bool = False,
    weights: Float[Array, " N"] | None = None,
) -> tuple[Scalar, GCVStats]:
    r"""The ridge penalty $\alpha^* = \operatorname{argmin}_{\alpha > 0}\mathrm{GCV}(\alpha)$
    for the features $\hat F$ (`(N, p)`, the ones column included when there is a bias)
    and the targets $Y$ (`(N, k)`); `intercept` says the last column of $\hat F$ is
    ones (then its spectrum is computed from the centred features, exactly, see
    `_gcv_spectrum`).

    With the eigenvalues $\lambda_i$ of $\hat F^\top\hat F/N$ (or of $\hat F\hat F^\top/N$
    when $N \le p$), $\mathrm{tr}\,H_\alpha = \sum_i \lambda_i/(\lambda_i + \alpha)$ and the
    residual is a similar sum (see `_GCVSpectrum`). GCV is minimised by `choose_log_penalty`
    over $\log\alpha \in [\log(\varepsilon\,\mathrm{tr}\,G), \log(100\lambda_{\max})]$,
    $G = \hat F^\top\hat F/N$ (with an intercept, $\mathrm{tr}\,G$ is that of the centred
    Gram matrix plus 1, since the offset is handled exactly): below $\varepsilon\,
    \mathrm{tr}\,G$ the penalty is lost in the rounding of the Gram matrix; above
    $100\lambda_{\max}$ every direction is shrunk by over 99% and GCV is flat at its
    limit $\|Y\|_F^2/N$. GCV's rounding error is about $r\varepsilon$ ($r$ eigenvalues)
    relative to its value and to the residual's cancelled part ($\|Y\|_F^2/N$ when the
    residual is $\|Y\|^2$ minus the fitted part, no intercept and $N > p$;
    $\|Y - \bar Y\|_F^2/N$ with an intercept); where it is flat to within that, as for
    targets the features fit exactly, the largest such penalty is taken.

    Everything is `jax.lax`, so it is jittable and vmappable. The inputs are not
    differentiated (the caller holds $\alpha^*$ fixed).

    **Returns:**

    `(alpha, stats)`: $\alpha^*$ and its `GCVStats`.
    """
    return spectrum_penalty(_gcv_spectrum(features, targets, intercept, weights))
