"""Benchmark suite: step time, memory and compile time of every loss over a grid of sizes.

For each loss (`vploss_msereg`, `vploss_bce`, `vploss_ce` with K = 10 classes, and the
two logistic losses again with the inexact mode for training loops,
`solver=vploss.BudgetedNewtonCG()`, over mini-batch sizes N = 128-4,096), batch size N
and feature count m, the feature map is an MLP 2 → 64 → 64 → m (tanh, float32, on the
default device) and the script compiles one `value_and_grad` step of

- the VarPro loss (`solver="auto"`, or the budgeted one), after 100 Adam steps of VarPro training on
  mini-batches of 1024 samples, the logistic losses warm started from the readout of
  the last of those steps (fitted on another batch, as in a training loop), and
- the baseline: the same MLP with a plain trainable head (mean squared error, sigmoid
  or softmax cross-entropy) on the same features,

and prints, per (N, m): the median step times (interleaved, in the same run) and their
ratio; beside it the ratio a flop model predicts (`varpro_flops` / `plain_flops`: the
matmul flops of each step, with the inner solve's counted iterations), the limit the
VarPro step would reach at the plain step's speed per flop, and how far the measured
ratio is from it; the peak memory of each compiled step (`memory_analysis()`: arguments + outputs
+ temporaries), whether the compiled VarPro step holds an N×N array, the time to trace
and compile the VarPro step, and the steps and convergence of its inner solve. Below
each table, the fitted exponent a of time ∝ N^a for each m. Then the ridge solvers at
two shapes: overparameterised (N = 256, m = 4096), where `"auto"` picks the dual form,
and tall (N = 4096, m = 256), where it picks the primal Cholesky form.

    python benchmarks/suite.py            # N in {1k, 4k, 16k, 64k}, m in {16, 64, 256}
    python benchmarks/suite.py --quick    # N in {1k, 4k}, m in {16, 64}, fewer repeats
    python benchmarks/suite.py --losses bce-budgeted ce-budgeted --skip-shapes

The budgeted losses run over N in {128, 512, 1k, 4k} (quick: {128, 1k}).

OpenBLAS is single-threaded unless `OPENBLAS_NUM_THREADS` is set (see `ridge_step.py`).
"""

import os


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before JAX loads

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import (  # noqa: E402
    adam_steps,
    angle_classes,
    feature_mlp,
    inside_circle,
    interleaved_medians,
    peaks,
)

from vploss import (  # noqa: E402
    BudgetedNewtonCG,
    CholeskyRidge,
    RESULTS,
    vploss_bce,
    vploss_ce,
    vploss_msereg,
)


SIZES = (1024, 4096, 16384, 65536)
WIDTHS = (16, 64, 256)
QUICK_SIZES = (1024, 4096)
QUICK_WIDTHS = (16, 64)
# The mini-batch sizes of the inexact mode for training loops.
MINIBATCH_SIZES = (128, 512, 1024, 4096)
QUICK_MINIBATCH_SIZES = (128, 1024)
NUM_CLASSES = 10
RIDGE_ALPHA2 = 1e-6
LOGISTIC_ALPHA2 = 1e-4
WARMUP_STEPS = 100
WARMUP_BATCH = 1024


class _Loss:
    """One benchmarked loss: its labels, its VarPro call and its plain-head baseline."""

    def __init__(self, name, labels, outputs, varpro, plain, warm, minibatch=False):
        self.name, self.labels, self.outputs = name, labels, outputs
        self.varpro, self.plain, self.warm = varpro, plain, warm
        self.minibatch = minibatch

    def budgeted(self):
        """The same loss in the inexact mode for training loops, over mini-batch sizes."""
        varpro = functools.partial(self.varpro, solver=BudgetedNewtonCG())
        name = f"{self.name}, BudgetedNewtonCG"
        return _Loss(name, self.labels, self.outputs, varpro, self.plain, True, minibatch=True)


