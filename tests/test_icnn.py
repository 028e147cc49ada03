"""The input-convex network: shapes, nonnegative weights, convexity in the input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import random_direction


def randomised(model, seed):
    """`model` with every parameter perturbed, the raw hidden weights widely."""
    direction = random_direction(model, seed)
    return jax.tree.map(lambda p, d: p + 2 * d, model, direction)


@pytest.mark.slow
@pytest.mark.parametrize(
    "seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
)
def test_every_feature_is_convex(seed):
    model = randomised(vploss.ICNN(3, 5, 7, 3, key=jax.random.PRNGKey(seed)), seed + 10)
    x = 3 * jax.random.normal(jax.random.PRNGKey(seed + 20), (50, 3))
    # Compiled: run eagerly, the nested derivatives compile op by op.
    hessians = eqx.filter_jit(lambda m, x: jax.vmap(jax.hessian(m))(x))(model, x)  # (50, 5, 3, 3)
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessians))
    assert eigenvalues.min() >= -1e-12 * np.abs(eigenvalues).max()
    # The midpoint inequality along random segments, a check without derivatives.
    y = 3 * jax.random.normal(jax.random.PRNGKey(seed + 30), (50, 3))
    midpoint = jax.vmap(model)((x + y) / 2)
    mean = (jax.vmap(model)(x) + jax.vmap(model)(y)) / 2
    assert np.all(np.asarray(midpoint) <= np.asarray(mean) + 1e-12)


def test_shapes_and_nonnegative_weights():
    model = vploss.ICNN(2, 4, 6, 3, key=jax.random.PRNGKey(0))
    assert model(jnp.ones(2)).shape == (4,)
    assert [w.shape for w in model.hidden_weights] == [(6, 6), (4, 6)]
    assert all(bool(jnp.all(w > 0)) for w in model.hidden_weights)
    shallow = vploss.ICNN(2, 3, 8, 1, key=jax.random.PRNGKey(0))
    assert shallow(jnp.ones(2)).shape == (3,) and shallow.hidden_weights == ()


def test_configurable_activation_and_dtype():
    model = vploss.ICNN(
        2, 3, 4, 2, activation=jax.nn.relu, dtype=jnp.float32, key=jax.random.PRNGKey(0)
    )
    out = model(jnp.ones(2, jnp.float32))
    assert out.dtype == jnp.float32 and bool(jnp.all(out >= 0))


def test_bad_sizes():
    with pytest.raises(ValueError, match="depth"):
        vploss.ICNN(2, 3, 4, 0, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="width"):
        vploss.ICNN(2, 3, 0, 2, key=jax.random.PRNGKey(0))
