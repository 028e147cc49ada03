"""Mini-batch training with a plain head, a per-batch VarPro readout and the stochastic
readouts (`vploss.SlimTik` for least squares, `vploss.WindowedReadout` for softmax).
`mnist1d` also runs `vp-budget`: the per-batch softmax readout solved inexactly by
`vploss.BudgetedNewtonCG()` (one Newton–CG update of at most 10 CG iterations per
step), warm-started from the previous step's readout.

Three experiments, each over 3 seeds (medians), all methods timed in the same run:

- `peaks`: the peaks regression (2048 training points, MLP 2 → 64 → 64 → 64, tanh) in
  mini-batches of 32 and 256. Plain Adam's test error after 2000 steps (at its best
  learning rate) is the target; reported: the steps and the training seconds each method
  needs to reach it, and their ratios to plain Adam's.
- `mnist1d`: MNIST-1D (the `mnist1d` package's default data set, generated offline: 4000
  training and 1000 test signals of length 40, 10 classes), batches of 128, with an MLP
  40 → 100 → 100 → 32 and a small 1-D CNN feature map: held-out accuracy against
  training time, and the cost of a step relative to a plain step.
- `grid`: the sensitivity to the learning rate and the readout penalty on scikit-learn's
  digits (batches of 128, MLP 64 → 64 → 16, tanh): the final test accuracy of each cell
  (the worse of 2 seeds after 6000 steps), and whether it diverged (a non-finite loss,
  or accuracy below 20%); `--adam-eps 1e-4` repeats it with Adam's eps raised.

Learning rates are tuned per method on a grid (the best final test metric of seed 0),
so each method is compared at its own best, as a user would run it.

Usage: `python benchmarks/stochastic.py {peaks,mnist1d,grid} [--quick]
[--methods M ...]`; `--quick` runs a few steps of each on one seed (a smoke test, not a
measurement); `--methods` (mnist1d only) restricts the methods run.
"""

import argparse
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import peaks

import vploss


# Steps per compiled chunk (a `lax.scan`): the test metric is recorded after each.
CHUNK = 50


class Problem(eqx.Module):
    """Training and test data of one experiment, and what its loss is."""

    x: Any
    y: Any
    x_test: Any
    y_test: Any
    num_classes: int | None = eqx.field(static=True)  # None: least squares


def _mean_loss(problem, predictions, y):
    if problem.num_classes is None:
        return 0.5 * jnp.mean((predictions - y) ** 2)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(predictions, y))


def _metric(problem, predictions):
    """Relative test error (least squares; lower is better) or accuracy (higher)."""
    if problem.num_classes is None:
        return jnp.linalg.norm(predictions - problem.y_test) / jnp.linalg.norm(problem.y_test)
    return jnp.mean(jnp.argmax(predictions, axis=1) == problem.y_test)


def _refit(problem, net, alpha2):
    """The readout fitted on the whole training set for the current features (a
    user's last step before prediction; for every method, the plain network's too)."""
    if problem.num_classes is None:
        return vploss.vploss_msereg(net, problem.x, problem.y, alpha2=alpha2)[1]
    return vploss.vploss_ce(
        net, problem.x, problem.y, alpha2=alpha2, num_classes=problem.num_classes, throw=False
    )[1]


