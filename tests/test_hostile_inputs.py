"""The hostile and edge inputs of docs/hostile_inputs.md: each row of its table is one
`Row` of `ROWS` here, with the same id, asserting either the exact error (type and a
message fragment naming the problem) or a finite answer checked against an independent
reference. `test_doc_table_matches_rows` checks that the table and `ROWS` agree one to
one (ids, numbering, error types and message fragments): add a case to both."""

import pathlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import (
    armijo_updates,
    logistic_problem,
    logistic_reference,
    mlp,
    newton_step,
    ridge_loss64,
    ridge_reference,
    same_precision_ridge_loss,
    stacked_coef,
)


N = 30
X = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
# Fixed features, passed through the identity model, so the references see them exactly.
F = jnp.tanh(X @ jnp.array([[1.0, 0.5, -0.3, 0.2], [0.2, -1.0, 0.4, 0.1], [0.3, 0.3, 1.0, -0.5]]))
Y = jnp.sin(X[:, 0])
Y_BINARY = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(jnp.float64)
Y_CLASS = jnp.argmax(X, axis=1)
ONE_HOT = jax.nn.one_hot(Y_CLASS, 3)
# Classes separated by the sign of the first feature.
SEPARABLE = (F[:, 0] > 0).astype(jnp.float64)
# `jax.nn.one_hot` takes integer labels (float ones are deprecated).
SEPARABLE_ONE_HOT = jax.nn.one_hot(SEPARABLE.astype(jnp.int32), 2, dtype=jnp.float64)


def identity(features):
    return features


def icnn():
    return vploss.ICNN(2, 5, 6, 2, key=jax.random.PRNGKey(0))


ridge = vploss.vploss_msereg


def bce(x, y, **kwargs):
    return vploss.vploss_bce(identity, x, y, **{"alpha2": 1e-3, **kwargs})


def ce(x, y, **kwargs):
    return vploss.vploss_ce(identity, x, y, **{"alpha2": 1e-3, **kwargs})


def cpflow(x, model=None, **kwargs):
    return vploss.vploss_cpflow(icnn() if model is None else model, x, **{"alpha2": 1e-3, **kwargs})


@dataclass(frozen=True)
class Row:
    """One row of the table: `call()` either raises `error` with `fragment` in its
    message, or returns a result that `check(result)` verifies."""

    call: Callable[[], object]
    error: type[BaseException] | None = None
    fragment: str = ""
    check: Callable[[object], None] | None = None


def close(value, reference, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(np.asarray(value, np.float64), reference, rtol=rtol, atol=atol)


def ridge_matches(features, y, alpha2, use_bias=True, rtol=1e-9):
    def check(result):
        loss, readout = result
        ref_loss, ref_coef = ridge_reference(features, y, alpha2, use_bias)
        close(loss, ref_loss, rtol)
        close(readout.weight, ref_coef[: features.shape[1]].T, rtol=1e-6, atol=1e-8)

    return check


def gcv_matches(features, y, use_bias=True):
    """The loss and readout of `alpha2="gcv"` are those of the ridge problem at the chosen
    penalty, which is finite and positive."""

    def check(result):
        _, readout = result
        alpha2 = float(readout.stats.alpha2)
        assert np.isfinite(alpha2) and alpha2 > 0
        assert np.isfinite(float(readout.stats.gcv))
        ridge_matches(features, y, alpha2, use_bias)(result)

    return check


def logistic_matches(features, labels, alpha2, softmax=False, rtol=1e-9):
    labels = np.asarray(labels, np.float64)
    labels = labels[:, None] if labels.ndim == 1 else labels

    def check(result):
        loss, readout = result
        close(loss, logistic_reference(features, labels, alpha2, softmax)[0], rtol)
        assert bool(readout.stats.converged)

    return check


def logistic_matches_float32(features, labels, alpha2, softmax=False):
    """A loss computed in float32 (on `features`, exact in float64) against the float64
    reference: off by at most the inner solve's suboptimality, `P·g²/(2 alpha2)` for
    `P` coefficients and the reported gradient max-norm `g` (strong convexity), plus
    the rounding of the computed objective, `16·eps32·(1 + |L|)` (the allowance of the
    library's line search)."""
    labels = np.asarray(labels, np.float64)
    labels = labels[:, None] if labels.ndim == 1 else labels

    def check(result):
        loss, readout = result
        assert loss.dtype == jnp.float32 and bool(readout.stats.converged)
        reference = logistic_reference(features, labels, alpha2, softmax)[0]
        size = readout.weight.size + readout.bias.size
        gradient = float(readout.stats.gradient_norm)
        eps32 = float(jnp.finfo(jnp.float32).eps)
        tolerance = size * gradient**2 / (2 * alpha2) + 16 * eps32 * (1 + abs(reference))
        assert abs(float(loss) - reference) <= tolerance

    return check


def scale_equivariant(loss_fn, scale, alpha2, labels, **kwargs):
    """Features scaled by `s` with `alpha2` scaled by `s²` (no bias): the same loss,
    the readout scaled by `1/s`. Checked against the unscaled problem."""

    def check(result):
        loss, readout = result
        ref_loss, ref_readout = loss_fn(
            identity, F, labels, alpha2=alpha2, use_bias=False, **kwargs
        )
        close(loss, float(ref_loss), rtol=1e-8)
        close(readout.weight * scale, ref_readout.weight, rtol=1e-6, atol=1e-9)

    return check


def all_zero_features_fit_the_mean(use_bias):
    def check(result):
        loss, _ = result
        centred = Y - jnp.mean(Y) if use_bias else Y
        close(loss, 0.5 * float(jnp.mean(centred**2)))

    return check


def finite_and_not_converged(result):
    loss, readout = result
    assert bool(jnp.isfinite(loss)) and not bool(readout.stats.converged)


def same_as_unsharded(result):
    loss, _ = result
    close(loss, float(ridge(identity, F, Y)[0]), rtol=1e-12)


def repeated_singular_values(result):
    loss, grad = result
    q = np.linalg.qr(np.asarray(F))[0] * np.sqrt(N)
    close(loss, ridge_reference(q, Y, 0.0, use_bias=False)[0])
    assert np.all(np.isfinite(np.asarray(grad)))


def ridge_loss_and_feature_gradient(features, **kwargs):
    return eqx.filter_value_and_grad(lambda f: ridge(identity, f, Y, **kwargs)[0])(features)


def gradient_alone(loss, wrt, *args, **kwargs):
    """A compiled step that returns the gradient of the loss in `wrt` and nothing else
    (the loss and the readout are dead code in it), as a training step's `grad` does."""
    return eqx.filter_jit(eqx.filter_grad(lambda w: loss(w, *args, **kwargs)[0]))(wrt)


def vmapped_gradient_alone(loss, wrt, batched, **kwargs):
    """`gradient_alone` vmapped over a stack of problems (`batched`, the second
    argument of `loss`)."""
    step = eqx.filter_grad(lambda w, b: loss(w, b, **kwargs)[0])
    return eqx.filter_jit(jax.vmap(step, in_axes=(None, 0)))(wrt, batched)


def residual_jacobian_alone(x, y):
    """Only the forward-mode Jacobian of the reduced residual in the features."""
    jacobian = jax.jacfwd(lambda f: vploss.vpresidual_msereg(identity, f, y)[0])
    return eqx.filter_jit(jacobian)(x)


def ridge_in(features, y, **kwargs):
    return ridge(identity, features, y, **kwargs)


def cpflow_of(model, x, **kwargs):
    return cpflow(x, model, **kwargs)


def concave(sample):
    return -jnp.stack([sample[0] ** 2, sample[1] ** 2, jnp.sum(sample**2)])


X2_NAN = X[:, :2].at[0, 0].set(jnp.nan)


# 16-bit models: the library works in float32 (`working_dtype`). Each case runs
# `value_and_grad` of the loss of a bfloat16 (or float16) MLP on 16-bit inputs and compares
# it with the float32 answer on the same 16-bit-rounded features (the model's output cast
# to float32 by the model itself). Both solve the same float32 problem from the same
# numbers and differ only by float32 rounding in the order of operations: a few units of
# eps32 = 1.2e-7 times the small condition numbers of these problems, so 1e-5 (below the
# 16-bit resolution, 4e-3 for bfloat16 and 5e-4 for float16, that a 16-bit solve would
# show) tells them apart.
LOW_PRECISION_RTOL = 1e-5


def low_precision_mlp(dtype):
    return mlp(3, features=4, dtype=dtype)


class Float32Output(eqx.Module):
    """The same 16-bit features (the same parameters), handed to the loss in float32."""

    model: Callable

    def __call__(self, sample):
        return self.model(sample).astype(jnp.float32)


def low_precision_loss(loss, dtype=jnp.bfloat16, model=None):
    """`value_and_grad` of `loss(model) -> (scalar, readout)` for a 16-bit `model`;
    returns what `matches_float32` checks."""
    model = low_precision_mlp(dtype) if model is None else model

    def call():
        # Compiled: op-by-op dispatch of the whole solve took seconds per row.
        value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (value, readout), grad = value_and_grad(model)
        return value, readout, grad, model, loss

    return call


def matches_float32(result):
    value, readout, grad, model, loss = result
    reference, reference_readout = eqx.filter_jit(loss)(Float32Output(model))
    assert value.dtype == jnp.float32 and reference.dtype == jnp.float32
    close(value, float(reference), rtol=LOW_PRECISION_RTOL, atol=0)
    for leaf, ref in zip(jax.tree.leaves(readout), jax.tree.leaves(reference_readout), strict=True):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
            close(leaf, np.asarray(ref, np.float64), rtol=LOW_PRECISION_RTOL, atol=1e-6)
    model_dtype = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))[0].dtype
    for leaf in jax.tree.leaves(eqx.filter(grad, eqx.is_inexact_array)):
        assert leaf.dtype == model_dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))


