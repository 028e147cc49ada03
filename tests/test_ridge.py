import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vploss
from vploss import VPLinear, vploss_msereg

from .helpers import (
    along,
    cast,
    directional_derivative_check,
    flatten,
    mlp,
    random_direction,
    repeated,
    ridge_float32_error_bound,
    ridge_reference,
    RIDGE_SOLVERS,
    stacked_coef,
    taylor_remainders,
)


SOLVERS = list(RIDGE_SOLVERS)
N, IN, M = 40, 3, 6


def _data(n=N, k=None, seed=0, dtype=jnp.float64):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, IN), dtype)
    shape = (n,) if k is None else (n, k)
    y = jnp.sin(3 * x[:, :1]).reshape(n, -1)[:, :1] + 0.1 * jax.random.normal(
        ky, shape, dtype
    ).reshape(n, -1)
    return x, y.reshape(shape)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("use_bias", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_loss_and_readout_against_lstsq(solver, k, use_bias):
    model = mlp(IN, features=M)
    x, y = _data(k=k)
    alpha2 = 1e-3
    loss, readout = vploss_msereg(model, x, y, alpha2=alpha2, use_bias=use_bias, solver=solver)
    features = jax.vmap(model)(x)
    ref_loss, ref_coef = ridge_reference(features, y, alpha2, use_bias)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(readout.weight, ref_coef[:M].T, rtol=1e-8, atol=1e-10)
    if use_bias:
        np.testing.assert_allclose(readout.bias, ref_coef[M], rtol=1e-8, atol=1e-10)
    else:
        assert readout.bias is None
    # The readout predicts one sample, shaped like one row of y.
    pred = jax.vmap(lambda xi: readout(model(xi)))(x)
    assert pred.shape == y.shape
    ref_pred = np.asarray(features) @ ref_coef[:M] + (ref_coef[M] if use_bias else 0.0)
    np.testing.assert_allclose(pred, ref_pred.reshape(y.shape), rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_loss_equals_objective_at_readout(solver):
    """The loss is J at the returned readout, with alpha1 over the model's leaves."""
    model = mlp(IN, features=M)
    x, y = _data(k=2)
    alpha1, alpha2 = 0.3, 1e-2
    loss, readout = vploss_msereg(model, x, y, alpha1=alpha1, alpha2=alpha2, solver=solver)
    pred = jax.vmap(lambda xi: readout(model(xi)))(x)
    theta = flatten(model)
    expected = (
        0.5 * np.mean(np.sum((np.asarray(pred) - np.asarray(y)) ** 2, axis=1))
        + 0.5
        * alpha2
        * (np.sum(np.asarray(readout.weight) ** 2) + np.sum(np.asarray(readout.bias) ** 2))
        + 0.5 * alpha1 * theta @ theta
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-10)


@pytest.mark.parametrize(
    "solver", [pytest.param(s, marks=pytest.mark.slow) for s in ("cholesky", "dual")] + ["svd"]
)
def test_gradient_finite_differences_and_taylor(solver):
    model = mlp(IN, features=M)
    n = 4 if solver == "dual" else N  # the dual form is for N < m + 1
    x, y = _data(n=n, k=2)
    loss_fn = lambda m: vploss_msereg(m, x, y, alpha1=1e-2, alpha2=1e-3, solver=solver)[0]  # noqa: E731
    fd, ad = directional_derivative_check(loss_fn, model)
    assert abs(fd - ad) <= 1e-6 * abs(ad)
    remainders = taylor_remainders(loss_fn, model)
    ratios = remainders[:-1] / remainders[1:]
    np.testing.assert_allclose(ratios, 4.0, rtol=0.15)


@pytest.mark.slow
def test_gradients_in_targets_and_alpha2_are_envelope_gradients():
    model = mlp(IN, features=M)
    x, y = _data(k=2)
    alpha2 = jnp.asarray(1e-2)

    def loss_fn(y, alpha2):
        return vploss_msereg(model, x, y, alpha2=alpha2)[0]

    g_y, g_alpha2 = jax.grad(loss_fn, argnums=(0, 1))(y, alpha2)
    _, readout = vploss_msereg(model, x, y, alpha2=alpha2)
    coef = np.concatenate([np.asarray(readout.weight).T, np.asarray(readout.bias)[None]])
    # dL/dalpha2 = ½‖Ŵ*‖², dL/dY = −(F̂Ŵ* − Y)/N.
    np.testing.assert_allclose(g_alpha2, 0.5 * np.sum(coef**2), rtol=1e-10)
    pred = jax.vmap(lambda xi: readout(model(xi)))(x)
    np.testing.assert_allclose(g_y, -(pred - y) / N, rtol=1e-8, atol=1e-14)
    h = 1e-6
    fd = (loss_fn(y, alpha2 + h) - loss_fn(y, alpha2 - h)) / (2 * h)
    np.testing.assert_allclose(g_alpha2, fd, rtol=1e-6)


@pytest.mark.slow
def test_forward_mode_matches_reverse_mode():
    model = mlp(IN, features=M)
    x, y = _data()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss_fn = lambda p: vploss_msereg(eqx.combine(p, static), x, y, alpha2=1e-3)[0]  # noqa: E731
    direction = jax.tree.map(jnp.ones_like, params)
    _, jvp = jax.jvp(loss_fn, (params,), (direction,))
    grad = jax.grad(loss_fn)(params)
    vjp = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(jvp, vjp, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS[:-1] + [pytest.param("dual", marks=pytest.mark.slow)])
def test_rank_deficient_features_give_the_pseudo_inverse(solver):
    """Duplicated and all-zero feature columns with alpha2 = 0: the minimum-norm
    readout, finite loss and gradients."""

    def model(xi):
        f = jnp.tanh(xi @ jnp.arange(1.0, 1.0 + 2 * IN).reshape(IN, 2))
        return jnp.stack([f[0], f[1], f[0], jnp.zeros(()), 2 * f[1]])

    n = 3 if solver == "dual" else N
    x, y = _data(n=n)
    loss, readout = vploss_msereg(model, x, y, alpha2=0.0, solver=solver)
    features = np.c_[np.asarray(jax.vmap(model)(x)), np.ones(n)]
    pinv_coef = np.linalg.pinv(features) @ np.asarray(y)
    ref_loss = 0.5 * np.mean((features @ pinv_coef - np.asarray(y)) ** 2)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-8, atol=1e-14)
    coef = np.r_[np.asarray(readout.weight)[0], np.asarray(readout.bias)]
    if solver == "cholesky":
        # A least-squares solution: the normal equations hold.
        normal = features.T @ (features @ coef - np.asarray(y))
        np.testing.assert_allclose(normal, 0.0, atol=1e-10)
    else:
        np.testing.assert_allclose(coef, pinv_coef, rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda x: vploss_msereg(model, x, y, alpha2=0.0, solver=solver)[0])(x)
    assert np.all(np.isfinite(grad))


@pytest.mark.slow
@pytest.mark.parametrize("solver", SOLVERS)
def test_repeated_singular_values_are_finite(solver):
    """Orthonormal features with equal singular values: no NaN in values or gradients."""
    x = jnp.eye(8)[:, :4] * jnp.sqrt(8.0)  # F̂ᵀF̂/N has a repeated eigenvalue

    def model(xi):
        return xi

    y = jnp.arange(8.0)
    loss, _ = vploss_msereg(model, x, y, alpha2=0.0, use_bias=False, solver=solver)
    grad = jax.grad(
        lambda x: vploss_msereg(model, x, y, alpha2=0.0, use_bias=False, solver=solver)[0]
    )(x)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    ref_loss, _ = ridge_reference(x, y, 0.0, use_bias=False)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)


