"""Compile time: the first call of a training step with each VarPro loss against the
first call of a plain step with a trainable linear head on the same task.

Each row runs in a fresh Python process (JAX's caches empty, nothing compiled yet, the
persistent compilation cache off) and reports

- **first call s**: the CPU seconds of the first call of the jitted training step
  (`eqx.filter_jit` of `eqx.filter_value_and_grad` of the loss and an Adam update,
  returning the loss and the readout with its stats): tracing, lowering, compiling
  and running it once; for `refit_readout`, the first call over a list of
  `NUM_BATCHES` batches; for `least_squares`, the first call with `max_steps=1`. CPU
  time (of the process, all its threads), not wall time, so that the other load of a
  shared machine does not count; it is what the first call costs on a quiet core;
- **ratio to plain**: first call / the first call of the plain step of the same task,
  measured in the same run;
- **first call wall s**: the same call's wall-clock seconds (the load included);
- **steady ms**: the median CPU milliseconds of the following calls (compiled);
- **trace s, compile s**: for the jitted steps, the same function traced and lowered
  (`jax.jit(step).trace(...).lower()`) and compiled (`.compile()`) apart, in CPU
  seconds, in the same process after the first call (JAX's caches cleared, so
  one-off costs of the process, e.g. loading LAPACK, are in the first call only); and
  the number of lines of its StableHLO text, a measure of the program's size.

Tasks on N random points of [-2, 2]² with the feature map of the other benchmarks (an
MLP 2 → 64 → 64 → m, tanh, float32): regression (MATLAB's `peaks`; plain step: mean
squared error), binary (inside the unit circle; sigmoid cross-entropy), classification
(K = 10 sectors; softmax cross-entropy), counts (Poisson draws; Poisson
log-likelihood), and density (the arc of `tests/test_cpflow.py` with an `vploss.ICNN`
2 → m; plain step: the same convex potential flow with its readout `(w, c, a)` trained
by gradient descent, `w, c` through a softplus). The iterative losses are warm started
from the previous step's readout (as in `docs/getting_started.md`), the first call from
a zero readout.

    python benchmarks/compile_time.py             # N = 512, m = 32, 20 timed steps
    python benchmarks/compile_time.py --quick     # N = 128, m = 8, 3 timed steps
    python benchmarks/compile_time.py --rows ce ce-plain

OpenBLAS is single-threaded unless `OPENBLAS_NUM_THREADS` is set (see `ridge_step.py`).
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before JAX loads

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import NamedTuple  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import angle_classes, feature_mlp, inside_circle, peaks  # noqa: E402

import vploss  # noqa: E402


NUM_CLASSES = 10
NUM_BATCHES = 4  # the batches of `refit_readout`
RIDGE_ALPHA2 = 1e-6
ALPHA2 = 1e-4
FLOW_ALPHA2 = 1e-3


class Squared(vploss.AbstractReadoutLoss):
    """½‖z − y‖², the loss of your own that `vploss_glm` takes (`adding_a_loss.md`)."""

    name = "a squared loss"

    def labels(self, y, num_samples):
        return vploss.Labels(y.reshape(num_samples, -1), y.ndim == 1, jnp.array(False), "")

    def loss(self, logits, labels):
        return 0.5 * jnp.sum((logits - labels) ** 2, axis=1)

    def curvature(self, logits, labels):
        return vploss.Curvature(jnp.ones_like(logits), None)

    def basis(self, num_outputs):
        return None


def counts(x):
    """Poisson counts of rate `exp(sin x₁ + x₂/2)`."""
    rate = jnp.exp(jnp.sin(x[:, 0]) + 0.5 * x[:, 1])
    return jax.random.poisson(jax.random.PRNGKey(3), rate).astype(x.dtype)


def classes(x):
    """`NUM_CLASSES` sectors of the angle, shifted by one inside the unit circle."""
    return angle_classes(x, NUM_CLASSES)


def arc(x):
    """The density task's samples (`x` only sets their number): a noisy arc."""
    n = x.shape[0]
    t = jax.random.uniform(jax.random.PRNGKey(4), (n,), maxval=np.pi)
    points = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=1)
    return points - points.mean(0) + 0.1 * jax.random.normal(jax.random.PRNGKey(5), (n, 2))


