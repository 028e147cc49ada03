"""`readout_posterior` and `ReadoutPosterior` against independent NumPy float64
references: the closed-form Bayesian linear regression posterior (ridge), the Laplace
posterior from a dense Hessian at the Newton reference's readout (logistic, softmax,
Poisson), quadrature and Monte Carlo for the predictive probabilities; float32 within a
tolerance derived from the precision's condition number; `jit`, `vmap`, weights and the
error paths."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import (
    cast,
    inner_objective64,
    LOSS_CASES,
    mlp,
    newton_reference,
    repeated,
    stacked_coef,
)


N = 40
M = 6


def _model(offset=0.0, dtype=jnp.float64):
    """A tanh MLP feature map 3 → 6 whose features carry a common `offset`."""
    net = mlp(3, 8, 2, M, dtype=dtype)
    return lambda sample: net(sample) + jnp.asarray(offset, dtype)


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng


def _features(model, x):
    return np.asarray(jax.vmap(model)(jnp.asarray(x)), np.float64)


def _augmented(features, use_bias):
    return np.c_[features, np.ones(len(features))] if use_bias else features


def _blr_reference(features, targets, alpha2, weights=None, use_bias=True, noise="evidence"):
    r"""Bayesian linear regression in closed form: the posterior mean `(p, k)`, the
    unit covariance $(\hat F^\top D\hat F + S\alpha I)^{-1}$ `(p, p)` (times
    $\sigma_a^2$ per output) and the noise variances `(k,)`."""
    fh = _augmented(features, use_bias)
    y = np.asarray(targets, np.float64).reshape(len(fh), -1)
    w = np.ones(len(fh)) if weights is None else np.asarray(weights, np.float64)
    total = w.sum()
    p = fh.shape[1]
    # The precision F̂ᵀDF̂ + SαI is AᵀA for the stacked A = [D^½F̂; √(Sα) I]: its inverse
    # from the SVD of A, and the mean by least squares on A (backward stable, so an
    # offset of the features costs κ(A) = √κ(AᵀA) digits, not κ(AᵀA)).
    stacked = np.r_[np.sqrt(w)[:, None] * fh, np.sqrt(total * alpha2) * np.eye(p)]
    _, singular, vt = np.linalg.svd(stacked, full_matrices=False)
    unit = (vt.T / singular**2) @ vt
    response = np.r_[np.sqrt(w)[:, None] * y, np.zeros((p, y.shape[1]))]
    mean = np.linalg.lstsq(stacked, response, rcond=None)[0]
    residual = y - fh @ mean
    # γ = tr(Ĝ(Ĝ + αI)⁻¹) = p − Sα tr((F̂ᵀDF̂ + SαI)⁻¹).
    dof = p - total * alpha2 * np.trace(unit)
    rss = np.sum(w[:, None] * residual**2, axis=0)
    if noise == "evidence":
        sigma2 = rss / (total - dof)
    elif noise == "residual":
        sigma2 = rss / total
    else:
        sigma2 = np.broadcast_to(np.asarray(noise, np.float64), rss.shape)
    return mean, unit, sigma2


def _laplace_reference(case, features, targets, alpha2, weights=None):
    """The Newton reference's readout `(p, k)` and the Laplace covariance `(p, k, p, k)`,
    the inverse of S times the dense NumPy Hessian of the inner objective there."""
    _, coef = newton_reference(case.reference, features, targets, alpha2, weights)
    evaluate, (p, k) = inner_objective64(case.reference, features, targets, alpha2, weights)
    total = len(features) if weights is None else float(np.sum(weights))
    covariance = np.linalg.inv(total * evaluate(coef)[2])
    return coef, covariance.reshape(p, k, p, k)


def _latent(posterior, features):
    mean, covariance = jax.vmap(posterior.latent)(jnp.asarray(features))
    return np.asarray(mean), np.asarray(covariance)


@pytest.mark.parametrize(
    "use_bias, offset, k, weighted, noise",
    [
        (True, 300.0, 2, False, "evidence"),
        (True, 0.0, 1, True, "residual"),
        (False, 0.0, 1, False, 0.3),
        (True, 0.0, 2, True, "evidence"),
    ],
)
def test_ridge_is_bayesian_linear_regression(use_bias, offset, k, weighted, noise):
    model = _model(offset)
    x, rng = _data()
    targets = rng.normal(size=(N, k)) + _features(model, x)[:, :k]
    y = targets[:, 0] if k == 1 else targets
    weights = rng.integers(0, 4, N).astype(float) if weighted else None
    alpha2 = 1e-3
    posterior = vploss.readout_posterior(
        model,
        x,
        y,
        loss=vploss.vploss_msereg,
        alpha2=alpha2,
        weights=weights,
        use_bias=use_bias,
        noise=noise,
    )
    mean, unit, sigma2 = _blr_reference(
        _features(model, x), targets, alpha2, weights, use_bias, noise
    )
    x_test, _ = _data(1, 7)
    features = _features(model, x_test)
    fh = _augmented(features, use_bias)
    latent_mean, latent_cov = _latent(posterior, features)
    np.testing.assert_allclose(posterior.noise, sigma2, rtol=1e-9)
    np.testing.assert_allclose(latent_mean, fh @ mean, rtol=1e-9, atol=1e-9)
    reference_cov = np.einsum("ip,pq,iq->i", fh, unit, fh)[:, None, None] * np.diag(sigma2)
    np.testing.assert_allclose(latent_cov, reference_cov, rtol=1e-7, atol=1e-12)
    predictive_mean, predictive_var = jax.vmap(posterior.predict)(jnp.asarray(features))
    expected_var = np.einsum("ip,pq,iq->i", fh, unit, fh)[:, None] * sigma2 + sigma2
    if k == 1:
        assert predictive_mean.shape == predictive_var.shape == (7,)
        expected_var = expected_var[:, 0]
    np.testing.assert_allclose(predictive_mean, np.squeeze(fh @ mean), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(predictive_var, expected_var, rtol=1e-7)


def test_ridge_gcv_uses_the_gcv_penalty():
    model = _model()
    x, rng = _data()
    y = rng.normal(size=N) + _features(model, x)[:, 0]
    posterior = vploss.readout_posterior(model, x, y, loss=vploss.vploss_msereg, alpha2="gcv")
    _, readout = vploss.vploss_msereg(model, x, y, alpha2="gcv")
    np.testing.assert_allclose(posterior.alpha2, readout.stats.alpha2, rtol=1e-12)
    mean, unit, sigma2 = _blr_reference(_features(model, x), y, float(posterior.alpha2))
    features = _features(model, _data(2, 3)[0])
    fh = _augmented(features, True)
    _, variance = jax.vmap(posterior.predict)(jnp.asarray(features))
    np.testing.assert_allclose(
        variance, sigma2 * (1 + np.einsum("ip,pq,iq->i", fh, unit, fh)), rtol=1e-7
    )


def _labels(name, rng, logits):
    if name == "bce":
        return (rng.uniform(size=logits.shape[0]) < 1 / (1 + np.exp(-logits[:, 0]))).astype(float)
    if name == "ce":
        probabilities = np.exp(logits[:, :3]) / np.exp(logits[:, :3]).sum(1, keepdims=True)
        return np.array([rng.choice(3, p=row) for row in probabilities])
    return rng.poisson(np.exp(0.5 * logits[:, 0])).astype(float)


@pytest.mark.parametrize("name", ["bce", "ce", "poisson"])
@pytest.mark.parametrize("weighted", [False, True])
def test_laplace_matches_a_dense_numpy_hessian(name, weighted):
    case = LOSS_CASES[name]
    model = _model(offset=5.0)
    x, rng = _data()
    features = _features(model, x)
    y = _labels(name, rng, 3 * (features - 5.0))
    weights = rng.uniform(0.2, 2.0, N) if weighted else None
    alpha2 = 1e-2
    posterior = vploss.readout_posterior(
        model, x, y, loss=case.function, alpha2=alpha2, weights=weights, **case.kwargs
    )
    coef, covariance = _laplace_reference(case, features, case.targets(y), alpha2, weights)
    test_features = _features(model, _data(3, 5)[0])
    fh = _augmented(test_features, True)
    mean, latent_cov = _latent(posterior, test_features)
    reference = np.einsum("ip,paqb,iq->iab", fh, covariance, fh)
    if name == "ce":
        # The softmax posterior has no variance along the logits' common shift (the
        # readout has no component there); the reference's is 1/(Sα2), removed here.
        centring = np.eye(3) - 1 / 3
        reference = centring @ reference @ centring
    np.testing.assert_allclose(mean, fh @ coef, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        latent_cov, reference, rtol=1e-6, atol=1e-10 * np.abs(reference).max()
    )


def test_prior_alpha2_changes_the_covariance_only():
    """A separate prior precision (Laplace Redux's post-hoc tuning): the mean is the
    readout fitted with `alpha2`, the covariance (S(H_data + prior·I))⁻¹ there."""
    case = LOSS_CASES["bce"]
    model = _model(offset=5.0)
    x, rng = _data()
    features = _features(model, x)
    y = _labels("bce", rng, 3 * (features - 5.0))
    alpha2, prior = 1e-2, 0.3
    posterior = vploss.readout_posterior(
        model, x, y, loss=vploss.vploss_bce, alpha2=alpha2, prior_alpha2=prior
    )
    _, coef = newton_reference(case.reference, features, y[:, None], alpha2)
    evaluate, (p, k) = inner_objective64(case.reference, features, y[:, None], alpha2)
    hessian = evaluate(coef)[2] + (prior - alpha2) * np.eye(p * k)
    covariance = np.linalg.inv(N * hessian)
    test = _features(model, _data(3, 5)[0])
    fh = _augmented(test, True)
    mean, latent_cov = _latent(posterior, test)
    np.testing.assert_allclose(mean, fh @ coef, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(
        latent_cov[:, 0, 0], np.einsum("ip,pq,iq->i", fh, covariance, fh), rtol=1e-6
    )
    assert float(posterior.alpha2) == alpha2 and float(posterior.prior_alpha2) == prior
    with pytest.raises(ValueError, match="prior_alpha2"):
        vploss.readout_posterior(model, x, y, loss=vploss.vploss_bce, alpha2=1.0, prior_alpha2=0.0)


def _sigmoid_expectation(mean, variance):
    """E[σ(z)], z ~ N(mean, variance), by 200-point Gauss–Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    z = mean[:, None] + np.sqrt(variance)[:, None] * nodes
    return (1 / (1 + np.exp(-z))) @ weights / np.sqrt(2 * np.pi)


@pytest.fixture(scope="module")
def logistic_posterior():
    model = _model()
    x, rng = _data(0, 30)
    features = _features(model, x)
    y = _labels("bce", rng, 4 * features)
    posterior = vploss.readout_posterior(model, x, y, loss=vploss.vploss_bce, alpha2=1e-2)
    test = jnp.asarray(2 * _features(model, 3 * _data(4, 50)[0]))
    return posterior, test


def test_probit_within_its_known_error_and_mc_agrees(logistic_posterior):
    """The probit approximation of E[σ(z)] is off by at most about 0.02 (absolute);
    Monte Carlo agrees with quadrature within its standard error."""
    posterior, test = logistic_posterior
    mean, covariance = _latent(posterior, test)
    variance = covariance[:, 0, 0]
    assert variance.max() > 1.0, "the case must have real uncertainty"
    exact = _sigmoid_expectation(mean[:, 0], variance)
    probit = np.asarray(jax.vmap(posterior.predict)(test))
    assert probit.shape == (50,)
    assert np.max(np.abs(probit - exact)) < 0.02
    # The approximation does change the probabilities (it is not the plug-in).
    assert np.max(np.abs(1 / (1 + np.exp(-mean[:, 0])) - exact)) > 0.05
    num_samples = 20000
    key = jax.random.PRNGKey(0)
    mc = np.asarray(
        jax.vmap(lambda f: posterior.predict(f, method="mc", key=key, num_samples=num_samples))(
            test
        )
    )
    standard_error = 0.5 / np.sqrt(num_samples)
    assert np.max(np.abs(mc - exact)) < 5 * standard_error


def test_softmax_probit_bridge_and_mc():
    model = _model()
    x, rng = _data(0, 30)
    y = _labels("ce", rng, 3 * _features(model, x))
    posterior = vploss.readout_posterior(
        model, x, y, loss=vploss.vploss_ce, alpha2=1e-2, num_classes=3
    )
    test = jnp.asarray(_features(model, 2 * _data(5, 20)[0]))
    mean, covariance = _latent(posterior, test)
    np.testing.assert_allclose(mean.sum(1), 0, atol=1e-10)
    np.testing.assert_allclose(covariance.sum(2), 0, atol=1e-10)
    # A NumPy Monte Carlo reference from the same Gaussian.
    draws = np.random.default_rng(0).standard_normal((200000, 3))
    reference = []
    for mu, cov in zip(mean, covariance, strict=True):
        values, vectors = np.linalg.eigh(cov)
        z = mu + draws @ (vectors * np.sqrt(np.maximum(values, 0))).T
        e = np.exp(z - z.max(1, keepdims=True))
        reference.append((e / e.sum(1, keepdims=True)).mean(0))
    reference = np.array(reference)
    key = jax.random.PRNGKey(1)
    mc = np.asarray(
        jax.vmap(lambda f: posterior.predict(f, method="mc", key=key, num_samples=20000))(test)
    )
    assert np.max(np.abs(mc - reference)) < 5 * 0.5 / np.sqrt(20000)
    probit = np.asarray(jax.vmap(posterior.predict)(test))
    np.testing.assert_allclose(probit.sum(1), 1, rtol=1e-12)
    assert np.max(np.abs(probit - reference)) < 0.05
    scaled = mean / np.sqrt(1 + np.pi / 8 * np.diagonal(covariance, axis1=1, axis2=2))
    np.testing.assert_allclose(probit, np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True))
    bridge = np.asarray(jax.vmap(lambda f: posterior.predict(f, method="bridge"))(test))
    variance = np.diagonal(covariance, axis1=1, axis2=2)
    alpha = (1 - 2 / 3 + np.exp(mean) * np.exp(-mean).sum(1, keepdims=True) / 9) / variance
    np.testing.assert_allclose(bridge, alpha / alpha.sum(1, keepdims=True), rtol=1e-10)


