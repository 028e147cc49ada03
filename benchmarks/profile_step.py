"""Where a VarPro step's time goes: one compiled `value_and_grad` step of
`benchmarks/suite.py`, split into separately compiled pieces and timed, and its XLA
operations counted by the JAX profiler, grouped by what they compute.

    python benchmarks/profile_step.py ce 4096 64     # loss (msereg, bce, ce), N, m

The step is the suite's (the same model, warm start and data). Wall times (medians,
interleaved) of:

- the plain step (MLP and trainable head) and the VarPro step;
- the feature map alone, forward and backward (`jax.vjp` of the MLP on the batch);
- the readout alone: the VarPro loss and its gradient in the features, on the
  features computed once (what VarPro adds to the feature map), and its forward pass
  (the solve and the checks without the envelope gradient).

Then, from a trace of the VarPro step, how many XLA operations run per step in each
part: the feature map (`eqx.nn.*` in the operation's `op_name`, the JAX path in the
compiled HLO), the inner solver's loop, the conjugate-gradient iterations inside it
(`linear_solve`), and the rest; and the operations run most often. On a CPU the
trace's per-operation durations are not reported: large operations run asynchronously
on the runtime's thread pool, and their events cover only the launch.
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before JAX loads, as in suite.py

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import suite  # noqa: E402
from _common import interleaved_medians  # noqa: E402


CALLS = 5


def _op_names(compiled):
    """`instruction name -> op_name` of a compiled executable's HLO, without the
    control flow (`while`, `conditional`, `call`), whose time is that of the
    operations inside."""
    names = {}
    pattern = re.compile(
        r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(.*metadata=\{[^}]*op_name="([^"]+)"'
    )
    for line in compiled.as_text().splitlines():
        match = pattern.match(line)
        if match and match.group(2) not in ("while", "conditional", "call"):
            names[match.group(1)] = match.group(3)
    return names


def _phase(op_name):
    if "eqx.nn" in op_name:
        return "feature map"
    if "while" in op_name:
        cg = re.search(r"linear_solve\)?/while", op_name)
        return "inner solve, CG iterations" if cg else "inner solve, the rest"
    return "readout and gradient"


def operation_counts(step, compiled):
    """`(phase -> operations per call, [(calls per call, name, op_name)])` of the XLA
    operations that `step` (a zero-argument callable running `compiled`) runs."""
    for _ in range(2):
        jax.block_until_ready(step())
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(CALLS):
                jax.block_until_ready(step())
        (trace,) = pathlib.Path(directory).rglob("*perfetto_trace.json.gz")
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = _op_names(compiled)
    counts = collections.Counter(
        event["name"] for event in events if event.get("ph") == "X" and event.get("name") in names
    )
    phases = collections.Counter()
    for name, count in counts.items():
        phases[_phase(names[name])] += count / CALLS
    top = [(count / CALLS, name, names[name]) for name, count in counts.most_common(8)]
    return phases, top


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("loss", choices=list(suite.LOSSES))
    parser.add_argument("n", type=int, help="batch size N")
    parser.add_argument("m", type=int, help="features m")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per piece")
    args = parser.parse_args()
    loss = suite.LOSSES[args.loss]
    model, init = suite.trained(args.loss, args.m, suite.WARMUP_STEPS)
    init = init if loss.warm else None
    x = jax.random.uniform(jax.random.PRNGKey(2), (args.n, 2), jnp.float32, -2.0, 2.0)
    y = loss.labels(x)
    head = eqx.nn.Linear(args.m, loss.outputs, key=jax.random.PRNGKey(3), dtype=jnp.float32)
    features = jax.vmap(model)(x)

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def feature_map(params, x, cotangent):
        evaluate = lambda p: jax.vmap(eqx.combine(p, static))(x)
        return jax.vjp(evaluate, params)[1](cotangent)

    def readout(model, features, y, init):  # `model` is the identity on the features
        return loss.varpro(model, features, y, init)

    identity = eqx.nn.Identity()
    varpro, _, varpro_compiled = suite.compile_step(loss.varpro, model, x, y, init, has_aux=True)
    steps = {
        "plain step": suite.compile_step(
            suite.plain_loss(loss), (model, head), x, y, has_aux=False
        )[0],
        "VarPro step": varpro,
        "feature map, forward and backward": functools.partial(
            eqx.filter_jit(feature_map), params, x, jnp.ones_like(features)
        ),
        "readout: loss and gradient in the features": functools.partial(
            eqx.filter_jit(jax.value_and_grad(lambda f, *a: readout(identity, f, *a)[0])),
            features,
            y,
            init,
        ),
        "readout: loss alone (solve and checks)": functools.partial(
            eqx.filter_jit(readout), identity, features, y, init
        ),
    }
    times = interleaved_medians(steps, args.repeats)
    stats = varpro()[0][1].stats
    print(f"`{loss.name}`, N = {args.n}, m = {args.m}, float32, {jax.devices()[0].platform}")
    if stats is not None:
        print(f"inner solve (steps, CG iterations, converged): {suite.inner_summary(stats)}")
    print("\n| piece | ms | / plain step |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} | {ms / times['plain step']:.2f} |")
    phases, top = operation_counts(varpro, varpro_compiled)
    print("\n| part of the VarPro step | operations run |\n|---|---|")
    for phase, count in sorted(phases.items()):
        print(f"| {phase} | {count:.0f} |")
    print("\n| operation | runs per step | op_name |\n|---|---|---|")
    for count, name, op_name in top:
        print(f"| {name} | {count:g} | `{op_name[-90:]}` |")


if __name__ == "__main__":
    main()
