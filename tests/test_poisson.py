"""`vploss_poisson`: what is specific to the Poisson loss (the shared checks of every
readout loss are in `test_readout_losses.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import PoissonRegressor

import vploss

from .helpers import mlp


def _data(n=80, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, 3))
    rate = jnp.exp(0.8 * jnp.sin(2 * x[:, 0]) + 0.3 * x[:, 1])
    return x, jax.random.poisson(jax.random.PRNGKey(seed + 1), rate).astype(jnp.float64)


@pytest.mark.parametrize("alpha2", [1e-3, pytest.param(1e-1, marks=pytest.mark.slow)])
def test_matches_scikit_learn(alpha2):
    """scikit-learn's `PoissonRegressor` minimises half the mean deviance plus
    `alpha/2 |w|²`, whose minimiser is ours for `alpha = alpha2` when its intercept is
    a (penalised) ones column of the features."""
    model = mlp()
    x, y = _data()
    loss, readout = vploss.vploss_poisson(model, x, y, alpha2=alpha2, gtol=1e-12)
    features = np.asarray(jax.vmap(model)(x))
    augmented = np.concatenate([features, np.ones((len(x), 1))], axis=1)
    reference = PoissonRegressor(
        alpha=alpha2, fit_intercept=False, solver="newton-cholesky", tol=1e-14, max_iter=1000
    )
    reference.fit(augmented, np.asarray(y))
    coef = np.concatenate([np.asarray(readout.weight[0]), np.asarray(readout.bias)])
    np.testing.assert_allclose(coef, reference.coef_, rtol=1e-6, atol=1e-8)
    logits = augmented @ reference.coef_
    expected = np.mean(np.exp(logits) - np.asarray(y) * logits) + 0.5 * alpha2 * np.sum(
        reference.coef_**2
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-10)


def test_predicts_the_log_mean_and_rejects_negative_counts():
    model = mlp()
    x, y = _data()
    _, readout = vploss.vploss_poisson(model, x, y, alpha2=1e-3)
    mean = jnp.exp(jax.vmap(lambda v: readout(model(v)))(x))
    assert mean.shape == y.shape
    # The fitted means match the counts on average (the bias's optimality condition,
    # up to the penalty on the bias).
    np.testing.assert_allclose(jnp.mean(mean), jnp.mean(y), rtol=1e-2)
    with pytest.raises(Exception, match="counts or rates >= 0"):
        vploss.vploss_poisson(model, x, y.at[0].set(-1.0), alpha2=1e-3)