def test_poisson_rate_is_the_lognormal_mean():
    model = _model()
    x, rng = _data()
    y = _labels("poisson", rng, _features(model, x))
    posterior = vploss.readout_posterior(model, x, y, loss=vploss.vploss_poisson, alpha2=1e-2)
    test = jnp.asarray(_features(model, _data(6, 5)[0]))
    mean, covariance = _latent(posterior, test)
    rate = np.asarray(jax.vmap(posterior.predict)(test))
    np.testing.assert_allclose(rate, np.exp(mean[:, 0] + covariance[:, 0, 0] / 2), rtol=1e-12)
    key = jax.random.PRNGKey(2)
    mc = jax.vmap(lambda f: posterior.predict(f, method="mc", key=key, num_samples=40000))(test)
    np.testing.assert_allclose(mc, rate, rtol=0.02)


def _condition(posterior):
    """The condition number of the precision the posterior factors (in its centred
    coefficients): that of the covariance `RRᵀ`, from the float64 factor."""
    factor = np.asarray(posterior.factor, np.float64)
    factor = factor.reshape(-1, factor.shape[-1])
    singular = np.linalg.svd(factor, compute_uv=False)
    singular = singular[singular > 1e-12 * singular[0]]  # the softmax's zero shift
    return (singular[0] / singular[-1]) ** 2


