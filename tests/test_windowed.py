"""`WindowedReadout` and its evidence penalty: the window's readout against an independent
NumPy Newton solve, the evidence fixed point against a bisection of its equation, the
Hessian spectrum, the gradient, and the loop's transformations."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss
from vploss import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy, WindowedReadout, WindowedState
from vploss._readout_losses.evidence import data_hessian_eigenvalues
from vploss._readout_losses.objective import ReadoutArgs, ReadoutObjective

from .helpers import flatten, logistic_reference, mlp, scanned_updates


def identity(features):
    return features


def _batches(count, n=20, m=4, classes=None, seed=0):
    """Batches of features and noisy labels of a linear model: binary `(n,)` floats, or
    integer classes."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(m, classes or 1))
    out = []
    for _ in range(count):
        x = rng.normal(size=(n, m))
        logits = x @ truth + rng.normal(size=(n, classes or 1))
        y = (logits[:, 0] > 0).astype(float) if classes is None else np.argmax(logits, axis=1)
        out.append((x, y))
    return out


def _run(readout_rule, batches, model=identity):
    state = readout_rule.init(model, *batches[0])
    history = []
    for x, y in batches:
        previous = state
        loss, (readout, state) = readout_rule.update(model, jnp.asarray(x), jnp.asarray(y), state)
        history.append((previous, loss, readout, state))
    return history


def _stacked(readout):
    return np.concatenate([np.asarray(readout.weight).T, np.asarray(readout.bias)[None]], axis=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("classes", "memory"), [pytest.param(None, 0, marks=pytest.mark.slow), (3, 2)]
)
def test_readout_is_the_exact_readout_of_the_window(classes, memory):
    """After each batch the readout minimises the loss over the current batch and the
    last `memory` stored batches (fewer at the start) at the state's penalty: checked
    against a dense NumPy Newton solve of that window (`logistic_reference`)."""
    batches = _batches(4, classes=classes)
    loss_fn = SigmoidBinaryCrossEntropy() if classes is None else SoftmaxCrossEntropy(classes)
    history = _run(WindowedReadout(loss_fn, memory=memory, alpha2=0.05), batches)
    for step, (_, _, readout, state) in enumerate(history):
        window = batches[max(0, step - memory) : step + 1]
        x = np.concatenate([b[0] for b in window])
        y = np.concatenate([b[1] for b in window])
        labels = y[:, None] if classes is None else np.eye(classes)[y]
        _, expected = logistic_reference(x, labels, 0.05, softmax=classes is not None)
        np.testing.assert_allclose(_stacked(readout), expected, rtol=1e-6, atol=1e-7)
        assert float(state.alpha2) == 0.05
        assert bool(readout.stats.converged)


def _fixed_point_residual(x, y, alpha):
    """`log(alpha · N‖Ŵ‖²/γ)` at the readout of penalty alpha, with the logistic Hessian
    and γ = Σ μ/(μ + alpha) formed in NumPy: zero at MacKay's fixed point."""
    _, coef = logistic_reference(x, y[:, None], alpha)
    features = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    p = 1 / (1 + np.exp(-features @ coef[:, 0]))
    hessian = (features * (p * (1 - p))[:, None]).T @ features / x.shape[0]
    mu = np.linalg.eigvalsh(hessian)
    gamma = np.sum(mu / (mu + alpha))
    return np.log(alpha * x.shape[0] * np.sum(coef**2) / gamma)


@pytest.mark.slow
def test_evidence_penalty_converges_to_mackays_fixed_point():
    """Updates on one repeated batch (no memory) converge to the penalty solving
    alpha = γ/(N‖Ŵ_alpha‖²), found here by bisection on log alpha with NumPy solves."""
    ((x, y),) = _batches(1, n=40)
    rule = WindowedReadout(SigmoidBinaryCrossEntropy(), memory=0)
    state = rule.init(identity, x, y)
    update = eqx.filter_jit(rule.update)
    # The fixed-point iteration converges linearly (about 0.75 per step here).
    for _ in range(70):
        _, (_, state) = update(identity, jnp.asarray(x), jnp.asarray(y), state)
    lo, hi = np.log(1e-6), np.log(10.0)
    assert _fixed_point_residual(x, y, np.exp(lo)) < 0 < _fixed_point_residual(x, y, np.exp(hi))
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _fixed_point_residual(x, y, np.exp(mid)) < 0 else (lo, mid)
    assert float(state.alpha2) == pytest.approx(np.exp(lo), rel=1e-6)