def trainer(
    method: str,
    problem: Problem,
    model,
    lr: float,
    alpha2: float,
    memory: int,
    batch: int,
    eps: float = 1e-8,
):
    """`(carry, run_chunk, evaluate)` of one method: `run_chunk(carry, indices)` takes
    `CHUNK` Adam steps on the batches `x[indices[i]]` (compiled once), and
    `evaluate(carry)` gives the test metric of the current network and head."""
    optimiser = optax.adam(lr, eps=eps)
    k = 1 if problem.num_classes is None else problem.num_classes
    num_features = jax.eval_shape(model, problem.x[0]).shape[0]
    x0, y0 = problem.x[:batch], problem.y[:batch]
    if method == "plain":
        head = eqx.nn.Linear(num_features, "scalar" if k == 1 else k, key=jax.random.PRNGKey(7))
        params = (model, head)

        def loss_fn(params, xb, yb, state):
            net, head = params
            return _mean_loss(problem, jax.vmap(lambda xi: head(net(xi)))(xb), yb), (head, state)

        readout_state = None
    else:
        params = model
        if method in ("per-batch", "vp-budget"):
            solver = vploss.BudgetedNewtonCG() if method == "vp-budget" else "auto"
            if problem.num_classes is None:

                def loss_fn(net, xb, yb, state):
                    loss, readout = vploss.vploss_msereg(net, xb, yb, alpha2=alpha2)
                    return loss, (readout, state)

                readout_state = None
            else:

                def loss_fn(net, xb, yb, state):
                    loss, readout = vploss.vploss_ce(
                        net,
                        xb,
                        yb,
                        alpha2=alpha2,
                        num_classes=k,
                        init=state,
                        solver=solver,
                        throw=False,
                    )
                    return loss, (readout, readout)

                readout_state = vploss.vploss_ce(model, x0, y0, alpha2=alpha2, num_classes=k)[1]
        else:
            if problem.num_classes is None:
                rule = vploss.SlimTik(memory=memory)
            else:
                rule = vploss.WindowedReadout(
                    vploss.SoftmaxCrossEntropy(num_classes=k), memory=memory, throw=False
                )
            readout_state = rule.init(model, x0, y0)

            def loss_fn(net, xb, yb, state):
                loss, (readout, state) = rule.update(net, xb, yb, state)
                return loss, (readout, state)

    opt_state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
    # The readout of a first batch, so that the carry has its final structure (no
    # second compilation) and the state is not advanced.
    first_readout = eqx.filter_jit(loss_fn)(params, x0, y0, readout_state)[1][0]
    carry = (params, opt_state, readout_state, first_readout)

    @eqx.filter_jit
    def run_chunk(carry, indices):
        params, opt_state, state, _ = carry
        # A scan carries arrays only: the activation functions are static.
        dynamic, static = eqx.partition(params, eqx.is_array)

        def step(inner, index):
            dynamic, opt_state, state = inner
            params = eqx.combine(dynamic, static)
            (loss, (readout, state)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
                params, problem.x[index], problem.y[index], state
            )
            updates, opt_state = optimiser.update(grads, opt_state, params)
            dynamic = eqx.filter(eqx.apply_updates(params, updates), eqx.is_array)
            return (dynamic, opt_state, state), (loss, readout)

        (dynamic, opt_state, state), (losses, readouts) = jax.lax.scan(
            step, (dynamic, opt_state, state), indices
        )
        last = jax.tree.map(lambda a: a[-1], readouts)
        return (eqx.combine(dynamic, static), opt_state, state, last), losses

    @eqx.filter_jit
    def evaluate(carry, refit=False):
        params, _, _, readout = carry
        net = params[0] if method == "plain" else params
        if refit:
            readout = _refit(problem, net, alpha2)
        predictions = jax.vmap(lambda xi: readout(net(xi)))(problem.x_test)
        return _metric(problem, predictions)

    return carry, run_chunk, evaluate


def train(method, problem, model, lr, steps, seed, *, alpha2=1e-3, memory=8, batch=128, eps=1e-8):
    """Trains for `steps` (a multiple of `CHUNK`); returns `(steps, seconds, metric,
    refit metric)` rows after each chunk (seconds: training only, compilation excluded;
    the refit metric, with the readout fitted on the whole training set, at every chunk
    for least squares and at the end for classification) and whether it diverged (a
    non-finite loss)."""
    carry, run_chunk, evaluate = trainer(method, problem, model, lr, alpha2, memory, batch, eps)
    indices = jax.random.randint(
        jax.random.PRNGKey(1000 + seed), (steps // CHUNK, CHUNK, batch), 0, problem.x.shape[0]
    )
    jax.block_until_ready(run_chunk(carry, indices[0]))  # compile outside the timing
    rows, elapsed, diverged = [], 0.0, False
    for i, chunk in enumerate(indices):
        start = time.perf_counter()
        carry, losses = run_chunk(carry, chunk)
        jax.block_until_ready(losses)
        elapsed += time.perf_counter() - start
        metric = float(evaluate(carry))
        last = i == len(indices) - 1
        refit = float(evaluate(carry, True)) if last or problem.num_classes is None else np.nan
        if not (np.all(np.isfinite(np.asarray(losses))) and np.isfinite(metric)):
            diverged = True
            rows.append(((i + 1) * CHUNK, elapsed, np.nan, np.nan))
            break
        rows.append(((i + 1) * CHUNK, elapsed, metric, refit))
    return rows, diverged


def step_cost(method, problem, model, lr, *, alpha2=1e-3, memory=8, batch=128, repeats=5):
    """Median seconds of one chunk of `CHUNK` steps (compiled; the machine's load
    affects all methods alike when they are measured in turn)."""
    carry, run_chunk, _ = trainer(method, problem, model, lr, alpha2, memory, batch)
    indices = jax.random.randint(jax.random.PRNGKey(0), (CHUNK, batch), 0, problem.x.shape[0])
    jax.block_until_ready(run_chunk(carry, indices))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run_chunk(carry, indices)[1])
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / CHUNK


# --- problems -------------------------------------------------------------------------


