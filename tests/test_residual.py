"""`vpresidual_msereg`: the reduced residual of the ridge loss and its full
(Golub–Pereyra) Jacobian, for Gauss–Newton and Levenberg–Marquardt."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

from vploss import vpjacobian_msereg, vploss_msereg, vpresidual_msereg

from .helpers import along, flatten, mlp, random_direction


N, IN, M = 30, 2, 5


def _data(seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (N, IN))
    return x, jnp.stack([jnp.sin(2 * x[:, 0]) * x[:, 1], jnp.cos(x[:, 1])], axis=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "alpha1, alpha2, extra",
    [
        pytest.param(0.0, 1e-3, (M + 1) * 2, marks=pytest.mark.slow),
        pytest.param(1e-2, 1e-3, (M + 1) * 2, marks=pytest.mark.slow),
        (0.0, 0.0, 0),
        (1e-2, 0.0, 0),
    ],
)
def test_half_squared_norm_is_the_loss(alpha1, alpha2, extra):
    model = mlp(IN, features=M)
    x, y = _data()
    residual, readout = vpresidual_msereg(model, x, y, alpha1=alpha1, alpha2=alpha2)
    loss, expected = vploss_msereg(model, x, y, alpha1=alpha1, alpha2=alpha2)
    num_params = flatten(model).size if alpha1 else 0
    assert residual.shape == (N * 2 + extra + num_params,)
    # The same blocks under `jit` (where arrays made inside the trace are tracers).
    jitted = eqx.filter_jit(lambda m: vpresidual_msereg(m, x, y, alpha1=alpha1, alpha2=alpha2))
    assert jitted(model)[0].shape == residual.shape
    np.testing.assert_allclose(0.5 * jnp.sum(residual**2), loss, rtol=1e-12)
    np.testing.assert_allclose(readout.weight, expected.weight, rtol=1e-12)


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_jacobian_against_finite_differences_both_modes():
    """J v (forward mode) and vᵀ J (reverse mode) against central differences of the
    residual: the full Jacobian, with the readout moving with the model."""
    model = mlp(IN, features=M)
    x, y = _data()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def residual(p):
        return vpresidual_msereg(eqx.combine(p, static), x, y, alpha1=1e-2, alpha2=1e-3)[0]

    direction = random_direction(model)
    h = 1e-6
    fd = (residual(along(params, direction, h)) - residual(along(params, direction, -h))) / (2 * h)
    _, jvp = jax.jvp(residual, (params,), (direction,))
    np.testing.assert_allclose(jvp, fd, rtol=1e-6, atol=1e-9)
    cotangent = jax.random.normal(jax.random.PRNGKey(7), jvp.shape)
    _, vjp_fn = jax.vjp(residual, params)
    (vjp,) = vjp_fn(cotangent)
    np.testing.assert_allclose(
        float(jnp.vdot(flatten(vjp), flatten(direction))), float(jnp.vdot(cotangent, fd)), rtol=1e-6
    )
    # The partial Jacobian at a fixed readout would differ: the readout's motion matters.
    readout = vpresidual_msereg(model, x, y, alpha2=1e-3)[1]
    fixed = lambda p: jax.vmap(lambda s: readout(eqx.combine(p, static)(s)))(x)  # noqa: E731
    _, partial = jax.jvp(fixed, (params,), (direction,))
    assert float(jnp.max(jnp.abs(partial.ravel() / np.sqrt(N) - jvp[: 2 * N]))) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("jac", [pytest.param("fwd", marks=pytest.mark.slow), "bwd"])
def test_levenberg_marquardt_lowers_the_loss(jac):
    model = mlp(IN, features=M)
    x, y = _data()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def residual(p, args):
        return vpresidual_msereg(eqx.combine(p, static), x, y, alpha2=1e-6)

    solution = optx.least_squares(
        residual,
        optx.LevenbergMarquardt(rtol=1e-8, atol=1e-8),
        params,
        has_aux=True,
        options={"jac": jac},
        max_steps=20,
        throw=False,
    )
    before = vploss_msereg(model, x, y, alpha2=1e-6)[0]
    after = vploss_msereg(eqx.combine(solution.value, static), x, y, alpha2=1e-6)[0]
    assert float(after) < 0.2 * float(before)


def test_errors_are_those_of_the_loss():
    model = mlp(IN, features=M)
    x, y = _data()
    with pytest.raises(ValueError, match="`y`"):
        vpresidual_msereg(model, x, y[:-1])
    with pytest.raises(ValueError, match="alpha2"):
        vpresidual_msereg(model, x, y, alpha2=-1.0)


@pytest.mark.slow
def test_gcv_penalty():
    """With `alpha2="gcv"`, the residual uses the penalty GCV chose (in the stats)."""
    model = mlp(IN, features=M)
    x, y = _data()
    residual, readout = vpresidual_msereg(model, x, y, alpha2="gcv")
    loss, expected = vploss_msereg(model, x, y, alpha2=readout.stats.alpha2)
    assert residual.shape == (N * 2 + (M + 1) * 2,)
    np.testing.assert_allclose(0.5 * jnp.sum(residual**2), loss, rtol=1e-10)
    np.testing.assert_allclose(readout.weight, expected.weight, rtol=1e-10)


@pytest.mark.parametrize(
    "k, kwargs",
    [
        pytest.param(2, {}, marks=pytest.mark.slow),
        pytest.param(1, {"alpha1": 1e-2}, marks=pytest.mark.slow),
        pytest.param(2, {"alpha2": 0.0}, marks=pytest.mark.slow),
        pytest.param(1, {"alpha2": "gcv", "use_bias": False}, marks=pytest.mark.slow),
    ],
)
def test_assembled_jacobian_equals_forward_mode(k, kwargs):
    """`vpjacobian_msereg` (per-sample rows plus the readout's derivative) equals
    `jax.jacfwd` of the residual in the flattened parameters."""
    model = mlp(IN, features=M)
    x, y = _data()
    y = y if k == 2 else y[:, 0]
    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta, unflatten = jax.flatten_util.ravel_pytree(params)
    jacobian, residual, readout = vpjacobian_msereg(model, x, y, **kwargs)
    expected = jax.jacfwd(
        lambda t: vpresidual_msereg(eqx.combine(unflatten(t), static), x, y, **kwargs)[0]
    )(theta)
    np.testing.assert_allclose(jacobian, expected, rtol=0, atol=1e-9 * np.max(np.abs(expected)))
    expected_residual, expected_readout = vpresidual_msereg(model, x, y, **kwargs)
    np.testing.assert_allclose(residual, expected_residual, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(readout.weight, expected_readout.weight, rtol=1e-12)


RESIDUAL_WEIGHTS = jnp.asarray(np.random.default_rng(2).integers(0, 4, N), jnp.float64)


def test_weighted_half_squared_norm_is_the_weighted_loss():
    """Data rows √(w_j/S)(Ŵf̂_j − y_j): ½‖r‖² is the weighted loss, zero weights give
    zero rows, and the residual keeps its length."""
    model = mlp(IN, features=M)
    x, y = _data()
    kwargs = dict(alpha1=1e-2, alpha2=1e-3, weights=RESIDUAL_WEIGHTS)
    residual, readout = eqx.filter_jit(vpresidual_msereg)(model, x, y, **kwargs)
    loss, expected = eqx.filter_jit(vploss_msereg)(model, x, y, **kwargs)
    assert residual.shape == (N * 2 + (M + 1) * 2 + flatten(model).size,)
    np.testing.assert_allclose(0.5 * jnp.sum(residual**2), loss, rtol=1e-12)
    np.testing.assert_allclose(readout.weight, expected.weight, rtol=1e-12)
    assert np.all(np.asarray(residual[: 2 * N]).reshape(N, 2)[RESIDUAL_WEIGHTS == 0] == 0)


@pytest.mark.slow  # a long compile (jacfwd of the residual), as the unweighted test
def test_weighted_jacobian_equals_forward_mode():
    """`vpjacobian_msereg` with weights equals `jax.jacfwd` of the weighted residual
    (a small model, so the compile stays short)."""
    model = mlp(IN, width=4, depth=1, features=3)
    x, y = _data()
    kwargs = dict(alpha2=1e-3, weights=RESIDUAL_WEIGHTS)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    theta, unflatten = jax.flatten_util.ravel_pytree(params)
    jacobian, residual, _ = eqx.filter_jit(vpjacobian_msereg)(model, x, y, **kwargs)
    expected = jax.jit(
        jax.jacfwd(
            lambda t: vpresidual_msereg(eqx.combine(unflatten(t), static), x, y, **kwargs)[0]
        )
    )(theta)
    np.testing.assert_allclose(jacobian, expected, rtol=0, atol=1e-9 * np.max(np.abs(expected)))
    np.testing.assert_allclose(residual, vpresidual_msereg(model, x, y, **kwargs)[0], rtol=1e-12)
