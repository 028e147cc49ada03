"""`vploss.least_squares` and `VarProLevenbergMarquardt`: the reduced residual's
Jacobian against automatic differentiation of `vpresidual_msereg`, the solver's
minimiser against SciPy's Levenberg–Marquardt on the whole problem (Golub and
Pereyra's exponential fitting), the damped system's forms against each other, float32,
weights, the stopping rules, the callbacks and the errors."""

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import vploss
from vploss._least_squares.levenberg_marquardt import _problem
from vploss._least_squares.reduced import dense_jacobian, linearise

from .helpers import mlp


class Exponentials(eqx.Module):
    """Features $e^{-\\lambda_i t}$ of a time $t$: the exponential fitting problem of
    Golub and Pereyra (1973)."""

    rates: jax.Array

    def __call__(self, t):
        return jnp.exp(-self.rates * t)


def exponential_data(noise=0.01, dtype=jnp.float64):
    t = jnp.linspace(0.0, 4.0, 60, dtype=dtype)
    clean = 2.0 * jnp.exp(-0.5 * t) - 1.0 * jnp.exp(-2.0 * t) + 0.3
    y = clean + noise * jax.random.normal(jax.random.PRNGKey(3), t.shape, dtype)
    return t, y


def full_problem_reference(t, y, rates0):
    """SciPy's MINPACK Levenberg–Marquardt on the whole problem (rates, coefficients and
    intercept together), from the rates `rates0` and their least-squares coefficients:
    by Golub and Pereyra's theorem its minimiser's rates minimise the reduced problem."""
    t, y = np.asarray(t, np.float64), np.asarray(y, np.float64)

    def residual(z):
        rates, coef, bias = z[:2], z[2:4], z[4]
        return (np.exp(-np.outer(t, rates)) @ coef + bias - y) / np.sqrt(t.size)

    design = np.column_stack([np.exp(-np.outer(t, rates0)), np.ones_like(t)])
    coef0 = np.linalg.lstsq(design, y, rcond=None)[0]
    z0 = np.concatenate([rates0, coef0])
    tol = dict(xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return scipy.optimize.least_squares(residual, z0, method="lm", **tol).x


def flat_residual(model, x, y, **kwargs):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    flat, unravel = jfu.ravel_pytree(params)

    def residual(f):
        return vploss.vpresidual_msereg(eqx.combine(unravel(f), static), x, y, **kwargs)[0]

    return flat, residual


JACOBIAN_CASES = {
    "ridge": dict(alpha2=1e-3),
    "weights": dict(alpha2=1e-3, weights="random"),
    "no-bias-alpha1": dict(alpha2=1e-3, alpha1=1e-2, use_bias=False),
    "unregularised": dict(alpha2=0.0),
}


def _jacobian_problem(case):
    model = mlp(in_size=2, width=6, depth=2, features=5)
    x = jax.random.normal(jax.random.PRNGKey(1), (25, 2)) + 3.0
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] ** 2], 1) + 100.0  # two outputs, an offset
    kwargs = dict(JACOBIAN_CASES[case])
    if kwargs.get("weights") == "random":
        kwargs["weights"] = jax.random.uniform(jax.random.PRNGKey(2), (25,))
    return model, x, y, kwargs


def _linearisation(model, x, y, kwargs, jacobian):
    problem, flat = _problem(
        model,
        x,
        y,
        kwargs.get("alpha1", 0.0),
        kwargs["alpha2"],
        kwargs.get("use_bias", True),
        kwargs.get("weights"),
    )
    lin, _ = linearise(problem, flat, jacobian)
    return problem, flat, lin