def peaks_problem():
    kx, kt = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.uniform(kx, (2048, 2), minval=-3.0, maxval=3.0)
    x_test = jax.random.uniform(kt, (4096, 2), minval=-3.0, maxval=3.0)
    return Problem(x, peaks(x), x_test, peaks(x_test), None)


def peaks_model(seed):
    key = jax.random.PRNGKey(seed)
    return eqx.nn.MLP(2, 64, 64, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=key)


def mnist1d_problem():
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, x_test = (jnp.asarray(data[name], jnp.float32) for name in ("x", "x_test"))
    y, y_test = (jnp.asarray(data[name]) for name in ("y", "y_test"))
    return Problem(x, y, x_test, y_test, 10)


class CNN1D(eqx.Module):
    """A small 1-D CNN feature map: two strided convolutions (ReLU) and a tanh layer."""

    conv1: eqx.nn.Conv1d
    conv2: eqx.nn.Conv1d
    linear: eqx.nn.Linear

    def __init__(self, num_features, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv1d(1, 16, 5, stride=2, key=k1)
        self.conv2 = eqx.nn.Conv1d(16, 16, 3, stride=2, key=k2)
        self.linear = eqx.nn.Linear(16 * 8, num_features, key=k3)

    def __call__(self, x):
        h = jax.nn.relu(self.conv1(x[None, :]))
        h = jax.nn.relu(self.conv2(h))
        return jnp.tanh(self.linear(h.reshape(-1)))


def mnist1d_model(kind, seed):
    key = jax.random.PRNGKey(seed)
    if kind == "cnn":
        return CNN1D(32, key)
    return eqx.nn.MLP(40, 32, 100, 2, activation=jax.nn.relu, final_activation=jnp.tanh, key=key)


def digits_problem():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x, x_test, y, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0)
    return Problem(*(jnp.asarray(a) for a in (x, y, x_test, y_test)), 10)


def digits_model(seed):
    key = jax.random.PRNGKey(seed)
    return eqx.nn.MLP(64, 16, 64, 1, activation=jnp.tanh, final_activation=jnp.tanh, key=key)


# --- experiments ----------------------------------------------------------------------


def _tuned(method, problem, make_model, lrs, steps, better, **options):
    """The learning rate with the best final metric on seed 0, and its run."""
    runs = {lr: train(method, problem, make_model(0), lr, steps, 0, **options) for lr in lrs}
    finite = {lr: run for lr, run in runs.items() if not run[1]}
    best = (max if better == "max" else min)(finite, key=lambda lr: finite[lr][0][-1][2])
    return best, runs[best]


def _reach(rows, target, better, column=2):
    """The first `(steps, seconds)` at which the metric in `column` (2: the readout as
    trained, 3: refit) reaches `target`, or None."""
    for row in rows:
        metric = row[column]
        if (metric >= target) if better == "max" else (metric <= target):
            return row[0], row[1]
    return None


def experiment_peaks(quick):
    problem = peaks_problem()
    steps, seeds = (100, 1) if quick else (2000, 3)
    lrs = (3e-3,) if quick else (1e-3, 3e-3, 1e-2)
    methods = ("plain", "per-batch", "slimtik")
    for batch in (32, 256):
        options = dict(batch=batch, alpha2=1e-6, memory=8)
        results = {}
        for method in methods:
            lr, _ = _tuned(method, problem, peaks_model, lrs, steps, "min", **options)
            results[method] = (
                lr,
                [
                    train(method, problem, peaks_model(s), lr, steps, s, **options)[0]
                    for s in range(seeds)
                ],
            )
        for column, what in (
            (2, "the readout as trained"),
            (3, "the readout refit on the training set"),
        ):
            print(
                f"\npeaks, batch {batch}, {what}: medians over {seeds} seeds of the steps and "
                f"seconds to plain Adam's test error after {steps} steps"
            )
            print(
                f"{'method':>10} {'lr':>6} {'reached':>7} {'steps':>6} {'seconds':>8} "
                f"{'steps/plain':>11} {'time/plain':>10} {'final error':>11}"
            )
            for method, (lr, runs) in results.items():
                reached, ratios = [], []
                for seed in range(seeds):
                    target = results["plain"][1][seed][-1][column]
                    hit = _reach(runs[seed], target, "min", column)
                    base = _reach(results["plain"][1][seed], target, "min", column)
                    if hit:
                        reached.append(hit)
                        ratios.append((hit[0] / base[0], hit[1] / base[1]))
                final = np.median([run[-1][column] for run in runs])
                if reached:
                    steps_, seconds = np.median(reached, axis=0)
                    step_ratio, time_ratio = np.median(ratios, axis=0)
                    text = f"{steps_:6.0f} {seconds:8.2f} {step_ratio:11.2f} {time_ratio:10.2f}"
                else:
                    text = f"{'-':>6} {'-':>8} {'-':>11} {'-':>10}"
                print(f"{method:>10} {lr:6.0e} {len(reached):>4}/{seeds} {text} {final:11.2e}")