def low_precision_refit(loss, y, dtype=jnp.bfloat16, **kwargs):
    """`refit_readout` of a 16-bit model over two batches; returns the readout and the
    float32 reference readout."""
    model = low_precision_mlp(dtype)
    x = X.astype(dtype)

    batches = [(x[:15], y[:15]), (x[15:], y[15:])]

    def call():
        fit = vploss.refit_readout(model, batches, loss=loss, **kwargs)
        reference = vploss.refit_readout(Float32Output(model), batches, loss=loss, **kwargs)
        return fit, reference

    return call


def refit_matches_float32(result):
    fit, reference = result
    assert fit.weight.dtype == jnp.float32
    close(fit.weight, np.asarray(reference.weight, np.float64), rtol=LOW_PRECISION_RTOL, atol=1e-6)
    close(fit.bias, np.asarray(reference.bias, np.float64), rtol=LOW_PRECISION_RTOL, atol=1e-6)


def jacobian_matches_float32(result):
    (jacobian, residual, readout), (ref_jacobian, ref_residual, _) = result
    assert jacobian.dtype == jnp.float32 and residual.dtype == jnp.float32
    assert readout.weight.dtype == jnp.float32
    close(residual, np.asarray(ref_residual, np.float64), rtol=LOW_PRECISION_RTOL, atol=1e-6)
    scale = float(jnp.max(jnp.abs(ref_jacobian)))
    close(jacobian, np.asarray(ref_jacobian, np.float64), rtol=0, atol=LOW_PRECISION_RTOL * scale)


def low_precision_jacobian():
    model = low_precision_mlp(jnp.bfloat16)
    x, y = X.astype(jnp.bfloat16), Y.astype(jnp.bfloat16)
    return (
        vploss.vpjacobian_msereg(model, x, y, alpha2=1e-3),
        vploss.vpjacobian_msereg(Float32Output(model), x, y, alpha2=1e-3),
    )


X16 = X.astype(jnp.bfloat16)
Y16 = Y.astype(jnp.bfloat16)
Y_BINARY_INT = Y_BINARY.astype(jnp.int32)
ICNN16 = jax.tree.map(
    lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a,
    vploss.ICNN(2, 5, 6, 2, key=jax.random.PRNGKey(0)),
)


def half_squared_residual(model):
    residual, readout = vploss.vpresidual_msereg(model, X16, Y16, alpha2=1e-3)
    return 0.5 * jnp.sum(residual**2), readout


# Orthogonal columns of equal norm: all singular values equal.
EQUAL_SINGULAR_VALUES = jnp.linalg.qr(F)[0] * jnp.sqrt(N)
DUPLICATED = jnp.concatenate([F, F], axis=1)
SINGLE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
RUNTIME = eqx.EquinoxRuntimeError
F32 = F.astype(jnp.float32)


def _line(offset, dtype, n=2000):
    t = offset + np.arange(float(n))[:, None]
    return t.astype(dtype), (2020 + 2020 * np.arange(float(n))).astype(dtype)


def _column_scales(dtype):
    rng = np.random.default_rng(1)
    scales = np.array([1e-3, 1e-2, 1.0, 10.0, 1e2, 1e3])
    features = rng.normal(size=(500, 6)) * scales
    return features.astype(dtype), (features @ (1 / scales)).astype(dtype)


def _pixels_relu(dtype, n=1000):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (n, 30)).astype(np.float64)
    features = np.maximum(pixels @ rng.normal(size=(30, 16)) / 5, 0)
    return features.astype(dtype), rng.normal(size=n).astype(dtype)


def same_precision(features, targets, alpha2=1e-6):
    """The readout's loss (in float64) within 1.1x of a backward-stable solve of the
    stacked system in the same precision (NumPy's `lstsq`), up to rounding level."""

    def check(result):
        readout = result[1] if isinstance(result, tuple) else result
        loss = ridge_loss64(features, targets, alpha2, stacked_coef(readout))
        reference, floor = same_precision_ridge_loss(features, targets, alpha2)
        assert loss <= 1.1 * reference + floor, (loss, reference)

    return check


def _repeated_inputs():
    rng = np.random.default_rng(3)
    return np.repeat(rng.normal(size=(2, 8)), 3, axis=0), rng.normal(size=6)


def pseudo_inverse_matches(features, targets):
    """The minimum-norm least-squares readout and its loss (NumPy's `pinv`)."""

    def check(result):
        loss, readout = result
        coef = np.linalg.pinv(np.c_[features, np.ones(len(features))]) @ targets
        close(loss, ridge_loss64(features, targets, 0.0, coef[:, None]), rtol=1e-8)
        close(stacked_coef(readout)[:, 0], coef, rtol=1e-6, atol=1e-8)

    return check


