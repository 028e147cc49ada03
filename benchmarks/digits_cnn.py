"""Mini-batch VarPro with the budgeted inner solver against tuned Adam with a trainable
linear head, at equal wall time, on scikit-learn's digits with a small CNN.

Data: `sklearn.datasets.load_digits` (8x8 images, pixels scaled to [0, 1]), one fixed
stratified split of 1297 training and 500 test images. Feature map: a small CNN
(conv 3x3, 1 → 16 channels; conv 3x3 stride 2, 16 → 32; a linear layer 512 → 32; tanh
after each), so 32 features. Batches of 128 (indices drawn with replacement).

Methods, each Adam on the network:

- `adam`: a trainable `eqx.nn.Linear(32, 10)` head, softmax cross-entropy.
- `vp-exact`: the reduced loss `vploss.vploss_ce(..., alpha2=1e-3)` with the default
  (exact) inner solver, the previous step's readout passed as `init`.
- `vp-budget`: the same with `solver=vploss.BudgetedNewtonCG()` (one Newton–CG update
  of at most 10 CG iterations per step), the previous step's readout as `init`.

Every run gets the same training seconds (`--seconds`, default 20); compilation is
excluded by a warm-up call of the compiled chunk of steps (its result discarded), and
evaluation is excluded from the clock. Test accuracy is that of the readout as carried
by the training (for VarPro, the last batch's readout, as the `mnist1d` experiment of
`stochastic.py` reports it); the last column refits the readout on the whole training
set (`vploss_ce` at the same alpha2, exact) for every method, adam's network included.
Each method's learning rate is its best of 1e-3, 3e-3, 1e-2 (the best median final
test accuracy over the seeds; test = validation, as in the other benchmarks).
Reported, medians over 3 seeds: test accuracy at 10%, 33% and 100% of the budget, at
the number of steps that the slowest method takes in the budget (accuracy per step),
the steps taken, ms per step and its ratio to adam's.

Usage: `python benchmarks/digits_cnn.py [--seconds S] [--seeds N] [--quick]`;
`--quick` is a smoke test (one seed, one learning rate, 0.5 s per run, one step per
compiled call), not a measurement.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import vploss


BATCH = 128
ALPHA2 = 1e-3
NUM_CLASSES = 10
METHODS = ("adam", "vp-exact", "vp-budget")
# Steps per compiled call (a `lax.scan`, unrolled: on the CPU, XLA's convolutions inside
# a loop run about 15 times slower than outside one); the state is evaluated after each.
UNIT = {"adam": 5, "vp-budget": 5, "vp-exact": 5}
MARKS = (0.1, 1 / 3, 1.0)


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    x, x_test, y, y_test = train_test_split(
        x, digits.target, test_size=500, stratify=digits.target, random_state=0
    )
    return tuple(jnp.asarray(a) for a in (x, y, x_test, y_test))


class CNN(eqx.Module):
    """Two 3x3 convolutions (the second strided) and a linear layer, tanh after each."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    linear: eqx.nn.Linear

    def __init__(self, num_features, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 16, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, 3, stride=2, padding=1, key=k2)
        self.linear = eqx.nn.Linear(32 * 4 * 4, num_features, key=k3)

    def __call__(self, x):
        h = jnp.tanh(self.conv1(x))
        h = jnp.tanh(self.conv2(h))
        return jnp.tanh(self.linear(h.reshape(-1)))


def _logits(net, head, x):
    return jax.vmap(lambda xi: head(net(xi)))(x)