MNIST1D_METHODS = ("plain", "per-batch", "vp-budget", "windowed")


def experiment_mnist1d(quick, methods=MNIST1D_METHODS):
    # Plain Adam is always run: the reference of the step costs.
    methods = ("plain",) + tuple(m for m in methods if m != "plain")
    problem = mnist1d_problem()
    steps, seeds = (100, 1) if quick else (3000, 3)
    lrs = (3e-3,) if quick else (1e-3, 3e-3, 1e-2)
    for kind in ("mlp", "cnn"):
        make_model = lambda seed, kind=kind: mnist1d_model(kind, seed)  # noqa: E731
        costs = {
            method: step_cost(method, problem, make_model(0), 1e-3, memory=4) for method in methods
        }
        print(f"\nMNIST-1D, {kind}: held-out accuracy (median of {seeds} seeds) against time")
        print(
            "step cost / plain step: "
            + ", ".join(
                f"{m} {c / costs['plain']:.2f} ({1e3 * c:.2f} ms)" for m, c in costs.items()
            )
        )
        for method in methods:
            lr, _ = _tuned(method, problem, make_model, lrs, steps, "max", memory=4)
            runs = [
                train(method, problem, make_model(s), lr, steps, s, memory=4)[0]
                for s in range(seeds)
            ]
            marks = sorted({len(runs[0]) // 10, len(runs[0]) // 3, len(runs[0]) - 1} - {-1})
            cells = []
            for mark in marks:
                seconds = np.median([run[mark][1] for run in runs])
                accuracy = np.median([run[mark][2] for run in runs])
                cells.append(f"step {runs[0][mark][0]}: {accuracy:.3f} at {seconds:.1f} s")
            print(f"  {method:>10} (lr {lr:.0e}): " + "; ".join(cells))


def experiment_grid(quick, eps=1e-8):
    problem = digits_problem()
    steps, seeds = (100, 1) if quick else (6000, 2)
    lrs = (1e-2,) if quick else (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    alpha2s = (1e-3,) if quick else (1e-4, 1e-3, 1e-2)
    # Adam's default eps over the alpha2 grid; with `--adam-eps 1e-4` (which removes the
    # late events of VarPro with a saturated tanh output, docs/stochastic.md), the
    # per-batch readout at alpha2 = 1e-3 only.
    if eps != 1e-8:
        alpha2s = (1e-3,)
    cells = [("plain", None)] + [("per-batch", a) for a in alpha2s] + [("windowed", None)]
    print(
        f"digits, Adam eps {eps:g}: final test accuracy after {steps} steps (min over "
        f"{seeds} seeds; 'div' = diverged: a non-finite loss or an accuracy below 0.2)"
    )
    print(f"{'method':>10} {'alpha2':>8} " + " ".join(f"{lr:>8.0e}" for lr in lrs))
    for method, alpha2 in cells:
        texts = []
        for lr in lrs:
            results = [
                train(
                    method,
                    problem,
                    digits_model(s),
                    lr,
                    steps,
                    s,
                    alpha2=alpha2 or 1e-3,
                    memory=4,
                    eps=eps,
                )
                for s in range(seeds)
            ]
            worst = min((rows[-1][2] if not diverged else -1.0) for rows, diverged in results)
            texts.append(f"{'div':>8}" if worst < 0.2 else f"{worst:8.3f}")
        label = "evidence" if method == "windowed" else ("-" if alpha2 is None else f"{alpha2:.0e}")
        print(f"{method:>10} {label:>8} " + " ".join(texts), flush=True)


EXPERIMENTS: dict[str, Callable[[bool], None]] = {
    "peaks": experiment_peaks,
    "mnist1d": experiment_mnist1d,
    "grid": experiment_grid,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true", help="a smoke test: few steps, one seed")
    parser.add_argument(
        "--adam-eps", type=float, default=1e-8, help="grid only: Adam's eps (default 1e-8)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=MNIST1D_METHODS,
        default=list(MNIST1D_METHODS),
        help="mnist1d only: the methods to run (plain is always run)",
    )
    args = parser.parse_args()
    if args.experiment == "grid":
        experiment_grid(args.quick, args.adam_eps)
    elif args.experiment == "mnist1d":
        experiment_mnist1d(args.quick, tuple(args.methods))
    else:
        EXPERIMENTS[args.experiment](args.quick)