@pytest.mark.parametrize("classes", [None, 3])
def test_data_hessian_eigenvalues(classes):
    """Logistic: the eigenvalues of the exact data Hessian F̂ᵀDF̂/N. Softmax: those of
    its Kronecker factorisation Ā ⊗ F̂ᵀF̂/N in the loss's basis (Ā the mean curvature),
    formed here with NumPy."""
    ((x, y),) = _batches(1, n=30, classes=classes)
    features = np.concatenate([x, np.ones((30, 1))], axis=1)
    rng = np.random.default_rng(1)
    loss_fn = SigmoidBinaryCrossEntropy() if classes is None else SoftmaxCrossEntropy(classes)
    labels = y[:, None] if classes is None else np.eye(classes)[y]
    coef = rng.normal(size=(features.shape[1], labels.shape[1]))
    objective = ReadoutObjective(loss_fn)
    args = ReadoutArgs(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(0.1), use_bias=True)
    eigenvalues = np.sort(np.asarray(data_hessian_eigenvalues(objective, jnp.asarray(coef), args)))
    if classes is None:
        p = 1 / (1 + np.exp(-features @ coef[:, 0]))
        expected = np.linalg.eigvalsh((features * (p * (1 - p))[:, None]).T @ features / 30)
    else:
        basis = np.asarray(loss_fn.basis(classes))
        logits = features @ coef @ basis.T
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        mean = sum(np.diag(q) - np.outer(q, q) for q in prob) / 30
        curvature = basis.T @ mean @ basis
        curvature[-1, :] = curvature[:, -1] = 0  # the basis's linear direction
        gram = features.T @ features / 30
        expected = np.linalg.eigvalsh(np.kron(curvature, gram))
    np.testing.assert_allclose(eigenvalues, np.maximum(expected, 0), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_gradient_is_that_of_the_batch_loss_at_the_fixed_readout():
    """The model's gradient is that of the current batch's mean loss at the window's
    readout held fixed, plus alpha1/2 ‖θ‖²."""
    model = mlp(in_size=3, features=4)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 3)))
    y = jnp.asarray(rng.integers(0, 3, 16))
    rule = WindowedReadout(SoftmaxCrossEntropy(3), memory=2)
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(rule.update, has_aux=True))
    (_, (_, state)), _ = value_and_grad(model, x, y, rule.init(model, x, y), alpha1=0.01)
    x2 = x[::-1] + 0.2
    (loss, (readout, _)), grads = value_and_grad(model, x2, y, state, alpha1=0.01)

    def fixed_readout_loss(model):
        logits = jax.vmap(lambda xi: readout(model(xi)))(x2)
        data = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        return data + 0.005 * penalty

    expected_loss, expected = eqx.filter_value_and_grad(fixed_readout_loss)(model)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-10)
    np.testing.assert_allclose(flatten(grads), flatten(expected), rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_scan_and_checkpoint():
    """The state is a pytree: a `lax.scan` equals the Python loop, and a state saved and
    loaded with `eqx.tree_serialise_leaves` continues identically."""
    rule = WindowedReadout(SigmoidBinaryCrossEntropy(), memory=2)
    batches = _batches(5, n=10, m=3)
    xs = jnp.asarray(np.stack([b[0] for b in batches]))
    ys = jnp.asarray(np.stack([b[1] for b in batches]))
    state0 = rule.init(identity, xs[0], ys[0])
    run = scanned_updates(rule, identity)

    final, _ = run(state0, xs, ys)
    looped = _run(rule, batches)[-1][3]
    np.testing.assert_allclose(final.coef, looped.coef, rtol=1e-6)
    np.testing.assert_allclose(final.alpha2, looped.alpha2, rtol=1e-6)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, run(state0, xs[:2], ys[:2])[0])
    buffer.seek(0)
    resumed, _ = run(eqx.tree_deserialise_leaves(buffer, state0), xs[2:], ys[2:])
    np.testing.assert_array_equal(resumed.coef, final.coef)


@pytest.mark.slow
def test_float32_window_is_within_its_loss_bound():
    """Float32 (an MLP's features): the window's objective at the float32 readout,
    evaluated in float64, exceeds the float64 minimum by at most the solver's reported
    bound ‖∇J‖²/(2 alpha2) plus rounding of the objective."""
    model32 = mlp(in_size=4, features=5, dtype=jnp.float32)
    batches = [(x.astype(np.float32), y.astype(np.float32)) for x, y in _batches(3, n=32)]
    rule = WindowedReadout(SigmoidBinaryCrossEntropy(), memory=2, alpha2=1e-3)
    _, _, readout, state = _run(rule, batches, model=model32)[-1]
    assert readout.weight.dtype == jnp.float32 and bool(readout.stats.converged)
    features = np.concatenate(
        [np.asarray(jax.vmap(model32)(jnp.asarray(x)), np.float64) for x, _ in batches]
    )
    labels = np.concatenate([y for _, y in batches])[:, None]
    minimum, _ = logistic_reference(features, labels, 1e-3)
    augmented = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    z = augmented @ _stacked(readout).astype(np.float64)
    value = np.mean(np.logaddexp(0, z) - labels * z) + 0.5e-3 * np.sum(_stacked(readout) ** 2.0)
    bound = float(readout.stats.loss_error_bound)
    assert minimum <= value <= minimum + bound + 10 * np.finfo(np.float32).eps * minimum


def test_errors():
    x, y = jnp.ones((4, 2)), jnp.zeros(4)
    with pytest.raises(TypeError, match="AbstractReadoutLoss"):
        WindowedReadout("bce")
    with pytest.raises(ValueError, match="`memory` must be an integer >= 0"):
        WindowedReadout(SigmoidBinaryCrossEntropy(), memory=-1)
    with pytest.raises(ValueError, match='number > 0 or the string "evidence"'):
        WindowedReadout(SigmoidBinaryCrossEntropy(), alpha2="gcv")
    with pytest.raises(ValueError, match="alpha2_init"):
        WindowedReadout(SigmoidBinaryCrossEntropy(), alpha2_init=-1.0)
    with pytest.raises(ValueError, match="solver"):
        WindowedReadout(SigmoidBinaryCrossEntropy(), solver="adam")
    rule = WindowedReadout(SigmoidBinaryCrossEntropy(), memory=2)
    state = rule.init(identity, x, y)
    with pytest.raises(ValueError, match="batches of 4 samples.*this batch has 3"):
        rule.update(identity, x[:3], y[:3], state)
    with pytest.raises(TypeError, match="WindowedState"):
        rule.update(identity, x, y, None)
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        eqx.filter_jit(rule.update)(identity, x, y + 2, state)
    assert isinstance(state, WindowedState) and vploss.WindowedReadout is WindowedReadout


def test_is_a_stochastic_readout():
    readout = WindowedReadout(SigmoidBinaryCrossEntropy())
    assert isinstance(readout, vploss.AbstractStochasticReadout)
