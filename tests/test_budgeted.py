"""The inexact mode for training loops, `vploss.BudgetedNewtonCG`: its budget, its error
bounds against the exact minimiser (a dense NumPy Newton method, float64), its results
(`budget_spent` is no error), and its robustness on raw-unit features, float32, weights
and `vmap`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import inner_objective64, newton_reference, READOUT_CASES, stacked_coef


N, M = 40, 6
X = jax.random.normal(jax.random.PRNGKey(0), (N, M))
SCORE = X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2]
WEIGHTS = jax.random.uniform(jax.random.PRNGKey(2), (N,), minval=0.2, maxval=3.0)
# The softmax loss, the mini-batch mode's main case, in the default run; the others
# with `-m slow`.
CASES = pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[] if name == "ce" else [pytest.mark.slow])
        for name in READOUT_CASES
    ],
)


def identity(features):
    return features


@eqx.filter_jit
def fit(name, x, alpha2, solver, init=None, weights=None, throw=True):
    """`(loss, readout, feature gradient)` of loss `name` on the features `x`."""
    case = READOUT_CASES[name]
    y = case.labels(SCORE.astype(x.dtype))

    def loss(features):
        return case(
            identity,
            features,
            y,
            alpha2=alpha2,
            solver=solver,
            init=init,
            weights=weights,
            throw=throw,
        )

    (value, readout), gradient = jax.value_and_grad(loss, has_aux=True)(x)
    return value, readout, gradient


def exact(name, x, alpha2, weights=None):
    """The exact loss, readout `(p, k)` and feature gradient, by NumPy in float64."""
    case = READOUT_CASES[name]
    targets = case.targets(case.labels(SCORE))
    value, coef = newton_reference(case.reference, x, targets, alpha2, weights)
    features = np.c_[np.asarray(x, np.float64), np.ones(N)]
    omega = np.ones(N) if weights is None else np.asarray(weights) * N / np.sum(weights)
    _, residuals, _ = case.reference(features @ coef, targets)
    gradient = (omega[:, None] * residuals) @ coef[:-1].T / N
    return value, coef, gradient


def perturbed_start(name, alpha2, seed):
    """A readout far from the minimiser (the warm start of another batch)."""
    _, readout, _ = fit(name, X[::-1] * 1.5, alpha2, vploss.Newton())
    noise = jax.random.normal(jax.random.PRNGKey(seed), readout.weight.shape)
    return eqx.tree_at(lambda r: r.weight, readout, readout.weight + 0.3 * noise)


@pytest.mark.slow
@CASES
@pytest.mark.parametrize("alpha2", [1e-1, 1e-3])
def test_error_bounds_hold(name, alpha2):
    """After 1-3 budgeted updates from a far warm start (with weights at the small
    penalty), the loss, the readout and the envelope gradient in the features are
    within the reported bounds of the exact ones; at the large penalty the gradient
    bound is below 1 after three updates, so the check can fail."""
    weights = WEIGHTS if alpha2 < 1e-2 else None
    exact_loss, exact_coef, exact_gradient = exact(name, X, alpha2, weights)
    init = perturbed_start(name, alpha2, seed=3)
    for max_steps in (1, 3):
        solver = vploss.BudgetedNewtonCG(max_steps=max_steps, max_cg_steps=4)
        value, readout, gradient = fit(name, X, alpha2, solver, init, weights)
        stats = readout.stats
        assert int(stats.num_steps) <= max_steps
        rounding = 1e-12 * (1 + abs(exact_loss))
        upper = exact_loss + float(stats.loss_error_bound) + rounding
        assert exact_loss - rounding <= float(value) <= upper
        distance = np.linalg.norm(stacked_coef(readout).reshape(exact_coef.shape) - exact_coef)
        assert distance <= float(stats.readout_error_bound) * (1 + 1e-10)
        gradient = np.asarray(gradient).reshape(exact_gradient.shape)
        relative = np.linalg.norm(gradient - exact_gradient) / np.linalg.norm(gradient)
        if READOUT_CASES[name].loss.curvature_bound is None:
            assert float(stats.gradient_error_bound) == np.inf
        else:
            assert relative <= float(stats.gradient_error_bound) * (1 + 1e-10)
            if alpha2 == 1e-1 and max_steps == 3:
                assert float(stats.gradient_error_bound) < 1


@CASES
def test_a_spent_budget_is_no_error(name):
    """`throw=True` (the default) does not raise for a spent budget: the result is
    `budget_spent`, `converged` is false, and the loss is above the exact one and
    below the warm start's."""
    init = perturbed_start(name, 1e-3, seed=4)
    exact_loss, _, _ = exact(name, X, 1e-3)
    value, readout, _ = fit(name, X, 1e-3, vploss.BudgetedNewtonCG(max_cg_steps=3), init)
    assert readout.stats.result == vploss.RESULTS.budget_spent
    assert not bool(readout.stats.converged)
    assert int(readout.stats.num_steps) == 1 and int(readout.stats.cg_steps) <= 3
    case = READOUT_CASES[name]
    evaluate, shape = inner_objective64(case.reference, X, case.targets(case.labels(SCORE)), 1e-3)
    start = evaluate(stacked_coef(init).reshape(shape))[0]
    assert exact_loss < float(value) < start