def _hadamard_readout_curvature(solver="svd", alpha2=1e-3):
    """The second derivative of a validation loss through the readout of orthogonal
    equal-norm (Hadamard) columns, and its central difference: the features `v +
    s·tanh(v M)` are the Hadamard columns at `s = 0` and change their span with `s`
    (so the second derivative is not zero, as it would be for a mere scaling with
    `alpha2 = 0`)."""
    h = np.array([[1.0, 1.0], [1.0, -1.0]])
    columns = np.kron(np.kron(h, h), h)[:, 1:5]
    y = np.random.default_rng(4).normal(size=8)
    x_val = jnp.asarray(np.random.default_rng(5).normal(size=(5, 4)))
    mixing = jnp.asarray(np.random.default_rng(6).normal(size=(4, 4)))

    def validation(scale):
        model = lambda v: v + scale * jnp.tanh(v @ mixing)  # noqa: E731
        _, readout = ridge(model, columns, y, alpha2=alpha2, solver=solver)
        return jnp.mean(jax.vmap(lambda v: readout(model(v)))(x_val) ** 2)

    gradient = jax.jit(jax.grad(validation))
    zero, h_step = jnp.asarray(0.0), 1e-5
    fd = (gradient(zero + h_step) - gradient(zero - h_step)) / (2 * h_step)
    return jax.jit(jax.grad(jax.grad(validation)))(zero), fd


def finite_and_matches_difference(result):
    second, fd = result
    assert np.isfinite(float(second))
    close(second, fd, rtol=1e-6)


def zero_sum_over_classes(readout):
    """The readout's rows and biases sum to zero over the K classes, to the rounding of a
    sum of K entries of size max|Ŵ|: the softmax loss is flat along the shift of all
    logits, and the penalty alone fixes it."""
    rows = np.concatenate([np.asarray(readout.weight), np.asarray(readout.bias)[:, None]], axis=1)
    k = rows.shape[0]
    tolerance = 10 * k * float(jnp.finfo(rows.dtype).eps) * np.max(np.abs(rows))
    assert np.max(np.abs(rows.sum(axis=0))) <= tolerance


def softmax_matches_centred_reference(features, labels, alpha2, rtol):
    """Zero sums, and the readout of `logistic_reference` with its rows centred over the
    classes (the reference solves in all K directions, so its shift is rounding divided
    by alpha2; the optimum has none)."""

    def check(readout):
        if isinstance(readout, tuple):
            readout = readout[1]
        zero_sum_over_classes(readout)
        coef = logistic_reference(features, labels, alpha2, softmax=True)[1]
        coef = coef - coef.mean(axis=1, keepdims=True)
        scale = np.max(np.abs(coef))
        close(readout.weight, coef[:-1].T, rtol=rtol, atol=rtol * scale)
        close(readout.bias, coef[-1], rtol=rtol, atol=rtol * scale)

    return check


def one_newton_update(features, labels, alpha2):
    """One Newton update from zero with the Armijo search, by NumPy; one update counted,
    not converged."""

    def check(result):
        _, readout = result
        evaluate, zero = logistic_problem(features, labels, alpha2)
        expected = armijo_updates(evaluate, zero, newton_step, 1)
        close(readout.weight, expected[:-1].T)
        close(readout.bias, expected[-1])
        assert int(readout.stats.num_steps) == 1 and not bool(readout.stats.converged)

    return check


def least_squares(w, args):
    a, b = args
    return 0.5 * jnp.sum((a @ w - b) ** 2)


def start_kept_no_update(result):
    _, w, stats = result
    np.testing.assert_array_equal(w, -np.ones(4))
    assert int(stats.num_steps) == 0 and not bool(stats.converged)


SOFT_CLASS = 0.8 * ONE_HOT + 0.2 / 3


# Targets the features fit exactly: GCV and sGCV fall below their rounding error as the
# penalty falls (issue 24).
NOISE_FREE = F @ jnp.array([1.0, -2.0, 0.5, 3.0]) + 0.25


def largest_eigenvalue(features, use_bias=True):
    features = np.asarray(features, np.float64)
    if use_bias:
        features = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    return np.linalg.eigvalsh(features.T @ features / len(features))[-1]


def gcv_resolved(features, y, rtol):
    """The chosen penalty is at least eps·λ_max in the working dtype (below it the penalty
    is lost in the Gram matrix's rounding), and reversing the samples gives the same
    penalty, loss and readout."""

    def check(result):
        loss, readout = result
        alpha2 = float(readout.stats.alpha2)
        eps = float(jnp.finfo(readout.stats.alpha2.dtype).eps)
        assert alpha2 >= eps * largest_eigenvalue(features)
        other_loss, other = ridge(identity, features[::-1], y[::-1], alpha2="gcv")
        close(other.stats.alpha2, alpha2, rtol=rtol, atol=0)
        close(other_loss, float(loss), rtol=rtol, atol=0)
        close(other.weight, np.asarray(readout.weight, np.float64), rtol=rtol, atol=rtol)

    return check


def slimtik_steps(x, y):
    slimtik = vploss.SlimTik(memory=2)
    state = slimtik.init(identity, x, y)
    penalties = []
    for _ in range(2):
        _, (readout, state) = slimtik.update(identity, x, y, state)
        penalties.append(float(state.penalty))
    return penalties, readout


def slimtik_resolved(result):
    """Every step's penalty is at least eps·λ_max of the memory (the batch's Gram matrix
    times the steps remembered), and reversing the samples gives the same penalties and
    readout."""
    penalties, readout = result
    top = largest_eigenvalue(F)
    eps = float(jnp.finfo(jnp.float64).eps)
    for step, penalty in enumerate(penalties, 1):
        assert penalty >= eps * step * top
    other_penalties, other = slimtik_steps(F[::-1], NOISE_FREE[::-1])
    close(other_penalties, penalties, rtol=1e-9, atol=0)
    close(other.weight, np.asarray(readout.weight, np.float64), rtol=1e-9, atol=1e-12)


def _embedding_ids():
    """Integer token ids and the model that looks them up: `x` of any dtype the model
    takes."""
    table = jnp.asarray(np.random.default_rng(8).normal(size=(10, 4)))
    ids = jnp.asarray(np.random.default_rng(9).integers(0, 10, N), jnp.int32)
    return (lambda token: table[token]), ids, table[ids]


def same_as(reference_call, rtol=1e-10):
    """The loss and readout of another call of the same problem (the features computed
    by hand, the samples dropped instead of weighted zero, native byte order)."""

    def check(result):
        loss, readout = result
        reference_loss, reference_readout = reference_call()
        close(loss, float(reference_loss), rtol=rtol)
        close(stacked_coef(readout), stacked_coef(reference_readout), rtol=rtol, atol=1e-12)

    return check


def minimum_norm_ones(result):
    """`[W, b]` of three equal inputs with alpha2 = 0 is the minimum-norm
    least-squares readout (`numpy.linalg.pinv`), not another least-squares one."""
    _, readout = result
    design = np.ones((3, 2))
    close(stacked_coef(readout)[:, 0], np.linalg.pinv(design) @ np.array([1.0, 2.0, 4.0]))


def _offset_moderate_penalty(offset):
    rng = np.random.default_rng(10)
    return (offset + rng.normal(size=(8, 3))).astype(np.float32), rng.normal(size=8).astype(
        np.float32
    )


