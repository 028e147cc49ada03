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
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from ._lstsq import sample_scale
from ._misc import column_mean, matmul


#: Points of the log-spaced grid over the penalty (see `gcv_penalty`).
_GRID_POINTS = 64
#: The grid spans `[eps·λ_max, _GRID_TOP·λ_max]`.
_GRID_TOP = 1e2
#: Golden-section steps of the refinement: each shrinks the bracket by 0.618, so 40 steps
#: take the two grid cells around the best point (under 0.6 decades) to a relative
#: precision of about 1e-8 in `alpha`.
_REFINE_STEPS = 40
_INV_GOLDEN = (math.sqrt(5) - 1) / 2


class GCVStats(eqx.Module):
    r"""The readout penalty chosen by generalised cross-validation, carried by the readout
    of `vploss_msereg(..., alpha2="gcv")` as `readout.stats`.

    **Fields:**

    - `alpha2`: the chosen penalty $\alpha^*$, the minimiser of $\mathrm{GCV}$.
    - `gcv`: the minimal value $\mathrm{GCV}(\alpha^*) = N\|(I - H_{\alpha^*})Y\|_F^2 /
        (N - \mathrm{tr}\,H_{\alpha^*})^2$.
    - `dof`: the effective number of parameters (per output) $\mathrm{tr}\,H_{\alpha^*}$,
        between 0 and $\min(N, p)$.
    """

    alpha2: Float[Array, ""]
    gcv: Float[Array, ""]
    dof: Float[Array, ""]


class _Spectrum(eqx.Module):
    r"""What GCV needs of $(\hat F, Y)$, from the eigendecomposition of the smaller of the
    Gram matrix $\hat F^\top\hat F/N$ (when $N > p$) and the kernel matrix $\hat F\hat
    F^\top/N$ (when $N \le p$): both have the nonzero eigenvalues $\lambda_i = s_i^2$ of
    $\hat F/\sqrt N = U S V^\top$."""

    eigenvalues: Float[Array, " r"]
    # Primal: ‖b_i‖² with b = Vᵀ F̂ᵀY/N = S c; dual and centred: ‖c_i‖² with c = UᵀY/√N.
    weights: Float[Array, " r"]
    # Primal: ‖Y‖²/N; centred: ‖Y_⊥‖²/N, the part of Y outside the range of F̂; dual: 0.
    total: Scalar
    # The scale below which eps times it is lost in rounding: λ_max, or for centred
    # features the largest eigenvalue of diag(C, 1) (the offset direction is exact).
    resolved: Scalar
    # n in GCV's formula: N, or the total weight S.
    count: Scalar | int
    # The residual as a sum of non-negative terms (dual and centred forms), not as ‖Y‖²
    # minus the fitted part (primal).
    spectral: bool = eqx.field(static=True)

    def __call__(self, log_alpha: Float[Array, "*g"]) -> tuple[Float[Array, "*g"], ...]:
        """`(GCV, tr H)` at `alpha = exp(log_alpha)`, elementwise."""
        alpha = jnp.exp(log_alpha)[..., None]
        lam = self.eigenvalues
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
            floor = jnp.finfo(lam.dtype).eps * self.total
            residual = jnp.maximum(self.total - fitted, floor)
        # n − tr H = (n − r) + Σ α/(λ_i + α) over the r eigenvalues (r = p, or N in the
        # dual form, where n − r is 0 without weights), exact for every α > 0.
        slack = (self.count - lam.shape[-1]) + jnp.sum(shrink, axis=-1)
        slack = slack / self.count
        # n − tr H > 0 for every α > 0 (a sum of positive terms, plus N − p > 0 in the
        # primal form), but it underflows as α/λ_max → 0 with N ≤ p; such an α counts as
        # +inf (GCV is then 0/0), never as a NaN.
        ok = slack > 0
        gcv = jnp.where(ok, residual / jnp.where(ok, slack, 1) ** 2, jnp.inf)
        return gcv, self.count * (1 - slack)