@pytest.mark.slow
@pytest.mark.parametrize("name, offset", [("msereg", 100.0), ("ce", 10.0)])
def test_float32_within_the_derived_tolerance(name, offset):
    r"""The float32 posterior (features with a common offset) against the float64 one,
    within a tolerance derived from κ, the condition number of the precision in the
    posterior's centred coefficients (the offset enters it only through the prior's
    coupling of the weights and the bias):

    - ridge: the SVD of the stacked matrix, of condition number √κ, is backward
        stable, so the variances are off by about p·ε₃₂·√κ relative (c = 10 for the
        constants);
    - a readout loss: the formed precision's eigendecomposition, p·ε₃₂·κ, plus the
        float32 readout's own error: its logits differ by δz on the training samples,
        which moves their curvature by at most δz (the softmax curvature's derivative
        is below 1) and the precision by δz·max‖d‖² against its floor α₂ (d the
        centred features)."""
    case = LOSS_CASES[name]
    x, rng = _data()
    model64 = _model(offset=offset)
    model32 = _model(offset=offset, dtype=jnp.float32)
    features = _features(model64, x)
    if name == "msereg":
        y = rng.normal(size=N) + features[:, 0]
        y32 = y.astype(np.float32)
    else:
        y = y32 = _labels(name, rng, 3 * (features - offset))
    alpha2 = 1e-2
    kwargs = dict(loss=case.function, alpha2=alpha2, **case.kwargs)
    post64 = vploss.readout_posterior(model64, x, y, **kwargs)
    post32 = vploss.readout_posterior(model32, x.astype(np.float32), y32, **kwargs)
    assert post32.factor.dtype == jnp.float32
    test = _features(model64, _data(7, 10)[0])
    m64, c64 = _latent(post64, test)
    m32, c32 = _latent(post32, test.astype(np.float32))
    kappa = _condition(post64)
    eps = np.finfo(np.float32).eps
    if name == "msereg":
        tolerance = 10 * (M + 1) * eps * np.sqrt(kappa)
    else:
        tolerance = 10 * (M + 1) * eps * kappa
        augmented = np.c_[features, np.ones(N)]
        change = augmented @ (stacked_coef(post32.readout) - stacked_coef(post64.readout))
        centred = np.c_[features - features.mean(0), np.ones(N)]
        largest = np.max(np.sum(centred**2, axis=1))
        tolerance += np.max(np.abs(change)) * largest / alpha2
    assert tolerance < 0.01, "the case must be well enough conditioned to test anything"
    variance64 = np.diagonal(c64, axis1=1, axis2=2)
    variance32 = np.diagonal(c32, axis1=1, axis2=2)
    assert np.max(np.abs(variance32 - variance64) / variance64) < tolerance
    scale = np.sqrt(variance64) + np.abs(m64)
    assert np.max(np.abs(m32 - m64) / scale) < tolerance


