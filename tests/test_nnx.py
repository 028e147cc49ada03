"""Flax NNX modules as feature maps.

Since Flax 0.11 an `nnx.Module` is a JAX pytree whose leaves are its variables' values,
so every loss takes one as it takes an Equinox module, and `eqx.filter_value_and_grad`,
Optax and `eqx.apply_updates` train it unchanged (docs/nnx.md). Each test compares an
NNX network with an Equinox twin holding the same weights: `nnx.Linear` stores its
kernel as `(in, out)`, `eqx.nn.Linear` its weight as `(out, in)`.
"""

import pathlib
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vploss

from .helpers import READOUT_CASES


RTOL = 1e-10  # float64: the twins differ only in the order of a matmul's operands
LEARNING_RATE = 1e-2


class NNXMLP(nnx.Module):
    """`2 → 16 → 16 → 8`, tanh after every layer (the readout comes after)."""

    def __init__(self, *, rngs: nnx.Rngs):
        # Named layers rather than a list: a list of modules needs `nnx.List` (or
        # `nnx.data`) in recent Flax and not in older versions.
        self.layer0 = nnx.Linear(2, 16, param_dtype=jnp.float64, rngs=rngs)
        self.layer1 = nnx.Linear(16, 16, param_dtype=jnp.float64, rngs=rngs)
        self.layer2 = nnx.Linear(16, 8, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        for layer in (self.layer0, self.layer1, self.layer2):
            x = jnp.tanh(layer(x))
        return x


def nnx_layers(model):
    return (model.layer0, model.layer1, model.layer2)


def equinox_mlp_like(model):
    """The `eqx.nn.MLP` computing the same function as the `NNXMLP` `model`."""
    # Shapes only (every array is replaced), so no random initialisation to run.
    twin = eqx.filter_eval_shape(
        eqx.nn.MLP,
        2,
        8,
        16,
        2,
        activation=jnp.tanh,
        final_activation=jnp.tanh,
        key=jax.random.key(0),
    )
    weights = [jnp.asarray(layer.kernel[...]).T for layer in nnx_layers(model)]
    biases = [jnp.asarray(layer.bias[...]) for layer in nnx_layers(model)]
    twin = eqx.tree_at(lambda m: [layer.weight for layer in m.layers], twin, weights)
    return eqx.tree_at(lambda m: [layer.bias for layer in m.layers], twin, biases)


def assert_mlps_match(nnx_tree, eqx_tree, atol=0.0):
    """The NNX MLP's kernels and biases (parameters or gradients) against the Equinox
    MLP's weights and biases."""
    for layer, twin in zip(nnx_layers(nnx_tree), eqx_tree.layers, strict=True):
        np.testing.assert_allclose(layer.kernel[...], twin.weight.T, rtol=RTOL, atol=atol)
        np.testing.assert_allclose(layer.bias[...], twin.bias, rtol=RTOL, atol=atol)


def regression_data():
    x = jax.random.uniform(jax.random.key(1), (64, 2), jnp.float64, -2.0, 2.0)
    return x, jnp.sin(x[:, 0]) * jnp.cos(x[:, 1])


def test_an_nnx_module_is_a_pytree_of_its_parameters():
    """The premise of the direct support: Equinox's filtering sees every parameter."""
    model = NNXMLP(rngs=nnx.Rngs(0))
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    expected = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(params) == len(expected) == 6
    assert sum(p.size for p in params) == 2 * 16 + 16 + 16 * 16 + 16 + 16 * 8 + 8


def train(model, x, y, steps=20):
    """Adam on `vploss_msereg`, the training loop of the getting-started page: the
    trained model, the last readout, the losses and the first gradient."""
    optimiser = optax.adam(LEARNING_RATE)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss_fn = lambda m: vploss.vploss_msereg(m, x, y, alpha2=1e-6)
        (loss, readout), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, readout, grads

    losses, gradients = [], []
    for _ in range(steps):
        model, opt_state, loss, readout, grads = step(model, opt_state)
        losses.append(loss)
        gradients.append(grads)
    return model, readout, np.array(losses), gradients[0]


@pytest.mark.slow
def test_training_with_optax_matches_equinox():
    x, y = regression_data()
    model = NNXMLP(rngs=nnx.Rngs(0))
    twin = equinox_mlp_like(model)

    trained, readout, losses, grads = train(model, x, y)
    trained_twin, readout_twin, losses_twin, grads_twin = train(twin, x, y)

    assert losses[-1] < 0.5 * losses[0]  # it trains, so the comparison means something
    assert isinstance(grads, NNXMLP)  # the gradient of a module is a module
    assert_mlps_match(grads, grads_twin, atol=1e-14)
    np.testing.assert_allclose(losses, losses_twin, rtol=RTOL)
    assert readout.bias is not None and readout_twin.bias is not None
    # Normwise: an entry near zero keeps only the readout's absolute accuracy.
    for fitted, fitted_twin in (
        (readout.weight, readout_twin.weight),
        (readout.bias, readout_twin.bias),
    ):
        atol = RTOL * float(jnp.max(jnp.abs(fitted_twin)))
        np.testing.assert_allclose(fitted, fitted_twin, rtol=RTOL, atol=atol)
    # Each Adam step moves a parameter by about the learning rate times a normalised
    # direction, so directions agreeing to RTOL leave parameters within steps·lr·RTOL
    # (a parameter near zero has no relative accuracy to keep).
    assert_mlps_match(trained, trained_twin, atol=len(losses) * LEARNING_RATE * RTOL)

    # The trained model is an NNX module again (a new one: the step is functional);
    # `nnx.update` writes its state into the original object.
    assert isinstance(trained, NNXMLP)
    before = jax.vmap(model)(x)
    nnx.update(model, nnx.state(trained))
    prediction = jax.vmap(lambda x_j: readout(model(x_j)))(x)
    np.testing.assert_allclose(prediction, jax.vmap(lambda x_j: readout(trained(x_j)))(x))
    assert not np.allclose(jax.vmap(model)(x), before)


class NNXSoftplus(nnx.Module):
    """`softplus(A x + c)`: six features, each convex in `x` (so `vploss_cpflow` takes
    it too)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 6, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return jax.nn.softplus(self.linear(x))


def equinox_softplus_like(model):
    linear = eqx.filter_eval_shape(eqx.nn.Linear, 2, 6, key=jax.random.key(0))
    weight, bias = jnp.asarray(model.linear.kernel[...]).T, jnp.asarray(model.linear.bias[...])
    linear = eqx.tree_at(lambda lin: (lin.weight, lin.bias), linear, (weight, bias))
    return eqx.nn.Sequential([linear, eqx.nn.Lambda(jax.nn.softplus)])


def _sum_of_squares(residual_and_readout):
    residual, readout = residual_and_readout
    return 0.5 * jnp.sum(residual**2), readout


x_cls = jax.random.normal(jax.random.key(2), (48, 2), jnp.float64)
y_cls = (x_cls[:, 0] > 0).astype(jnp.int32) + (x_cls[:, 1] > 0.5).astype(jnp.int32)
# The losses share the feature evaluation (`jax.vmap(model)(x)`, or its derivatives in
# `x` for the flow), which the default run checks with the ridge loss's training test;
# every loss runs with the slow tests (about two seconds of compilation each, three
# times that for the flow).
slow = pytest.mark.slow
LOSSES = [
    *(
        pytest.param(
            lambda m, case=case: case(
                m, x_cls, case.labels(x_cls[:, 0] - x_cls[:, 1]), alpha2=1e-3
            ),
            id=name,
            marks=slow,
        )
        for name, case in READOUT_CASES.items()
    ),
    pytest.param(lambda m: vploss.vploss_cpflow(m, x_cls, alpha2=1e-3), id="cpflow", marks=slow),
    pytest.param(
        lambda m: vploss.vploss_msereg(m, x_cls, y_cls, alpha1=1e-2), id="alpha1", marks=slow
    ),
    pytest.param(
        lambda m: _sum_of_squares(vploss.vpresidual_msereg(m, x_cls, y_cls)),
        id="vpresidual",
        marks=slow,
    ),
]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_every_loss_takes_an_nnx_module(loss_fn):
    """Value, readout and gradient of each loss on the NNX model and on its twin."""
    model = NNXSoftplus(rngs=nnx.Rngs(3))
    twin = equinox_softplus_like(model)
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))

    (loss, readout), grads = value_and_grad(model)
    (loss_twin, readout_twin), grads_twin = value_and_grad(twin)

    np.testing.assert_allclose(loss, loss_twin, rtol=RTOL)
    for leaf, leaf_twin in zip(
        jax.tree.leaves(readout), jax.tree.leaves(readout_twin), strict=True
    ):
        if eqx.is_inexact_array(leaf):
            np.testing.assert_allclose(leaf, leaf_twin, rtol=1e-8, atol=1e-12)
    # The gradient is an `NNXSoftplus` whose variables hold the gradient's values.
    assert isinstance(grads, NNXSoftplus)
    linear_twin = grads_twin.layers[0]
    np.testing.assert_allclose(grads.linear.kernel[...], linear_twin.weight.T, rtol=1e-8)
    assert grads.linear.bias is not None
    np.testing.assert_allclose(grads.linear.bias[...], linear_twin.bias, rtol=1e-8)
    assert np.linalg.norm(linear_twin.weight) > 1e-6


@slow
def test_refit_readout_takes_an_nnx_module():
    model = NNXSoftplus(rngs=nnx.Rngs(3))
    batches = [(x_cls[:24], y_cls[:24]), (x_cls[24:], y_cls[24:])]
    refit = vploss.refit_readout(model, batches, loss=vploss.vploss_ce, num_classes=3, alpha2=1e-3)
    _, readout = vploss.vploss_ce(model, x_cls, y_cls, num_classes=3, alpha2=1e-3)
    np.testing.assert_allclose(refit.weight, readout.weight, rtol=1e-6, atol=1e-8)


class NNXBatchNormNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        # Float32 (Flax's default): BatchNorm keeps float32 statistics whatever its
        # `param_dtype`, and warns when training mode writes float64 ones into them.
        self.linear = nnx.Linear(2, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.dropout(self.norm(self.linear(x))))


@pytest.mark.parametrize("layer", ["norm", "dropout"])
def test_a_model_in_training_mode_is_a_clear_error(layer):
    """BatchNorm and Dropout update their state on every call in training mode, which a
    per-sample `jax.vmap` cannot do: the error says to call `model.eval()`, which fixes
    it."""
    x, y = (a.astype(jnp.float32) for a in regression_data())
    model = NNXBatchNormNet(rngs=nnx.Rngs(0))
    model.eval()
    getattr(model, layer).train()
    with pytest.raises(ValueError, match=re.escape("call `model.eval()`")):
        vploss.vploss_msereg(model, x, y)
    model.eval()
    jax.eval_shape(lambda: vploss.vploss_msereg(model, x, y))  # traces, so no error


@pytest.mark.slow
def test_vploss_imports_without_flax():
    """Flax is optional: with it made unimportable, vploss imports (and never tries)."""
    code = "import sys; sys.modules['flax'] = None; import vploss"  # `import flax` would raise
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_check_does_not_need_flax(monkeypatch):
    """The training-mode check looks Flax up in `sys.modules`; without it, a model's own
    errors pass through as before."""
    monkeypatch.delitem(sys.modules, "flax.errors")
    x, y = regression_data()

    def broken(sample):
        raise RuntimeError("the model's own error")

    with pytest.raises(RuntimeError, match="the model's own error"):
        vploss.vploss_msereg(broken, x, y)
    with pytest.raises(ValueError, match=re.escape("failed on one sample")):
        vploss.vploss_msereg(lambda sample: sample @ jnp.ones((3, 4)), x, y)


@pytest.mark.slow
def test_split_trains_the_parameters_only():
    """`eqx.is_inexact_array` also picks up BatchNorm's running statistics; splitting
    out the `nnx.Param`s (docs/nnx.md) differentiates the parameters alone, with the
    same gradient."""
    x, y = regression_data()
    model = NNXBatchNormNet(rngs=nnx.Rngs(0))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    loss_fn = lambda p: vploss.vploss_msereg(nnx.merge(graphdef, p, rest), x, y)[0]
    grads = jax.jit(jax.grad(loss_fn))(params)
    grads_all = eqx.filter_jit(eqx.filter_grad(lambda m: vploss.vploss_msereg(m, x, y)[0]))(model)

    is_variable = lambda v: isinstance(v, nnx.Variable)
    assert set(jax.tree.leaves(jax.tree.map(type, grads, is_leaf=is_variable))) == {nnx.Param}
    np.testing.assert_allclose(grads["linear"]["kernel"][...], grads_all.linear.kernel[...])
    np.testing.assert_allclose(grads["norm"]["scale"][...], grads_all.norm.scale[...])
    assert np.linalg.norm(grads_all.norm.mean[...]) > 0  # the statistics' "gradient"


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@slow
def test_the_documentation_snippets_run():
    """docs/nnx.md: its code blocks, run in order in one namespace, as a reader would."""
    blocks = python_blocks(pathlib.Path(__file__).parent.parent / "docs" / "nnx.md")
    assert len(blocks) >= 2
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/nnx.md", "exec"), namespace)