LOSSES = {
    "msereg": _Loss(
        "vploss_msereg",
        peaks,
        "scalar",
        lambda m, x, y, init: vploss_msereg(m, x, y, alpha2=RIDGE_ALPHA2),
        lambda pred, y: 0.5 * jnp.mean((pred - y) ** 2),
        warm=False,
    ),
    "bce": _Loss(
        "vploss_bce",
        inside_circle,
        "scalar",
        lambda m, x, y, init, **options: vploss_bce(
            m, x, y, alpha2=LOGISTIC_ALPHA2, init=init, throw=False, **options
        ),
        lambda logits, y: jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)),
        warm=True,
    ),
    "ce": _Loss(
        "vploss_ce",
        functools.partial(angle_classes, num_classes=NUM_CLASSES),
        NUM_CLASSES,
        lambda m, x, y, init, **options: vploss_ce(
            m,
            x,
            y,
            alpha2=LOGISTIC_ALPHA2,
            num_classes=NUM_CLASSES,
            init=init,
            throw=False,
            **options,
        ),
        lambda logits, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
        warm=True,
    ),
}
LOSSES["bce-budgeted"] = LOSSES["bce"].budgeted()
LOSSES["ce-budgeted"] = LOSSES["ce"].budgeted()


HIDDEN = 64  # the feature MLP's hidden width (`feature_mlp`)


def _mlp_flops(m):
    """Matmul flops per sample of the feature MLP 2 → 64 → 64 → m: forward, and backward
    (the weights' gradients of every layer, the inputs' of all but the first)."""
    shapes = ((2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, m))
    forward = sum(2 * a * b for a, b in shapes)
    return 3 * forward - 2 * 2 * HIDDEN


def plain_flops(n, m, outputs):
    """Matmul flops of the plain step: the MLP and its trainable head (forward, the
    gradients of its weights and of its input), `outputs` = k columns."""
    return n * (_mlp_flops(m) + 6 * m * outputs)


def varpro_flops(name, n, m, outputs, stats):
    r"""Matmul flops of the VarPro step (the flop model of the limit column), from the
    inner solve's counted iterations (`stats`): the MLP as in the plain step, plus, with
    $p = m + 1$ coefficients per output and $k$ outputs,

    - ridge: the Gram matrix $2Np^2$, $\hat F^\top y$, the loss's residual and its
      gradient in the features ($2Npk$ each), the refinement steps ($4Npk$ each,
      `CholeskyRidge().refine_steps` of them) and two Cholesky factors ($p^3/3$ each);
    - logistic: at the start and after each inner update (`num_steps` + 1; rejected
      line-search trials aside), one evaluation of the objective and its gradient
      ($4Npk$), exact Newton's Hessian ($2Np^2$ per output, and $2N(p(k -
      1))^2$ more for the softmax's rank-one term) and its Cholesky factor
      ($(pk)^3/3$), or Newton–CG's `cg_steps` Hessian products and one more per step
      for the decrement bound ($4Npk$ each) and its preconditioner's Gram matrix
      ($2Np^2$, once); then the objective's value and gradient at the solution and the
      loss's gradient in the features ($8Npk$).
    """
    p, k = m + 1, outputs
    features = n * _mlp_flops(m)
    if name.endswith("-budgeted"):
        # The start's value and gradient (4Npk), per update the curvature, the
        # preconditioner's pass, one trial value and the new value and gradient
        # (10Npk), the CG products (4Npk each), then the error bounds' pass and the
        # loss's gradient in the features (4Npk).
        steps = int(stats.num_steps)
        return features + n * p * k * (8 + 10 * steps + 4 * int(stats.cg_steps))
    if name == "msereg":
        refine_steps = CholeskyRidge().refine_steps
        return features + n * (2 * p * p + (6 + 4 * refine_steps) * p * k) + 2 * p**3 / 3
    steps = int(stats.num_steps) + 1
    evaluations = steps * 4 * n * p * k
    if int(stats.cg_steps) == 0:  # `AutoNewton` chose exact Newton
        rank_one = 0 if k == 1 else 2 * (p * (k - 1)) ** 2
        hessians = steps * (n * (2 * k * p * p + rank_one) + (p * k) ** 3 / 3)
    else:
        hessians = 2 * n * p * p + (int(stats.cg_steps) + steps) * 4 * n * p * k
    return features + evaluations + hessians + 8 * n * p * k