#: Rows of weight zero holding values that overflow (1e200 squared), inf and NaN, and
#: an invalid label: removed samples are never read.
ZERO_WEIGHTS = jnp.ones(N).at[:3].set(0.0)
HUGE_ROWS = F.at[0].set(1e200).at[1].set(jnp.inf).at[2, 0].set(jnp.nan)


# Wide features (N = 30 samples, m = 40 features, so `solver="auto"` takes
# `KernelNewton`, the Newton step in the span of the rows).
WIDE = jnp.tanh(X @ jax.random.normal(jax.random.PRNGKey(5), (3, 40)))
# Every sample twice: the (30, 41) features have rank 15 (a singular kernel).
WIDE_REPEATED = jnp.concatenate([WIDE[:15], WIDE[:15]])
WIDE_REPEATED_LABELS = jnp.concatenate([Y_BINARY[:15], Y_BINARY[:15]])
WIDE_SEPARABLE = (WIDE[:, 0] > 0).astype(jnp.float64)
WIDE_COUNTS = jax.random.poisson(jax.random.PRNGKey(6), jnp.exp(WIDE[:, 0])).astype(jnp.float64)
WIDE_WEIGHTS = jnp.ones(N).at[:10].set(0.0)


def matches_without_zero_weights(result):
    """Zero weights drop their samples: the loss and readout of the call on the others."""
    loss, readout = result
    ref_loss, ref_readout = vploss.vploss_poisson(
        identity, WIDE[10:], WIDE_COUNTS[10:], alpha2=1e-3
    )
    close(loss, float(ref_loss), rtol=1e-10)
    close(readout.weight, ref_readout.weight, rtol=1e-6, atol=1e-9)


