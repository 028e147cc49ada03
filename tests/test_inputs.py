"""Inputs as the model takes them, and samples removed by a zero weight, for every loss.

`x` is the model's input: any pytree of arrays of any dtype (token ids, uint8 pixels,
boolean masks), NumPy arrays in either byte order. Only the features and the targets
must be floating point. A sample of weight zero is removed before any arithmetic: huge,
infinite or NaN values there change nothing. The references are the same losses on the
features computed by hand (the identity model), and on the data set without the
removed samples.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import cases


N, M = 12, 3
RNG = np.random.default_rng(7)
TABLE = jnp.asarray(RNG.standard_normal((20, M)))
IDS = jnp.asarray(RNG.integers(0, 20, N), jnp.int32)
MASK = jnp.asarray(RNG.random(N) > 0.3)
FEATURES = TABLE[IDS] * MASK[:, None]
Y = jnp.asarray(RNG.standard_normal(N))


def identity(features):
    return features


class Embedding(eqx.Module):
    """A per-sample model of integer token ids and a boolean mask."""

    table: jax.Array

    def __call__(self, sample):
        token, keep = sample
        return self.table[token] * keep


def loss_and_targets(case):
    """`(loss, targets)`: `loss(model, x, y, **kwargs)` is the case's loss (with
    `alpha2 = 1e-2` for the readout losses) and the targets are made from `Y`."""
    kwargs = {} if case.loss is None else {"alpha2": 1e-2}
    return functools.partial(case, **kwargs), case.labels(Y)


def _readout_close(a, b, rtol=1e-9):
    np.testing.assert_allclose(a.weight, b.weight, rtol=rtol, atol=1e-11)
    np.testing.assert_allclose(a.bias, b.bias, rtol=rtol, atol=1e-11)


# The inputs are checked and the features evaluated by the same code for every loss:
# the default run keeps the closed-form one (every other loss, a new one too, runs with
# the slow tests).
@pytest.mark.slow
@pytest.mark.parametrize("case", cases(default=("msereg",)))
def test_integer_and_boolean_inputs_in_a_pytree(case):
    """Token ids (int32) and a mask (bool) as a tuple: the loss, readout and gradient
    in the embedding table are those of the same loss on the features."""
    loss, targets = loss_and_targets(case)
    model = Embedding(TABLE)

    def reduced(model):
        return loss(model, (IDS, MASK), targets)

    (value, readout), grad = eqx.filter_value_and_grad(reduced, has_aux=True)(model)
    reference, reference_readout = loss(identity, FEATURES, targets)
    np.testing.assert_allclose(value, reference, rtol=1e-10)
    _readout_close(readout, reference_readout)
    # The envelope gradient in the table, by the chain rule through the lookup.
    feature_grad = jax.grad(lambda f: loss(identity, f, targets)[0])(FEATURES)
    expected = jnp.zeros_like(TABLE).at[IDS].add(feature_grad * MASK[:, None])
    np.testing.assert_allclose(grad.table, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_uint8_pixels_and_big_endian_arrays():
    """uint8 pixels through a model that scales them, and NumPy arrays in non-native
    byte order (`x`, `y` and `weights`), give the native float64 result."""
    pixels = RNG.integers(0, 256, (N, 4)).astype(np.uint8)
    scaled = lambda p: p.astype(jnp.float64) / 255  # noqa: E731
    value, readout = vploss.vploss_msereg(scaled, pixels, Y)
    reference, reference_readout = vploss.vploss_msereg(identity, pixels / 255.0, Y)
    np.testing.assert_allclose(value, reference, rtol=1e-12)
    _readout_close(readout, reference_readout)
    weights = RNG.random(N)
    swapped = {
        "model": identity,
        "x": np.asarray(FEATURES).astype(">f8"),
        "y": np.asarray(Y).astype(">f8"),
        "weights": weights.astype(">f8"),
    }
    value = vploss.vploss_msereg(identity, swapped["x"], swapped["y"], weights=swapped["weights"])[
        0
    ]
    reference = vploss.vploss_msereg(identity, FEATURES, Y, weights=jnp.asarray(weights))[0]
    np.testing.assert_allclose(value, reference, rtol=1e-12)


def test_features_must_still_be_floating_point():
    with pytest.raises(TypeError, match="real floating-point features"):
        vploss.vploss_msereg(identity, IDS[:, None], Y)


def test_inputs_with_different_batch_sizes_are_refused():
    with pytest.raises(ValueError, match="same batch size N along axis 0"):
        vploss.vploss_msereg(Embedding(TABLE), (IDS, MASK[:-1]), Y)


#: Removed samples: rows 0-2 get weight zero and hostile values (huge, inf, NaN).
REMOVED = np.zeros(N, bool)
REMOVED[:3] = True
WEIGHTS = jnp.asarray(np.where(REMOVED, 0.0, 1.0 + RNG.random(N)))
HOSTILE = np.asarray(FEATURES).copy()
HOSTILE[0], HOSTILE[1], HOSTILE[2, 0] = 1e200, np.inf, np.nan


def tanh_mlp():
    return eqx.nn.MLP(M, 4, 5, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))


# The ridge and logistic losses have rows in docs/hostile_inputs.md; these add the
# gradients. The default run keeps one loss read through a class-label parser (every
# other loss, a new one too, runs with the slow tests).
@pytest.mark.slow
@pytest.mark.parametrize("case", cases(default=("ce",)))
def test_zero_weight_samples_never_reach_the_arithmetic(case):
    """Huge, infinite and NaN inputs and an invalid target in zero-weight samples:
    the loss, readout and parameter gradient equal those without the samples."""
    loss, targets = loss_and_targets(case)
    reduced = lambda model, x, y, weights: loss(model, x, y, weights=weights)  # noqa: E731
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(reduced, has_aux=True))
    model = tanh_mlp()
    hostile_targets = targets.at[0].set(case.invalid)
    (value, readout), grad = value_and_grad(model, jnp.asarray(HOSTILE), hostile_targets, WEIGHTS)
    kept = ~REMOVED
    (expected, expected_readout), expected_grad = value_and_grad(
        model, FEATURES[kept], targets[kept], WEIGHTS[kept]
    )
    np.testing.assert_allclose(value, expected, rtol=1e-9)
    _readout_close(readout, expected_readout, rtol=1e-7)
    for leaf, expected_leaf in zip(
        jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True
    ):
        np.testing.assert_allclose(leaf, expected_leaf, rtol=1e-7, atol=1e-12)


@pytest.mark.slow
def test_zero_weight_samples_in_the_ridge_jacobian():
    """The same for the residual Jacobian of the ridge loss: the removed samples' rows
    are zero, the others those of the smaller problem."""
    model = eqx.nn.MLP(M, 2, 3, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))
    jac, residual, _ = vploss.vpjacobian_msereg(model, jnp.asarray(HOSTILE), Y, weights=WEIGHTS)
    kept = ~REMOVED
    expected_jac, expected_residual, _ = vploss.vpjacobian_msereg(
        model, FEATURES[kept], Y[kept], weights=WEIGHTS[kept]
    )
    removed_rows = np.flatnonzero(REMOVED)
    np.testing.assert_array_equal(np.asarray(jac)[removed_rows], 0.0)
    np.testing.assert_array_equal(np.asarray(residual)[removed_rows], 0.0)
    np.testing.assert_allclose(
        np.delete(jac, removed_rows, axis=0), expected_jac, rtol=1e-8, atol=1e-14
    )
    np.testing.assert_allclose(np.delete(residual, removed_rows), expected_residual, rtol=1e-8)


@pytest.mark.slow
def test_zero_weight_samples_in_the_flow():
    points = jnp.asarray(RNG.standard_normal((8, 2)))
    hostile = points.at[0].set(1e200).at[1].set(jnp.nan)
    weights = jnp.ones(8).at[:2].set(0.0)
    icnn = vploss.ICNN(2, 5, 6, 2, key=jax.random.PRNGKey(0))
    value = vploss.vploss_cpflow(icnn, hostile, alpha2=1e-3, weights=weights)[0]
    expected = vploss.vploss_cpflow(icnn, points[2:], alpha2=1e-3, weights=weights[2:])[0]
    np.testing.assert_allclose(value, expected, rtol=1e-8)