@pytest.mark.slow
@pytest.mark.parametrize("case", JACOBIAN_CASES)
def test_jacobian_is_that_of_the_reduced_residual(case):
    """The residual here has the centred rows (one more than the samples per output),
    an isometry of `vpresidual_msereg`'s rows on the residual's range: the loss, JᵀJ and
    Jᵀr are equal."""
    model, x, y, kwargs = _jacobian_problem(case)
    problem, flat, lin = _linearisation(model, x, y, kwargs, "golub_pereyra")
    jacobian = dense_jacobian(problem, lin)
    _, residual = flat_residual(model, x, y, solver="svd", **kwargs)
    reference = jax.jacfwd(residual)(flat)
    r = residual(flat)
    scale = np.linalg.norm(reference.T @ reference)
    np.testing.assert_allclose(0.5 * jnp.sum(lin.residual**2), 0.5 * jnp.sum(r**2), rtol=1e-12)
    np.testing.assert_allclose(jacobian.T @ jacobian, reference.T @ reference, atol=1e-10 * scale)
    np.testing.assert_allclose(
        jacobian.T @ lin.residual, reference.T @ r, atol=1e-10 * np.linalg.norm(reference.T @ r)
    )
    loss, _ = vploss.vploss_msereg(model, x, y, solver="svd", **kwargs)
    np.testing.assert_allclose(0.5 * jnp.sum(lin.residual**2), loss, rtol=1e-12)


@pytest.mark.parametrize("case", JACOBIAN_CASES)
@pytest.mark.parametrize("jacobian", ["golub_pereyra", "kaufman"])
def test_matrix_free_products_match_the_dense_jacobian(case, jacobian):
    model, x, y, kwargs = _jacobian_problem(case)
    problem, flat, lin = _linearisation(model, x, y, kwargs, jacobian)
    dense = dense_jacobian(problem, lin)
    by_columns = jax.vmap(lin.mv)(jnp.eye(flat.size)).T
    by_rows = jax.vmap(lin.rmv)(jnp.eye(lin.residual.size))
    # Rounding through the readout's derivative grows with the design's condition.
    condition = float(lin.projection.s[0] / lin.projection.s[-1])
    atol = 100 * np.finfo(np.float64).eps * condition * np.max(np.abs(dense))
    np.testing.assert_allclose(by_columns, dense, atol=atol)
    np.testing.assert_allclose(by_rows, dense, atol=atol)


def test_kaufman_jacobian():
    """Kaufman's Jacobian drops the term proportional to the residual: it gives the exact
    gradient Jᵀr, differs from the exact Jacobian on a misfit, and equals it where the
    targets are fitted exactly."""
    model, x, y, kwargs = _jacobian_problem("ridge")
    kwargs["alpha2"] = 0.0
    problem, _, exact = _linearisation(model, x, y, kwargs, "golub_pereyra")
    _, _, kaufman = _linearisation(model, x, y, kwargs, "kaufman")
    j_exact, j_kaufman = dense_jacobian(problem, exact), dense_jacobian(problem, kaufman)
    gradient = j_exact.T @ exact.residual
    atol = 1e-10 * np.max(np.abs(gradient))
    np.testing.assert_allclose(j_kaufman.T @ kaufman.residual, gradient, atol=atol)
    assert np.max(np.abs(j_kaufman - j_exact)) > 1e-3 * np.max(np.abs(j_exact))
    # Targets in the span of the features: zero residual, the same Jacobian.
    features = jax.vmap(model)(x)
    fitted = features @ jnp.arange(1.0, 11.0).reshape(5, 2) + 1.0
    problem, _, exact = _linearisation(model, x, fitted, kwargs, "golub_pereyra")
    _, _, kaufman = _linearisation(model, x, fitted, kwargs, "kaufman")
    j_exact, j_kaufman = dense_jacobian(problem, exact), dense_jacobian(problem, kaufman)
    np.testing.assert_allclose(j_kaufman, j_exact, atol=1e-9 * np.max(np.abs(j_exact)))


