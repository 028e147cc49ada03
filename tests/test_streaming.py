"""`refit_readout`: the readout fitted on batches equals the one-shot fit on the
concatenated data."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import (
    armijo_updates,
    cases,
    inner_objective64,
    logistic_problem,
    logistic_reference,
    mlp,
    newton_step,
    READOUT_CASES,
    ridge_reference,
)


N, IN, M = 50, 3, 6
SIZES = (16, 16, 11, 7)  # uneven batches
GTOL = 1e-10


def _split(*arrays):
    edges = np.cumsum(SIZES)[:-1]
    return list(zip(*(np.split(np.asarray(a), edges) for a in arrays), strict=True))


def _data(dtype=jnp.float64):
    x = jax.random.normal(jax.random.PRNGKey(0), (N, IN), dtype)
    return {
        "regression": jnp.stack([jnp.sin(2 * x[:, 0]), x[:, 1] * x[:, 2]], axis=1),
        "scalar": jnp.sin(2 * x[:, 0]),
        "binary": (x[:, 0] + 0.5 * x[:, 1] > 0).astype(dtype),
        "classes": jnp.argmax(x, axis=1),
    }, x


def _assert_same_readout(streamed, one_shot, rtol, atol):
    np.testing.assert_allclose(streamed.weight, one_shot.weight, rtol=rtol, atol=atol)
    np.testing.assert_allclose(streamed.bias, one_shot.bias, rtol=rtol, atol=atol)
    assert streamed.scalar_output == one_shot.scalar_output


@pytest.mark.parametrize("target", [pytest.param("regression", marks=pytest.mark.slow), "scalar"])
def test_ridge_in_one_pass_equals_one_shot(target):
    labels, x = _data()
    y = labels[target]
    model = mlp(IN, features=M)
    _, one_shot = vploss.vploss_msereg(model, x, y, alpha2=1e-4, solver="svd")
    # A generator: the ridge readout needs a single pass.
    batches = (batch for batch in _split(x, y))
    streamed = vploss.refit_readout(model, batches, loss=vploss.vploss_msereg, alpha2=1e-4)
    _assert_same_readout(streamed, one_shot, rtol=1e-10, atol=1e-12)
    # One pytree structure for one loss's readout, whatever fitted it.
    assert jax.tree.structure(streamed) == jax.tree.structure(one_shot)
    _, reference = ridge_reference(jax.vmap(model)(x), np.reshape(y, (N, -1)), 1e-4)
    np.testing.assert_allclose(streamed.weight.T, reference[:-1], rtol=1e-10, atol=1e-12)


def test_ridge_float32():
    """The streamed readout solves the normal equations of Gram sums accumulated in
    float32, so its relative error is that of a backward-stable solve with the Gram
    matrix, `κ(G)·eps32` with `G = F̂ᵀF̂/N + alpha2 I` (here κ(G) = 1.2e4, so 1.4e-3;
    measured 8e-5 to 9e-5 under AVX-512 and SSE4.2)."""
    labels, x = _data()
    model = mlp(IN, features=M)
    alpha2 = 1e-4
    _, reference = vploss.vploss_msereg(model, x, labels["regression"], alpha2=alpha2)
    x32, y32 = x.astype(jnp.float32), labels["regression"].astype(jnp.float32)
    model32 = mlp(IN, features=M, dtype=jnp.float32)
    streamed = vploss.refit_readout(
        model32, _split(x32, y32), loss=vploss.vploss_msereg, alpha2=alpha2
    )
    assert streamed.weight.dtype == jnp.float32
    features = np.c_[np.asarray(jax.vmap(model)(x)), np.ones(N)]
    gram = features.T @ features / N + alpha2 * np.eye(M + 1)
    bound = np.linalg.cond(gram) * np.finfo(np.float32).eps

    def coef(readout):
        return np.r_[np.asarray(readout.weight, np.float64).T, np.asarray(readout.bias)[None]]

    error = np.linalg.norm(coef(streamed) - coef(reference))
    assert error <= bound * np.linalg.norm(coef(reference))


# The readout losses' refit is checked against the one-shot fit in
# test_readout_losses.py too.
@pytest.mark.slow
@pytest.mark.parametrize("warm", [False, True])
def test_bce_newton_passes_equal_one_shot(warm):
    labels, x = _data()
    y = labels["binary"]
    model = mlp(IN, features=M)
    # Tighter than the default: the weights are large (nearly separable classes), and
    # both solves must agree to more digits than the default tolerance gives.
    kwargs = dict(alpha2=1e-3, gtol=GTOL)
    _, one_shot = vploss.vploss_bce(model, x, y, **kwargs)
    # The readout of the last batch, as mini-batch training would leave it.
    init = vploss.vploss_bce(model, x[-7:], y[-7:], alpha2=1e-3)[1] if warm else None
    streamed = vploss.refit_readout(
        model, _split(x, y), loss=vploss.vploss_bce, init=init, **kwargs
    )
    _assert_same_readout(streamed, one_shot, rtol=1e-9, atol=1e-11)
    assert bool(streamed.stats.converged)
    assert float(streamed.stats.gradient_norm) <= GTOL
    assert int(streamed.stats.num_steps) <= 12


@pytest.mark.slow
@pytest.mark.parametrize("one_hot", [False, True])
def test_ce_newton_passes_equal_one_shot(one_hot):
    labels, x = _data()
    y = labels["classes"]
    if one_hot:
        y = jax.nn.one_hot(y, IN)
    model = mlp(IN, features=M)
    kwargs = dict(alpha2=1e-3, num_classes=IN)
    _, one_shot = vploss.vploss_ce(model, x, y, solver="newton", **kwargs)
    streamed = vploss.refit_readout(model, _split(x, y), loss=vploss.vploss_ce, gtol=GTOL, **kwargs)
    # The one-shot solve stops at a gradient of about 4e-10 here (its line search
    # cannot resolve the last digits), so it agrees to about 1e-8; the independent
    # reference (gradient 1e-14) checks the streamed readout to more digits.
    _assert_same_readout(streamed, one_shot, rtol=1e-7, atol=1e-9)
    _, coef = logistic_reference(
        jax.vmap(model)(x), jax.nn.one_hot(labels["classes"], IN), 1e-3, softmax=True
    )
    np.testing.assert_allclose(streamed.weight, coef[:M].T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(streamed.bias, coef[M], rtol=1e-10, atol=1e-12)
    assert streamed.weight.shape == (IN, M)
    assert bool(streamed.stats.converged)


@pytest.mark.parametrize("passes", [2, 3])
def test_budget_and_throw(passes):
    """The first pass evaluates the start, each further one a trial step: `max_passes=k`
    allows k - 1 Newton updates, here each a full step, and `stats.num_steps` counts the
    updates (it counted the passes)."""
    labels, x = _data()
    model = mlp(IN, features=M)
    batches = _split(x, labels["binary"])
    kwargs = dict(loss=vploss.vploss_bce, alpha2=1e-3, gtol=1e-14, max_passes=passes)
    with pytest.raises(RuntimeError, match=f"did not converge within {passes} passes"):
        vploss.refit_readout(model, batches, **kwargs)
    readout = vploss.refit_readout(model, batches, throw=False, **kwargs)
    assert not bool(readout.stats.converged)
    assert int(readout.stats.num_steps) == passes - 1
    evaluate, zero = logistic_problem(jax.vmap(model)(x), labels["binary"], 1e-3)
    expected = armijo_updates(evaluate, zero, newton_step, passes - 1)
    coef = np.concatenate([np.asarray(readout.weight).T, np.asarray(readout.bias)[None]])
    np.testing.assert_allclose(coef, expected, rtol=1e-10, atol=1e-12)


def _bad_inputs():
    labels, x = _data()
    pairs = _split(x, labels["binary"])
    nan_x = x.at[20, 0].set(jnp.nan)
    return [
        (dict(loss=vploss.vploss_bce, batches=iter(pairs)), TypeError, "re-iterable"),
        (dict(loss=vploss.vploss_ce, batches=(p for p in pairs)), TypeError, "re-iterable"),
        (dict(loss=vploss.vploss_msereg, batches=[]), ValueError, "empty"),
        (dict(loss=vploss.vploss_msereg, batches=[x]), TypeError, r"yield `\(x, y\)` pairs"),
        (dict(loss=jnp.sum, batches=pairs), ValueError, "`loss` must be"),
        (dict(loss=vploss.vploss_bce, batches=pairs, alpha2=0.0), ValueError, "alpha2"),
        (
            dict(loss=vploss.vploss_bce, batches=pairs, alpha2="gcv"),
            ValueError,
            '"evidence" \\(the evidence fixed point\\)',
        ),
        (
            dict(loss=vploss.vploss_msereg, batches=pairs, alpha2="evidence"),
            ValueError,
            '"gcv" \\(generalised cross-validation\\), "sgcv"',
        ),
        (dict(loss=vploss.vploss_bce, batches=pairs, max_passes=0), ValueError, "max_passes"),
        (dict(loss=vploss.vploss_bce, batches=pairs, gtol=-1.0), ValueError, "gtol"),
        (
            dict(loss=vploss.vploss_bce, batches=_split(x, 2 * labels["binary"])),
            ValueError,
            r"batch 0: `vploss_bce`: labels `y` must be in \[0, 1\]",
        ),
        (
            dict(loss=vploss.vploss_ce, batches=_split(x, labels["classes"])),
            ValueError,
            "num_classes",
        ),
        (
            dict(loss=vploss.vploss_msereg, batches=_split(nan_x, labels["scalar"])),
            ValueError,
            "Batch 1: .* NaN or inf",
        ),
        (
            dict(
                loss=vploss.vploss_msereg,
                batches=[(x[:10], labels["scalar"][:10]), (x[10:], labels["regression"][10:])],
            ),
            ValueError,
            "same shape per sample",
        ),
        (
            dict(
                loss=vploss.vploss_bce,
                batches=pairs,
                init=vploss.VPLinear(jnp.zeros((2, M)), jnp.zeros(2)),
            ),
            ValueError,
            "`init` has 2 output",
        ),
        (dict(loss=vploss.vploss_bce, batches=pairs, init="warm"), TypeError, "VPLinear"),
    ]


@pytest.mark.slow
def test_weighted_ridge_triples_equal_one_shot():
    """`(x, y, w)` triples: the readout of the one-shot weighted loss on the
    concatenated data, with a batch whose weights are all zero (it adds nothing)."""
    labels, x = _data()
    y = labels["regression"]
    weights = np.random.default_rng(0).uniform(0, 2, N)
    weights[16:32] = 0  # the second batch
    model = mlp(IN, features=M)
    _, one_shot = vploss.vploss_msereg(
        model, x, y, alpha2=1e-4, solver="svd", weights=jnp.asarray(weights)
    )
    streamed = vploss.refit_readout(
        model, _split(x, y, weights), loss=vploss.vploss_msereg, alpha2=1e-4
    )
    _assert_same_readout(streamed, one_shot, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["gcv", "sgcv"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_ridge_gcv_equals_one_shot(rule, weighted, use_bias):
    """`alpha2="gcv"` (and SlimTik's `"sgcv"`, exact on the whole data) minimises the
    GCV curve of `vploss_msereg(..., alpha2="gcv")` on the concatenated batches, from
    the merged sums. Near its minimum the curve is flat to second order, so rounding
    (relative eps) moves the minimiser by about sqrt(eps) relatively: the two penalties
    agree to 1e-5 and their GCV values to their rounding, and the readout is the one-shot
    readout at the streamed penalty. The features have an offset of 30, which the
    centred sums never form."""
    labels, x = _data()
    y = labels["regression"] + 0.3 * jax.random.normal(jax.random.PRNGKey(3), (N, 2))
    weights = None
    batches = _split(x, y)
    if weighted:
        weights = np.random.default_rng(1).uniform(0, 2, N)
        batches = _split(x, y, weights)
        weights = jnp.asarray(weights)
    model = _Offset(mlp(IN, features=M), 30.0)
    _, one_shot = vploss.vploss_msereg(
        model, x, y, alpha2="gcv", weights=weights, use_bias=use_bias
    )
    streamed = vploss.refit_readout(
        model, batches, loss=vploss.vploss_msereg, alpha2=rule, use_bias=use_bias
    )
    assert jax.tree.structure(streamed) == jax.tree.structure(one_shot)
    alpha = streamed.stats.alpha2
    np.testing.assert_allclose(alpha, one_shot.stats.alpha2, rtol=1e-5)
    # Without a bias the residual is |Y|² less the fitted part, over features with an
    # offset: its rounding is about 1e-10 relative here.
    np.testing.assert_allclose(streamed.stats.gcv, one_shot.stats.gcv, rtol=1e-8)
    np.testing.assert_allclose(streamed.stats.dof, one_shot.stats.dof, rtol=1e-4)
    _, at_alpha = vploss.vploss_msereg(
        model, x, y, alpha2=alpha, weights=weights, use_bias=use_bias, solver="svd"
    )
    # The streamed readout solves the (centred, with a bias) normal equations: its
    # relative error is at most about cond(G)·eps, G their matrix.
    features = np.asarray(jax.vmap(model)(x))
    features = features - features.mean(axis=0) if use_bias else features
    gram = features.T @ features / N + float(alpha) * np.eye(M)
    tolerance = 10 * np.linalg.cond(gram) * np.finfo(np.float64).eps
    error = np.linalg.norm(streamed.weight - at_alpha.weight) / np.linalg.norm(at_alpha.weight)
    assert error <= tolerance
    if use_bias:
        np.testing.assert_allclose(streamed.bias, at_alpha.bias, rtol=tolerance)
    # An interior minimum of the curve, not the edge of the search.
    assert 1e-12 < float(alpha) < 1.0


class _Offset(eqx.Module):
    model: eqx.Module
    offset: float = eqx.field(static=True)

    def __call__(self, x):
        return self.model(x) + self.offset


@pytest.mark.parametrize("case", cases(READOUT_CASES, default=["bce"]))
def test_evidence_fixed_point(case):
    """`alpha2="evidence"`: at the returned penalty, MacKay's fixed point holds,
    `alpha = γ/(N|Ŵ|²)` with `γ = Σ μ/(μ + alpha)` over the eigenvalues μ of the data
    term's Hessian (a dense NumPy Hessian, float64) to the 0.1% the iteration stops
    at; the readout is that of `refit_readout` at that penalty; and the stats say
    which penalty it used."""
    labels, x = _data()
    score = x[:, 0] + 0.8 * x[:, 1] + 0.5 * jax.random.normal(jax.random.PRNGKey(4), (N,))
    y = case.labels(score)
    model = mlp(IN, features=M)
    batches = _split(x, y)
    fit = vploss.refit_readout(
        model, batches, loss=case.function, alpha2="evidence", gtol=GTOL, **case.kwargs
    )
    alpha = float(fit.stats.alpha2)
    assert bool(fit.stats.converged) and alpha > 0
    fixed = vploss.refit_readout(
        model, batches, loss=case.function, alpha2=alpha, gtol=GTOL, **case.kwargs
    )
    # Both are within their readout error bounds of the exact minimiser at `alpha`.
    difference = np.sqrt(
        np.sum((fit.weight - fixed.weight) ** 2) + np.sum((fit.bias - fixed.bias) ** 2)
    )
    assert difference <= fit.stats.readout_error_bound + fixed.stats.readout_error_bound
    evaluate, shape = inner_objective64(case.reference, jax.vmap(model)(x), case.targets(y), alpha)
    coef = np.r_[np.asarray(fit.weight).T, np.asarray(fit.bias)[None]]
    # The softmax readout is determined up to a common shift of the classes' logits,
    # and it has none (its coefficients sum to zero over the classes): `|Ŵ|` is
    # the norm in the solver's coordinates.
    _, gradient, hessian = evaluate(coef)
    assert np.max(np.abs(gradient)) <= 1e-8
    eigenvalues = np.clip(np.linalg.eigvalsh(hessian - alpha * np.eye(hessian.shape[0])), 0, None)
    gamma = np.sum(eigenvalues / (eigenvalues + alpha))
    assert 0 < gamma < coef.size
    np.testing.assert_allclose(alpha, gamma / (N * np.sum(coef**2)), rtol=3e-3)


def _bad_weights():
    labels, x = _data()
    y = labels["scalar"]
    ones = np.ones(N)
    ridge = vploss.vploss_msereg
    return [
        (ridge, _split(x, y, ones)[:1] + _split(x, y)[1:], ValueError, "same kind"),
        (ridge, _split(x, y, ones.astype(bool)), TypeError, "got dtype bool"),
        (ridge, [(x[:10], y[:10], ones[:9])], ValueError, r"shape \(N,\) = \(10,\)"),
        (ridge, _split(x, y, -ones), ValueError, "batch 0: `weights` .* must be >= 0"),
        (ridge, _split(x, y, ones * np.nan), ValueError, "batch 0: `weights` .* not finite"),
        (ridge, _split(x, y, 0 * ones), ValueError, "sum to zero over all batches"),
        (
            vploss.vploss_bce,
            _split(x, labels["binary"], 0 * ones),
            ValueError,
            "sum to zero over all batches",
        ),
        (vploss.vploss_bce, _split(x, labels["binary"], -ones), ValueError, "must be >= 0"),
    ]


@pytest.mark.parametrize("loss, batches, error, match", _bad_weights())
def test_bad_weights_raise_clear_errors(loss, batches, error, match):
    with pytest.raises(error, match=match):
        vploss.refit_readout(mlp(IN, features=M), batches, loss=loss, alpha2=1e-3)


@pytest.mark.parametrize("traced", ["model", "batches", "alpha2"])
def test_traced_arguments_raise_clear_errors(traced):
    """Its loop over batches is Python: under `jit` (or `grad`, `vmap`) it says so."""
    labels, x = _data()
    model = mlp(IN, features=M)
    y = labels["scalar"]

    def refit(model, x, alpha2):
        batches = [(x[:25], y[:25]), (x[25:], y[25:])]
        return vploss.refit_readout(model, batches, loss=vploss.vploss_msereg, alpha2=alpha2)

    jitted = {
        "model": eqx.filter_jit(lambda m: refit(m, x, 1e-3)),
        "batches": jax.jit(lambda x: refit(model, x, 1e-3)),
        "alpha2": jax.jit(lambda a: refit(model, x, a)),
    }[traced]
    argument = {"model": model, "batches": x, "alpha2": 1e-3}[traced]
    with pytest.raises(TypeError, match="called outside `jax.jit`, `jax.grad` and `jax.vmap`"):
        jitted(argument)


@pytest.mark.parametrize("kwargs, error, match", _bad_inputs())
def test_bad_input_raises_clear_errors(kwargs, error, match):
    kwargs = dict(alpha2=1e-3) | kwargs
    with pytest.raises(error, match=match):
        vploss.refit_readout(mlp(IN, features=M), **kwargs)
