"""`VPModel`: the feature map and its fitted readout as one module that predicts, and
`save_model`/`load_model`, which save it and load it into a template feature map."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import mlp


N, IN, M = 40, 3, 5


def _data(dtype=jnp.float64):
    x = jax.random.normal(jax.random.PRNGKey(0), (N, IN), dtype)
    return x, jnp.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]


def _readouts(model, x, y):
    """Readouts of one model from every producer of the ridge loss's readout."""
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    return {
        "msereg": vploss.vploss_msereg(model, x, y, alpha2=1e-4)[1],
        "msereg-gcv": vploss.vploss_msereg(model, x, y, alpha2="gcv")[1],
        "refit": vploss.refit_readout(model, batches, loss=vploss.vploss_msereg, alpha2=1e-4),
        "refit-gcv": vploss.refit_readout(model, batches, loss=vploss.vploss_msereg, alpha2="gcv"),
    }


@pytest.mark.slow
def test_predicts_the_readout_of_the_features():
    x, y = _data()
    model = mlp(IN, features=M)
    readout = vploss.vploss_msereg(model, x, y, alpha2=1e-4)[1]
    net = vploss.VPModel(model, readout)
    expected = jax.vmap(lambda xi: readout.weight @ model(xi) + readout.bias[0])(x)
    prediction = jax.vmap(net)(x)
    assert prediction.shape == (N,)
    # Summed in another order: rounding of the sum's terms, about eps each.
    np.testing.assert_allclose(prediction, expected[:, 0], rtol=1e-13, atol=1e-14)
    # Under jit, as a pytree argument.
    jitted = eqx.filter_jit(lambda net, x: jax.vmap(net)(x))(net, x)
    np.testing.assert_allclose(jitted, prediction, rtol=1e-13, atol=1e-14)


@pytest.mark.slow
def test_one_structure_whatever_fitted_the_readout():
    """The readout's `stats` differ by producer (None, `GCVStats`, `InnerStats`); the
    model keeps the readout without them, so every `VPModel` of one architecture has
    one pytree structure: a template of one loads the saved leaves of any other."""
    x, y = _data()
    model = mlp(IN, features=M)
    nets = {name: vploss.VPModel(model, r) for name, r in _readouts(model, x, y).items()}
    structures = {jax.tree.structure(net) for net in nets.values()}
    assert len(structures) == 1
    for net in nets.values():
        assert net.readout.stats is None


@pytest.mark.parametrize(
    "targets, use_bias",
    [("scalar", True), ("vector", True), ("scalar", False), ("classes", True)],
)
@pytest.mark.parametrize("dtype", [pytest.param(jnp.float64, marks=pytest.mark.slow), jnp.float32])
def test_save_load_round_trip(targets, use_bias, dtype):
    """Saved and loaded into a freshly initialised template of the same architecture
    (a different key), the model predicts exactly as before, with the same shape (a
    scalar output stays a scalar) and dtype; through a path and a file object."""
    x, y = _data(dtype)
    model = mlp(IN, features=M, dtype=dtype)
    if targets == "classes":
        labels = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)
        readout = vploss.vploss_ce(model, x, labels, num_classes=3, alpha2=1e-3)[1]
    else:
        y = y if targets == "scalar" else jnp.stack([y, -y], axis=1)
        readout = vploss.vploss_msereg(model, x, y, alpha2=1e-4, use_bias=use_bias)[1]
    net = vploss.VPModel(model, readout)
    template = mlp(IN, features=M, dtype=dtype, seed=7)
    buffer = io.BytesIO()
    vploss.save_model(buffer, net)
    buffer.seek(0)
    loaded = vploss.load_model(buffer, template)
    expected = jax.vmap(net)(x)
    prediction = jax.vmap(loaded)(x)
    assert prediction.shape == expected.shape and prediction.dtype == expected.dtype
    np.testing.assert_array_equal(prediction, expected)
    assert loaded.readout.scalar_output == readout.scalar_output
    assert (loaded.readout.bias is None) == (not use_bias)


def test_save_load_path(tmp_path):
    x, y = _data()
    model = mlp(IN, features=M)
    net = vploss.VPModel(model, vploss.vploss_msereg(model, x, y, alpha2=1e-4)[1])
    path = str(tmp_path / "model.eqx")
    vploss.save_model(path, net)
    loaded = vploss.load_model(path, mlp(IN, features=M, seed=3))
    np.testing.assert_array_equal(jax.vmap(loaded)(x), jax.vmap(net)(x))


