"""`vpggn`, `ggn_operator` and `GeneralisedGaussNewton`: the generalised Gauss–Newton
matrix of the reduced loss, against a dense GGN assembled from Jacobians and an
independently written loss Hessian, against finite differences of independently fitted
readouts, against `vpjacobian_msereg` for ridge, and the minimiser against optimistix's
Levenberg–Marquardt and the stationarity condition."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest
from jax.flatten_util import ravel_pytree

import vploss
from vploss._readout_losses.objective import curvature_product

from .helpers import along, LOSS_CASES, mlp, newton_reference, random_direction, ridge_reference


N, IN, M = 24, 2, 4


def _problem(case, dtype=jnp.float64, weighted=False):
    """`(x, loss function, y, keyword arguments)` of a small problem of the loss `case`
    (a `LossCase`): its labels of a smooth score of `x`, both penalties, and with
    `weighted` random weights, three of them zero."""
    x = jax.random.normal(jax.random.PRNGKey(0), (N, IN), dtype)
    y = case.labels(jnp.sin(2 * x[:, 0] + x[:, 1]))
    kwargs = dict(alpha2=1e-2, alpha1=1e-3, **case.kwargs)
    if weighted:
        weights = jax.random.uniform(jax.random.PRNGKey(1), (N,), dtype).at[:3].set(0.0)
        kwargs["weights"] = weights
    return x, case.function, y, kwargs


def _ridge_problem():
    """The ridge loss's own problem, with two outputs, as `_problem` gives it."""
    x = jax.random.normal(jax.random.PRNGKey(0), (N, IN))
    y = jnp.stack([jnp.sin(2 * x[:, 0]) * x[:, 1], jnp.cos(x[:, 1])], axis=1)
    return x, vploss.vploss_msereg, y, dict(alpha2=1e-3, alpha1=1e-2)


def _reference_hessian(case, logits, y, kwargs):
    """The Hessian of the (weighted) mean data loss in the `(N, k)` logits, as an
    `(Nk, Nk)` matrix, from the loss's NumPy reference (independent of the library's
    `curvature`): block diagonal, sample j's block `w_j/Σw` times its curvature."""
    logits = np.asarray(logits, np.float64)
    _, _, curvature = case.reference(logits, case.targets(y))
    weights = np.asarray(kwargs.get("weights", np.ones(N)), np.float64)
    hessian = np.einsum("j,jab,jl->jalb", weights / weights.sum(), curvature, np.eye(N))
    return hessian.reshape(logits.size, logits.size)


@eqx.filter_jit
def _features(model, x):
    features = jax.vmap(model)(x)
    return jnp.concatenate([features, jnp.ones((N, 1), features.dtype)], axis=1)


def _setup(case, jacobian, dtype=jnp.float64, weighted=False, problem=None):
    x, loss, y, kwargs = problem or _problem(case, dtype, weighted)
    model = mlp(IN, width=5, depth=1, features=M, dtype=dtype)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params, args):
        return vploss.vpggn(loss, eqx.combine(params, static), x, y, jacobian=jacobian, **kwargs)

    return x, loss, y, kwargs, params, static, fn


@eqx.filter_jit
def _dense_ggn(fn, params):
    """`ggn_operator`'s value, gradient and GGN (as a dense `(P, P)` matrix, one product
    per basis vector) and outputs, compiled as one program."""
    value, gradient, ggn, outputs = vploss.ggn_operator(fn, params, None)
    flat, unravel = ravel_pytree(params)
    columns = jax.vmap(lambda e: ravel_pytree(ggn.mv(unravel(e)))[0])
    return value, gradient, columns(jnp.eye(flat.size, dtype=flat.dtype)), outputs


JACOBIANS = ("exact", "fixed_readout")


def _loss_cases(default=()):
    """`pytest.param`s `(case, jacobian)` of every loss in `LOSS_CASES` and both
    Jacobians: the `(name, jacobian)` pairs in `default` run in the default run, every
    other one (those of a new loss too) with the slow tests."""
    return [
        pytest.param(
            case,
            jacobian,
            id=f"{name}-{jacobian}",
            marks=[] if (name, jacobian) in default else [pytest.mark.slow],
        )
        for name, case in LOSS_CASES.items()
        for jacobian in JACOBIANS
    ]