@pytest.mark.slow
@CASES
def test_a_large_budget_converges_to_the_minimiser(name):
    """With budget to spare it stops as soon as the tolerance of `Newton` is met, at the
    exact minimiser; from the minimiser it takes no update."""
    exact_loss, exact_coef, _ = exact(name, X, 1e-3)
    solver = vploss.BudgetedNewtonCG(max_steps=100, max_cg_steps=50, gtol=1e-10)
    value, readout, _ = fit(name, X, 1e-3, solver)
    assert bool(readout.stats.converged)
    assert int(readout.stats.num_steps) < 100
    np.testing.assert_allclose(float(value), exact_loss, rtol=1e-12)
    np.testing.assert_allclose(
        stacked_coef(readout).reshape(exact_coef.shape), exact_coef, atol=1e-7
    )
    _, again, _ = fit(name, X, 1e-3, solver, init=readout)
    assert bool(again.stats.converged) and int(again.stats.num_steps) == 0


@pytest.mark.slow
@pytest.mark.parametrize("offset, scale", [(300.0, 1.0), (0.0, 255.0)])
@pytest.mark.parametrize("name", ["ce", pytest.param("bce", marks=pytest.mark.slow)])
def test_raw_units_in_float32(name, offset, scale):
    """Uncentred features (an offset of 300) and pixel-sized ones (0-255) in float32:
    every budgeted update lowers the loss and stays finite, and a large budget reaches
    the float64 minimiser's loss to float32's tolerance."""
    x = (offset + scale * jax.nn.sigmoid(X)).astype(jnp.float32)
    exact_loss, _, _ = exact(name, np.asarray(x, np.float64), 1e-2)
    previous = np.inf
    init = None
    for _ in range(5):
        value, init, gradient = fit(name, x, 1e-2, vploss.BudgetedNewtonCG(), init)
        assert value.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(gradient)))
        assert float(value) <= previous * (1 + 1e-5)
        previous = float(value)
    solver = vploss.BudgetedNewtonCG(max_steps=200, max_cg_steps=50)
    value, readout, _ = fit(name, x, 1e-2, solver, init)
    assert readout.stats.result in (vploss.RESULTS.successful, vploss.RESULTS.budget_spent)
    eps = float(jnp.finfo(jnp.float32).eps)
    assert abs(float(value) - exact_loss) <= eps**0.5 * exact_loss + 64 * eps * (1 + exact_loss)


@pytest.mark.slow
def test_vmap_and_gradient_only():
    """Under `vmap` over problems the loss is each problem's; a gradient-only step is
    the same gradient."""
    xs = jnp.stack([X, 2 * X, X + 1])
    solver = vploss.BudgetedNewtonCG(max_steps=2)
    labels = READOUT_CASES["ce"].labels(SCORE)

    def loss(x):
        return vploss.vploss_ce(identity, x, labels, alpha2=1e-2, num_classes=3, solver=solver)[0]

    batched = jax.jit(jax.vmap(loss))(xs)
    single = jax.jit(loss)
    for x, value in zip(xs, batched, strict=True):
        np.testing.assert_allclose(float(value), float(single(x)), rtol=1e-12)
    gradient = jax.jit(jax.grad(loss))(X)
    _, _, reference = fit("ce", X, 1e-2, solver)
    np.testing.assert_allclose(gradient, reference, rtol=1e-12)


@pytest.mark.slow
def test_options_are_checked():
    with pytest.raises(ValueError, match="max_cg_steps"):
        vploss.BudgetedNewtonCG(max_cg_steps=0)
    with pytest.raises(ValueError, match="max_steps"):
        vploss.BudgetedNewtonCG(max_steps=0)
    by_name = vploss.vploss_bce(
        identity, X, READOUT_CASES["bce"].labels(SCORE), alpha2=1e-2, solver="budgeted-newton-cg"
    )[1]
    assert int(by_name.stats.num_steps) <= 1