def build(method, data):
    """`(init, advance, evaluate)` of one method, compiled once for every seed and
    learning rate: `init(seed, lr)` gives the carry; `advance(carry, indices)` takes
    `UNIT[method]` Adam steps on the batches `x[indices[i]]`; `evaluate(carry, refit)`
    gives the test accuracy."""
    x, y, x_test, y_test = data
    # The learning rate is a leaf of the optimiser's state: one compilation for all.
    optimiser = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    if method == "adam":

        def loss_fn(params, xb, yb, readout):
            net, head = params
            logits = _logits(net, head, xb)
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
            return loss, head

    else:
        solver = vploss.BudgetedNewtonCG() if method == "vp-budget" else "auto"

        def loss_fn(net, xb, yb, readout):
            return vploss.vploss_ce(
                net,
                xb,
                yb,
                alpha2=ALPHA2,
                num_classes=NUM_CLASSES,
                init=readout,
                solver=solver,
                throw=False,
            )

    @eqx.filter_jit
    def first_readout(params):
        """The readout of a first batch: for VarPro, the exact one, then one training
        loss's from it, so that the carry has the structure the steps return."""
        readout = None
        if method != "adam":
            readout = vploss.vploss_ce(
                params, x[:BATCH], y[:BATCH], alpha2=ALPHA2, num_classes=NUM_CLASSES
            )[1]
        return loss_fn(params, x[:BATCH], y[:BATCH], readout)[1]

    def init(seed, lr):
        model = CNN(32, jax.random.PRNGKey(seed))
        params = model
        if method == "adam":
            params = (model, eqx.nn.Linear(32, NUM_CLASSES, key=jax.random.PRNGKey(7 + seed)))
        opt_state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        return params, opt_state, first_readout(params)

    @eqx.filter_jit
    def advance(carry, indices):
        params, opt_state, readout = carry
        dynamic, static = eqx.partition(params, eqx.is_array)

        def step(inner, index):
            dynamic, opt_state, readout = inner
            params = eqx.combine(dynamic, static)
            (loss, readout), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
                params, x[index], y[index], readout
            )
            updates, opt_state = optimiser.update(grads, opt_state, params)
            dynamic = eqx.filter(eqx.apply_updates(params, updates), eqx.is_array)
            return (dynamic, opt_state, readout), loss

        (dynamic, opt_state, readout), losses = jax.lax.scan(
            step, (dynamic, opt_state, readout), indices, unroll=True
        )
        return (eqx.combine(dynamic, static), opt_state, readout), losses

    @eqx.filter_jit
    def evaluate(carry, refit=False):
        params, _, readout = carry
        net = params
        if method == "adam":
            net, readout = params  # the head as updated (the carried one is a step older)
        if refit:
            readout = vploss.vploss_ce(
                net, x, y, alpha2=ALPHA2, num_classes=NUM_CLASSES, throw=False
            )[1]
        predictions = jax.vmap(lambda xi: readout(net(xi)))(x_test)
        return jnp.mean(jnp.argmax(predictions, axis=1) == y_test)

    return init, advance, evaluate


def run(method, compiled, data, lr, seed, seconds):
    """Trains for `seconds` of compiled-step time; returns the rows `(steps, seconds,
    test accuracy)` after each call, the final refit accuracy and the median seconds
    per step."""
    init, advance, evaluate = compiled
    carry = init(seed, lr)
    unit, n = UNIT[method], data[0].shape[0]
    key = jax.random.PRNGKey(1000 + seed)
    # Warm-up (compilation): two calls, the second on the first's output (a carry typed
    # as the steps return it); the results are discarded, the state is not advanced.
    warm = jnp.zeros((unit, BATCH), jnp.int32)
    jax.block_until_ready(advance(advance(carry, warm)[0], warm))
    jax.block_until_ready(evaluate(carry))
    jax.block_until_ready(evaluate(carry, True))
    rows, call_seconds, elapsed, steps = [(0, 0.0, float(evaluate(carry)))], [], 0.0, 0
    while elapsed < seconds:
        key, sub = jax.random.split(key)
        indices = jax.block_until_ready(jax.random.randint(sub, (unit, BATCH), 0, n))
        start = time.perf_counter()
        carry, losses = advance(carry, indices)
        jax.block_until_ready(carry)
        took = time.perf_counter() - start
        elapsed += took
        call_seconds.append(took)
        steps += unit
        accuracy = float(evaluate(carry))
        if not np.all(np.isfinite(np.asarray(losses))):
            accuracy = np.nan
        rows.append((steps, elapsed, accuracy))
        if np.isnan(accuracy):
            break
    refit = float(evaluate(carry, True))
    return rows, refit, float(np.median(call_seconds)) / unit