# The exact Jacobian's dense reference compiles `jax.jacfwd` through the implicit
# derivative (10-20 s a loss), and each loss compiles its own: every loss runs it, with
# weights and both penalties, with -m slow; the default run checks bce against finite
# differences below (the README's command).
@pytest.mark.parametrize("case, jacobian", _loss_cases())
def test_ggn_equals_the_dense_ggn(case, jacobian):
    """G = J_Zᵀ H J_Z + alpha2 J_Wᵀ J_W + alpha1 I with the Jacobians by `jax.jacfwd`
    and H the Hessian of the loss written here; the gradient is the loss's own."""
    x, loss, y, kwargs, params, static, fn = _setup(case, jacobian, weighted=True)
    value, gradient, actual, outputs = _dense_ggn(fn, params)
    flat, unravel = ravel_pytree(params)

    def coefficients(theta):
        _, readout = loss(eqx.combine(unravel(theta), static), x, y, **kwargs)
        return jnp.concatenate([readout.weight.T, readout.bias[None]], axis=0)

    coef = coefficients(flat)
    if jacobian == "exact":
        logits_of = lambda t: _features(eqx.combine(unravel(t), static), x) @ coefficients(t)  # noqa: E731
        jac_w = jax.jacfwd(coefficients)(flat).reshape(coef.size, -1)
    else:
        logits_of = lambda t: _features(eqx.combine(unravel(t), static), x) @ coef  # noqa: E731
        jac_w = jnp.zeros((coef.size, flat.size))
    logits = logits_of(flat)
    jac_z = jax.jacfwd(logits_of)(flat).reshape(logits.size, -1)
    hessian = _reference_hessian(case, logits, y, kwargs)
    alpha1, alpha2 = kwargs.get("alpha1", 0.0), kwargs["alpha2"]
    expected = jac_z.T @ hessian @ jac_z + alpha2 * jac_w.T @ jac_w + alpha1 * jnp.eye(flat.size)

    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(outputs.logits, logits, rtol=1e-12, atol=1e-12)
    loss_value, loss_grad = eqx.filter_value_and_grad(
        lambda p: loss(eqx.combine(p, static), x, y, **kwargs)[0]
    )(params)
    np.testing.assert_allclose(value, loss_value, rtol=1e-14)
    np.testing.assert_allclose(
        ravel_pytree(gradient)[0], ravel_pytree(loss_grad)[0], rtol=1e-12, atol=1e-14
    )
    ggn = vploss.ggn_operator(fn, params, None)[2]
    assert lx.is_symmetric(ggn) and lx.is_positive_semidefinite(ggn)


@eqx.filter_jit
def _ggn_product(fn, params, direction):
    """`ggn_operator`'s outputs and the GGN's product with `direction`, compiled."""
    _, _, ggn, outputs = vploss.ggn_operator(fn, params, None)
    return outputs, ggn.mv(direction)


def _readout_of(case, features, y, kwargs):
    """The readout `[W, b]ᵀ` by an independent float64 NumPy solver."""
    alpha2 = kwargs["alpha2"]
    if case.loss is None:
        return ridge_reference(features, y, alpha2, use_bias=False)[1]
    return newton_reference(case.reference, features, case.targets(y), alpha2, use_bias=False)[1]