def _fixed_readout_loss(model, x, y, coef, alpha2):
    """The ridge objective at a given readout `coef = [W, b]ᵀ`."""
    features = jax.vmap(model)(x)
    features = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], 1)
    residual = features @ coef - y
    return 0.5 * jnp.mean(jnp.sum(residual**2, axis=1)) + 0.5 * alpha2 * jnp.sum(coef**2)


FLOAT32_ALPHA2 = 1e-4


@eqx.filter_jit
def _fixed_readout_gradient(model, x, y, coef):
    return eqx.filter_grad(_fixed_readout_loss)(model, x, y, coef, FLOAT32_ALPHA2)


@pytest.fixture(scope="module")
def float32_problem():
    """The float64 reference and error bounds of `test_float32_matches_float64`,
    computed once for its three solvers."""
    model = mlp(IN, features=M)
    x, y = _data(n=200, k=2)
    bound, coef64 = ridge_float32_error_bound(jax.vmap(model)(x), y, FLOAT32_ALPHA2)
    coef64 = jnp.asarray(coef64)
    grad64 = flatten(_fixed_readout_gradient(model, x, y, coef64))
    gradient_jacobian = eqx.filter_jit(
        jax.jacfwd(
            lambda c: jax.flatten_util.ravel_pytree(_fixed_readout_gradient(model, x, y, c))[0]
        )
    )(coef64)
    condition = (
        np.linalg.norm(np.asarray(gradient_jacobian).reshape(grad64.size, -1), 2)
        * np.linalg.norm(coef64)
        / np.linalg.norm(grad64)
    )
    m32, x32, y32 = cast(model, jnp.float32), x.astype(jnp.float32), y.astype(jnp.float32)
    at_coef64 = _fixed_readout_gradient(m32, x32, y32, coef64.astype(jnp.float32))
    evaluation = np.linalg.norm(flatten(at_coef64) - grad64) / np.linalg.norm(grad64)
    return (m32, x32, y32), np.asarray(coef64), grad64, bound, condition, evaluation


