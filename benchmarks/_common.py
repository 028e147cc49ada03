"""Helpers shared by the benchmark scripts: problems, interleaved timing, warm starts."""

import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


# The peaks surface is the examples' (`examples/_peaks.py`).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from _peaks import peaks as peaks  # noqa: E402


def feature_mlp(width, *, key, dtype=jnp.float32):
    """The feature map of the benchmarks: an MLP 2 → 64 → 64 → `width`, tanh."""
    model = eqx.nn.MLP(2, width, 64, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=key)
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def inside_circle(x):
    """Binary labels: whether each point of `x` `(N, 2)` lies inside the unit circle."""
    return (jnp.sum(x**2, axis=1) < 1).astype(x.dtype)


def angle_classes(x, num_classes):
    """Integer labels in `[0, num_classes)`: the sector of each point's angle, shifted
    by one inside the unit circle."""
    angle = jnp.floor((jnp.arctan2(x[:, 1], x[:, 0]) / jnp.pi + 1) * num_classes / 2)
    return (angle.astype(jnp.int32) + inside_circle(x).astype(jnp.int32)) % num_classes


def interleaved_medians(steps, repeats):
    """Median wall-clock milliseconds of each zero-argument callable in `steps`, called
    once to warm up, then `repeats` times in turn, so that the load of a shared
    machine affects all of them alike."""
    for step in steps.values():
        jax.block_until_ready(step())
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def adam_steps(model, loss, num_steps, learning_rate=1e-3):
    """`num_steps` Adam steps of VarPro training on `loss(model, init) -> (loss,
    readout)`, warm started. Returns the model and the readout fitted before the
    last step (the next step's warm start)."""
    optimiser = optax.adam(learning_rate)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    @eqx.filter_jit
    def step(params, state, init):
        grad_fn = jax.value_and_grad(lambda p: loss(eqx.combine(p, static), init), has_aux=True)
        (_, readout), grads = grad_fn(params)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(params, updates), state, readout

    state = optimiser.init(params)
    readout = None
    for _ in range(num_steps):
        params, state, readout = step(params, state, readout)
    return eqx.combine(params, static), readout