@pytest.mark.slow
@pytest.mark.parametrize("jacobian", ["golub_pereyra", "kaufman"])
def test_exponential_fit_matches_the_whole_problem_minimiser(jacobian):
    t, y = exponential_data()
    rates0 = np.array([0.3, 3.0])
    reference = full_problem_reference(t, y, rates0)
    # A tolerance on the loss's relative reduction of about eps stops where the rates
    # are resolved to about sqrt(eps); the default sqrt(eps) stops at eps^(1/4).
    solver = vploss.VarProLevenbergMarquardt(jacobian=jacobian, rtol=1e-15)
    solution = vploss.least_squares(
        Exponentials(jnp.asarray(rates0)), t, y, solver=solver, alpha2=0.0, max_steps=200
    )
    assert solution.stats.converged, solution.stats.termination
    assert solution.stats.termination != "max_steps"
    np.testing.assert_allclose(solution.model.rates, reference[:2], rtol=1e-7)
    np.testing.assert_allclose(solution.readout.weight[0], reference[2:4], rtol=1e-6)
    np.testing.assert_allclose(solution.readout.bias, reference[4], rtol=1e-6)
    # The readout is that of `vploss_msereg` at the trained model.
    _, readout = vploss.vploss_msereg(solution.model, t, y, alpha2=0.0, solver="svd")
    np.testing.assert_allclose(solution.readout.weight, readout.weight, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["primal", "dual", "cg"])
def test_damped_system_forms_take_the_same_steps(form):
    model = mlp(in_size=2, width=5, depth=1, features=4)
    x = jax.random.normal(jax.random.PRNGKey(4), (12, 2))
    y = jnp.sin(x[:, 0]) * x[:, 1]
    steps = {}
    for name in ("primal", form):
        solver = vploss.VarProLevenbergMarquardt(
            linear_solver=name, cg_rtol=1e-10, cg_max_steps=10_000, geodesic_acceleration=False
        )
        solution = vploss.least_squares(model, x, y, solver=solver, alpha2=1e-4, max_steps=1)
        assert int(solution.stats.num_accepted) == 1
        steps[name] = jfu.ravel_pytree(eqx.filter(solution.model, eqx.is_inexact_array))[0]
    # CG to a relative residual of 1e-10 on a system of condition about 2e3.
    np.testing.assert_allclose(steps[form], steps["primal"], rtol=1e-6, atol=1e-7)


def test_form_is_chosen_by_shape():
    solver = vploss.VarProLevenbergMarquardt()
    assert solver.form(1000, 100) == "primal"
    assert solver.form(100, 1000) == "dual"
    assert solver.form(2**14, 2**13) == "cg"
    assert vploss.VarProLevenbergMarquardt(linear_solver="dual").form(1000, 100) == "dual"


def test_exact_fit_converges_quadratically():
    """Noise-free targets: the residual goes to rounding and a stopping test fires by
    itself, long before the step budget."""
    t, y = exponential_data(noise=0.0)
    seen = []
    solution = vploss.least_squares(
        Exponentials(jnp.array([0.3, 3.0])), t, y, alpha2=0.0, max_steps=200, callback=seen.append
    )
    assert solution.stats.converged
    assert solution.stats.termination in ("loss", "gradient", "step", "reduction", "no_reduction")
    assert float(solution.stats.loss) < 1e-25
    assert len(seen) < 60
    np.testing.assert_allclose(solution.model.rates, [0.5, 2.0], rtol=1e-10)


def test_float32():
    """Float32 data: the solver converges to the float64 minimiser within float32
    rounding of the loss, with no NaN."""
    t, y = exponential_data()
    rates0 = jnp.array([0.3, 3.0])
    solution64 = vploss.least_squares(Exponentials(rates0), t, y, alpha2=0.0, max_steps=200)
    solution32 = vploss.least_squares(
        Exponentials(rates0.astype(jnp.float32)),
        t.astype(jnp.float32),
        y.astype(jnp.float32),
        alpha2=0.0,
        max_steps=200,
    )
    assert solution32.model.rates.dtype == jnp.float32
    assert solution32.stats.loss.dtype == jnp.float32
    assert solution32.stats.converged
    # The loss is resolved to about eps32 times the targets' square norm.
    bound = 50 * np.finfo(np.float32).eps * float(jnp.mean(y**2))
    assert float(solution32.stats.loss) - float(solution64.stats.loss) < bound
    np.testing.assert_allclose(solution32.model.rates, solution64.model.rates, rtol=1e-2)


