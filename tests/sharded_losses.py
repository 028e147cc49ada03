"""Every loss on a batch sharded over 4 CPU devices, against the same loss unsharded.

Run by `tests/test_sharding.py` in a subprocess, because the device count must be set
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`) before JAX starts. For each case
it prints one JSON line: the largest relative difference of the loss and gradients
between the sharded and the unsharded run, the collectives of the compiled sharded
program, and the shapes in it with a dimension of the full batch size (an array that
holds the whole batch on one device).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.sharded_losses
"""

import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import vploss

from .helpers import READOUT_CASES


jax.config.update("jax_enable_x64", True)

# A batch size that no other dimension of the problems equals, so any array with a
# dimension of this size holds the full batch.
N = 96
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _mlp(features):
    key = jax.random.PRNGKey(0)
    return eqx.nn.MLP(3, features, 8, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=key)


def _cases():
    x = jax.random.normal(jax.random.PRNGKey(1), (N, 3))
    regression = jnp.sin(x[:, 0]) + 0.1 * x[:, 1]
    icnn = vploss.ICNN(3, 5, 6, 2, key=jax.random.PRNGKey(2))
    ridge = lambda solver, alpha2: (
        lambda m, x, y: vploss.vploss_msereg(m, x, y, alpha2=alpha2, solver=solver)[0]
    )
    readout_losses = {
        case.function.__name__: (
            _mlp(6),
            x,
            case.labels(regression),
            lambda m, x, y, case=case: case(m, x, y, alpha2=1e-3)[0],
        )
        for case in READOUT_CASES.values()
    }
    return {
        "vploss_msereg": (_mlp(6), x, regression, ridge("auto", 1e-3)),
        # The documented choice for a sharded batch with alpha2 = 0, where "auto"
        # would pick the SVD of the tall matrix.
        "vploss_msereg cholesky alpha2=0": (_mlp(6), x, regression, ridge("cholesky", 0.0)),
        # The kernel form needs all rows at once: this case must gather.
        "vploss_msereg dual": (_mlp(6), x, regression, ridge("dual", 1e-3)),
        **readout_losses,
        "vploss_cpflow": (
            icnn,
            x,
            regression,
            lambda m, x, y: vploss.vploss_cpflow(m, x, alpha2=1e-3)[0],
        ),
    }


def _relative_difference(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _value_and_grad(loss, static):
    @jax.jit
    def value_and_grad(params, x, y):
        return jax.value_and_grad(lambda p: loss(eqx.combine(p, static), x, y))(params)

    return value_and_grad


def main():
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    for name, (model, x, y, loss) in _cases().items():
        params, static = eqx.partition(model, eqx.is_inexact_array)

        value_and_grad = _value_and_grad(loss, static)
        sharded = (
            jax.device_put(params, replicated),
            jax.device_put(x, batch),
            jax.device_put(y, batch),
        )
        reference = jax.tree.leaves(value_and_grad(params, x, y))
        result = jax.tree.leaves(value_and_grad(*sharded))
        hlo = value_and_grad.lower(*sharded).compile().as_text()
        collectives = sorted(
            {op for op in COLLECTIVES for line in hlo.splitlines() if f" {op}(" in line}
        )
        shapes = set(re.findall(r"\w+\[[\d,]*\]", hlo))
        full_batch = sorted(s for s in shapes if str(N) in s[s.index("[") + 1 : -1].split(","))
        record = {
            "name": name,
            "difference": max(map(_relative_difference, result, reference)),
            "collectives": collectives,
            "full_batch_shapes": full_batch,
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
