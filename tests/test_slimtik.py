"""`SlimTik`: the slimTik update against a direct NumPy solve of its windowed problem,
sampled GCV against a brute-force curve, the gradient, and the loop's transformations."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss
from vploss import SlimTik, SlimTikState, vploss_msereg

from .helpers import flatten, mlp, scanned_updates


def identity(features):
    return features


def _batches(count, n=12, m=5, k=2, seed=0):
    """Batches of features with an offset and spread scales, and noisy linear targets."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(m, k))
    out = []
    for _ in range(count):
        features = rng.normal(size=(n, m)) * np.logspace(0, -1, m) + 0.3
        out.append((features, features @ truth + 0.1 * rng.normal(size=(n, k))))
    return out


def _augment(features):
    return np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)


def _run(slimtik, batches, model=identity):
    state = slimtik.init(model, *batches[0])
    history = []
    for x, y in batches:
        previous = state
        _, (readout, state) = slimtik.update(model, jnp.asarray(x), jnp.asarray(y), state)
        history.append((previous, readout, state))
    return history


def _stacked(readout):
    return np.concatenate([np.asarray(readout.weight).T, np.asarray(readout.bias)[None]], axis=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("memory", "alpha2"),
    [(0, "sgcv"), (2, 0.05), pytest.param(8, "sgcv", marks=pytest.mark.slow)],
)
def test_update_solves_the_windowed_problem(memory, alpha2):
    """Each update is the minimiser of the windowed problem: the current batch, the
    previous readout weighted by the remembered batches' Gram matrices and the previous
    cumulative penalty, and the new penalty; solved here by its normal equations in
    NumPy (the penalty increment may be negative with sGCV)."""
    batches = _batches(6)
    history = _run(SlimTik(memory=memory, alpha2=alpha2), batches)
    seen = []
    for (x, y), (previous, readout, state) in zip(batches, history, strict=True):
        features = _augment(x)
        n, p = features.shape
        previous_coef = np.asarray(previous.coef)
        remembered = sum((f.T @ f / n for f in seen[-memory:]), np.zeros((p, p))) if memory else 0
        a_prev, a_new = float(previous.penalty), float(state.penalty)
        if alpha2 != "sgcv":
            assert a_new == pytest.approx(a_prev + alpha2, rel=1e-14)
        lhs = features.T @ features / n + remembered + a_new * np.eye(p)
        rhs = features.T @ y / n + (remembered + a_prev * np.eye(p)) @ previous_coef
        expected = np.linalg.solve(lhs, rhs)
        np.testing.assert_allclose(_stacked(readout), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(state.coef), expected, rtol=1e-10, atol=1e-12)
        seen.append(features)
    assert int(history[-1][2].step) == len(batches)