@pytest.mark.slow
@pytest.mark.parametrize("case, jacobian", _loss_cases(default=[("bce", "fixed_readout")]))
def test_ggn_against_finite_differences(case, jacobian):
    """uᵀGv = (J_Z u)ᵀ H (J_Z v) + alpha2 (J_W u)·(J_W v) + alpha1 uᵀv with J u by central
    differences of the logits, the readout refitted at each point by an independent
    NumPy solver (exact) or held at the one fitted at θ (fixed readout)."""
    x, loss, y, kwargs, params, static, fn = _setup(case, jacobian)
    flat, unravel = ravel_pytree(params)
    rng = np.random.default_rng(0)
    u, v = (jnp.asarray(rng.standard_normal(flat.size)) for _ in range(2))
    outputs, ggn_v = _ggn_product(fn, params, unravel(v))
    features = lambda t: np.asarray(_features(eqx.combine(unravel(t), static), x))  # noqa: E731
    coef0 = _readout_of(case, features(flat), y, kwargs)

    def outputs_at(theta):
        coef = _readout_of(case, features(theta), y, kwargs) if jacobian == "exact" else coef0
        return features(theta) @ coef, coef

    h = 1e-5

    def jvp(direction):
        (zp, wp), (zm, wm) = outputs_at(flat + h * direction), outputs_at(flat - h * direction)
        return (zp - zm) / (2 * h), (wp - wm) / (2 * h)

    (ju_z, ju_w), (jv_z, jv_w) = jvp(u), jvp(v)
    hessian = _reference_hessian(case, outputs.logits, y, kwargs)
    alpha1, alpha2 = kwargs.get("alpha1", 0.0), kwargs["alpha2"]
    expected = (
        ju_z.ravel() @ hessian @ jv_z.ravel() + alpha2 * np.sum(ju_w * jv_w) + alpha1 * float(u @ v)
    )
    actual = float(u @ ravel_pytree(ggn_v)[0])
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(alpha2=1e-3, alpha1=1e-2), marks=pytest.mark.slow),
        pytest.param(dict(alpha2="gcv", weights=np.linspace(0, 2, N)), marks=pytest.mark.slow),
    ],
)
def test_ridge_ggn_is_the_gauss_newton_matrix_of_the_residual(kwargs):
    """For `vploss_msereg`, G = J_rᵀ J_r with J_r from `vpjacobian_msereg`."""
    x, _, y, _ = _ridge_problem()
    model = mlp(IN, width=5, depth=1, features=M)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params, args):
        return vploss.vpggn(vploss.vploss_msereg, eqx.combine(params, static), x, y, **kwargs)

    value, gradient, actual, outputs = _dense_ggn(fn, params)
    # GCV's minimiser rounds differently compiled: compare at the penalty it chose.
    reference = dict(kwargs, alpha2=outputs.alpha2)
    jacobian, residual, _ = vploss.vpjacobian_msereg(model, x, y, **reference)
    expected = np.asarray(jacobian.T @ jacobian)
    np.testing.assert_allclose(actual, expected, atol=1e-12 * np.abs(expected).max())
    np.testing.assert_allclose(ravel_pytree(gradient)[0], jacobian.T @ residual, atol=1e-12)
    np.testing.assert_allclose(value, 0.5 * jnp.sum(residual**2), rtol=1e-12)


@pytest.mark.slow
def test_float32_products_as_accurate_as_a_dense_float32_ggn():
    """In float32, the products' error (against float64) is within a small multiple of
    that of the dense float32 GGN from the same formula (a same-precision reference)."""
    ce = LOSS_CASES["ce"]
    _, _, _, _, params64, _, fn64 = _setup(ce, "fixed_readout", weighted=True)
    exact = np.asarray(_dense_ggn(fn64, params64)[2])
    x, loss, y, kwargs, params, static, fn = _setup(ce, "fixed_readout", jnp.float32, True)
    actual = np.asarray(_dense_ggn(fn, params)[2])

    flat, unravel = ravel_pytree(params)
    _, readout = loss(eqx.combine(params, static), x, y, **kwargs)
    coef = jnp.concatenate([readout.weight.T, readout.bias[None]], axis=0)
    logits_of = lambda t: _features(eqx.combine(unravel(t), static), x) @ coef  # noqa: E731
    jac_z = jax.jacfwd(logits_of)(flat).reshape(N * 3, -1)
    hessian = _reference_hessian(ce, logits_of(flat), y, kwargs).astype(np.float32)
    dense32 = np.asarray(jac_z.T @ hessian @ jac_z)
    assert actual.dtype == np.float32
    reference_error = np.abs(dense32 - exact).max()
    rounding = np.finfo(np.float32).eps * np.abs(exact).max()
    assert np.abs(actual - exact).max() <= 10 * reference_error + 10 * rounding