ROWS = {
    # vploss_msereg
    "ridge-y-batch-mismatch": Row(lambda: ridge(identity, F, Y[:7]), ValueError, "same batch size"),
    "ridge-y-rank-3": Row(lambda: ridge(identity, F, Y[:, None, None]), ValueError, "(N, k)"),
    "ridge-x-integer": Row(
        lambda: ridge(identity, F.astype(jnp.int32), Y), TypeError, "real floating-point features"
    ),
    "ridge-y-complex": Row(
        lambda: ridge(identity, F, Y.astype(jnp.complex128)), TypeError, "got dtype complex128"
    ),
    "ridge-y-bool": Row(lambda: ridge(identity, F, Y > 0), TypeError, "got dtype bool"),
    "ridge-empty-batch": Row(lambda: ridge(identity, F[:0], Y[:0]), ValueError, "empty batch"),
    "ridge-N-1": Row(
        lambda: ridge(identity, F[:1], Y[:1]), check=ridge_matches(F[:1], Y[:1], 1e-6)
    ),
    "ridge-N-1-alpha2-0": Row(
        lambda: ridge(identity, F[:1], Y[:1], alpha2=0.0), check=ridge_matches(F[:1], Y[:1], 0.0)
    ),
    "ridge-x-nan": Row(
        lambda: ridge(identity, F.at[3, 1].set(jnp.nan), Y), RUNTIME, "`x` is not finite"
    ),
    "ridge-x-inf-saturating-model": Row(
        lambda: ridge(mlp(3, features=4), X.at[0, 0].set(jnp.inf), Y), RUNTIME, "`x` is not finite"
    ),
    "ridge-y-inf": Row(
        lambda: ridge(identity, F, Y.at[0].set(jnp.inf)), RUNTIME, "`y` is not finite"
    ),
    "ridge-alpha2-negative": Row(
        lambda: ridge(identity, F, Y, alpha2=-1.0), ValueError, "`alpha2` must be finite and >= 0"
    ),
    "ridge-alpha2-negative-traced": Row(
        lambda: eqx.filter_jit(ridge)(identity, F, Y, alpha2=jnp.asarray(-1.0)), RUNTIME, "`alpha2`"
    ),
    "ridge-alpha2-unknown-string": Row(
        lambda: ridge(identity, F, Y, alpha2="loocv"), ValueError, 'or the string "gcv"'
    ),
    "ridge-gcv-N-1": Row(
        lambda: ridge(identity, F[:1], Y[:1], alpha2="gcv"), check=gcv_matches(F[:1], Y[:1])
    ),
    "ridge-gcv-duplicated-features": Row(
        lambda: ridge(identity, DUPLICATED, Y, alpha2="gcv"), check=gcv_matches(DUPLICATED, Y)
    ),
    "ridge-gcv-zero-features": Row(
        lambda: ridge(identity, 0 * F, Y, alpha2="gcv", use_bias=False),
        check=all_zero_features_fit_the_mean(use_bias=False),
    ),
    "ridge-alpha1-negative": Row(
        lambda: ridge(identity, F, Y, alpha1=-0.5), ValueError, "`alpha1`"
    ),
    "ridge-duplicated-features-alpha2-0": Row(
        lambda: ridge(identity, DUPLICATED, Y, alpha2=0.0), check=ridge_matches(DUPLICATED, Y, 0.0)
    ),
    "ridge-zero-features-alpha2-0-cholesky": Row(
        lambda: ridge(identity, 0 * F, Y, alpha2=0.0, solver="cholesky", use_bias=False),
        check=all_zero_features_fit_the_mean(use_bias=False),
    ),
    "ridge-zero-features-alpha2-0-dual": Row(
        lambda: ridge(identity, 0 * F, Y, alpha2=0.0, solver="dual", use_bias=False),
        check=all_zero_features_fit_the_mean(use_bias=False),
    ),
    "ridge-repeated-singular-values": Row(
        lambda: ridge_loss_and_feature_gradient(EQUAL_SINGULAR_VALUES, alpha2=0.0, use_bias=False),
        check=repeated_singular_values,
    ),
    "ridge-features-scaled-1e6": Row(
        lambda: ridge(identity, 1e6 * F, Y, alpha2=1e-3 * 1e12, use_bias=False),
        check=scale_equivariant(ridge, 1e6, 1e-3, Y),
    ),
    "ridge-features-scaled-1e-6": Row(
        lambda: ridge(identity, 1e-6 * F, Y, alpha2=1e-3 * 1e-12, use_bias=False),
        check=scale_equivariant(ridge, 1e-6, 1e-3, Y),
    ),
    "ridge-mixed-f32-features-f64-targets": Row(
        lambda: ridge(identity, F32, Y, alpha2=1e-3),
        check=ridge_matches(F32, Y, 1e-3),  # computed in float64, the targets' dtype
    ),
    "ridge-model-returns-matrix": Row(
        lambda: ridge(lambda f: jnp.outer(f, f), F, Y), ValueError, "shape (m,) or a scalar"
    ),
    "ridge-model-fails-on-sample-shape": Row(
        lambda: ridge(mlp(3, features=4), X[:, :2], Y),
        ValueError,
        "failed on one sample of shape (2,)",
    ),
    "ridge-vmap-one-bad-member": Row(
        lambda: jax.vmap(lambda f: ridge(identity, f, Y)[0])(
            jnp.stack([F, F.at[0, 0].set(jnp.nan)])
        ),
        RUNTIME,
        "not finite",
    ),
    "ridge-sharded-single-device": Row(
        lambda: ridge(identity, jax.device_put(F, SINGLE_DEVICE), jax.device_put(Y, SINGLE_DEVICE)),
        check=same_as_unsharded,
    ),
    # vploss_bce
    "bce-labels-plus-minus-one": Row(lambda: bce(F, 2 * Y_BINARY - 1), RUNTIME, "(y + 1) / 2"),
    "bce-labels-nan": Row(
        lambda: bce(F, Y_BINARY.at[0].set(jnp.nan)), RUNTIME, "must be in [0, 1]"
    ),
    "bce-alpha2-zero": Row(
        lambda: bce(F, Y_BINARY, alpha2=0.0), ValueError, "must be finite and > 0"
    ),
    "bce-x-nan": Row(lambda: bce(F.at[2, 2].set(jnp.nan), Y_BINARY), RUNTIME, "`x` is not finite"),
    "bce-empty-batch": Row(lambda: bce(F[:0], Y_BINARY[:0]), ValueError, "empty batch"),
    "bce-N-1": Row(
        lambda: bce(F[:1], Y_BINARY[:1]), check=logistic_matches(F[:1], Y_BINARY[:1], 1e-3)
    ),
    "bce-integer-labels": Row(
        lambda: bce(F, Y_BINARY.astype(jnp.int32)), check=logistic_matches(F, Y_BINARY, 1e-3)
    ),
    "bce-separable-alpha2-1e-8": Row(
        lambda: bce(F, SEPARABLE, alpha2=1e-8),
        check=logistic_matches(F, SEPARABLE, 1e-8, rtol=1e-7),
    ),
    "bce-duplicated-features": Row(
        lambda: bce(DUPLICATED, Y_BINARY, alpha2=1e-4),
        check=logistic_matches(DUPLICATED, Y_BINARY, 1e-4),
    ),
    "bce-zero-features": Row(
        lambda: bce(0 * F, Y_BINARY, alpha2=1e-4), check=logistic_matches(0 * F, Y_BINARY, 1e-4)
    ),
    "bce-features-scaled-1e6": Row(
        lambda: bce(1e6 * F, Y_BINARY, alpha2=1e-2), check=logistic_matches(1e6 * F, Y_BINARY, 1e-2)
    ),
    "bce-features-scaled-1e-6": Row(
        lambda: bce(1e-6 * F, Y_BINARY, alpha2=1e-5),
        check=logistic_matches(1e-6 * F, Y_BINARY, 1e-5),
    ),
    "bce-features-scaled-1e-6-no-bias": Row(
        lambda: bce(1e-6 * F, Y_BINARY, alpha2=1e-3 * 1e-12, use_bias=False),
        check=scale_equivariant(vploss.vploss_bce, 1e-6, 1e-3, Y_BINARY),
    ),
    "bce-features-scaled-1e6-no-bias": Row(
        lambda: bce(1e6 * F, Y_BINARY, alpha2=1e-3 * 1e12, use_bias=False),
        check=scale_equivariant(vploss.vploss_bce, 1e6, 1e-3, Y_BINARY),
    ),
    "bce-max-steps-1": Row(lambda: bce(F, Y_BINARY, max_steps=1), RUNTIME, "did not converge"),
    "bce-max-steps-1-throw-false": Row(
        lambda: bce(F, Y_BINARY, max_steps=1, throw=False), check=finite_and_not_converged
    ),
    "bce-vmap-one-bad-member": Row(
        lambda: jax.vmap(lambda y: bce(F, y)[0])(jnp.stack([Y_BINARY, Y_BINARY.at[0].set(2.0)])),
        RUNTIME,
        "must be in [0, 1]",
    ),
    # vploss_ce
    "ce-num-classes-too-small": Row(
        lambda: ce(F, Y_CLASS, num_classes=2), RUNTIME, "[0, num_classes) = [0, 2)"
    ),
    "ce-negative-label": Row(
        lambda: ce(F, Y_CLASS.at[0].set(-1), num_classes=3), RUNTIME, "[0, num_classes)"
    ),
    "ce-num-classes-1": Row(lambda: ce(F, Y_CLASS, num_classes=1), ValueError, ">= 2; got 1"),
    "ce-integer-labels-without-num-classes": Row(
        lambda: ce(F, Y_CLASS), ValueError, "needs `num_classes`"
    ),
    "ce-float-labels-of-shape-N": Row(
        lambda: ce(F, Y_CLASS.astype(jnp.float64), num_classes=3), TypeError, "integer class labels"
    ),
    "ce-integer-one-hot-rows": Row(
        lambda: ce(F, ONE_HOT.astype(jnp.int32)), TypeError, "must hold class probabilities"
    ),
    "ce-rows-not-summing-to-one": Row(lambda: ce(F, 0.5 * ONE_HOT), RUNTIME, "sum to 1"),
    "ce-num-classes-mismatch": Row(
        lambda: ce(F, ONE_HOT, num_classes=4), ValueError, "does not match"
    ),
    "ce-alpha2-negative": Row(lambda: ce(F, ONE_HOT, alpha2=-1e-3), ValueError, "> 0; got -0.001"),
    "ce-N-1": Row(
        lambda: ce(F[:1], Y_CLASS[:1], num_classes=3),
        check=logistic_matches(F[:1], ONE_HOT[:1], 1e-3, softmax=True),
    ),
    "ce-separable-alpha2-1e-6": Row(
        lambda: ce(F, SEPARABLE_ONE_HOT, alpha2=1e-6),
        check=logistic_matches(F, SEPARABLE_ONE_HOT, 1e-6, softmax=True, rtol=1e-7),
    ),
    "ce-separable-alpha2-1e-8-gtol-1e-10": Row(
        # The loss is within about |g|²/(2 alpha2) of the minimum: at alpha2 = 1e-8 the
        # default `gtol` leaves 4e-7 of this small loss (2.7e-5); 1e-10 leaves 2e-12.
        lambda: ce(F, SEPARABLE_ONE_HOT, alpha2=1e-8, gtol=1e-10),
        check=logistic_matches(F, SEPARABLE_ONE_HOT, 1e-8, softmax=True),
    ),
    "ce-features-scaled-1e-6-no-bias": Row(
        lambda: ce(1e-6 * F, ONE_HOT, alpha2=1e-3 * 1e-12, use_bias=False),
        check=scale_equivariant(vploss.vploss_ce, 1e-6, 1e-3, ONE_HOT),
    ),
    "ce-features-scaled-1e6-no-bias": Row(
        lambda: ce(1e6 * F, ONE_HOT, alpha2=1e-3 * 1e12, use_bias=False),
        check=scale_equivariant(vploss.vploss_ce, 1e6, 1e-3, ONE_HOT),
    ),
    "ce-f32-features-int-labels": Row(
        lambda: ce(F32, Y_CLASS, num_classes=3),
        check=logistic_matches_float32(F32, ONE_HOT, 1e-3, softmax=True),
    ),
    "ce-vmap-one-bad-member": Row(
        lambda: jax.vmap(lambda y: ce(F, y, num_classes=3)[0])(
            jnp.stack([Y_CLASS, Y_CLASS.at[0].set(5)])
        ),
        RUNTIME,
        "[0, num_classes)",
    ),
    # vploss_cpflow
    "cpflow-x-rank-1": Row(lambda: cpflow(X[:, 0]), ValueError, "shape (N, n)"),
    "cpflow-x-integer": Row(
        lambda: cpflow(X[:, :2].astype(jnp.int32)), TypeError, "real floating-point"
    ),
    "cpflow-alpha2-zero": Row(lambda: cpflow(X[:, :2], alpha2=0.0), ValueError, "> 0; got 0.0"),
    "cpflow-x-nan": Row(lambda: cpflow(X[:, :2].at[0, 0].set(jnp.nan)), RUNTIME, "not finite"),
    "cpflow-model-wrong-input-dimension": Row(
        lambda: cpflow(X), ValueError, "failed on one sample of shape (3,)"
    ),
    "cpflow-max-steps-1": Row(
        lambda: cpflow(X[:, :2], solver=vploss.LogBarrier(max_steps=1)), RUNTIME, "did not converge"
    ),
    # Runtime checks in a compiled step that returns the gradient alone
    "ridge-x-nan-gradient-alone": Row(
        lambda: gradient_alone(ridge_in, F.at[3, 1].set(jnp.nan), Y), RUNTIME, "`x` is not finite"
    ),
    "ridge-y-inf-gradient-alone": Row(
        lambda: gradient_alone(ridge_in, F, Y.at[0].set(jnp.inf)), RUNTIME, "`y` is not finite"
    ),
    "ridge-x-inf-saturating-model-gradient-alone": Row(
        lambda: gradient_alone(ridge, mlp(3, features=4), X.at[0, 0].set(jnp.inf), Y),
        RUNTIME,
        "`x` is not finite",
    ),
    "ridge-vmap-gradient-alone-one-bad-member": Row(
        lambda: vmapped_gradient_alone(ridge_in, F, jnp.stack([Y, Y.at[0].set(jnp.nan)])),
        RUNTIME,
        "`y` is not finite",
    ),
    "residual-x-nan-jacobian-alone": Row(
        lambda: residual_jacobian_alone(F.at[3, 1].set(jnp.nan), Y), RUNTIME, "`x` is not finite"
    ),
    "jacobian-x-nan-jacobian-alone": Row(
        lambda: eqx.filter_jit(lambda x: vploss.vpjacobian_msereg(mlp(3, features=4), x, Y)[0])(
            X.at[0, 0].set(jnp.nan)
        ),
        RUNTIME,
        "`x` is not finite",
    ),
    "bce-label-2-gradient-alone": Row(
        lambda: gradient_alone(
            vploss.vploss_bce, mlp(3, features=4), X, Y_BINARY.at[0].set(2.0), alpha2=1e-3
        ),
        RUNTIME,
        "must be in [0, 1]",
    ),
    "bce-x-nan-gradient-alone": Row(
        lambda: gradient_alone(bce, F.at[2, 2].set(jnp.nan), Y_BINARY), RUNTIME, "`x` is not finite"
    ),
    "bce-max-steps-1-gradient-alone": Row(
        lambda: gradient_alone(bce, F, Y_BINARY, max_steps=1), RUNTIME, "did not converge"
    ),
    "bce-vmap-gradient-alone-one-bad-member": Row(
        lambda: vmapped_gradient_alone(bce, F, jnp.stack([Y_BINARY, Y_BINARY.at[0].set(2.0)])),
        RUNTIME,
        "must be in [0, 1]",
    ),
    "ce-label-out-of-range-gradient-alone": Row(
        lambda: gradient_alone(ce, F, Y_CLASS.at[0].set(5), num_classes=3),
        RUNTIME,
        "[0, num_classes)",
    ),
    "ce-x-nan-gradient-alone": Row(
        lambda: gradient_alone(ce, F.at[2, 2].set(jnp.nan), Y_CLASS, num_classes=3),
        RUNTIME,
        "`x` is not finite",
    ),
    "ce-max-steps-1-gradient-alone": Row(
        lambda: gradient_alone(ce, F, Y_CLASS, num_classes=3, max_steps=1),
        RUNTIME,
        "did not converge",
    ),
    "cpflow-x-nan-gradient-alone": Row(
        lambda: gradient_alone(cpflow_of, icnn(), X2_NAN), RUNTIME, "`x` is not finite"
    ),
    "cpflow-max-steps-1-gradient-alone": Row(
        lambda: gradient_alone(cpflow_of, icnn(), X[:, :2], solver=vploss.LogBarrier(max_steps=1)),
        RUNTIME,
        "did not converge",
    ),
    "cpflow-non-convex-model-gradient-alone": Row(
        lambda: gradient_alone(cpflow, X[:, :2], concave), RUNTIME, "not convex in x"
    ),
    # 16-bit models (bfloat16, float16): the loss in float32, checked against float32
    "ridge-bfloat16-model": Row(
        low_precision_loss(lambda m: ridge(m, X16, Y16, alpha2=1e-3)), check=matches_float32
    ),
    "ridge-float16-model": Row(
        low_precision_loss(
            lambda m: ridge(m, X.astype(jnp.float16), Y.astype(jnp.float16), alpha2=1e-3),
            jnp.float16,
        ),
        check=matches_float32,
    ),
    "ridge-gcv-bfloat16-model": Row(
        low_precision_loss(lambda m: ridge(m, X16, Y16, alpha2="gcv")), check=matches_float32
    ),
    "residual-bfloat16-model": Row(
        low_precision_loss(half_squared_residual), check=matches_float32
    ),
    "jacobian-bfloat16-model": Row(low_precision_jacobian, check=jacobian_matches_float32),
    "bce-bfloat16-model": Row(
        low_precision_loss(lambda m: vploss.vploss_bce(m, X16, Y_BINARY_INT, alpha2=1e-3)),
        check=matches_float32,
    ),
    "ce-bfloat16-model": Row(
        low_precision_loss(lambda m: vploss.vploss_ce(m, X16, Y_CLASS, alpha2=1e-3, num_classes=3)),
        check=matches_float32,
    ),
    "cpflow-bfloat16-model": Row(
        low_precision_loss(
            lambda m: vploss.vploss_cpflow(m, X16[:, :2], alpha2=1e-3), model=ICNN16
        ),
        check=matches_float32,
    ),
    "refit-ridge-bfloat16-model": Row(
        low_precision_refit(vploss.vploss_msereg, Y16, alpha2=1e-3), check=refit_matches_float32
    ),
    "refit-bce-bfloat16-model": Row(
        low_precision_refit(vploss.vploss_bce, Y_BINARY_INT, alpha2=1e-3),
        check=refit_matches_float32,
    ),
    "refit-ce-bfloat16-model": Row(
        low_precision_refit(vploss.vploss_ce, Y_CLASS, alpha2=1e-3, num_classes=3),
        check=refit_matches_float32,
    ),
    # VPLinear
    "readout-wrong-feature-count": Row(
        lambda: vploss.VPLinear(jnp.ones((2, 3)), jnp.zeros(2))(jnp.ones(4)),
        ValueError,
        "shape (3,)",
    ),
    "readout-batch-of-features": Row(
        # A (2, 3) batch has the 6 entries a (1, 6) readout expects of ONE sample.
        lambda: vploss.VPLinear(jnp.ones((1, 6)), jnp.zeros(1))(jnp.ones((2, 3))),
        TypeError,
        "features",
    ),
    "readout-scalar-output-with-k-2": Row(
        lambda: vploss.VPLinear(jnp.ones((2, 3)), None, scalar_output=True), ValueError, "(1, m)"
    ),
    # Raw units: offsets and scales (the Gram matrix of the uncentred features lost
    # every direction but the offset's), the alpha2 = 0 kernel, second derivatives.
    "ridge-offset-2020-line-float32": Row(
        lambda: ridge(identity, *_line(0.0, np.float32)),
        check=same_precision(*_line(0.0, np.float32)),
    ),
    "ridge-offset-1e6-float64": Row(
        lambda: ridge(identity, *_line(1e6, np.float64)),
        check=same_precision(*_line(1e6, np.float64)),
    ),
    "ridge-offset-1e6-float32": Row(
        lambda: ridge(identity, *_line(1e6, np.float32)),
        check=same_precision(*_line(1e6, np.float32)),
    ),
    "ridge-column-scales-float32": Row(
        lambda: ridge(identity, *_column_scales(np.float32)),
        check=same_precision(*_column_scales(np.float32)),
    ),
    "ridge-pixels-relu-float32": Row(
        lambda: ridge(identity, *_pixels_relu(np.float32)),
        check=same_precision(*_pixels_relu(np.float32)),
    ),
    "ridge-dual-pixels-relu-float32": Row(
        lambda: ridge(identity, *_pixels_relu(np.float32, n=12), solver="dual"),
        check=same_precision(*_pixels_relu(np.float32, n=12)),
    ),
    "refit-ridge-offset-1e6-float32": Row(
        lambda: vploss.refit_readout(
            identity,
            [
                (a, b)
                for a, b in zip(*(np.split(v, 4) for v in _line(1e6, np.float32)), strict=True)
            ],
            loss=ridge,
            alpha2=1e-6,
        ),
        check=same_precision(*_line(1e6, np.float32)),
    ),
    "ridge-dual-alpha2-0-repeated-inputs": Row(
        lambda: ridge(identity, *_repeated_inputs(), alpha2=0.0, solver="dual"),
        check=pseudo_inverse_matches(*_repeated_inputs()),
    ),
    "ridge-auto-traced-alpha2-0-repeated-inputs": Row(
        lambda: eqx.filter_jit(lambda a: ridge(identity, *_repeated_inputs(), alpha2=a))(
            jnp.asarray(0.0)
        ),
        check=pseudo_inverse_matches(*_repeated_inputs()),
    ),
    "ridge-svd-readout-hessian-repeated-singular-values": Row(
        _hadamard_readout_curvature, check=finite_and_matches_difference
    ),
    # Per-sample weights of the ridge loss
    "ridge-weights-negative": Row(
        lambda: ridge(identity, F, Y, weights=jnp.ones(N).at[2].set(-1.0)),
        RUNTIME,
        "must be >= 0",
    ),
    "ridge-weights-nan": Row(
        lambda: ridge(identity, F, Y, weights=jnp.ones(N).at[2].set(jnp.nan)),
        RUNTIME,
        "are not finite",
    ),
    "ridge-weights-wrong-shape": Row(
        lambda: ridge(identity, F, Y, weights=jnp.ones(N - 1)),
        ValueError,
        "must have shape (N,) = (30,)",
    ),
    # The readout losses' weights and the Poisson loss's counts
    "bce-weights-zero-total-gradient-alone": Row(
        lambda: eqx.filter_grad(
            lambda m: vploss.vploss_bce(m, F, Y_BINARY_INT, alpha2=1e-3, weights=jnp.zeros(N))[0]
        )(identity),
        RUNTIME,
        "sum to zero",
    ),
    "poisson-negative-counts": Row(
        lambda: vploss.vploss_poisson(identity, F, Y_BINARY.at[0].set(-1.0), alpha2=1e-3),
        RUNTIME,
        "counts or rates >= 0",
    ),
    # Newton steps and the softmax shift
    "ce-probabilities-alpha2-1e-12-zero-sum": Row(
        lambda: ce(F, SOFT_CLASS, alpha2=1e-12, gtol=1e-12),
        check=softmax_matches_centred_reference(F, SOFT_CLASS, 1e-12, rtol=1e-8),
    ),
    "refit-ce-probabilities-alpha2-1e-12-zero-sum": Row(
        lambda: vploss.refit_readout(
            identity,
            [(F[:15], SOFT_CLASS[:15]), (F[15:], SOFT_CLASS[15:])],
            loss=vploss.vploss_ce,
            alpha2=1e-12,
            gtol=1e-12,
        ),
        check=softmax_matches_centred_reference(F, SOFT_CLASS, 1e-12, rtol=1e-8),
    ),
    "bce-max-steps-1-one-update": Row(
        lambda: bce(F, Y_BINARY, max_steps=1, throw=False),
        check=one_newton_update(F, Y_BINARY, 1e-3),
    ),
    "barrier-infeasible-start": Row(
        lambda: vploss.barrier_minimise(
            least_squares, (F[:, :4], Y), -jnp.ones(4), constrained=True
        ),
        check=start_kept_no_update,
    ),
    # Automatic penalties resolved by the working precision
    "ridge-gcv-noise-free-targets": Row(
        lambda: ridge(identity, F, NOISE_FREE, alpha2="gcv"),
        check=lambda result: (
            gcv_matches(F, NOISE_FREE)(result),
            gcv_resolved(F, NOISE_FREE, rtol=1e-9)(result),
        ),
    ),
    "ridge-gcv-noise-free-interpolating-float32": Row(
        lambda: ridge(
            identity, F[:3].astype(jnp.float32), NOISE_FREE[:3].astype(jnp.float32), alpha2="gcv"
        ),
        check=gcv_resolved(F[:3].astype(jnp.float32), NOISE_FREE[:3].astype(jnp.float32), 1e-5),
    ),
    "slimtik-noise-free-batch": Row(lambda: slimtik_steps(F, NOISE_FREE), check=slimtik_resolved),
    # Wide features, few samples (`KernelNewton`)
    "bce-wide-repeated-samples": Row(
        lambda: bce(WIDE_REPEATED, WIDE_REPEATED_LABELS),
        check=logistic_matches(WIDE_REPEATED, WIDE_REPEATED_LABELS, 1e-3),
    ),
    "bce-wide-separable-float32": Row(
        lambda: bce(WIDE.astype(jnp.float32) * 10, WIDE_SEPARABLE.astype(jnp.float32), alpha2=1e-6),
        check=logistic_matches_float32(WIDE.astype(jnp.float32) * 10, WIDE_SEPARABLE, 1e-6),
    ),
    "poisson-wide-zero-weights": Row(
        lambda: vploss.vploss_poisson(
            identity, WIDE, WIDE_COUNTS, alpha2=1e-3, weights=WIDE_WEIGHTS
        ),
        check=matches_without_zero_weights,
    ),
    # Decisions on an argument's value, the same eagerly and under `jit`
    "ridge-alpha2-0-python-float-under-jit": Row(
        lambda: jax.jit(lambda x, y: ridge(identity, x, y, alpha2=0.0))(
            jnp.ones((3, 1)), jnp.array([1.0, 2.0, 4.0])
        ),
        check=minimum_norm_ones,
    ),
    # Raw units with a moderate penalty: the eliminated intercept's row dominated the
    # Gram matrix (21% excess loss at 1e5)
    "ridge-offset-1e5-alpha2-1e-2-float32": Row(
        lambda: ridge(identity, *_offset_moderate_penalty(1e5), alpha2=1e-2),
        check=same_precision(*_offset_moderate_penalty(1e5), alpha2=1e-2),
    ),
    "refit-ridge-offset-1e4-alpha2-1-40-float32": Row(
        lambda: vploss.refit_readout(
            identity, [_offset_moderate_penalty(1e4)], loss=vploss.vploss_msereg, alpha2=1 / 40
        ),
        check=same_precision(*_offset_moderate_penalty(1e4), alpha2=1 / 40),
    ),
    # Second derivatives through every decomposition at repeated singular values
    "ridge-dual-readout-hessian-repeated-singular-values": Row(
        lambda: _hadamard_readout_curvature("dual", 1e-3), check=finite_and_matches_difference
    ),
    "ridge-svd-alpha2-0-readout-hessian-repeated-singular-values": Row(
        lambda: _hadamard_readout_curvature("svd", 0.0), check=finite_and_matches_difference
    ),
    # Inputs the model takes
    "ridge-x-int32-token-ids": Row(
        lambda: ridge(_embedding_ids()[0], _embedding_ids()[1], Y),
        check=same_as(lambda: ridge(identity, _embedding_ids()[2], Y)),
    ),
    "ridge-x-big-endian-numpy": Row(
        lambda: ridge(identity, np.asarray(F).astype(">f8"), np.asarray(Y).astype(">f4")),
        check=same_as(lambda: ridge(identity, F, Y.astype(jnp.float32))),
    ),
    # Samples removed by a zero weight
    "ridge-zero-weight-rows-huge-inf-nan": Row(
        lambda: ridge(identity, HUGE_ROWS, Y, weights=ZERO_WEIGHTS),
        check=same_as(lambda: ridge(identity, F[3:], Y[3:]), rtol=1e-9),
    ),
    "bce-zero-weight-rows-huge-inf-nan-invalid-label": Row(
        lambda: bce(HUGE_ROWS, Y_BINARY.at[0].set(7.0), weights=ZERO_WEIGHTS),
        check=same_as(lambda: bce(F[3:], Y_BINARY[3:]), rtol=1e-9),
    ),
}


