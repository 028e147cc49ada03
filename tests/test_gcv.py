"""`vploss_msereg(..., alpha2="gcv")`: the penalty minimising generalised cross-validation,
checked against a brute-force GCV curve computed here with NumPy."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vploss import GCVStats, vploss_msereg

from .helpers import directional_derivative_check, mlp, random_direction, repeated, tree_dot


def identity(features):
    return features


def _problem(n, m, k, noise, seed=0):
    """Features with singular values spread over three decades, so that GCV has an
    interior minimum, and noisy linear targets `(N, k)`."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, m)) * np.logspace(0, -3, m) + 0.5
    targets = features @ rng.normal(size=(m, k)) + noise * rng.normal(size=(n, k))
    return jnp.asarray(features), jnp.asarray(targets)


def brute_force_gcv(features, targets, alphas, use_bias, weights=None):
    """`N‖(I − H_α)Y‖² / (N − tr H_α)²` from the hat matrix
    `H_α = F̂ (F̂ᵀF̂/N + αI)⁻¹ F̂ᵀ/N = U diag(s²/(s² + α)) Uᵀ`, for every α from NumPy's
    full SVD of `F̂/√N` (backward stable, so also for features with a large offset,
    whose Gram matrix would lose the small directions): `(I − H_α)Y` has the coordinates
    `α/(s_i² + α)·u_iᵀY` (`u_iᵀY` beyond the rank), so its norm is a sum of
    non-negative terms, accurate also where the fit interpolates (N ≤ p, α → 0). With `weights`, the
    weighted problem with n = S = Σw: `S‖(I − H_α)D^½Y‖²/(S − tr H_α)²`, the SVD of
    `D^½F̂/√S`."""
    features = np.asarray(features, np.float64)
    targets = np.asarray(targets, np.float64).reshape(features.shape[0], -1)
    n = features.shape[0]
    if use_bias:
        features = np.concatenate([features, np.ones((n, 1))], axis=1)
    root = np.ones((n, 1)) if weights is None else np.sqrt(np.asarray(weights, float))[:, None]
    if weights is not None:
        n = float(np.sum(weights))
    targets = root * targets
    u, singular, _ = np.linalg.svd(root * features / np.sqrt(n))
    coordinates = np.sum((u.T @ targets) ** 2, axis=1)
    values, traces = [], []
    for alpha in np.atleast_1d(alphas):
        shrink = np.ones(len(coordinates))
        shrink[: len(singular)] = alpha / (singular**2 + alpha)
        # n − tr H as a sum of positive terms too.
        slack = n - len(singular) + np.sum(shrink[: len(singular)])
        values.append(n * np.sum(shrink**2 * coordinates) / slack**2)
        traces.append(n - slack)
    return np.array(values), np.array(traces), singular[0] ** 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, m, k, use_bias, noise",
    [
        (40, 6, 1, True, 0.3),
        pytest.param(100, 10, 3, False, 1.0, marks=pytest.mark.slow),
        (8, 12, 2, True, 0.3),  # N < p: the kernel matrix
        pytest.param(11, 10, 1, True, 0.1, marks=pytest.mark.slow),  # N = p
    ],
)
def test_alpha_against_brute_force_gcv_curve(n, m, k, use_bias, noise):
    features, targets = _problem(n, m, k, noise)
    _, readout = vploss_msereg(identity, features, targets, alpha2="gcv", use_bias=use_bias)
    stats = readout.stats
    assert isinstance(stats, GCVStats)
    alpha = float(stats.alpha2)
    # A fine grid of 20 points per decade over 14 decades around the largest eigenvalue
    # of the Gram matrix, where the explicit hat matrix is still accurate.
    _, _, top = brute_force_gcv(features, targets, 1.0, use_bias)
    grid = top * np.logspace(-12, 2, 281)
    curve, _, _ = brute_force_gcv(features, targets, grid, use_bias)
    best = np.argmin(curve)
    assert 0 < best < len(grid) - 1, "the test problem should have an interior minimum"
    value, trace, _ = brute_force_gcv(features, targets, alpha, use_bias)
    # The same minimum as the grid's (within one grid step), and at least as good.
    assert abs(np.log10(alpha / grid[best])) <= 0.05
    assert value[0] <= curve[best] * (1 + 1e-10)
    # No grid point between the grid's neighbours of alpha is better: a local minimum.
    near = np.abs(np.log10(grid / alpha)) < 0.2
    assert value[0] <= curve[near].min() * (1 + 1e-10)
    np.testing.assert_allclose(float(stats.gcv), value[0], rtol=1e-8)
    np.testing.assert_allclose(float(stats.dof), trace[0], rtol=1e-8)


