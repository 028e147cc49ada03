"""Where a VarPro step's time goes: the XLA operations of one compiled `value_and_grad`
step of `benchmarks/suite.py`, timed by the JAX profiler, grouped by what they compute.

    python benchmarks/profile_step.py ce 4096 64     # loss (msereg, bce, ce), N, m

The step is the suite's (the same model, warm start and data). It runs a few times
under `jax.profiler.trace`; each XLA operation's time is read from the trace and
attributed by its `op_name` (the JAX transformation path recorded in the compiled HLO):

- feature map: the MLP's forward and backward pass (`eqx.nn.*` in the path);
- inner solve, CG: the conjugate-gradient iterations of Newton–CG (`linear_solve`
  inside the solver's loop);
- inner solve, other: the rest of the solver's loop (objective, gradient, Hessian,
  Cholesky, line search);
- readout and gradient: everything outside the loop (the ridge solve, the checks, the
  loss at the solution and its gradient in the features).

The same is printed for the plain step (MLP and trainable head), then the ten most
expensive operations of the VarPro step with their paths and call counts.
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before JAX loads, as in suite.py

import argparse  # noqa: E402
import collections  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import suite  # noqa: E402


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
        return "inner solve, CG" if cg else "inner solve, other"
    return "readout and gradient"


def profile(step, compiled):
    """`(phase -> ms per call, [(ms per call, calls per call, name, op_name)])` of the
    XLA operations of `step` (a zero-argument callable running `compiled`)."""
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
    microseconds, counts = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in names:
            microseconds[event["name"]] += event.get("dur", 0)
            counts[event["name"]] += 1
    phases = collections.Counter()
    for name, total in microseconds.items():
        phases[_phase(names[name])] += total / CALLS / 1e3
    top = [
        (total / CALLS / 1e3, counts[name] / CALLS, name, names[name])
        for name, total in microseconds.most_common(10)
    ]
    return phases, top


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loss", choices=list(suite.LOSSES))
    parser.add_argument("n", type=int, help="batch size N")
    parser.add_argument("m", type=int, help="features m")
    args = parser.parse_args()
    loss = suite.LOSSES[args.loss]
    model, init = suite.trained(args.loss, args.m, suite.WARMUP_STEPS)
    init = init if loss.warm else None
    x = jax.random.uniform(jax.random.PRNGKey(2), (args.n, 2), jnp.float32, -2.0, 2.0)
    y = loss.labels(x)
    head = eqx.nn.Linear(args.m, loss.outputs, key=jax.random.PRNGKey(3))
    varpro = suite.compile_step(loss.varpro, model, x, y, init, has_aux=True)
    plain = suite.compile_step(suite.plain_loss(loss), (model, head), x, y, has_aux=False)
    stats = varpro[0]()[0][1].stats
    print(f"`{loss.name}`, N = {args.n}, m = {args.m}, float32, {jax.devices()[0].platform}")
    if stats is not None:
        print(f"inner solve: {suite.inner_summary(stats)}")
    results = {"plain": profile(plain[0], plain[2]), "VarPro": profile(varpro[0], varpro[2])}
    print("\n| phase | plain ms | VarPro ms |\n|---|---|---|")
    phases = sorted(set(results["plain"][0]) | set(results["VarPro"][0]))
    for phase in phases + ["total"]:
        cells = [
            sum(result[0].values()) if phase == "total" else result[0].get(phase, 0.0)
            for result in results.values()
        ]
        print(f"| {phase} | {cells[0]:.2f} | {cells[1]:.2f} |")
    print("\n| VarPro op | ms per step | calls per step | op_name |\n|---|---|---|---|")
    for ms, calls, name, op_name in results["VarPro"][1]:
        print(f"| {name} | {ms:.2f} | {calls:g} | `{op_name[-90:]}` |")


if __name__ == "__main__":
    main()