def at_time(rows, t):
    """The accuracy of the last evaluation at or before `t` seconds."""
    return [row for row in rows if row[1] <= t + 1e-9][-1][2]


def at_step(rows, s):
    """The accuracy of the last evaluation at or before `s` steps."""
    return [row for row in rows if row[0] <= s][-1][2]


def main(seconds, seeds, lrs):
    data = digits_data()
    print(
        f"digits CNN: {data[0].shape[0]} train / {data[2].shape[0]} test, batch {BATCH}, "
        f"alpha2 {ALPHA2:g}, {seconds:g} s per run, {seeds} seeds, lrs {lrs}, float32",
        flush=True,
    )
    runs = {}
    for method in METHODS:
        compiled = build(method, data)
        for lr in lrs:
            for seed in range(seeds):
                started = time.perf_counter()
                result = run(method, compiled, data, lr, seed, seconds)
                runs.setdefault((method, lr), []).append(result)
                rows, refit, per_step = result
                print(
                    f"  {method:>9} lr {lr:<6g} seed {seed}: {rows[-1][0]:6d} steps, "
                    f"{1e3 * per_step:7.2f} ms/step, test acc {rows[-1][2]:.3f}, refit "
                    f"{refit:.3f} ({time.perf_counter() - started:.1f} s wall)",
                    flush=True,
                )
    chosen = {}
    for method in METHODS:
        score = {lr: np.median([at_time(r[0], seconds) for r in runs[(method, lr)]]) for lr in lrs}
        chosen[method] = max(lrs, key=lambda lr: (np.nan_to_num(score[lr], nan=-1), -lr))
    best = {m: runs[(m, chosen[m])] for m in METHODS}
    steps = {m: float(np.median([r[0][-1][0] for r in rs])) for m, rs in best.items()}
    ms = {m: 1e3 * float(np.median([r[2] for r in rs])) for m, rs in best.items()}
    common = int(min(steps.values()))
    print(
        f"\ndigits CNN, medians of {seeds} seeds, {seconds:g} s of training per run, "
        f"alpha2 {ALPHA2:g} (VarPro), each method at its best lr; test accuracy of the "
        f"readout as trained, and refit on the whole training set at the end\n"
    )
    head = ["method", "lr"] + [f"acc@{100 * f:.0f}%" for f in MARKS]
    head += [f"acc@{common} steps", "refit acc@100%", "steps", "ms/step", "ms/step ÷ adam"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|")
    for method, rs in best.items():
        cells = [method, f"{chosen[method]:.0e}"]
        cells += [f"{np.median([at_time(r[0], f * seconds) for r in rs]):.3f}" for f in MARKS]
        cells.append(f"{np.median([at_step(r[0], common) for r in rs]):.3f}")
        cells.append(f"{np.median([r[1] for r in rs]):.3f}")
        cells += [f"{steps[method]:.0f}", f"{ms[method]:.2f}", f"{ms[method] / ms['adam']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print("\nfinal test accuracy (median over seeds) of every learning rate:")
    for method in METHODS:
        print(
            f"  {method:>9}: "
            + ", ".join(
                f"{lr:g} {np.median([at_time(r[0], seconds) for r in runs[(method, lr)]]):.3f}"
                for lr in lrs
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="training seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--quick", action="store_true", help="a smoke test (< 60 s)")
    args = parser.parse_args()
    if args.quick:
        # Compilation dominates a smoke test: one step per compiled call.
        UNIT = dict.fromkeys(METHODS, 1)
        main(0.5, 1, [3e-3])
    else:
        main(args.seconds, args.seeds, args.lrs)