class Task(NamedTuple):
    labels: object  # x -> y
    outputs: object  # the plain head's outputs: "scalar", K, or None (the flow's readout)
    plain: object  # the plain step's loss of (predictions, y)


def _sigmoid_ce(logits, y):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))


def _softmax_ce(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _poisson(logits, y):
    return jnp.mean(jnp.exp(logits) - y * logits)


TASKS = {
    "regression": Task(peaks, "scalar", lambda pred, y: 0.5 * jnp.mean((pred - y) ** 2)),
    "binary": Task(inside_circle, "scalar", _sigmoid_ce),
    "classification": Task(classes, NUM_CLASSES, _softmax_ce),
    "counts": Task(counts, "scalar", _poisson),
    "density": Task(arc, None, None),
}


class Row(NamedTuple):
    label: str
    task: str
    kind: str  # "plain", "flow-plain", "step" (a VarPro loss), "refit", "least-squares"
    loss: object = None  # (model, x, y, init) -> (loss, readout), or refit's loss
    warm: bool = False  # whether the step passes the previous readout as `init`


def _glm(function, **options):
    return lambda m, x, y, init: function(m, x, y, alpha2=ALPHA2, init=init, **options)


ROWS = {
    "msereg-plain": Row("plain head, MSE", "regression", "plain"),
    "msereg": Row(
        "`vploss_msereg`",
        "regression",
        "step",
        lambda m, x, y, init: vploss.vploss_msereg(m, x, y, alpha2=RIDGE_ALPHA2),
    ),
    "msereg-gcv": Row(
        '`vploss_msereg`, `alpha2="gcv"`',
        "regression",
        "step",
        lambda m, x, y, init: vploss.vploss_msereg(m, x, y, alpha2="gcv"),
    ),
    "glm": Row(
        "`vploss_glm` (a squared loss)",
        "regression",
        "step",
        _glm(functools.partial(vploss.vploss_glm, Squared())),
        True,
    ),
    "refit-msereg": Row(
        "`refit_readout`, `vploss_msereg`", "regression", "refit", vploss.vploss_msereg
    ),
    "least-squares": Row("`least_squares`, one step", "regression", "least-squares"),
    "bce-plain": Row("plain head, sigmoid CE", "binary", "plain"),
    "bce": Row("`vploss_bce`", "binary", "step", _glm(vploss.vploss_bce), True),
    "ce-plain": Row("plain head, softmax CE", "classification", "plain"),
    "ce": Row(
        "`vploss_ce`",
        "classification",
        "step",
        _glm(vploss.vploss_ce, num_classes=NUM_CLASSES),
        True,
    ),
    "ce-budgeted": Row(
        '`vploss_ce`, `"budgeted-newton-cg"`',
        "classification",
        "step",
        _glm(vploss.vploss_ce, num_classes=NUM_CLASSES, solver="budgeted-newton-cg"),
        True,
    ),
    "refit-ce": Row("`refit_readout`, `vploss_ce`", "classification", "refit", vploss.vploss_ce),
    "poisson-plain": Row("plain head, Poisson", "counts", "plain"),
    "poisson": Row("`vploss_poisson`", "counts", "step", _glm(vploss.vploss_poisson), True),
    "cpflow-plain": Row("plain convex potential flow", "density", "flow-plain"),
    "cpflow": Row(
        "`vploss_cpflow`",
        "density",
        "step",
        lambda m, x, y, init: vploss.vploss_cpflow(m, x, alpha2=FLOW_ALPHA2, init=init),
        True,
    ),
}
# The row of each task that the others are divided by.
BASELINES = {
    "regression": "msereg-plain",
    "binary": "bce-plain",
    "classification": "ce-plain",
    "counts": "poisson-plain",
    "density": "cpflow-plain",
}


def _zero_readout(task, m):
    """A readout with zero coefficients: the first call's warm start, of the structure
    of the ones the step returns (without their stats)."""
    if task.outputs is None:  # the density task's flow
        return vploss.CPFlow(jnp.zeros(m), jnp.zeros(()), jnp.zeros(2))
    k = 1 if task.outputs == "scalar" else task.outputs
    return vploss.VPLinear(jnp.zeros((k, m)), jnp.zeros(k), task.outputs == "scalar")


def _plain_flow(m, key):
    """The density task's plain model: the ICNN and a trainable flow readout, `w` and
    `c` through a softplus."""
    model = vploss.ICNN(2, m, 64, 2, key=key)
    return model, (jnp.zeros(m), jnp.zeros(()), jnp.zeros(2))


def _flow_nll(model_and_readout, x):
    """The plain flow's loss: the mean negative log-likelihood and the readout penalty
    of `vploss_cpflow`."""
    model, (raw_weight, raw_quadratic, linear) = model_and_readout
    flow = vploss.CPFlow(jax.nn.softplus(raw_weight), jax.nn.softplus(raw_quadratic), linear)
    log_probs = jax.vmap(flow.log_prob, in_axes=(None, 0))(model, x)
    penalty = 0.5 * FLOW_ALPHA2 * sum(jnp.sum(a**2) for a in (flow.weight, flow.linear))
    return -jnp.mean(log_probs) + penalty + 0.5 * FLOW_ALPHA2 * flow.quadratic**2


def _without_stats(readout):
    return eqx.tree_at(lambda r: r.stats, readout, None, is_leaf=lambda leaf: leaf is None)


def _training_step(row, task, model, x, y, m):
    """The jitted step `(params, state, init) -> (params, state, init, (loss,
    readout))` of the row and its first arguments. Like the training loop of
    `docs/getting_started.md` it returns the loss and the readout with its stats; the
    next warm start is that readout without its stats (of the first call's structure)."""
    optimiser = optax.adam(1e-3)
    if row.kind == "plain":
        head = eqx.nn.Linear(model.out_size, task.outputs, key=jax.random.PRNGKey(6))
        model = (model, head)

        def loss_fn(mdl, init):
            predictions = jax.vmap(lambda xj: mdl[1](mdl[0](xj)))(x)
            return task.plain(predictions, y), None

    elif row.kind == "flow-plain":

        def loss_fn(mdl, init):
            return _flow_nll(mdl, x), None

    else:

        def loss_fn(mdl, init):
            return row.loss(mdl, x, y, init)

    params, static = eqx.partition(model, eqx.is_inexact_array)

    @eqx.filter_jit
    def step(params, state, init):
        grad_fn = eqx.filter_value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), init), has_aux=True
        )
        (loss, readout), grads = grad_fn(params)
        updates, state = optimiser.update(grads, state, params)
        next_init = _without_stats(readout) if row.warm else init
        return eqx.apply_updates(params, updates), state, next_init, (loss, readout)

    init = _zero_readout(task, m) if row.warm else None
    return step, (params, optimiser.init(params), init)