@pytest.mark.slow
@pytest.mark.parametrize("name", ["msereg", "bce"])
def test_exact_jacobian_with_exact_solves_is_optimistix_levenberg_marquardt(name):
    """With the ridge loss and an exact linear solve, the minimiser's iterates are those
    of `optimistix.LevenbergMarquardt` on `vpresidual_msereg` (the same damped system,
    trust region and acceptance); for other losses, the loss decreases monotonically."""
    problem = _ridge_problem() if name == "msereg" else None
    x, loss, y, kwargs, params, static, fn = _setup(LOSS_CASES[name], "exact", problem=problem)
    solver = vploss.GeneralisedGaussNewton(rtol=0.0, atol=0.0, linear_solver=lx.Cholesky())
    steps = 6
    ours = optx.minimise(fn, solver, params, None, has_aux=True, max_steps=steps, throw=False)
    assert ours.result == optx.RESULTS.nonlinear_max_steps_reached
    if name != "msereg":
        assert ours.aux.readout.stats.converged
        assert fn(ours.value, None)[0] < fn(params, None)[0]
        return

    def residual(params, args):
        return vploss.vpresidual_msereg(eqx.combine(params, static), x, y, **kwargs)

    theirs = optx.least_squares(
        residual,
        optx.LevenbergMarquardt(rtol=0.0, atol=0.0, linear_solver=lx.QR()),
        params,
        has_aux=True,
        max_steps=steps,
        throw=False,
    )
    np.testing.assert_allclose(
        ravel_pytree(ours.value)[0], ravel_pytree(theirs.value)[0], rtol=1e-8, atol=1e-10
    )


@pytest.mark.slow
@pytest.mark.parametrize("jacobian", ["exact", "fixed_readout"])
def test_minimiser_fits_a_realisable_target(jacobian):
    """Targets made by a network of the same architecture (a zero-residual problem, where
    Gauss–Newton converges fast): from a perturbed start, the default solver (truncated
    conjugate gradients) drives the loss and the gradient to near zero."""
    x = jax.random.normal(jax.random.PRNGKey(0), (N, IN))
    teacher = mlp(IN, width=5, depth=1, features=M)
    y = jax.vmap(teacher)(x) @ jnp.array([1.0, -2.0, 0.5, 1.5]) + 0.3
    start = along(teacher, random_direction(teacher, 3), 0.3)
    params, static = eqx.partition(start, eqx.is_inexact_array)

    def loss(params):
        return vploss.vploss_msereg(eqx.combine(params, static), x, y, alpha2=1e-10)[0]

    def fn(params, args):
        model = eqx.combine(params, static)
        return vploss.vpggn(vploss.vploss_msereg, model, x, y, jacobian=jacobian, alpha2=1e-10)

    solver = vploss.GeneralisedGaussNewton(rtol=1e-10, atol=1e-12)
    solution = optx.minimise(fn, solver, params, None, has_aux=True, max_steps=60, throw=False)
    assert loss(params) > 1e-3
    assert loss(solution.value) < 1e-8
    gradient = ravel_pytree(eqx.filter_grad(loss)(solution.value))[0]
    assert np.abs(gradient).max() < 1e-5
    assert isinstance(solution.aux.readout, vploss.VPLinear)


def test_errors_name_what_was_expected():
    x, loss, y, kwargs, params, static, _ = _setup(LOSS_CASES["bce"], "exact")
    model = eqx.combine(params, static)
    with pytest.raises(TypeError, match="vploss_msereg"):
        vploss.vpggn(jnp.sum, model, x, y, alpha2=1e-2)
    with pytest.raises(ValueError, match="fixed_readout"):
        vploss.vpggn(loss, model, x, y, jacobian="kaufman", alpha2=1e-2)

    def plain(params, args):
        return loss(eqx.combine(params, static), x, y, **kwargs)

    with pytest.raises(TypeError, match="GaussNewtonOutputs"):
        optx.minimise(
            plain, vploss.GeneralisedGaussNewton(rtol=1e-6, atol=1e-6), params, None, has_aux=True
        )


@pytest.mark.slow
def test_curvature_products_batched_and_compiled_in_float32():
    """The per-sample curvature products of the GGN and of the inner Hessian, compiled
    and batched in float32, against NumPy: XLA's CPU compiler miscompiled the row dot
    products written as `jnp.sum(u * v, axis=1, keepdims=True)` for batches of 32 or
    more (errors of order one)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    diagonal, rank_one = (jax.random.uniform(k, (200, 10), jnp.float32) for k in keys[:2])
    rows = jax.random.normal(keys[2], (40, 200, 10), jnp.float32)
    batched = jax.jit(jax.vmap(lambda v: curvature_product(diagonal, rank_one, v)))(rows)
    d, u, v = (np.asarray(a, np.float64) for a in (diagonal, rank_one, rows))
    expected = d * v - u * np.sum(u * v, axis=2, keepdims=True)
    np.testing.assert_allclose(batched, expected, atol=1e-5 * np.abs(expected).max())