def compile_step(loss_fn, model, *args, has_aux):
    """`value_and_grad` of `loss_fn(model, *args)` in the model's inexact leaves,
    traced and compiled now. Returns the step as a zero-argument callable, the seconds
    spent tracing and compiling, and the compiled executable."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, *args):
        return jax.value_and_grad(
            lambda p: loss_fn(eqx.combine(p, static), *args), has_aux=has_aux
        )(params)

    start = time.perf_counter()
    compiled = jax.jit(step).lower(params, *args).compile()
    seconds = time.perf_counter() - start
    return functools.partial(compiled, params, *args), seconds, compiled


def _peak_bytes(compiled):
    memory = compiled.memory_analysis()
    return memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes


def plain_loss(loss):
    """The baseline's loss of `(model, head)`: the MLP with a plain trainable head."""

    def plain(model_and_head, x, y):
        features_to_output = lambda xj: model_and_head[1](model_and_head[0](xj))
        return loss.plain(jax.vmap(features_to_output)(x), y)

    return plain


@functools.cache
def trained(name, m, warmup_steps):
    """The model after `warmup_steps` Adam steps of VarPro training on mini-batches of
    `WARMUP_BATCH` samples, and the readout of the last one: the next step's warm start,
    fitted on another batch, as in a training loop. The same for every N."""
    loss = LOSSES[name]
    model = feature_mlp(m, key=jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (WARMUP_BATCH, 2), jnp.float32, -2.0, 2.0)
    y = loss.labels(x)
    return adam_steps(model, lambda mdl, init: loss.varpro(mdl, x, y, init), warmup_steps)


def cell(name, n, m, repeats, warmup_steps=WARMUP_STEPS):
    """One cell of a loss's table: the step times of VarPro and the plain head at
    batch size `n` and feature count `m`, their ratio and its flop-model limit, memory,
    compile time and the inner solve's iterations."""
    loss = LOSSES[name]
    model, init = trained(name, m, warmup_steps)
    init = init if loss.warm else None
    hkey, xkey = jax.random.split(jax.random.PRNGKey(2))
    head = eqx.nn.Linear(m, loss.outputs, key=hkey, dtype=jnp.float32)
    x = jax.random.uniform(xkey, (n, 2), jnp.float32, -2.0, 2.0)
    y = loss.labels(x)

    plain = plain_loss(loss)
    vp_step, compile_s, vp_compiled = compile_step(loss.varpro, model, x, y, init, has_aux=True)
    plain_step, plain_compile_s, plain_compiled = compile_step(
        plain, (model, head), x, y, has_aux=False
    )
    times = interleaved_medians({"plain": plain_step, "varpro": vp_step}, repeats)
    stats = vp_step()[0][1].stats
    square = f"[{n},{n}]" in vp_compiled.as_text()
    outputs = 1 if loss.outputs == "scalar" else loss.outputs
    limit = varpro_flops(name, n, m, outputs, stats) / plain_flops(n, m, outputs)
    return {
        "plain_ms": times["plain"],
        "varpro_ms": times["varpro"],
        "ratio": times["varpro"] / times["plain"],
        "limit": limit,
        "varpro_mib": _peak_bytes(vp_compiled) / 2**20,
        "plain_mib": _peak_bytes(plain_compiled) / 2**20,
        "square": square,
        "compile_s": compile_s,
        "plain_compile_s": plain_compile_s,
        "inner": "-" if stats is None else inner_summary(stats),
    }


def inner_summary(stats):
    cg = (
        "" if stats.cg_steps is None or int(stats.cg_steps) == 0 else f" ({int(stats.cg_steps)} CG)"
    )
    outcome = "budget" if stats.result == RESULTS.budget_spent else str(bool(stats.converged))
    return f"{int(stats.num_steps)}{cg} {outcome}"