def _spectrum(
    features: Float[Array, "N p"],
    targets: Float[Array, "N k"],
    intercept: bool,
    weights: Float[Array, " N"] | None,
) -> _Spectrum:
    num_samples, num_coefficients = features.shape
    spectral = True
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
        resolved = eigenvalues[-1]
        # Every direction of the targets is in the kernel's range (up to its null
        # space, whose terms are in the sum with λ = 0).
        total = jnp.zeros((), targets.dtype)
    elif intercept:
        # With a large common offset the Gram matrix is dominated by it, and its small
        # eigenvalues are lost in float32. It factors exactly as LᵀBL with B =
        # diag(C, 1), C the centred Gram matrix, L = [[I, 0], [μᵀ, 1]]: so F̂/√N has the
        # singular values and right singular vectors of the small matrix
        # [[Λ^½Uᵀ, 0], [μᵀ, 1]] (C = UΛUᵀ), with no cancellation. Sums over samples only.
        mean = column_mean(features[:, :-1], weights)
        target_mean = column_mean(targets, weights)
        centred = rows(features[:, :-1] - mean)
        targets = rows(targets - target_mean)
        centred_gram = matmul(centred.T, centred) / num_samples
        centred_eigenvalues, centred_vectors = jnp.linalg.eigh(centred_gram)
        root = jnp.sqrt(jnp.maximum(centred_eigenvalues, 0))[:, None] * centred_vectors.T
        factor = jnp.block(
            [
                [root, jnp.zeros_like(root[:, :1])],
                [mean[None, :], jnp.ones_like(mean[:1])[None, :]],
            ]
        )
        left, singular_values, vt = jnp.linalg.svd(factor)
        # Ascending, as `eigh` would give them.
        singular_values, left = singular_values[::-1], left[:, ::-1]
        eigenvalues = singular_values**2
        # F̂/√N = Q̃·factor with orthonormal Q̃ = [F_c U Λ^-½/√N, 1/√N], so the
        # coefficients of Y in the left singular vectors are c = leftᵀ Q̃ᵀY/√N and
        # b = s·c: the centred cross products, never the offset's.
        centred_cross = matmul(centred_vectors.T, matmul(centred.T, targets)) / num_samples
        safe = jnp.where(centred_eigenvalues > 0, centred_eigenvalues, 1)
        whitened = jnp.where(
            centred_eigenvalues[:, None] > 0, centred_cross / jnp.sqrt(safe)[:, None], 0
        )
        coordinates = jnp.concatenate([whitened, target_mean[None]])
        projected = matmul(left.T, coordinates)
        # The part of Y outside the range of F̂ = span(F_c, 1): of Y_c outside that of
        # F_c (the offset ȳ never enters).
        centred_total = jnp.sum(targets**2) / num_samples
        total = jnp.maximum(centred_total - jnp.sum(whitened**2), 0)
        resolved = jnp.maximum(centred_eigenvalues[-1], 1)
    else:
        # The Gram matrix is a sum over samples (a matmul), so it shards along the batch
        # like the Cholesky solver.
        features, targets = rows(features), rows(targets)
        gram = matmul(features.T, features) / num_samples
        eigenvalues, vectors = jnp.linalg.eigh(gram)
        projected = matmul(vectors.T, matmul(features.T, targets) / num_samples)
        resolved = eigenvalues[-1]
        total = jnp.sum(targets**2) / num_samples
        spectral = False
    return _Spectrum(
        # Rounding can make the eigenvalues of a singular matrix slightly negative.
        eigenvalues=jnp.maximum(eigenvalues, 0),
        weights=jnp.sum(projected**2, axis=1),
        total=total,
        resolved=resolved,
        count=count,
        spectral=spectral,
    )