# Rows whose compile alone takes half a minute run with the slow tests, and so do the
# longer of two rows that check the same input on related paths (the other stays), so
# that the default suite fits in five minutes on two cores.
SLOW_ROWS = {
    "ridge-dual-readout-hessian-repeated-singular-values",
    "bce-duplicated-features",
    "ridge-dual-alpha2-0-repeated-inputs",
    "ce-separable-alpha2-1e-6",
    "ridge-offset-1e6-float64",
    "ridge-N-1",
    "poisson-negative-counts",
    "bce-max-steps-1",
    "ridge-gcv-zero-features",
    "ridge-x-nan-gradient-alone",
    "bce-weights-zero-total-gradient-alone",
    "cpflow-non-convex-model-gradient-alone",
    "bce-labels-nan",
    "ce-num-classes-too-small",
    "ce-negative-label",
    "bce-wide-separable-float32",
    "ce-features-scaled-1e6-no-bias",
    "bce-features-scaled-1e-6-no-bias",
    "ce-max-steps-1-gradient-alone",
    "ridge-duplicated-features-alpha2-0",
    "refit-ce-probabilities-alpha2-1e-12-zero-sum",
    "ridge-svd-alpha2-0-readout-hessian-repeated-singular-values",
    "ridge-gcv-noise-free-targets",
    "ridge-offset-1e5-alpha2-1e-2-float32",
    "slimtik-noise-free-batch",
    "bce-wide-repeated-samples",
    "poisson-wide-zero-weights",
    "ce-f32-features-int-labels",
    "ridge-gcv-bfloat16-model",
    "ridge-gcv-duplicated-features",
    "ridge-offset-2020-line-float32",
    "ce-N-1",
    "ce-features-scaled-1e-6-no-bias",
    "refit-ridge-bfloat16-model",
    "ce-separable-alpha2-1e-8-gtol-1e-10",
    "ce-x-nan-gradient-alone",
    "jacobian-x-nan-jacobian-alone",
    "ridge-vmap-one-bad-member",
    "cpflow-bfloat16-model",
    "cpflow-x-nan",
    "cpflow-max-steps-1",
    "jacobian-bfloat16-model",
    "ridge-float16-model",
    "cpflow-x-nan-gradient-alone",
    "cpflow-max-steps-1-gradient-alone",
    "ce-vmap-one-bad-member",
    "bce-vmap-one-bad-member",
    "bce-labels-plus-minus-one",
    "residual-bfloat16-model",
    "refit-ce-bfloat16-model",
    "refit-bce-bfloat16-model",
    "ridge-dual-pixels-relu-float32",
    "ridge-column-scales-float32",
    "ridge-sharded-single-device",
    "bce-bfloat16-model",
    "ce-bfloat16-model",
    "ridge-svd-readout-hessian-repeated-singular-values",
}