@pytest.mark.parametrize(
    "solver", [pytest.param("auto", marks=pytest.mark.slow), "cholesky", "svd"]
)
def test_float32_matches_float64(solver, float32_problem):
    """Float32 is as accurate as the problem's conditioning allows, on any CPU: the
    readout within the least-squares perturbation bound `ridge_float32_error_bound`
    (`eps32·(2κ + κ²η)` = 1.6e-4 here, κ = 110; measured 4e-7 to 5.5e-6), and the
    gradient within that bound times the gradient's condition number in the readout,
    `‖∂g/∂W‖·‖W‖/‖g‖` (the envelope gradient `g = ∂_θ J(W*, θ)` depends on the solve
    only through `W*`), plus twice the error of evaluating the gradient in float32 at
    the exact readout (measured here, 1.2e-5)."""
    (m32, x32, y32), coef64, grad64, bound, condition, evaluation = float32_problem
    loss_fn = lambda m: vploss_msereg(m, x32, y32, alpha2=FLOAT32_ALPHA2, solver=solver)  # noqa: E731
    (loss32, readout32), grad32 = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn, has_aux=True))(
        m32
    )
    assert loss32.dtype == jnp.float32 and readout32.weight.dtype == jnp.float32
    coef32 = np.concatenate([np.asarray(readout32.weight).T, np.asarray(readout32.bias)[None]])
    assert np.linalg.norm(coef32 - coef64) <= bound * np.linalg.norm(coef64)
    grad32 = flatten(grad32)
    # The float32 gradient is the envelope gradient at the float32 readout, up to the
    # rounding of two float32 evaluations of it (measured: equal).
    at_readout32 = flatten(_fixed_readout_gradient(m32, x32, y32, jnp.asarray(coef32)))
    scale = np.linalg.norm(grad64)
    assert np.linalg.norm(grad32 - at_readout32) <= 2 * evaluation * scale
    # Hence close to float64 (a loose bound: cancellation at the envelope makes the
    # gradient ill-conditioned in the readout, about 1.3e3 here; measured errors 3e-6
    # to 2.3e-5 under the AVX-512, AVX2 and SSE4.2 code paths).
    assert np.linalg.norm(grad32 - grad64) <= (condition * bound + 2 * evaluation) * scale


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_dual_equals_primal_when_overparameterised():
    model = mlp(IN, features=12)
    x, y = _data(n=5, k=2)
    for alpha2 in (1e-3, 0.0):
        primal = vploss_msereg(model, x, y, alpha2=alpha2, solver="svd")
        dual = vploss_msereg(model, x, y, alpha2=alpha2, solver="dual")
        auto = vploss_msereg(model, x, y, alpha2=alpha2)
        for loss, readout in (dual, auto):
            np.testing.assert_allclose(loss, primal[0], rtol=1e-8, atol=1e-14)
            np.testing.assert_allclose(readout.weight, primal[1].weight, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_scalar_model_output_and_numpy_inputs():
    """A model returning a scalar counts as m = 1; NumPy inputs are accepted."""
    x = np.linspace(-1.0, 1.0, 20)[:, None]
    y = 3.0 * np.tanh(x[:, 0]) - 1.0
    loss, readout = vploss_msereg(lambda xi: jnp.tanh(xi[0]), x, y, alpha2=0.0)
    np.testing.assert_allclose(readout.weight, [[3.0]], rtol=1e-10)
    np.testing.assert_allclose(readout.bias, [-1.0], rtol=1e-10)
    assert float(loss) < 1e-20
    assert readout(jnp.tanh(0.5)).shape == ()


@pytest.mark.slow  # a long compile; CI runs it after the README's command
def test_jit_and_vmap_over_problems():
    model = mlp(IN, features=M)
    xs = jnp.stack([_data(seed=s)[0] for s in range(3)])
    ys = jnp.stack([_data(seed=s)[1] for s in range(3)])
    loss_fn = lambda x, y: vploss_msereg(model, x, y, alpha2=1e-3)  # noqa: E731
    batched_loss, batched_readout = jax.vmap(loss_fn)(xs, ys)
    jitted = jax.jit(loss_fn)
    for i in range(3):
        loss, readout = jitted(xs[i], ys[i])
        np.testing.assert_allclose(batched_loss[i], loss, rtol=1e-10)
        np.testing.assert_allclose(batched_readout.weight[i], readout.weight, rtol=1e-8)
    grads = jax.vmap(jax.grad(lambda x, y: loss_fn(x, y)[0]))(xs, ys)
    assert grads.shape == xs.shape and np.all(np.isfinite(grads))


@pytest.mark.slow
def test_traced_alpha2_under_filter_jit():
    model = mlp(IN, features=M)
    x, y = _data()
    step = eqx.filter_jit(eqx.filter_value_and_grad(vploss_msereg, has_aux=True))
    (loss, _), _ = step(model, x, y, alpha2=jnp.asarray(1e-3))
    np.testing.assert_allclose(loss, vploss_msereg(model, x, y, alpha2=1e-3)[0], rtol=1e-12)
    with pytest.raises(Exception, match="alpha2"):
        step(model, x, y, alpha2=jnp.asarray(-1.0))


@pytest.mark.slow
def test_optax_training_loop_decreases_the_loss():
    model = mlp(2, width=16, features=16, dtype=jnp.float32)
    x = jax.random.uniform(jax.random.PRNGKey(3), (128, 2), jnp.float32, -2, 2)
    y = jnp.sin(2 * x[:, 0]) * jnp.cos(x[:, 1])
    optimiser = optax.adam(1e-2)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        (loss, readout), grads = eqx.filter_value_and_grad(vploss_msereg, has_aux=True)(model, x, y)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for _ in range(60):
        model, state, loss = step(model, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"y": jnp.ones(7)}, ValueError, r"same batch size.*N = 40.*7"),
        ({"y": jnp.ones((N, 2, 2))}, ValueError, r"shape \(N,\) or \(N, k\).*\(40, 2, 2\)"),
        # `x` may have any dtype the model takes; the features must be real floats.
        (
            {"x": jnp.ones((N, IN), jnp.complex64)},
            TypeError,
            r"`model\(x\[j\]\)` must return real floating-point features.*complex",
        ),
        ({"x": jnp.ones((0, IN)), "y": jnp.ones(0)}, ValueError, r"empty batch"),
        ({"alpha2": -1.0}, ValueError, r"`alpha2` must be finite and >= 0; got -1.0"),
        ({"alpha1": -0.5}, ValueError, r"`alpha1` must be finite and >= 0; got -0.5"),
        ({"alpha2": jnp.ones(2)}, ValueError, r"`alpha2` must be a scalar"),
        ({"alpha2": float("nan")}, ValueError, r"`alpha2` must be finite"),
        ({"solver": "qr"}, ValueError, r"`solver` must be one of .*'qr'"),
        ({"use_bias": 1}, TypeError, r"use_bias"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, error, match):
    args = {"x": _data()[0], "y": _data()[1]}
    args.update(kwargs)
    x, y = args.pop("x"), args.pop("y")
    with pytest.raises(error, match=match):
        vploss_msereg(mlp(IN, features=M), x, y, **args)