def minimise_on_log_grid(
    fn: Callable[[Float[Array, "*g"]], Float[Array, "*g"]], grid: Float[Array, " g"]
) -> Scalar:
    r"""The minimiser of a function of one variable (here $\log\alpha$) over an
    interval: `fn` (elementwise, so evaluated on the whole ascending `grid` at once) is
    minimised on the grid, and the best point refined by golden-section search between
    its two neighbours (`_REFINE_STEPS` steps). The refinement can only improve on the
    grid point (a multimodal cell never makes it worse). All `jax.lax`: jittable and
    vmappable; the penalty choice of GCV and of the stochastic readout's sampled GCV."""
    values = fn(grid)
    best = jnp.argmin(values)
    last = grid.shape[0] - 1
    lo = grid[jnp.maximum(best - 1, 0)]
    hi = grid[jnp.minimum(best + 1, last)]

    def golden_step(_, state):
        lo, hi, c, fc, d, fd = state
        # Keep the better interior point and place a new one in the larger part.
        left = fc < fd
        new_lo = jnp.where(left, lo, c)
        new_hi = jnp.where(left, d, hi)
        new = jnp.where(
            left,
            new_hi - _INV_GOLDEN * (new_hi - new_lo),
            new_lo + _INV_GOLDEN * (new_hi - new_lo),
        )
        f_new = fn(new)
        # Left: the old c becomes d and the new point c; right: the old d becomes c.
        c, fc, d, fd = (
            jnp.where(left, new, d),
            jnp.where(left, f_new, fd),
            jnp.where(left, c, new),
            jnp.where(left, fc, f_new),
        )
        return new_lo, new_hi, c, fc, d, fd

    c = hi - _INV_GOLDEN * (hi - lo)
    d = lo + _INV_GOLDEN * (hi - lo)
    state = (lo, hi, c, fn(c), d, fn(d))
    _, _, c, fc, d, fd = jax.lax.fori_loop(0, _REFINE_STEPS, golden_step, state)
    candidates = jnp.stack([grid[best], c, d])
    return candidates[jnp.argmin(jnp.stack([values[best], fc, fd]))]


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
    `_spectrum`).

    With the eigenvalues $\lambda_i$ of $\hat F^\top\hat F/N$ (or of $\hat F\hat F^\top/N$
    when $N \le p$), $\mathrm{tr}\,H_\alpha = \sum_i \lambda_i/(\lambda_i + \alpha)$ and the
    residual is a similar sum (see `_Spectrum`). GCV is evaluated on 64 points of
    $\log\alpha$ spaced evenly over $[\varepsilon^q\lambda_{\rm res}, 100\lambda_{\max}]$
    ($\lambda_{\rm res} = \lambda_{\max}$, or with an intercept the largest eigenvalue
    of the centred Gram matrix and 1, since the offset is handled exactly): with the
    residual as ‖Y‖² minus the fitted part (no intercept, N > p), $q = 1$, below which
    the penalty is lost in the rounding of that difference; with the residual as a sum
    of non-negative terms (an intercept, or N ≤ p), $q = 2$; above
    $100\lambda_{\max}$ every direction is shrunk by over 99% and GCV is flat at its
    limit $\|Y\|_F^2/N$. The best grid point is then refined by golden-section search
    on $\log\alpha$ between its two neighbours.

    Everything is `jax.lax`, so it is jittable and vmappable. The inputs are not
    differentiated (the caller holds $\alpha^*$ fixed).

    **Returns:**

    `(alpha, stats)`: $\alpha^*$ and its `GCVStats`.
    """
    spectrum = _spectrum(features, targets, intercept, weights)
    dtype = spectrum.eigenvalues.dtype
    eps = jnp.finfo(dtype).eps
    top = spectrum.eigenvalues[-1]  # eigh sorts in ascending order
    resolved = jnp.log(jnp.where(spectrum.resolved > 0, spectrum.resolved, 1))
    # All-zero features: every alpha fits nothing, and any scale will do.
    log_top = jnp.log(jnp.where(top > 0, top, 1))
    grid = jnp.linspace(
        resolved + (2 if spectrum.spectral else 1) * math.log(eps),
        log_top + math.log(_GRID_TOP),
        _GRID_POINTS,
        dtype=dtype,
    )
    log_alpha = minimise_on_log_grid(lambda t: spectrum(t)[0], grid)
    gcv, dof = spectrum(log_alpha)
    alpha = jnp.exp(log_alpha)
    return alpha, GCVStats(alpha2=alpha, gcv=gcv, dof=dof)