def _seconds(call):
    """The wall-clock and CPU seconds of `call()` (run to completion), and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(call())
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _problem(row, n, m):
    task = TASKS[row.task]
    x = jax.random.uniform(jax.random.PRNGKey(1), (n, 2), jnp.float32, -2.0, 2.0)
    y = task.labels(x)
    if row.task == "density":
        x, y = y, None
        if row.kind == "flow-plain":
            return task, _plain_flow(m, jax.random.PRNGKey(0)), x, y
        return task, vploss.ICNN(2, m, 64, 2, key=jax.random.PRNGKey(0)), x, y
    return task, feature_mlp(m, key=jax.random.PRNGKey(0)), x, y


def measure(name, n, m, repeats):
    """One row in this process: the first call's wall and CPU seconds, the median CPU
    milliseconds of the next `repeats` calls and, for a jitted step, its trace and
    compile CPU seconds and StableHLO lines."""
    row = ROWS[name]
    task, model, x, y = _problem(row, n, m)
    jax.block_until_ready((model, x, y))
    if row.kind in ("refit", "least-squares"):
        if row.kind == "refit":
            batches = list(zip(jnp.split(x, NUM_BATCHES), jnp.split(y, NUM_BATCHES), strict=True))
            options = {"num_classes": NUM_CLASSES} if row.task == "classification" else {}
            alpha2 = RIDGE_ALPHA2 if row.task == "regression" else ALPHA2
            call = lambda: vploss.refit_readout(
                model, batches, loss=row.loss, alpha2=alpha2, **options
            )
        else:
            call = lambda: vploss.least_squares(model, x, y, max_steps=1).model
        first_wall, first_cpu, _ = _seconds(call)
        steady = [_seconds(call)[1] for _ in range(repeats)]
    else:
        step, args = _training_step(row, task, model, x, y, m)
        first_wall, first_cpu, out = _seconds(lambda: step(*args))
        steady = []
        for _ in range(repeats):
            _, cpu, out = _seconds(lambda a=out[:3]: step(*a))
            steady.append(cpu)
    result = {"first_wall_s": first_wall, "first_s": first_cpu}
    result["steady_ms"] = 1e3 * float(np.median(steady))
    if row.kind in ("refit", "least-squares"):
        return result
    # The same step traced and lowered, then compiled, from empty caches.
    jax.clear_caches()
    arrays, static = eqx.partition(args, eqx.is_array)
    start = time.process_time()
    lowered = jax.jit(lambda a: step(*eqx.combine(a, static))).trace(arrays).lower()
    result["trace_s"] = time.process_time() - start
    start = time.process_time()
    lowered.compile()
    result["compile_s"] = time.process_time() - start
    result["hlo_lines"] = lowered.as_text().count("\n")
    return result


def run_row(name, args):
    """`measure` in a fresh process; its result."""
    command = [sys.executable, __file__, "--row", name, "--n", str(args.n), "--m", str(args.m)]
    command += ["--repeats", str(args.repeats)]
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false"}
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"row {name} failed:\n{output.stdout[-3000:]}{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


TABLE_HEADER = (
    "| task | step | first call s | ratio to plain | first call wall s | steady ms "
    "| trace s | compile s | HLO lines |"
)


def table_row(row, result, baseline):
    def optional(key, spec):
        return "-" if key not in result else format(result[key], spec)

    return (
        f"| {row.task} | {row.label} | {result['first_s']:.2f} | "
        f"{result['first_s'] / baseline['first_s']:.2f} | {result['first_wall_s']:.2f} | "
        f"{result['steady_ms']:.2f} | {optional('trace_s', '.2f')} | "
        f"{optional('compile_s', '.2f')} | {optional('hlo_lines', 'd')} |"
    )


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="N = 128, m = 8, 3 timed steps")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--n", type=int, help="samples (default 512, quick 128)")
    parser.add_argument("--m", type=int, help="features (default 32, quick 8)")
    parser.add_argument("--repeats", type=int, help="timed steady calls (default 20, quick 3)")
    parser.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n = args.n or (128 if args.quick else 512)
    args.m = args.m or (8 if args.quick else 32)
    args.repeats = args.repeats or (3 if args.quick else 20)
    if args.row is not None:  # one row, in the process `run_row` started
        print(json.dumps(measure(args.row, args.n, args.m, args.repeats)))
        return

    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__}, {platform}, N = {args.n}, m = {args.m}, ", end="")
    print(f"repeats {args.repeats}, OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}\n")
    print(TABLE_HEADER)
    print("|" + "---|" * (TABLE_HEADER.count("|") - 1))
    tasks = {ROWS[name].task for name in args.rows}
    names = [BASELINES[t] for t in TASKS if t in tasks]
    names += [name for name in args.rows if name not in names]
    results = {}
    for task in TASKS:
        for name in names:
            if ROWS[name].task != task:
                continue
            results[name] = run_row(name, args)
            baseline = results[BASELINES[task]]
            print(table_row(ROWS[name], results[name], baseline), flush=True)


if __name__ == "__main__":
    main()