@pytest.mark.parametrize("name", ["msereg", "bce"])
def test_jit_and_vmap(name):
    case = LOSS_CASES[name]
    model = _model(offset=2.0)
    x, rng = _data()
    features = _features(model, x)
    ys = np.stack([_labels("bce", rng, 3 * (features - 2)) for _ in range(2)])
    if name == "msereg":
        ys = ys + rng.normal(size=ys.shape)
    weights = rng.uniform(0.5, 1.5, N)
    test = jnp.asarray(_features(model, _data(8, 4)[0]))

    def fit(y):
        posterior = vploss.readout_posterior(
            model, x, y, loss=case.function, alpha2=1e-2, weights=weights
        )
        return jax.vmap(posterior.latent)(test)

    eager = [fit(y) for y in ys]
    jitted = eqx.filter_jit(fit)(ys[0])
    mapped = jax.jit(jax.vmap(fit))(jnp.asarray(ys))
    for i, (mean, cov) in enumerate(eager):
        np.testing.assert_allclose(mapped[0][i], mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mapped[1][i], cov, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(jitted[1], eager[0][1], rtol=1e-9, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["msereg", "ce"])
def test_integer_weights_are_repeated_rows(name):
    case = LOSS_CASES[name]
    model = _model(offset=1.0)
    x, rng = _data()
    features = _features(model, x)
    y = (
        rng.normal(size=N) + features[:, 0]
        if name == "msereg"
        else _labels(name, rng, 3 * (features - 1))
    )
    weights = rng.integers(0, 4, N)
    weights[0] = 0
    kwargs = dict(loss=case.function, alpha2=1e-2, **case.kwargs)
    weighted = vploss.readout_posterior(model, x, y, weights=weights, **kwargs)
    x_rep, y_rep = repeated(weights, x, y)
    plain = vploss.readout_posterior(model, x_rep, y_rep, **kwargs)
    test = jnp.asarray(_features(model, _data(9, 4)[0]))
    np.testing.assert_allclose(weighted.count, weights.sum())
    for a, b in zip(_latent(weighted, test), _latent(plain, test), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    if name == "msereg":
        np.testing.assert_allclose(weighted.noise, plain.noise, rtol=1e-9)


@pytest.mark.slow
def test_evidence_penalty_is_refit_readouts():
    model = _model()
    x, rng = _data(0, 100)
    y = _labels("bce", rng, 4 * _features(model, x))
    posterior = vploss.readout_posterior(model, x, y, loss=vploss.vploss_bce, alpha2="evidence")
    refit = vploss.refit_readout(model, [(x, y)], loss=vploss.vploss_bce, alpha2="evidence")
    np.testing.assert_allclose(posterior.alpha2, refit.stats.alpha2, rtol=1e-2)
    np.testing.assert_allclose(posterior.readout.weight, refit.weight, rtol=1e-2, atol=1e-4)
    jitted = eqx.filter_jit(
        lambda y: vploss.readout_posterior(model, x, y, loss=vploss.vploss_bce, alpha2="evidence")
    )(y)
    np.testing.assert_allclose(jitted.alpha2, posterior.alpha2, rtol=1e-9)


def test_errors():
    model = _model()
    x, rng = _data()
    y = rng.normal(size=N)
    labels = (y > 0).astype(float)
    ridge = dict(loss=vploss.vploss_msereg)
    with pytest.raises(ValueError, match="improper"):
        vploss.readout_posterior(model, x, y, alpha2=0.0, **ridge)
    with pytest.raises(ValueError, match="'gcv'"):
        vploss.readout_posterior(model, x, y, alpha2="evidence", **ridge)
    with pytest.raises(ValueError, match="'evidence'"):
        vploss.readout_posterior(model, x, labels, loss=vploss.vploss_bce, alpha2="gcv")
    with pytest.raises(ValueError, match="noise"):
        vploss.readout_posterior(model, x, labels, loss=vploss.vploss_bce, alpha2=1.0, noise=0.1)
    with pytest.raises(ValueError, match=r"one variance per output, shape \(1,\)"):
        vploss.readout_posterior(model, x, y, alpha2=1e-3, noise=jnp.ones(3), **ridge)
    with pytest.raises(ValueError, match="'evidence', 'residual'"):
        vploss.readout_posterior(model, x, y, alpha2=1e-3, noise="ml", **ridge)
    with pytest.raises(TypeError, match="vploss_msereg"):
        vploss.readout_posterior(model, x, y, loss=jnp.mean, alpha2=1e-3)
    with pytest.raises(ValueError, match="same batch size"):
        vploss.readout_posterior(model, x, y[:-1], alpha2=1e-3, **ridge)
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(40,\)"):
        vploss.readout_posterior(model, x, y, alpha2=1e-3, weights=jnp.ones(3), **ridge)
    posterior = vploss.readout_posterior(model, x, y, alpha2=1e-3, **ridge)
    with pytest.raises(ValueError, match=r"one sample, shape \(6,\)"):
        posterior.predict(jnp.ones((2, M)))
    with pytest.raises(TypeError, match="floating point"):
        posterior.predict(jnp.ones(M, jnp.int32))
    with pytest.raises(ValueError, match="'auto', 'mc'"):
        posterior.predict(jnp.ones(M), method="probit")
    with pytest.raises(ValueError, match="needs a `key`"):
        posterior.predict(jnp.ones(M), method="mc")
    with pytest.raises(ValueError, match="num_samples"):
        posterior.predict(jnp.ones(M), method="mc", key=jax.random.PRNGKey(0), num_samples=1)
    custom = eqx.tree_at(lambda p: p.noise, posterior, None)
    custom = vploss.ReadoutPosterior(
        custom.readout,
        custom.centre,
        custom.factor,
        None,
        custom.alpha2,
        custom.prior_alpha2,
        custom.count,
        "none",
    )
    with pytest.raises(TypeError, match="latent"):
        custom.predict(jnp.ones(M))
    assert custom.latent(jnp.ones(M))[1].shape == (1, 1)


@pytest.mark.slow
def test_float32_model_gives_a_float32_posterior():
    model = _model(dtype=jnp.float32)
    x, rng = _data()
    y = rng.normal(size=N).astype(np.float32)
    posterior = vploss.readout_posterior(
        cast(model, jnp.float32), x.astype(np.float32), y, loss=vploss.vploss_msereg, alpha2=1e-3
    )
    mean, variance = posterior.predict(jnp.ones(M, jnp.float32))
    assert mean.dtype == variance.dtype == jnp.float32
    assert mean.shape == variance.shape == ()