def test_model_returning_a_matrix_is_rejected():
    x, y = _data()
    with pytest.raises(ValueError, match=r"shape \(m,\) or a scalar; got shape \(2, 3\)"):
        vploss_msereg(lambda xi: jnp.ones((2, 3)), x, y)


def test_non_finite_data_raise_at_run_time():
    model = mlp(IN, features=M)
    x, y = _data()
    with pytest.raises(Exception, match="not finite"):
        vploss_msereg(model, x.at[3, 0].set(jnp.nan), y)
    with pytest.raises(Exception, match="not finite"):
        eqx.filter_jit(vploss_msereg)(model, x, y.at[0].set(jnp.inf))


def _unchecked_readout(weight, bias, scalar_output=False):
    """A `VPLinear` built without running any check (neither `__check_init__` nor the
    jaxtyping hook's annotation checks), to test `__check_init__` itself."""
    readout = object.__new__(VPLinear)
    for name, value in [
        ("weight", weight),
        ("bias", bias),
        ("scalar_output", scalar_output),
        ("stats", None),
    ]:
        object.__setattr__(readout, name, value)
    return readout


@pytest.mark.parametrize(
    "weight, bias, scalar_output, match",
    [
        (jnp.ones(3), None, False, r"VPLinear.weight must have shape \(k, m\); got shape \(3,\)"),
        (jnp.ones((2, 3)), jnp.ones(3), False, r"VPLinear.bias must have shape \(k,\) = \(2,\)"),
        (jnp.ones((2, 3)), None, True, r"scalar_output=True needs weight of shape \(1, m\)"),
    ],
    ids=["weight-rank-1", "bias-shape", "scalar-output-with-k-2"],
)
def test_readout_validation(weight, bias, scalar_output, match):
    # The readout's own checks, called directly: under the test suite's jaxtyping hook
    # the annotations would reject the first two at construction before they run.
    with pytest.raises(ValueError, match=match):
        VPLinear.__check_init__(_unchecked_readout(weight, bias, scalar_output))
    # Constructed, the hook (a TypeError naming the field) or the check raises.
    with pytest.raises((ValueError, TypeError)):
        VPLinear(weight, bias, scalar_output)