@pytest.mark.slow
def test_refit_final_model_beats_the_stale_readout():
    """The readout a training step returns was fitted before the step's update; the
    model refitted after the last step fits the training data at least as well (the
    exact minimiser of the same training objective), here far better after one large
    step."""
    x, y = _data()
    model = mlp(IN, features=M)
    loss_fn = lambda m: vploss.vploss_msereg(m, x, y, alpha2=1e-6)  # noqa: E731
    (_, stale), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    model = eqx.apply_updates(model, jax.tree.map(lambda g: -0.5 * g, grads))
    refitted = vploss.refit_readout(model, [(x, y)], loss=vploss.vploss_msereg, alpha2=1e-6)

    def mse(readout):
        return float(jnp.mean((jax.vmap(vploss.VPModel(model, readout))(x) - y) ** 2))

    assert mse(refitted) <= mse(stale)


def test_errors():
    x, y = _data()
    model = mlp(IN, features=M)
    readout = vploss.vploss_msereg(model, x, y, alpha2=1e-4)[1]
    with pytest.raises(TypeError, match="must be the feature map"):
        vploss.VPModel(jnp.ones(3), readout)
    with pytest.raises(TypeError, match="must be the `vploss.VPLinear`"):
        vploss.VPModel(model, (readout.weight, readout.bias))
    with pytest.raises(TypeError, match="saves a `vploss.VPModel`"):
        vploss.save_model(io.BytesIO(), model)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    buffer.seek(0)
    with pytest.raises(ValueError, match="files written by `vploss.save_model`"):
        vploss.load_model(buffer, model)
    net = vploss.VPModel(model, readout)
    buffer = io.BytesIO()
    vploss.save_model(buffer, net)
    saved = buffer.getvalue()
    templates = {
        "width": (
            mlp(IN, width=9, features=M),
            r"array 0 \(`features.layers\[0\].weight` in the template\) has shape \(8, 3\) .* "
            r"\(9, 3\)",
        ),
        "features": (mlp(IN, features=M + 1), r"shape \(5, 8\) .* shape \(6, 8\)"),
        "deeper": (mlp(IN, depth=3), "shape"),
        "dtype": (mlp(IN, features=M, dtype=jnp.float32), "dtype float64 .* dtype float32"),
    }
    for template, match in templates.values():
        with pytest.raises(ValueError, match=f"does not fit the template `features`.*{match}"):
            vploss.load_model(io.BytesIO(saved), template)
    # A template with fewer arrays, the rest of whose arrays match: the counts differ.
    shallow = eqx.tree_at(lambda m: m.layers, model, model.layers[:1])
    with pytest.raises(
        ValueError, match="the file has 6 arrays of the feature map, the template 2"
    ):
        vploss.load_model(io.BytesIO(saved), shallow)
    with pytest.raises(TypeError, match="got a `VPModel`"):
        vploss.load_model(io.BytesIO(saved), net)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vploss.load_model(io.BytesIO(saved[:-8]), model)
    with pytest.raises(ValueError, match="data after the saved model"):
        vploss.load_model(io.BytesIO(saved + b"extra"), model)
    with pytest.raises(ValueError, match="header is truncated or corrupt"):
        vploss.load_model(io.BytesIO(saved[:20]), model)


class _KeyedFeatures(eqx.Module):
    """A feature map that holds a typed PRNG key beside its weights (as a dropout layer
    or a Flax NNX `Rngs` does)."""

    linear: eqx.nn.Linear
    key: jax.Array

    def __call__(self, x):
        return jnp.tanh(self.linear(x))


def test_save_load_round_trips_prng_keys():
    """Equinox's serialisation has no format for typed key arrays: they are saved as
    their raw data and loaded back as keys of the template's implementation."""
    model = _KeyedFeatures(eqx.nn.Linear(IN, M, key=jax.random.key(0)), jax.random.key(7))
    x = jax.random.normal(jax.random.key(1), (20, IN))
    _, readout = vploss.vploss_msereg(model, x, x[:, 0])
    buffer = io.BytesIO()
    vploss.save_model(buffer, vploss.VPModel(model, readout))
    template = _KeyedFeatures(eqx.nn.Linear(IN, M, key=jax.random.key(2)), jax.random.key(3))
    loaded = vploss.load_model(io.BytesIO(buffer.getvalue()), template)
    assert jax.random.key_impl(loaded.features.key) == jax.random.key_impl(model.key)
    np.testing.assert_array_equal(
        jax.random.key_data(loaded.features.key), jax.random.key_data(model.key)
    )
    np.testing.assert_array_equal(loaded.features.linear.weight, model.linear.weight)
