import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pytest

from vploss import vploss_ce

from .helpers import directional_derivative_check, logistic_reference, mlp, taylor_remainders


N, K = 60, 3


def _data(seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (N, 3))
    y = (jnp.floor(2 * x[:, 0]) + (x[:, 1] > 0)).astype(jnp.int32) % K
    return x, y


@pytest.mark.parametrize("kind, alpha2", [("integer", 1e-3), ("probabilities", 1e-2)])
def test_matches_numpy_newton(kind, alpha2):
    model = mlp()
    x, y = _data()
    onehot = jax.nn.one_hot(y, K, dtype=jnp.float64)
    if kind == "integer":
        labels, targets = y, onehot
        loss, readout = vploss_ce(model, x, labels, alpha2=alpha2, num_classes=K, gtol=1e-10)
    else:
        targets = 0.8 * onehot + 0.2 / K
        loss, readout = vploss_ce(model, x, targets, alpha2=alpha2, gtol=1e-10)
    features = jax.vmap(model)(x)
    ref_loss, ref_coef = logistic_reference(features, targets, alpha2, softmax=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-8)
    np.testing.assert_allclose(readout.weight, ref_coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(readout.bias, ref_coef[-1], rtol=1e-8, atol=1e-10)
    assert jax.vmap(lambda xi: readout(model(xi)))(x).shape == (N, K)


def test_newton_last_step_below_rounding():
    """As in `vploss_bce`: features of size 5-10, alpha2 = 1, a last Newton step
    below the rounding of the objective (the plain Armijo search stalled at a gradient
    of 2.0e-8, above the default `gtol`)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    features = 8 * jnp.tanh(jax.random.normal(kx, (20, 4)))
    targets = jax.nn.softmax(3 * jax.random.normal(ky, (20, K)), axis=1)
    loss, readout = vploss_ce(lambda f: f, features, targets, alpha2=1.0)
    ref_loss, ref_coef = logistic_reference(features, targets, 1.0, softmax=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-8)
    np.testing.assert_allclose(readout.weight, ref_coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(readout.bias, ref_coef[-1], rtol=1e-8, atol=1e-10)
    assert float(readout.stats.gradient_norm) <= 1.5e-8


@pytest.mark.parametrize("alpha2", [1e-3, 1e-5])
def test_newton_cg_matches_numpy_newton(alpha2):
    model = mlp()
    x, y = _data()
    loss, readout = vploss_ce(
        model, x, y, alpha2=alpha2, num_classes=K, solver="newton-cg", gtol=1e-10
    )
    targets = jax.nn.one_hot(y, K, dtype=jnp.float64)
    ref_loss, ref_coef = logistic_reference(jax.vmap(model)(x), targets, alpha2, softmax=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-8)
    np.testing.assert_allclose(readout.weight, ref_coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(readout.bias, ref_coef[-1], rtol=1e-8, atol=1e-10)
    assert bool(readout.stats.converged)


@pytest.mark.parametrize("alpha2", [1e-2, 1e-4, 1e-6])
def test_newton_cg_float32_converges(alpha2):
    # Nearly separable classes: at small alpha2 the readout is large and the Hessian
    # ill-conditioned, where unpreconditioned float32 CG broke down.
    model = mlp(in_size=2, width=16, features=12, dtype=jnp.float32)
    x = jax.random.uniform(jax.random.PRNGKey(2), (512, 2), jnp.float32, minval=-2, maxval=2)
    angle = jnp.floor((jnp.arctan2(x[:, 1], x[:, 0]) / jnp.pi + 1) * 2)
    y = angle.astype(jnp.int32) % 4
    solve = eqx.filter_jit(
        lambda m, init: vploss_ce(
            m, x, y, alpha2=alpha2, num_classes=4, solver="newton-cg", init=init, throw=False
        )
    )
    _, cold = solve(model, None)
    assert cold.weight.dtype == jnp.float32
    assert bool(cold.stats.converged), cold.stats
    moved = eqx.apply_updates(
        model, jax.tree.map(lambda a: 1e-3 * a, eqx.filter(model, eqx.is_inexact_array))
    )
    _, warm = solve(moved, cold)
    assert bool(warm.stats.converged), warm.stats


def test_envelope_gradient_float64():
    model = mlp()
    x, y = _data()
    loss_fn = eqx.filter_jit(lambda m: vploss_ce(m, x, y, alpha2=1e-3, num_classes=K)[0])
    fd, ad = directional_derivative_check(loss_fn, model)
    assert abs(fd - ad) <= 1e-6 * abs(ad)
    remainders = taylor_remainders(loss_fn, model)
    np.testing.assert_allclose(remainders[:-1] / remainders[1:], 4.0, rtol=0.15)


def test_warm_start_and_non_convergence():
    model = mlp()
    x, y = _data()
    _, cold = vploss_ce(model, x, y, alpha2=1e-3, num_classes=K)
    _, warm = vploss_ce(model, x, y, alpha2=1e-3, num_classes=K, init=cold)
    assert int(warm.stats.num_steps) < int(cold.stats.num_steps)
    _, readout = vploss_ce(model, x, y, alpha2=1e-3, num_classes=K, max_steps=1, throw=False)
    assert not bool(readout.stats.converged)
    with pytest.raises(Exception, match="did not converge"):
        vploss_ce(model, x, y, alpha2=1e-3, num_classes=K, max_steps=1)


def test_label_errors():
    model = mlp()
    x, y = _data()
    with pytest.raises(Exception, match=r"must be in \[0, num_classes\)"):
        vploss_ce(model, x, y + 1, alpha2=1e-2, num_classes=K)
    with pytest.raises(ValueError, match="num_classes"):
        vploss_ce(model, x, y, alpha2=1e-2)
    with pytest.raises(ValueError, match="num_classes"):
        vploss_ce(model, x, y, alpha2=1e-2, num_classes=1)
    with pytest.raises(TypeError, match="integer class labels"):
        vploss_ce(model, x, y.astype(jnp.float64), alpha2=1e-2, num_classes=K)
    probabilities = jax.nn.one_hot(y, K, dtype=jnp.float64)
    with pytest.raises(Exception, match="sum to 1"):
        vploss_ce(model, x, 2 * probabilities, alpha2=1e-2)
    with pytest.raises(ValueError, match="does not match"):
        vploss_ce(model, x, probabilities, alpha2=1e-2, num_classes=K + 1)
    with pytest.raises(ValueError, match="alpha2"):
        vploss_ce(model, x, y, alpha2=-1.0, num_classes=K)


def test_jit_and_vmap():
    model = mlp()
    x, y = _data()
    loss = lambda x, y: vploss_ce(model, x, y, alpha2=1e-2, num_classes=K)[0]
    batched = jax.jit(jax.vmap(loss))(jnp.stack([x, -x]), jnp.stack([y, y]))
    np.testing.assert_allclose(batched[0], loss(x, y), rtol=1e-10)
    np.testing.assert_allclose(batched[1], loss(-x, y), rtol=1e-10)


@pytest.mark.slow
def test_outer_bfgs_trains_the_model_full_batch():
    """Full-batch quasi-Newton training of θ on the reduced loss (optimistix BFGS on
    the envelope gradient): its line search needs exact gradients of the reduced loss,
    and it reaches a stationary point of it."""
    model = mlp()
    x, y = _data()
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def reduced_loss(p, args):
        return vploss_ce(eqx.combine(p, static), x, y, alpha2=1e-2, num_classes=K)[0]

    gradient_norm = lambda p: optx.max_norm(jax.grad(reduced_loss)(p, None))  # noqa: E731
    # The number of steps depends on the CPU's rounding (150 sufficed on one machine,
    # 293 were needed on another): allow plenty, and require that BFGS converged.
    solution = optx.minimise(
        reduced_loss, optx.BFGS(rtol=1e-6, atol=1e-6), params, max_steps=1000, throw=False
    )
    assert solution.result == optx.RESULTS.successful
    # Its Cauchy stopping test (on steps in θ and in the loss) is slower to trigger
    # than the gradient is to vanish: check the gradient too (measured: 3e-9).
    assert float(reduced_loss(solution.value, None)) < 0.7 * float(reduced_loss(params, None))
    assert float(gradient_norm(solution.value)) < 1e-4 * float(gradient_norm(params))


@pytest.mark.slow
def test_validation_loss_through_the_readout_large():
    """Beyond 256 coefficients the readout's derivative solves with the Hessian by
    preconditioned CG on Hessian-vector products: checked against central differences."""
    model = mlp(features=40)  # K(m + 1) = 7 · 41 = 287 coefficients
    x = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
    y = jnp.floor(7 * jax.nn.sigmoid(2 * x[:, 0] + x[:, 1])).astype(jnp.int32)
    x_val = jax.random.normal(jax.random.PRNGKey(5), (20, 3))
    y_val = jnp.floor(7 * jax.nn.sigmoid(2 * x_val[:, 0] + x_val[:, 1])).astype(jnp.int32)

    def validation_loss(m):
        _, readout = vploss_ce(m, x, y, alpha2=1e-2, num_classes=7, gtol=1e-12)
        logits = jax.vmap(lambda s: readout(m(s)))(x_val)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_val))

    fd, ad = directional_derivative_check(validation_loss, model)
    assert abs(fd - ad) <= 1e-6 * abs(ad)
