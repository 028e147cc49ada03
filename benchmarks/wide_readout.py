"""Wide features, few samples: the readout losses' primal Newton methods against the
kernel (dual) Newton method that `solver="auto"` picks there, float32, one CPU thread.

For `vploss_bce` (points inside the unit circle), `vploss_ce` (K = 10 classes by angle
and radius) and `vploss_poisson` (counts with mean exp(x₁)), with N = 200 samples, the
feature map an MLP 2 → 64 → 64 → m (tanh) and alpha2 = 1e-4, it times one jitted
`value_and_grad` step from a cold start (no `init`) for each m, interleaved in one
process (median over `--repeats`), of

- `primal`: the solver the default chose before the kernel method existed (`Newton`
    while its Hessian costs at most `MAX_EXACT_NEWTON_COST` Hessian-vector products,
    else `NewtonCG`), named in the table, and
- `auto`: the default now (`AutoNewton.choose`),

and prints the solver each is, their times, the ratio, the inner steps of each and the
difference of the two losses (both solves converge to the same minimum). Compilation is
not timed (each step is called once first); the primal steps at m = 2000 take seconds
each.

    python benchmarks/wide_readout.py [--widths 500 1000 2000] [--repeats 3]
"""

import os


# One thread for OpenBLAS (LAPACK) and XLA's CPU kernels, before JAX loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse  # noqa: E402
import functools  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _common import angle_classes, feature_mlp, inside_circle, interleaved_medians  # noqa: E402

import vploss  # noqa: E402
from vploss._readout_losses.objective import ReadoutArgs, ReadoutObjective  # noqa: E402
from vploss._readout_losses.solvers import exact_newton_cost, MAX_EXACT_NEWTON_COST  # noqa: E402


N = 200
ALPHA2 = 1e-4
NUM_CLASSES = 10


def _problems(x):
    counts = jax.random.poisson(jax.random.PRNGKey(2), jnp.exp(x[:, 0])).astype(x.dtype)
    return {
        "vploss_bce": (vploss.SigmoidBinaryCrossEntropy(), inside_circle(x)),
        "vploss_ce": (
            vploss.SoftmaxCrossEntropy(NUM_CLASSES),
            angle_classes(x, NUM_CLASSES),
        ),
        "vploss_poisson": (vploss.PoissonLogLikelihood(), counts),
    }


def shapes(loss, labels, width):
    """The inner problem's `ReadoutArgs` as shapes (all the solvers' choice reads)."""
    values = loss.labels(labels, N).values
    return ReadoutArgs(
        jax.ShapeDtypeStruct((N, width + 1), jnp.float32),
        jax.ShapeDtypeStruct(values.shape, jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
        use_bias=True,
    )


def old_default(loss, labels, width):
    """The solver `"auto"` chose before `KernelNewton`: `Newton` while its Hessian costs
    at most `MAX_EXACT_NEWTON_COST` Hessian-vector products, else `NewtonCG`."""
    cost = exact_newton_cost(ReadoutObjective(loss), shapes(loss, labels, width))
    return vploss.Newton() if cost <= MAX_EXACT_NEWTON_COST else vploss.NewtonCG()


def value_and_grad_step(loss, x, labels, solver):
    def objective(model):
        return vploss.vploss_glm(loss, model, x, labels, alpha2=ALPHA2, solver=solver, throw=False)

    return eqx.filter_jit(eqx.filter_value_and_grad(objective, has_aux=True))


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--widths", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = jax.random.uniform(jax.random.PRNGKey(1), (N, 2), minval=-2.0, maxval=2.0)
    print(f"N = {N}, alpha2 = {ALPHA2}, float32, cold start, one thread, {jax.devices()[0]}")
    print(
        "| loss | m | primal solver | primal ms | auto solver | auto ms | primal / auto "
        "| steps | loss diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for width in args.widths:
        model = feature_mlp(width, key=jax.random.PRNGKey(0))
        for name, (loss, labels) in _problems(x).items():
            primal = old_default(loss, labels, width)
            auto = vploss.AutoNewton().choose(ReadoutObjective(loss), shapes(loss, labels, width))
            steps = {
                "primal": value_and_grad_step(loss, x, labels, primal),
                "auto": value_and_grad_step(loss, x, labels, vploss.AutoNewton()),
            }
            times = interleaved_medians(
                {key: functools.partial(step, model) for key, step in steps.items()}, args.repeats
            )
            (primal_loss, primal_readout), _ = steps["primal"](model)
            (auto_loss, auto_readout), _ = steps["auto"](model)
            num_steps = (
                f"{int(primal_readout.stats.num_steps)} / {int(auto_readout.stats.num_steps)}"
            )
            print(
                f"| `{name}` | {width} | `{type(primal).__name__}` | {times['primal']:.0f} | "
                f"`{type(auto).__name__}` | {times['auto']:.0f} | "
                f"{times['primal'] / times['auto']:.1f} | {num_steps} | "
                f"{abs(float(primal_loss) - float(auto_loss)):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
