"""The `peaks` regression problem and its Adam trainings (plain head and
`vploss_msereg`), shared by `peaks_approximation.py` and `outer_second_order.py`."""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from vploss import vploss_msereg


def peaks(x):
    """MATLAB's `peaks` function of a point `x = (a, b)`."""
    a, b = x[..., 0], x[..., 1]
    return (
        3 * (1 - a) ** 2 * jnp.exp(-(a**2) - (b + 1) ** 2)
        - 10 * (a / 5 - a**3 - b**5) * jnp.exp(-(a**2) - b**2)
        - jnp.exp(-((a + 1) ** 2) - b**2) / 3
    )


def feature_map(key, width, depth=2):
    return eqx.nn.MLP(
        2, width, width, depth, activation=jnp.tanh, final_activation=jnp.tanh, key=key
    )


def relative_error(pred, y):
    return jnp.linalg.norm(pred - y) / jnp.linalg.norm(y)


def train_plain(key, data, steps, lr, width, record, depth=2):
    x, y, x_test, y_test = data
    fkey, hkey = jax.random.split(key)
    params = (feature_map(fkey, width, depth), eqx.nn.Linear(width, "scalar", key=hkey))
    predict = lambda p, x: jax.vmap(lambda xi: p[1](p[0](xi)))(x)  # noqa: E731
    optimiser = optax.adam(lr)
    state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(lambda p: 0.5 * jnp.mean((predict(p, x) - y) ** 2))(
            params
        )
        updates, state = optimiser.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    test_error = eqx.filter_jit(lambda p: relative_error(predict(p, x_test), y_test))
    return _loop(step, params, state, steps, record, test_error, f"plain lr={lr:g}")


def train_varpro(key, data, steps, lr, width, alpha2, record, depth=2):
    x, y, x_test, y_test = data
    model = feature_map(key, width, depth)
    optimiser = optax.adam(lr)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    loss_fn = lambda m: vploss_msereg(m, x, y, alpha2=alpha2)  # noqa: E731

    @eqx.filter_jit
    def step(model, state):
        (loss, readout), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    @eqx.filter_jit
    def test_error(model):
        # The loss on the whole training set fits the readout to the current features
        # (as `vploss.refit_readout` does), not the stale one of the last step.
        _, readout = loss_fn(model)
        return relative_error(jax.vmap(lambda xi: readout(model(xi)))(x_test), y_test)

    return _loop(step, model, state, steps, record, test_error, f"VarPro lr={lr:g}")


def _loop(step, params, state, steps, record, test_error, label):
    errors, times = {}, {}
    elapsed = 0.0
    jax.block_until_ready(step(params, state))  # compile outside the timed loop
    for i in tqdm(range(1, steps + 1), desc=label, leave=False, disable=None):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - start
        if i in record:
            errors[i] = float(test_error(params))
            times[i] = elapsed
    return params, errors, times