TABLE_HEADER = (
    "| N | m | plain ms | VarPro ms | ratio | flop limit | ratio / limit | VarPro MiB "
    "| plain MiB | N×N | compile s | plain compile s | inner steps, converged |"
)


def table_row(n, m, result):
    """A row of `TABLE_HEADER` for the `cell` result at batch size `n`, `m` features."""
    return (
        f"| {n} | {m} | {result['plain_ms']:.2f} | {result['varpro_ms']:.2f} | "
        f"{result['ratio']:.2f} | {result['limit']:.2f} | "
        f"{result['ratio'] / result['limit']:.2f} | {result['varpro_mib']:.1f} | "
        f"{result['plain_mib']:.1f} | {'yes' if result['square'] else 'no'} | "
        f"{result['compile_s']:.2f} | {result['plain_compile_s']:.2f} | {result['inner']} |"
    )


def _growth_exponent(sizes, times):
    """The least-squares slope of log(time) against log(N)."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def run_loss(name, sizes, widths, repeats):
    loss = LOSSES[name]
    warm = ", warm started" if loss.warm else ""
    print(f"\n### `{loss.name}` (float32, CPU{warm})\n")
    print(TABLE_HEADER)
    print("|" + "---|" * (TABLE_HEADER.count("|") - 1))
    exponents = {}
    for m in widths:
        rows = []
        for n in sizes:
            result = cell(name, n, m, repeats)
            rows.append(result)
            print(table_row(n, m, result), flush=True)
        if len(sizes) > 1:
            exponents[m] = (
                _growth_exponent(sizes, [r["varpro_ms"] for r in rows]),
                _growth_exponent(sizes, [r["plain_ms"] for r in rows]),
            )
    print()
    for m, (varpro, plain) in exponents.items():
        print(f"- m = {m}: time ∝ N^{varpro:.2f} (plain head N^{plain:.2f})")


def ridge_shapes(repeats):
    print("\n### Ridge solvers by shape (float32, CPU)\n")
    print("| N | m | plain ms | `auto` picks | dual / plain | cholesky / plain |")
    print("|---|---|---|---|---|---|")
    loss = LOSSES["msereg"]
    for n, m in ((256, 4096), (4096, 256)):
        mkey, hkey, xkey = jax.random.split(jax.random.PRNGKey(0), 3)
        model = feature_mlp(m, key=mkey)
        head = eqx.nn.Linear(m, "scalar", key=hkey, dtype=jnp.float32)
        x = jax.random.uniform(xkey, (n, 2), jnp.float32, -2.0, 2.0)
        y = loss.labels(x)

        steps = {"plain": compile_step(plain_loss(loss), (model, head), x, y, has_aux=False)[0]}
        for solver in ("dual", "cholesky"):
            ridge = lambda mdl, x, y, s=solver: vploss_msereg(mdl, x, y, alpha2=1e-6, solver=s)
            steps[solver] = compile_step(ridge, model, x, y, has_aux=True)[0]
        times = interleaved_medians(steps, repeats)
        auto = "dual" if n < m + 1 else "cholesky"
        print(
            f"| {n} | {m} | {times['plain']:.2f} | `{auto}` | "
            f"{times['dual'] / times['plain']:.2f} | {times['cholesky'] / times['plain']:.2f} |",
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="a small grid, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed calls per step (default 10, quick 5)")
    parser.add_argument(
        "--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES), help="losses to run"
    )
    parser.add_argument("--skip-shapes", action="store_true", help="skip the ridge shapes")
    args = parser.parse_args()
    sizes, widths = (QUICK_SIZES, QUICK_WIDTHS) if args.quick else (SIZES, WIDTHS)
    minibatch_sizes = QUICK_MINIBATCH_SIZES if args.quick else MINIBATCH_SIZES
    repeats = args.repeats or (5 if args.quick else 10)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, repeats {repeats}, ", end="")
    print(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    for name in args.losses:
        run_loss(name, minibatch_sizes if LOSSES[name].minibatch else sizes, widths, repeats)
    if not args.skip_shapes:
        ridge_shapes(repeats)


if __name__ == "__main__":
    main()
