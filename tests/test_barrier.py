"""The log-barrier solver on problems with known answers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import vploss
from vploss._core.stats import check_converged


def least_squares(w, args):
    a, b = args
    return 0.5 * jnp.sum((a @ w - b) ** 2)


def shifted_least_squares(params, args):
    """Least squares with an unconstrained offset: `‖A w + s − b‖²/2`."""
    w, shift = params
    a, b = args
    return 0.5 * jnp.sum((a @ w + shift - b) ** 2)


def bounded_above(w, args):
    """`(w − 2)² − log(1 − w)`: its domain `w < 1` is known only to the objective."""
    (target,) = args
    value = jnp.sum((w - target) ** 2 - jnp.log1p(-w))
    return jnp.where(jnp.all(w < 1), value, jnp.inf)


def double_well(w, args):
    """`Σ w⁴/4 − w²`: concave for `|w| < (2/3)^½`, minimised over `w ≥ 0` at `√2`."""
    del args
    return jnp.sum(w**4 / 4 - w**2)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 8)), rng.normal(size=20)


SOLVER = vploss.LogBarrier(gap_tol=1e-12)
solve = eqx.filter_jit(vploss.barrier_minimise)


def test_nonnegative_least_squares_matches_scipy(problem):
    a, b = problem
    value, w, stats = solve(least_squares, (a, b), jnp.ones(8), constrained=True, solver=SOLVER)
    reference, residual = scipy.optimize.nnls(a, b)
    assert bool(stats.converged)
    assert float(stats.duality_gap) <= 1e-12
    # Some constraints are active, so the test exercises the barrier.
    assert np.sum(reference == 0) >= 2
    np.testing.assert_allclose(w, reference, atol=1e-9)
    assert 0 <= float(value) - 0.5 * residual**2 <= float(stats.duality_gap) + 1e-12
    # KKT at the barrier point: feasibility and w_i ∂J/∂w_i = 1/t, up to the centering
    # tolerance.
    t = 8 / float(stats.duality_gap)
    gradient = a.T @ (a @ np.asarray(w) - b)
    assert np.all(np.asarray(w) > 0)
    np.testing.assert_allclose(t * np.asarray(w) * gradient, 1, rtol=1e-2)


def test_envelope_gradient_in_the_data(problem):
    a, b = problem

    def value(b):
        return solve(least_squares, (a, b), jnp.ones(8), constrained=True, solver=SOLVER)[0]

    reference, _ = scipy.optimize.nnls(a, b)
    grad = jax.grad(value)(jnp.asarray(b))
    np.testing.assert_allclose(grad, b - a @ reference, atol=1e-9)


def test_mask_leaves_free_entries_unconstrained(problem):
    a, b = problem
    b = b - 3.0  # the free offset must go negative
    _, (w, shift), stats = solve(
        shifted_least_squares,
        (a, b),
        (jnp.ones(8), jnp.zeros(())),
        constrained=(True, False),
        solver=SOLVER,
    )
    design = np.concatenate([a, np.ones((20, 1))], axis=1)
    lower = np.concatenate([np.zeros(8), [-np.inf]])
    reference = scipy.optimize.lsq_linear(design, b, bounds=(lower, np.inf), tol=1e-14).x
    assert bool(stats.converged)
    assert float(shift) < 0
    np.testing.assert_allclose(np.append(w, shift), reference, atol=1e-7)


def test_domain_of_the_objective_is_respected():
    # min (w − 2)² − log(1 − w) over w ≥ 0: 2w² − 6w + 3 = 0 on [0, 1).
    value, w, stats = solve(bounded_above, (jnp.array(2.0),), jnp.array([0.5]), constrained=True)
    assert bool(stats.converged)
    np.testing.assert_allclose(w, [(3 - np.sqrt(3)) / 2], atol=1e-7)


def test_unconstrained_problem_is_one_newton_solve(problem):
    a, b = problem
    _, w, stats = solve(least_squares, (a, b), jnp.zeros(8), constrained=False)
    assert bool(stats.converged) and float(stats.duality_gap) == 0
    np.testing.assert_allclose(w, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-10)


def test_vmap_over_problems(problem):
    a, b = problem
    bs = jnp.stack([b, -b, b + 1])
    batched = jax.vmap(
        lambda b: vploss.barrier_minimise(
            least_squares, (a, b), jnp.ones(8), constrained=True, solver=SOLVER
        )
    )
    _, ws, stats = jax.jit(batched)(bs)
    assert np.all(stats.converged)
    for w, bj in zip(ws, bs, strict=True):
        np.testing.assert_allclose(w, scipy.optimize.nnls(a, np.asarray(bj))[0], atol=1e-9)


def test_non_convergence_is_reported(problem):
    a, b = problem
    _, w, stats = solve(
        least_squares,
        (a, b),
        jnp.ones(8),
        constrained=True,
        solver=vploss.LogBarrier(max_steps=3),
    )
    assert not bool(stats.converged) and int(stats.num_steps) == 3
    assert stats.result == vploss.RESULTS.nonlinear_max_steps_reached
    # The loop stopped on the step budget, not on a failed line search: the iterate
    # moved and stayed strictly feasible, short of the gap.
    assert np.all(np.asarray(w) > 0) and not np.allclose(w, 1)
    assert float(stats.duality_gap) > 1e-12


def test_indefinite_hessian_falls_back():
    # At t0 = 10 the barrier Hessian at w = 0.5 is 10 (3/4 − 2) + 4 = −8.5: the plain
    # Cholesky direction is NaN, so the step must come from a fallback direction.
    solver = vploss.LogBarrier(gap_tol=1e-10, initial_weight=10.0)
    _, w, stats = solve(double_well, (), jnp.array([0.5, 2.0]), constrained=True, solver=solver)
    assert bool(stats.converged)
    assert int(stats.fallback_steps) > 0
    np.testing.assert_allclose(w, np.full(2, np.sqrt(2)), atol=1e-8)


def test_infeasible_start_is_reported(problem):
    a, b = problem
    _, w, stats = solve(least_squares, (a, b), -jnp.ones(8), constrained=True)
    assert not bool(stats.converged)
    # The line search found no step: the iterate did not move, and no update is counted.
    np.testing.assert_array_equal(w, -np.ones(8))
    assert int(stats.num_steps) == 0
    assert stats.result == vploss.RESULTS.line_search_failed


def test_unconverged_fallback_is_reported():
    # The first step falls back (see `test_indefinite_hessian_falls_back`), the only
    # step allowed: the result names the Hessian, and so does the error.
    solver = vploss.LogBarrier(gap_tol=1e-10, initial_weight=10.0, max_steps=1)
    _, w, stats = solve(double_well, (), jnp.array([0.5, 2.0]), constrained=True, solver=solver)
    assert int(stats.fallback_steps) > 0 and not bool(stats.converged)
    assert stats.result == vploss.RESULTS.indefinite_hessian
    with pytest.raises(Exception, match="not numerically positive definite"):
        check_converged(w, stats, True, "the test problem")


def _numpy_barrier_update(a, b, w):
    """One damped Newton update on `½‖Aw − b‖² − Σ log w` (the barrier weight 1): the
    step size from the largest feasible one (shortened by 1%) halved until the Armijo
    test with slope 1/10 holds; NumPy, float64."""

    def phi(v):
        return 0.5 * np.sum((a @ v - b) ** 2) - np.sum(np.log(v)) if np.all(v > 0) else np.inf

    gradient = a.T @ (a @ w - b) - 1 / w
    step = -np.linalg.solve(a.T @ a + np.diag(1 / w**2), gradient)
    size = min(1.0, 0.99 * np.min(-w[step < 0] / step[step < 0], initial=np.inf))
    while not phi(w + size * step) - phi(w) <= 0.1 * size * gradient @ step:
        size /= 2
    return w + size * step


@pytest.mark.parametrize("steps", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_max_steps_counts_newton_updates(problem, steps):
    """`max_steps=k` moves the iterate k times, each a Newton update with its line
    search, and `num_steps` counts them."""
    a, b = problem
    solver = vploss.LogBarrier(max_steps=steps)
    _, w, stats = solve(least_squares, (a, b), jnp.ones(8), constrained=True, solver=solver)
    expected = np.ones(8)
    for _ in range(steps):
        expected = _numpy_barrier_update(a, b, expected)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert int(stats.num_steps) == steps


def test_bad_options():
    with pytest.raises(ValueError, match="weight_factor"):
        vploss.LogBarrier(weight_factor=1.0)
    with pytest.raises(ValueError, match="initial_weight"):
        vploss.LogBarrier(initial_weight=0.0)
    with pytest.raises(TypeError, match="constrained"):
        vploss.barrier_minimise(
            least_squares, (jnp.eye(2), jnp.ones(2)), jnp.ones(2), constrained=1
        )