# The library's own calls must not lean on deprecated JAX behaviour either.
@pytest.mark.filterwarnings("error::DeprecationWarning")
@pytest.mark.parametrize(
    "row",
    [
        pytest.param(row, id=name, marks=pytest.mark.slow if name in SLOW_ROWS else ())
        for name, row in ROWS.items()
    ],
)
def test_hostile_input(row):
    if row.error is not None:
        with pytest.raises(row.error) as info:
            row.call()
        assert row.fragment in str(info.value)
    else:
        row.check(row.call())


def test_readout_rejects_a_batch_without_the_type_checker():
    """The readout's own check (the jaxtyping hook catches the case above first)."""
    readout = vploss.VPLinear(jnp.ones((1, 6)), jnp.zeros(1))
    unchecked_call = getattr(vploss.VPLinear.__call__, "__wrapped__", vploss.VPLinear.__call__)
    with pytest.raises(
        ValueError, match=r"features of one sample, shape \(6,\); got shape \(2, 3\)"
    ):
        unchecked_call(readout, jnp.ones((2, 3)))


DOC = pathlib.Path(__file__).parent.parent / "docs" / "hostile_inputs.md"


def doc_table():
    """The table of docs/hostile_inputs.md as `(number, id, behaviour)` per row."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not re.match(r"^\| \d+ \|", line):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 5, f"a row of the table needs 5 cells: {line!r}"
        number, case, _, _, behaviour = cells
        rows.append((int(number), case.strip("`"), behaviour))
    return rows


def expected_behaviour(row):
    """The start of the behaviour cell that a `Row` implies."""
    if row.error is None:
        return "finite"
    return f"error: `{row.error.__name__}`, message containing ``{row.fragment}``"


def test_doc_table_matches_rows():
    table = doc_table()
    assert [number for number, _, _ in table] == list(range(1, len(table) + 1)), (
        "the table's rows must be numbered 1, 2, ..."
    )
    ids = [case for _, case, _ in table]
    duplicated = sorted({case for case in ids if ids.count(case) > 1})
    assert not duplicated, f"ids repeated in the table: {duplicated}"
    only_doc = [case for case in ids if case not in ROWS]
    only_test = [case for case in ROWS if case not in ids]
    assert not only_doc and not only_test, (
        f"in docs/hostile_inputs.md only: {only_doc}; in ROWS only: {only_test}"
    )
    wrong = [
        f"{case}: the behaviour cell must start {expected_behaviour(ROWS[case])!r}; "
        f"it is {behaviour!r}"
        for _, case, behaviour in table
        if not behaviour.startswith(expected_behaviour(ROWS[case]))
    ]
    assert not wrong, "\n".join(wrong)