@pytest.mark.slow
def test_full_memory_is_the_ridge_readout_of_all_batches():
    """With a memory holding every batch and a fixed penalty increment alpha2, slimTik is
    recursive least squares: the readout of `vploss_msereg` on the union of the batches
    at penalty alpha2 (equal batch sizes; scalar targets)."""
    batches = [(x, y[:, 0]) for x, y in _batches(5)]
    _, readout, _ = _run(SlimTik(memory=10, alpha2=0.03), batches)[-1]
    x = jnp.asarray(np.concatenate([b[0] for b in batches]))
    y = jnp.asarray(np.concatenate([b[1] for b in batches]))
    _, union = vploss_msereg(identity, x, y, alpha2=0.03)
    assert readout.scalar_output and union.scalar_output
    np.testing.assert_allclose(readout.weight, union.weight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(readout.bias, union.bias, rtol=1e-10, atol=1e-12)


def _brute_force_sgcv(features, targets, previous_coef, remembered, a_prev, penalties):
    """sGCV(a) = (‖F̂Ŵ(a) − Y‖²/n)/(1 − tr T(a)/n)² with Ŵ(a) and the influence matrix
    T(a) = F̂(S + aI)⁻¹F̂ᵀ/n formed explicitly for each a by NumPy solves."""
    n, p = features.shape
    memory = features.T @ features / n + remembered
    values, traces = [], []
    for a in penalties:
        shifted = memory + a * np.eye(p)
        gradient = features.T @ (features @ previous_coef - targets) / n
        coef = previous_coef - np.linalg.solve(shifted, gradient + (a - a_prev) * previous_coef)
        influence = features @ np.linalg.solve(shifted, features.T) / n
        trace = np.trace(influence)
        values.append(np.sum((features @ coef - targets) ** 2) / n / (1 - trace / n) ** 2)
        traces.append(trace)
    return np.array(values), np.array(traces)


@pytest.mark.slow
def test_sampled_gcv_minimises_a_brute_force_curve():
    """At every step, the chosen cumulative penalty a_k minimises the sGCV curve formed
    explicitly here (a grid of 2000 points over the search interval): its value is at
    most the grid's minimum, and the reported sGCV and tr T are those of the curve."""
    batches = _batches(4, n=10, m=6)
    history = _run(SlimTik(memory=2), batches)
    seen = []
    for (x, y), (previous, readout, state) in zip(batches, history, strict=True):
        features = _augment(x)
        n, p = features.shape
        remembered = sum((f.T @ f / n for f in seen[-2:]), np.zeros((p, p)))
        args = (features, y, np.asarray(previous.coef), remembered, float(previous.penalty))
        chosen = float(state.penalty)
        (value,), (trace,) = _brute_force_sgcv(*args, [chosen])
        top = np.linalg.eigvalsh(features.T @ features / n + remembered)[-1]
        grid = np.geomspace(top * 1e-15, 100 * top + 10 * float(previous.penalty), 2000)
        curve, _ = _brute_force_sgcv(*args, grid)
        assert value <= curve.min() * (1 + 1e-9)
        assert float(readout.stats.gcv) == pytest.approx(value, rel=1e-9)
        assert float(readout.stats.dof) == pytest.approx(trace, rel=1e-9)
        assert float(readout.stats.alpha2) == chosen
        seen.append(features)


@pytest.mark.slow
def test_first_step_without_memory_is_ordinary_gcv():
    """From a zero readout with no memory, sGCV is the GCV of the batch's ridge problem:
    the penalty of `vploss_msereg(alpha2="gcv")`'s GCV (of the uncentred problem, the
    bias a penalised column of ones) and its readout."""
    from vploss._ridge.gcv import gcv_penalty

    (x, y), *_ = _batches(1, n=30, m=6)
    (_, readout, state), *_ = _run(SlimTik(memory=0), [(x, y)])
    alpha, stats = gcv_penalty(jnp.asarray(_augment(x)), jnp.asarray(y))
    assert float(state.penalty) == pytest.approx(float(alpha), rel=1e-6)
    assert float(readout.stats.gcv) == pytest.approx(float(stats.gcv), rel=1e-9)
    _, fitted = vploss_msereg(identity, jnp.asarray(x), jnp.asarray(y), alpha2=state.penalty)
    np.testing.assert_allclose(readout.weight, fitted.weight, rtol=1e-8)


@pytest.mark.slow
def test_gradient_is_that_of_the_batch_loss_at_the_fixed_updated_readout():
    """The model's gradient is that of ½ mean ‖F̂(θ)Ŵ_k − Y‖² + alpha1/2 ‖θ‖² with the
    updated readout Ŵ_k held fixed (slimTrain): checked against autodiff of that
    expression, and against central finite differences of it."""
    model = mlp(in_size=3, features=4)
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.normal(size=(16, 3))), jnp.asarray(rng.normal(size=(16, 2)))
    slimtik = SlimTik(memory=3)
    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(slimtik.update, has_aux=True))
    # A first batch, for a non-trivial memory.
    (_, (_, state)), _ = value_and_grad(model, x, y, slimtik.init(model, x, y), alpha1=0.01)
    x2, y2 = x + 0.1, y[::-1]
    (loss, (readout, _)), grads = value_and_grad(model, x2, y2, state, alpha1=0.01)

    def fixed_readout_loss(model):
        predictions = jax.vmap(lambda xi: readout(model(xi)))(x2)
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
        return 0.5 * jnp.mean(jnp.sum((predictions - y2) ** 2, axis=1)) + 0.005 * penalty

    expected_loss, expected = eqx.filter_value_and_grad(fixed_readout_loss)(model)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-12)
    np.testing.assert_allclose(flatten(grads), flatten(expected), rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_scan_checkpoint_and_vmap():
    """The state is a pytree: a `lax.scan` over batches equals the Python loop, a state
    saved and loaded with `eqx.tree_serialise_leaves` continues identically, and `vmap`
    over two independent problems equals running them one by one."""
    slimtik = SlimTik(memory=2)
    batches = _batches(5, n=8, m=3, k=1)
    xs = jnp.asarray(np.stack([b[0] for b in batches]))
    ys = jnp.asarray(np.stack([b[1] for b in batches]))
    state0 = slimtik.init(identity, xs[0], ys[0])
    run = scanned_updates(slimtik, identity)

    final, _ = run(state0, xs, ys)
    looped = _run(slimtik, batches)[-1][2]
    # Compiled and eager rounding differ, and sGCV's minimum is flat: the chosen
    # penalties agree to about sqrt(eps).
    np.testing.assert_allclose(final.coef, looped.coef, rtol=1e-6)

    buffer = io.BytesIO()
    middle, _ = run(state0, xs[:3], ys[:3])
    eqx.tree_serialise_leaves(buffer, middle)
    buffer.seek(0)
    loaded = eqx.tree_deserialise_leaves(buffer, state0)
    resumed, _ = run(loaded, xs[3:], ys[3:])
    np.testing.assert_array_equal(resumed.coef, final.coef)
    assert int(resumed.step) == 5

    other = ys[:, :, ::-1] * 2
    both = jax.vmap(run, in_axes=(None, None, 0))(state0, xs, jnp.stack([ys, other]))[0]
    second, _ = run(state0, xs, other)
    np.testing.assert_allclose(both.coef[1], second.coef, rtol=1e-6)
    np.testing.assert_allclose(both.penalty[0], final.penalty, rtol=1e-6)


@pytest.mark.slow
def test_float32_update_against_float64():
    """Float32 (an MLP's bounded features, as in training): the readout of each update
    agrees with the float64 update on the same float32 features within the
    normal-equations bound eps32·κ(S + aI) (relative), and sGCV's float32 choice is a
    near-minimiser of the float64 curve (the curve is flat at its minimum)."""
    model32 = mlp(in_size=3, features=6, dtype=jnp.float32)
    rng = np.random.default_rng(5)
    batches = [
        (rng.normal(size=(24, 3)).astype(np.float32), rng.normal(size=(24, 1)).astype(np.float32))
        for _ in range(4)
    ]
    features = [np.asarray(jax.vmap(model32)(jnp.asarray(x)), np.float64) for x, _ in batches]
    data64 = [(f, y.astype(np.float64)) for f, (_, y) in zip(features, batches, strict=True)]
    for alpha2 in (1e-3, "sgcv"):
        slimtik = SlimTik(memory=2, alpha2=alpha2)
        run32 = _run(slimtik, batches, model=model32)
        run64 = _run(slimtik, data64)
        for step, ((_, r32, s32), (p64, r64, s64)) in enumerate(zip(run32, run64, strict=True)):
            assert r32.weight.dtype == jnp.float32
            f = _augment(features[step])
            memory = sum(
                _augment(g).T @ _augment(g) / 24 for g in features[max(0, step - 2) : step + 1]
            )
            kappa = np.linalg.cond(memory + float(s64.penalty) * np.eye(f.shape[1]))
            if alpha2 == "sgcv":
                args = (
                    f,
                    data64[step][1],
                    np.asarray(p64.coef),
                    memory - f.T @ f / 24,
                    float(p64.penalty),
                )
                (v32,), _ = _brute_force_sgcv(*args, [float(s32.penalty)])
                (v64,), _ = _brute_force_sgcv(*args, [float(s64.penalty)])
                assert v32 <= v64 * (1 + 1e-3)
                break  # later steps start from different readouts
            error = np.max(np.abs(_stacked(r32) - _stacked(r64))) / np.max(np.abs(_stacked(r64)))
            # The error of step k feeds the next through the previous readout: one
            # bound per step, summed.
            assert error <= 10 * (step + 1) * kappa * np.finfo(np.float32).eps


@pytest.mark.slow
def test_bfloat16_model_is_solved_in_float32():
    model = mlp(in_size=2, features=3, dtype=jnp.bfloat16)
    x = jnp.ones((8, 2), jnp.bfloat16) * jnp.arange(8, dtype=jnp.bfloat16)[:, None] / 8
    y = jnp.sin(jnp.arange(8.0, dtype=jnp.float32))
    slimtik = SlimTik()
    state = slimtik.init(model, x, y)
    assert state.coef.dtype == jnp.float32
    loss, (readout, state) = slimtik.update(model, x, y, state)
    assert loss.dtype == jnp.float32 and readout.weight.dtype == jnp.float32
    assert np.isfinite(float(loss))


def test_errors():
    x, y = jnp.ones((4, 2)), jnp.zeros(4)
    with pytest.raises(ValueError, match="`memory` must be an integer >= 0"):
        SlimTik(memory=-1)
    with pytest.raises(ValueError, match='number > 0 or the string "sgcv"'):
        SlimTik(alpha2="gcv")
    with pytest.raises(ValueError, match="alpha2"):
        SlimTik(alpha2=0.0)
    state = SlimTik(memory=2).init(identity, x, y)
    with pytest.raises(ValueError, match="memory of 2 batches.*a memory of 3"):
        SlimTik(memory=3).update(identity, x, y, state)
    with pytest.raises(ValueError, match="3 coefficients"):
        SlimTik(memory=2).update(identity, jnp.ones((4, 3)), y, state)
    with pytest.raises(TypeError, match="SlimTikState"):
        SlimTik().update(identity, x, y, None)
    with pytest.raises(Exception, match="`x` is not finite"):
        bad = x.at[0, 0].set(jnp.nan)
        eqx.filter_jit(SlimTik(memory=2).update)(identity, bad, y, state)
    assert isinstance(state, SlimTikState)
    assert vploss.SlimTik is SlimTik


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)])
def test_noise_free_batches_choose_resolved_reproducible_penalties(dtype):
    """Batches the features fit exactly: sGCV falls below its rounding error as the
    penalty falls, so its minimiser was wherever rounding put it (the same batches
    with their samples permuted chose other penalties). At every step the penalty is at
    least eps·λ_max(S_k) (below it the penalty is lost in the rounding of S_k + aI),
    and the permuted batches give the same penalties and readouts to p·eps·κ, κ the
    condition number of S_k."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=12)
    batches = []
    for _ in range(3):
        x = rng.normal(size=(30, 12))
        batches.append((x.astype(dtype), (x @ truth + 0.5).astype(dtype)))
    order = np.random.default_rng(1).permutation(30)
    history = _run(SlimTik(memory=2), batches)
    permuted = _run(SlimTik(memory=2), [(x[order], y[order]) for x, y in batches])
    eps = float(np.finfo(dtype).eps)
    seen = []
    for (x, _), (_, readout, state), (_, other, other_state) in zip(
        batches, history, permuted, strict=True
    ):
        features = _augment(x.astype(np.float64))
        n, p = features.shape
        seen.append(features.T @ features / n)
        eigenvalues = np.linalg.eigvalsh(sum(seen[-3:]))
        assert float(state.penalty) >= eps * eigenvalues[-1]
        tolerance = p * eps * eigenvalues[-1] / eigenvalues[0]
        penalty = float(state.penalty)
        assert float(other_state.penalty) == pytest.approx(penalty, rel=tolerance, abs=0)
        np.testing.assert_allclose(
            _stacked(other), _stacked(readout), rtol=tolerance, atol=tolerance
        )


def test_is_a_stochastic_readout():
    assert isinstance(SlimTik(), vploss.AbstractStochasticReadout)