def test_weights_are_repeated_samples():
    t, y = exponential_data()
    counts = (jnp.arange(t.size) % 3).astype(jnp.float64)  # 0, 1 or 2 copies
    keep = np.repeat(np.arange(t.size), np.asarray(counts, int))
    rates0 = jnp.array([0.3, 3.0])
    options = dict(alpha2=1e-8, max_steps=200)
    weighted = vploss.least_squares(Exponentials(rates0), t, y, weights=counts, **options)
    repeated = vploss.least_squares(Exponentials(rates0), t[keep], y[keep], **options)
    np.testing.assert_allclose(weighted.model.rates, repeated.model.rates, rtol=1e-7)
    np.testing.assert_allclose(weighted.stats.loss, repeated.stats.loss, rtol=1e-7)


def test_gcv_penalty_is_reported():
    t, y = exponential_data(noise=0.05)
    model = Exponentials(jnp.array([0.3, 3.0]))
    solution = vploss.least_squares(model, t, y, alpha2="gcv", max_steps=50)
    assert isinstance(solution.readout.stats, vploss.GCVStats)
    np.testing.assert_allclose(solution.readout.stats.alpha2, solution.stats.alpha2)
    _, readout = vploss.vploss_msereg(solution.model, t, y, alpha2="gcv", solver="svd")
    np.testing.assert_allclose(solution.readout.weight, readout.weight, rtol=1e-8)


def test_callback_reports_progress_and_stops():
    t, y = exponential_data()
    seen = []

    def callback(progress):
        seen.append(progress)
        return progress.step == 3

    solution = vploss.least_squares(
        Exponentials(jnp.array([0.3, 3.0])), t, y, alpha2=0.0, max_steps=50, callback=callback
    )
    assert [p.step for p in seen] == [1, 2, 3]
    assert solution.stats.termination == "callback"
    assert solution.stats.converged
    assert int(solution.stats.num_steps) == 3
    losses = [p.loss for p in seen]
    assert all(b <= a for a, b in zip(losses[:-1], losses[1:], strict=True))
    assert all(isinstance(p.readout, vploss.VPLinear) for p in seen)
    np.testing.assert_allclose(seen[-1].model.rates, solution.model.rates)


def test_validation_returns_the_best_model():
    t, y = exponential_data()
    values = iter([5.0, 3.0, 4.0, 6.0, 7.0, 8.0] + [9.0] * 100)
    models = []

    def validation(model, readout):
        models.append(model)
        return next(values)

    solution = vploss.least_squares(
        Exponentials(jnp.array([0.3, 3.0])),
        t,
        y,
        solver=vploss.VarProLevenbergMarquardt(rtol=0.0),
        alpha2=0.0,
        max_steps=100,
        validation=validation,
        patience=3,
    )
    assert solution.stats.termination == "validation"
    assert len(models) == 5
    np.testing.assert_array_equal(solution.model.rates, models[1].rates)


def test_max_steps_is_reported():
    t, y = exponential_data()
    model = Exponentials(jnp.array([0.3, 3.0]))
    solution = vploss.least_squares(model, t, y, alpha2=0.0, max_steps=2)
    assert solution.stats.termination == "max_steps"
    assert not solution.stats.converged
    assert solution.stats.result == vploss.RESULTS.nonlinear_max_steps_reached


class NaNBeyond(eqx.Module):
    """Features that are NaN for a rate above 1: a trial step that crosses it must be
    rejected, never taken."""

    rate: jax.Array

    def __call__(self, t):
        rate = self.rate[0]
        return jnp.stack([jnp.exp(-rate * t) * jnp.sqrt(1.0 - rate), t])


def test_nan_trial_step_is_rejected():
    t = jnp.linspace(0.0, 3.0, 40)
    y = 3.0 * jnp.exp(-0.99 * t) * jnp.sqrt(0.01) + t + 0.1 * jnp.cos(7 * t)
    seen = []
    solution = vploss.least_squares(
        NaNBeyond(jnp.array([0.2])), t, y, alpha2=0.0, max_steps=40, callback=seen.append
    )
    assert np.isfinite(float(solution.stats.loss))
    assert float(solution.model.rate[0]) < 1.0
    assert all(np.isfinite(p.loss) for p in seen)