def _mlp_problem(dtype=jnp.float64):
    model = mlp(3, width=16, features=12, dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(3), (60, 3), dtype)
    noise = jax.random.normal(jax.random.PRNGKey(4), (60, 2), dtype)
    y = jnp.concatenate([jnp.sin(2 * x[:, :1]), x[:, 1:2] * x[:, 2:]], axis=1) + 0.5 * noise
    return model, x, y


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver", [pytest.param(s, marks=pytest.mark.slow) for s in ("auto", "svd")] + ["cholesky"]
)
def test_loss_and_readout_equal_the_explicit_penalty(solver):
    model, x, y = _mlp_problem()
    loss, readout = vploss_msereg(model, x, y, alpha2="gcv", alpha1=0.1, solver=solver)
    alpha = readout.stats.alpha2
    ref_loss, ref_readout = vploss_msereg(model, x, y, alpha2=alpha, alpha1=0.1, solver=solver)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
    np.testing.assert_allclose(readout.weight, ref_readout.weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(readout.bias, ref_readout.bias, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_gradient_is_the_envelope_gradient_at_the_chosen_penalty():
    """alpha* is held fixed: the gradient is that of the ridge loss at alpha*, checked by
    central finite differences of `vploss_msereg(..., alpha2=alpha*)`."""
    model, x, y = _mlp_problem()
    alpha = vploss_msereg(model, x, y, alpha2="gcv")[1].stats.alpha2
    gcv_grad = eqx.filter_grad(lambda m: vploss_msereg(m, x, y, alpha2="gcv")[0])(model)
    fd, ad = directional_derivative_check(
        lambda m: vploss_msereg(m, x, y, alpha2=alpha)[0], model, h=1e-5
    )
    direction = random_direction(model)
    gcv_slope = float(tree_dot(gcv_grad, direction))
    np.testing.assert_allclose(gcv_slope, ad, rtol=1e-10)
    np.testing.assert_allclose(gcv_slope, fd, rtol=1e-6)
    # Forward mode agrees too.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _, jvp = jax.jvp(
        lambda p: vploss_msereg(eqx.combine(p, static), x, y, alpha2="gcv")[0],
        (params,),
        (direction,),
    )
    np.testing.assert_allclose(float(jvp), gcv_slope, rtol=1e-10)


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_jit_and_vmap():
    features, targets = _problem(40, 6, 2, 0.3)
    loss, readout = vploss_msereg(identity, features, targets, alpha2="gcv")
    jit_loss, jit_readout = eqx.filter_jit(vploss_msereg)(identity, features, targets, alpha2="gcv")
    np.testing.assert_allclose(float(jit_loss), float(loss), rtol=1e-12)
    np.testing.assert_allclose(jit_readout.stats.alpha2, readout.stats.alpha2, rtol=1e-10)

    other_features, other_targets = _problem(40, 6, 2, 1.0, seed=1)
    batch = jax.vmap(lambda f, t: vploss_msereg(identity, f, t, alpha2="gcv"))(
        jnp.stack([features, other_features]), jnp.stack([targets, other_targets])
    )
    other = vploss_msereg(identity, other_features, other_targets, alpha2="gcv")
    for i, (one_loss, one_readout) in enumerate([(loss, readout), other]):
        np.testing.assert_allclose(float(batch[0][i]), float(one_loss), rtol=1e-10)
        np.testing.assert_allclose(batch[1].stats.alpha2[i], one_readout.stats.alpha2, rtol=1e-8)


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_float32_chooses_the_float64_penalty():
    """A float32 minimiser cannot tell apart penalties whose GCV values differ by less
    than the rounding error of evaluating GCV in float32. GCV sums the `p` spectral
    components of the residual and of the trace, so that error is at most about
    `p·eps32` relative (measured: 1.7·eps32 for a NumPy float32 evaluation), and the
    float32 choice must have a float64 GCV value within `2·p·eps32` of the float64 one's
    (measured: 3·eps32). Near its minimum GCV is a parabola in `log α` of curvature
    `c = G''/G` (from the brute-force curve), so that also bounds the penalty:
    `|log(α32/α64)| <= sqrt(2·2·p·eps32 / c)` (about 3% here; measured 0.8%)."""
    features, targets = _problem(200, 20, 1, 1.0)
    _, readout64 = vploss_msereg(identity, features, targets, alpha2="gcv")
    _, readout32 = vploss_msereg(
        identity, features.astype(jnp.float32), targets.astype(jnp.float32), alpha2="gcv"
    )
    assert readout32.stats.alpha2.dtype == jnp.float32
    alpha64, alpha32 = float(readout64.stats.alpha2), float(readout32.stats.alpha2)
    p = features.shape[1] + 1  # with the bias
    tolerance = 2 * p * float(jnp.finfo(jnp.float32).eps)
    values, _, _ = brute_force_gcv(features, targets, [alpha32, alpha64], use_bias=True)
    assert values[0] <= values[1] * (1 + tolerance)
    h = 0.1
    curve, _, _ = brute_force_gcv(features, targets, alpha64 * np.exp([-h, 0.0, h]), use_bias=True)
    curvature = (curve[0] - 2 * curve[1] + curve[2]) / h**2 / curve[1]
    assert curvature > 0
    assert abs(np.log(alpha32 / alpha64)) <= np.sqrt(2 * tolerance / curvature)


@pytest.mark.slow
@pytest.mark.parametrize("offset", [300.0, 1e6])
@pytest.mark.parametrize("target_offset", [0.0, 1e4])
def test_float32_gcv_with_a_feature_offset(offset, target_offset):
    """Features around a common offset (kelvin, time stamps): the float32 choice has a
    float64 GCV value within the float32 rounding bound above of the best on a fine
    grid of penalties. The Gram matrix's spectrum lost its small directions to the
    offset (float32 chose 0.22 against 3e-8 at offset 300, GCV 2x the minimum, and
    100·λ_max at 1e6, 23x)."""
    features, targets = _problem(300, 6, 1, 0.5)
    # The reference sees the float32 data (around 1e6 float32 resolves 0.06).
    features = (features + offset).astype(jnp.float32)
    # A large target mean made the residual ‖Y‖² − fitted cancel in float32.
    targets = (targets + target_offset).astype(jnp.float32)
    _, readout32 = vploss_msereg(identity, features, targets, alpha2="gcv")
    alpha32 = float(readout32.stats.alpha2)
    grid = np.logspace(-16, 2, 400)
    values, _, _ = brute_force_gcv(features, targets, np.r_[alpha32, grid], use_bias=True)
    total = np.mean(np.asarray(targets, np.float64) ** 2)
    best = values[1:].min()
    # The grid's spacing (0.045 decades) allows 1e-3. At 1e6 the spectrum has, beside
    # the offset's eigenvalue |μ|², a partner of about σ²/|μ|² (the penalised intercept
    # against the mean), below what float32 resolves of either factorisation: 1e-2
    # there (measured 0.4%).
    bound = max(10 * np.finfo(np.float32).eps * total / best, 1e-3 if offset < 1e4 else 1e-2)
    assert values[0] <= best * (1 + bound), (alpha32, grid[values[1:].argmin()])


@pytest.mark.parametrize("bad", ["GCV", "loocv", ""])
def test_unknown_string_is_an_error(bad):
    features, targets = _problem(20, 3, 1, 0.1)
    with pytest.raises(ValueError, match='`alpha2` must be a number >= 0 or the string "gcv"'):
        vploss_msereg(identity, features, targets, alpha2=bad)


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, m, k, use_bias, noise",
    # The centred, primal and dual forms.
    [
        (40, 6, 1, True, 0.3),
        pytest.param(100, 10, 3, False, 1.0, marks=pytest.mark.slow),
        pytest.param(8, 12, 2, True, 0.3, marks=pytest.mark.slow),
    ],
)
def test_weighted_penalty_repeats_and_drops_samples(n, m, k, use_bias, noise):
    """Integer weights with zeros choose the penalty of the data set with each sample
    repeated w_j times and the zero-weight ones dropped, and that penalty minimises the
    brute-force weighted GCV curve. The two problems differ in shape (and form), so
    their GCV values agree to rounding (measured 2e-12; 1e-10), and the golden-section
    minimiser and the trace at it to about the square root of that, GCV being flat at
    its minimum (measured 1.2e-7 in alpha; 1e-6). With fewer samples than coefficients
    (the dual form) only 0/1 weights: repeating samples there makes the fit interpolate
    as alpha → 0 with n − tr H > 0, so GCV has no interior minimum (its argmin is the
    bottom of the grid, which depends on the form)."""
    features, targets = _problem(n, m, k, noise)
    rng = np.random.default_rng(0)
    if n < m:
        weights = (rng.uniform(size=n) > 0.25).astype(int)
    else:
        weights = rng.integers(0, 4, n)
    kwargs = dict(alpha2="gcv", use_bias=use_bias)
    gcv = eqx.filter_jit(vploss_msereg)
    weighted = gcv(identity, features, targets, weights=jnp.asarray(weights), **kwargs)
    rep = gcv(identity, *map(jnp.asarray, repeated(weights, features, targets)), **kwargs)
    stats, rep_stats = weighted[1].stats, rep[1].stats
    np.testing.assert_allclose(float(stats.alpha2), float(rep_stats.alpha2), rtol=1e-6)
    np.testing.assert_allclose(float(stats.gcv), float(rep_stats.gcv), rtol=1e-10)
    np.testing.assert_allclose(float(stats.dof), float(rep_stats.dof), rtol=1e-6)
    np.testing.assert_allclose(float(weighted[0]), float(rep[0]), rtol=1e-6)
    alpha = float(stats.alpha2)
    _, _, top = brute_force_gcv(features, targets, 1.0, use_bias, weights)
    assert 1e-12 * top < alpha < top, "the test problem should have an interior minimum"
    value, trace, _ = brute_force_gcv(features, targets, alpha, use_bias, weights)
    np.testing.assert_allclose(float(stats.gcv), value[0], rtol=1e-8)
    np.testing.assert_allclose(float(stats.dof), trace[0], rtol=1e-8)
    near = alpha * np.logspace(-0.2, 0.2, 9)
    curve, _, _ = brute_force_gcv(features, targets, near, use_bias, weights)
    assert value[0] <= curve.min() * (1 + 1e-10)