def test_readout_call():
    readout = VPLinear(jnp.ones((2, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"features of one sample, shape \(3,\)"):
        readout(jnp.ones(4))
    np.testing.assert_allclose(readout(jnp.ones(3)), [3.0, 3.0])


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver", [pytest.param(s, marks=pytest.mark.slow) for s in ("cholesky", "dual")] + ["svd"]
)
def test_validation_loss_through_the_readout(solver):
    """The readout carries dŴ*/dθ (implicit function theorem): the gradient of a
    validation error computed from it matches central differences."""
    model = mlp(IN, features=M)
    n = 5 if solver == "dual" else N  # the dual form is for N < m + 1
    x, y = _data(n=n, k=2)
    x_val, y_val = _data(n=15, k=2, seed=3)

    def validation_loss(m):
        _, readout = vploss_msereg(m, x, y, alpha2=1e-3, solver=solver)
        return jnp.mean((jax.vmap(lambda s: readout(m(s)))(x_val) - y_val) ** 2)

    fd, ad = directional_derivative_check(validation_loss, model)
    assert abs(fd - ad) <= 1e-6 * abs(ad)
    # Forward mode agrees with reverse mode.
    direction = random_direction(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    _, jvp = jax.jvp(lambda p: validation_loss(eqx.combine(p, static)), (params,), (direction,))
    np.testing.assert_allclose(jvp, ad, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["cholesky", "svd", "dual"])
def test_readout_jacobian_in_targets_is_the_hat_map(solver):
    """dŴ*ᵀ/dY = (F̂ᵀF̂/N + alpha2 I)⁻¹F̂ᵀ/N, a closed form."""
    model = mlp(IN, features=M)
    x, y = _data(n=N)
    features = np.concatenate([np.asarray(jax.vmap(model)(x)), np.ones((N, 1))], axis=1)
    alpha2 = 1e-2
    expected = np.linalg.solve(features.T @ features / N + alpha2 * np.eye(M + 1), features.T / N)
    weight = lambda y: vploss_msereg(model, x, y, alpha2=alpha2, solver=solver)[1].weight  # noqa: E731
    np.testing.assert_allclose(jax.jacrev(weight)(y)[0], expected[:M], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_second_derivative_of_the_loss():
    """A Hessian-vector product of the reduced loss (forward over reverse) against
    central differences of its gradient: it needs the readout's derivative."""
    model = mlp(IN, features=M)
    x, y = _data(n=N, k=2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grad = jax.grad(lambda p: vploss_msereg(eqx.combine(p, static), x, y, alpha2=1e-3)[0])
    direction = random_direction(model)
    _, hvp = jax.jvp(grad, (params,), (direction,))
    h = 1e-6
    fd = jax.tree.map(
        lambda a, b: (a - b) / (2 * h),
        grad(along(params, direction, h)),
        grad(along(params, direction, -h)),
    )
    np.testing.assert_allclose(flatten(hvp), flatten(fd), rtol=1e-6, atol=1e-8)


# Per-sample weights. Integer weights with zeros: the weighted problem is the data set
# with each sample repeated w_j times, and without the zero-weight ones.
WEIGHTS = np.array([2, 0, 1, 3, 0, 1])


@eqx.filter_jit
def _weighted_value_and_grad(model, x, y, weights, solver, use_bias):
    def loss_fn(m):
        return vploss_msereg(
            m, x, y, alpha2=1e-3, solver=solver, use_bias=use_bias, weights=weights
        )

    return eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver, use_bias",
    [("svd", False)]
    + [
        pytest.param(solver, use_bias, marks=pytest.mark.slow)
        for solver in SOLVERS
        for use_bias in (True, False)
        if (solver, use_bias) != ("svd", False)
    ],
)
def test_weights_repeat_and_drop_samples(solver, use_bias):
    """Integer weights with zeros give the loss, readout and model gradient of the data
    set with each sample repeated w_j times and the zero-weight ones left out (both
    properties at once), for every solver; with the bias, also those of the same
    weights without the zero-weight samples (zero weights alone). 6 samples, 7
    coefficients with the bias: "auto" takes the dual form for the weighted problem,
    the primal one for the repeated data. Measured: equal to 1e-15 relative; 1e-10
    allows for other BLAS builds."""
    model = mlp(IN, features=M)
    x, y = _data(n=len(WEIGHTS), k=2)
    kept = WEIGHTS > 0
    cases = {"repeated": (*map(jnp.asarray, repeated(WEIGHTS, x, y)), None)}
    if use_bias:
        cases["dropped"] = (x[kept], y[kept], jnp.asarray(WEIGHTS[kept]))
    (loss, readout), grad = _weighted_value_and_grad(
        model, x, y, jnp.asarray(WEIGHTS), solver, use_bias
    )
    for name, case in cases.items():
        (other_loss, other_readout), other_grad = _weighted_value_and_grad(
            model, *case, solver, use_bias
        )
        np.testing.assert_allclose(loss, other_loss, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(
            stacked_coef(readout), stacked_coef(other_readout), rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(flatten(grad), flatten(other_grad), rtol=1e-9, atol=1e-12)


def test_weighted_readout_against_scikit_learn():
    """`sklearn.linear_model.Ridge(fit_intercept=False)` on the features with a ones
    column appended (our bias is penalised) and `sample_weight=w` minimises
    `Σ w_j‖r_j‖² + a‖Ŵ‖²`, our objective times 2S with `a = alpha2·S`; and NumPy's
    `lstsq` on the rows scaled by √(w_j/S)."""
    from sklearn.linear_model import Ridge

    model = mlp(IN, features=M)
    x, y = _data(k=2)
    weights = np.random.default_rng(0).uniform(0, 3, N)
    alpha2, use_bias = 1e-2, True
    loss, readout = eqx.filter_jit(vploss_msereg)(
        model, x, y, alpha2=alpha2, weights=jnp.asarray(weights)
    )
    features = np.asarray(jax.vmap(model)(x))
    design = np.c_[features, np.ones(N)]
    ridge = Ridge(alpha=alpha2 * weights.sum(), fit_intercept=False, solver="svd", tol=1e-14)
    ridge.fit(design, np.asarray(y), sample_weight=weights)
    coef = stacked_coef(readout).T
    np.testing.assert_allclose(coef, ridge.coef_, rtol=1e-8, atol=1e-10)
    ref_loss, ref_coef = ridge_reference(features, y, alpha2, use_bias, weights)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(coef, ref_coef.T, rtol=1e-8, atol=1e-10)


def test_weighted_loss_gradient_in_the_weights_is_the_envelope_gradient():
    """The weights are data: dL/dw_j = (½‖r_j‖² − data term)/S at the fitted readout."""
    model = mlp(IN, features=M)
    x, y = _data(k=2)
    weights = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2, N))
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda w: vploss_msereg(model, x, y, alpha2=1e-3, weights=w), has_aux=True
        )
    )
    (_, readout), grad = value_and_grad(weights)
    squares = 0.5 * np.sum((np.asarray(jax.vmap(lambda s: readout(model(s)))(x)) - y) ** 2, 1)
    data = squares @ np.asarray(weights) / float(weights.sum())
    np.testing.assert_allclose(grad, (squares - data) / float(weights.sum()), rtol=1e-8)


@pytest.mark.parametrize(
    "weights, error, match",
    [
        (
            jnp.ones(N - 1),
            ValueError,
            r"`weights` of `vploss_msereg` must have shape \(N,\) = \(40,\)",
        ),
        (np.ones(N, bool), TypeError, r"weights"),
        (jnp.ones(N, jnp.complex64), TypeError, r"weights"),
    ],
    ids=["wrong-length", "bool", "complex"],
)
def test_bad_weights_raise_at_trace_time(weights, error, match):
    x, y = _data()
    with pytest.raises(error, match=match):
        vploss_msereg(mlp(IN, features=M), x, y, weights=weights)


def test_weight_dtype_errors_without_the_type_checker():
    """The library's own messages (the jaxtyping hook rejects bool and complex weights
    by their annotation first)."""
    from vploss._core.checks import as_weights

    with pytest.raises(TypeError, match=r"real dtype \(floating or integer\); got dtype bool"):
        as_weights(np.ones(3, bool), 3, what="`vploss_msereg`")
    with pytest.raises(TypeError, match="got dtype complex64"):
        as_weights(jnp.ones(3, jnp.complex64), 3)
    weights, _ = as_weights(np.arange(3), 3)
    assert weights is not None and jnp.issubdtype(weights.dtype, jnp.floating)


@pytest.mark.slow
@pytest.mark.parametrize(
    "weights, match",
    [
        (jnp.ones(N).at[0].set(-1.0), "must be >= 0"),
        (jnp.ones(N).at[3].set(jnp.nan), "not finite"),
        (jnp.zeros(N), "sum to zero"),
    ],
    ids=["negative", "nan", "all-zero"],
)
def test_bad_weight_values_raise_at_run_time_in_a_gradient_only_step(weights, match):
    """The checks fire in a compiled step returning the model's gradient alone, and in
    `jax.grad` in the weights (the loss's own path: the hostile-input rows)."""
    model = mlp(IN, features=M)
    x, y = _data()
    with pytest.raises(Exception, match=match):
        _model_gradient_alone(model, x, y, weights)
    with pytest.raises(Exception, match=match):
        _weights_gradient_alone(model, x, y, weights)


@eqx.filter_jit
def _model_gradient_alone(model, x, y, weights):
    return eqx.filter_grad(lambda m: vploss_msereg(m, x, y, weights=weights)[0])(model)


@eqx.filter_jit
def _weights_gradient_alone(model, x, y, weights):
    return jax.grad(lambda w: vploss_msereg(model, x, y, weights=w)[0])(weights)


@pytest.mark.slow
@pytest.mark.parametrize("name", RIDGE_SOLVERS)
def test_solver_objects_equal_their_strings(name):
    solver = RIDGE_SOLVERS[name]()
    model = mlp(IN, features=M)
    x, y = _data(n=10, k=2)
    by_name = vploss_msereg(model, x, y, alpha2=1e-3, solver=name)
    by_object = vploss_msereg(model, x, y, alpha2=1e-3, solver=solver)
    np.testing.assert_array_equal(by_name[0], by_object[0])
    np.testing.assert_array_equal(by_name[1].weight, by_object[1].weight)
    # The residual takes objects too.
    residual = vploss.vpresidual_msereg(model, x, y, alpha2=1e-3, solver=solver)[0]
    np.testing.assert_allclose(0.5 * jnp.sum(residual**2), by_name[0], rtol=1e-12)


def test_auto_ridge_picks_by_shape_and_penalty():
    auto = vploss.AutoRidge()
    assert isinstance(auto.select(6, 7, False), vploss.DualRidge)
    assert isinstance(auto.select(7, 7, False), vploss.CholeskyRidge)
    assert isinstance(auto.select(700, 7, True), vploss.SVDRidge)
    assert vploss.CholeskyRidge(refine_steps=1).select(6, 7, True).refine_steps == 1


def test_bad_solvers_raise_clear_errors():
    model = mlp(IN, features=M)
    x, y = _data()
    with pytest.raises(ValueError, match=r"`solver` must be one of .*'qr'"):
        vploss_msereg(model, x, y, solver="qr")
    # A wrong type: the jaxtyping hook's TypeError here, the library's ValueError without.
    with pytest.raises((TypeError, ValueError), match="solver"):
        vploss_msereg(model, x, y, solver=3)
    from vploss._ridge.loss import as_ridge_solver

    with pytest.raises(ValueError, match=r"or a ridge solver object.*got 3"):
        as_ridge_solver(3)
    with pytest.raises(ValueError, match="refine_steps"):
        vploss.CholeskyRidge(refine_steps=-1)


class _Bottleneck(eqx.Module):
    """Features `B tanh(A x)`: rank 2 whatever their number, spanning a subspace
    that turns with the parameters."""

    a: jax.Array
    b: jax.Array

    def __call__(self, x):
        return self.b @ jnp.tanh(self.a @ x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_samples, features, solver",
    # A tall problem solved in the dual; a wide one, where "auto" picks the dual.
    [pytest.param(25, 4, "dual", marks=pytest.mark.slow), (8, 15, "auto")],
)
def test_readout_derivative_when_the_null_space_turns(num_samples, features, solver):
    """The dual readout's derivative needs the kernel's null directions that its value
    drops (`DualRidge`): without them the readout's tangent was 100% off and the
    loss's second derivative 70-160% (the loss and its gradient were right)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(num_samples, IN)))
    y = jnp.asarray(rng.normal(size=(num_samples, 2)))
    b = jnp.asarray(rng.normal(size=(features, 2)))
    a, direction = jnp.asarray(rng.normal(size=(2, IN))), jnp.asarray(rng.normal(size=(2, IN)))

    @jax.jit
    def fit(a):
        return vploss_msereg(_Bottleneck(a, b), x, y, alpha2=0.03, solver=solver)

    gradient = jax.jit(jax.grad(lambda a: fit(a)[0]))

    h = 1e-6
    _, tangent = jax.jvp(lambda a: fit(a)[1].weight, (a,), (direction,))
    difference = (fit(a + h * direction)[1].weight - fit(a - h * direction)[1].weight) / (2 * h)
    np.testing.assert_allclose(tangent, difference, rtol=1e-6, atol=1e-8)
    _, curvature = jax.jvp(gradient, (a,), (direction,))
    difference = (gradient(a + h * direction) - gradient(a - h * direction)) / (2 * h)
    np.testing.assert_allclose(curvature, difference, rtol=1e-6, atol=1e-8)