def test_errors():
    t, y = exponential_data()
    model = Exponentials(jnp.array([0.3, 3.0]))
    with pytest.raises(ValueError, match="no trainable parameters"):
        vploss.least_squares(lambda s: jnp.stack([s, s**2]), t, y)
    with pytest.raises(ValueError, match="y"):
        vploss.least_squares(model, t, y[:-1])
    with pytest.raises(ValueError, match="`x` of `least_squares` is not finite"):
        vploss.least_squares(model, t.at[3].set(jnp.nan), y)
    with pytest.raises(ValueError, match="`y` of `least_squares` is not finite"):
        vploss.least_squares(model, t, y.at[3].set(jnp.inf))
    with pytest.raises(ValueError, match="weights"):
        vploss.least_squares(model, t, y, weights=-jnp.ones_like(t))
    with pytest.raises(ValueError, match="not finite at the initial parameters"):
        vploss.least_squares(Exponentials(jnp.array([-400.0, 3.0])), t, y)
    with pytest.raises(ValueError, match="alpha2"):
        vploss.least_squares(model, t, y, alpha2="loo")
    with pytest.raises(TypeError, match="VarProLevenbergMarquardt"):
        vploss.least_squares(model, t, y, solver="lm")
    with pytest.raises(ValueError, match="max_steps"):
        vploss.least_squares(model, t, y, max_steps=-1)
    with pytest.raises(ValueError, match="jacobian"):
        vploss.VarProLevenbergMarquardt(jacobian="exact")
    with pytest.raises(ValueError, match="linear_solver"):
        vploss.VarProLevenbergMarquardt(linear_solver="qr")
    with pytest.raises(ValueError, match="initial_damping"):
        vploss.VarProLevenbergMarquardt(initial_damping=0.0)


def test_rounding_penalty_is_the_default():
    t, y = exponential_data()
    model = Exponentials(jnp.array([0.3, 3.0]))
    solution = vploss.least_squares(model, t, y, max_steps=3)
    # The centred design: rows (f_j - mean)/sqrt(N) with a zero for the bias, and the
    # row [mean, 1], whose Gram matrix is that of the features with a ones column.
    features = np.exp(-np.outer(t, model.rates))
    mean = features.mean(0)
    rows = np.column_stack([(features - mean) / np.sqrt(t.size), np.zeros(t.size)])
    design = np.vstack([rows, [*mean, 1.0]])
    expected = 10 * np.finfo(np.float64).eps * np.linalg.norm(design, 2) ** 2
    np.testing.assert_allclose(solution.stats.alpha2, expected, rtol=1e-10)


class CountingExponentials(Exponentials):
    def __call__(self, t):
        TRACES.append(1)  # Python runs this only when JAX traces it
        return super().__call__(t)


TRACES = []


def test_one_compilation_per_problem_structure():
    """A second solve of a problem of the same structure (new arrays, new model) traces
    nothing again: the compiled start and step are reused."""
    t, y = exponential_data()
    vploss.least_squares(CountingExponentials(jnp.array([0.3, 3.0])), t, y, max_steps=3)
    traced = len(TRACES)
    vploss.least_squares(CountingExponentials(jnp.array([0.4, 2.0])), t, 2 * y, max_steps=3)
    assert len(TRACES) == traced


@pytest.mark.slow
def test_bfloat16_model():
    """A bfloat16 network trains with float32 steps and comes back in bfloat16."""
    model = jax.tree.map(
        lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a,
        mlp(in_size=2, width=6, depth=1, features=4),
    )
    x = jax.random.normal(jax.random.PRNGKey(8), (40, 2), jnp.float32)
    y = jnp.sin(x[:, 0]) + x[:, 1] ** 2
    loss0, _ = vploss.vploss_msereg(model, x, y, alpha2=0.0, solver="svd")
    solution = vploss.least_squares(model, x, y, max_steps=20)
    leaves = jax.tree.leaves(eqx.filter(solution.model, eqx.is_inexact_array))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert solution.stats.loss.dtype == jnp.float32
    assert np.isfinite(float(solution.stats.loss))
    assert float(solution.stats.loss) < 0.5 * float(loss0)