def _noise_free(n, m, dtype, seed=0):
    """Gaussian features and targets they fit exactly (issue 24's report): GCV's
    minimum is below what the working precision resolves."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, m))
    return features.astype(dtype), (features @ rng.normal(size=m)).astype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    "n, m, use_bias, dtype, weighted",
    [
        (100, 50, True, np.float64, False),  # centred form
        (40, 50, False, np.float64, False),  # dual form, N < p
        # float32 in the default run: docs/hostile_inputs.md's interpolating row
        pytest.param(100, 50, False, np.float32, False, marks=pytest.mark.slow),
        pytest.param(40, 50, True, np.float32, False, marks=pytest.mark.slow),
        pytest.param(100, 50, True, np.float64, True, marks=pytest.mark.slow),
    ],
)
def test_noise_free_targets_choose_a_resolved_reproducible_penalty(n, m, use_bias, dtype, weighted):
    """Targets the features fit exactly: GCV falls below its rounding error as alpha
    → 0, so its minimiser was wherever rounding put it (1e-31 and 1e-29, with losses
    differing by 95% and 14% between two float64 evaluations). The brute-force float64
    GCV of the data checks the chosen penalty: at least eps·λ_max (the working
    precision's eps; below it the penalty is lost in the Gram matrix's rounding); within
    the rounding of the minimum over the penalties from eps·tr G (the rounding of
    forming G; with a bias, of the centred G plus 1), which is p·eps relative and, for
    N > p, where the residual is ‖Y_c‖² less the fitted part, p·eps·‖Y_c‖²/N divided by
    (1 − tr H/N)²; and near the top of that flat part (3α is beyond it). The samples
    permuted give the same penalty, loss and readout to p·eps·κ, κ the condition number
    of F̂'s nonzero spectrum."""
    features, targets = _noise_free(n, m, dtype)
    weights = np.random.default_rng(1).integers(1, 4, n) if weighted else None
    eps = float(np.finfo(dtype).eps)

    def fit(order):
        w = None if weights is None else jnp.asarray(weights[order])
        return vploss_msereg(
            identity,
            jnp.asarray(features[order]),
            jnp.asarray(targets[order]),
            alpha2="gcv",
            use_bias=use_bias,
            weights=w,
        )

    loss, readout = fit(np.arange(n))
    alpha = float(readout.stats.alpha2)
    _, _, top = brute_force_gcv(features, targets, 1.0, use_bias, weights)
    assert alpha >= eps * top
    mean = np.average(features, axis=0, weights=weights) if use_bias else 0.0
    trace = np.average(np.sum((features - mean) ** 2, axis=1), weights=weights) + use_bias
    grid = np.geomspace(eps * trace, 100 * top, 200)
    (value, tripled), (trace, _), _ = brute_force_gcv(
        features, targets, [alpha, 3 * alpha], use_bias, weights
    )
    curve, _, _ = brute_force_gcv(features, targets, grid, use_bias, weights)
    count = n if weights is None else np.sum(weights)
    mean = np.average(targets, weights=weights) if use_bias else 0.0
    spread = np.average((targets - mean) ** 2, weights=weights)
    p = m + use_bias
    cancelled = spread / (1 - trace / count) ** 2 if n > p else 0.0
    rounding = p * eps * (curve.min() + cancelled)
    assert value <= curve.min() + 2 * rounding
    assert tripled > curve.min() + rounding

    other_loss, other = fit(np.random.default_rng(2).permutation(n))
    singular = np.linalg.svd(
        np.concatenate([features, np.ones((n, int(use_bias)))], axis=1), compute_uv=False
    )
    tolerance = p * eps * (singular[0] / singular[min(n, p) - 1]) ** 2
    assert float(other.stats.alpha2) == pytest.approx(alpha, rel=tolerance, abs=0)
    assert float(other_loss) == pytest.approx(float(loss), rel=tolerance, abs=0)
    np.testing.assert_allclose(other.weight, readout.weight, rtol=tolerance, atol=tolerance)
