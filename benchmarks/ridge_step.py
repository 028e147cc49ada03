"""Speed and float32 accuracy of `vploss_msereg` against a plain trainable linear head.

The network is the feature map of the peaks example: an MLP 2 → 64 → 64 → m = 64 with
tanh activations, float32. For each batch size N the script times, interleaved, one
jitted `value_and_grad` step of

- the baseline: the same MLP with a trainable linear head `64 → 1` (mean squared error),
- `vploss_msereg` with the tall-problem solvers (`cholesky`, the default, and `svd`),

and prints the ratio of the median step times (VarPro / plain). It then prints the
relative error of each solver's float32 gradient against the float64 gradient at two
readout penalties, and the step ratios of an overparameterised problem (N = 256
samples, m = 1024 features), where `solver="auto"` picks the dual form. The whole
script runs twice, with OpenBLAS single-threaded and with its default threading,
because LAPACK on tall matrices is very sensitive to it.

    python benchmarks/ridge_step.py [--repeats 50] [--sizes 1024 4096 16384]
"""

import argparse
import os
import subprocess
import sys


SOLVERS = ("cholesky", "svd")
WIDE_SOLVERS = ("dual", "cholesky", "svd")


def _problem(n, dtype, seed=0, width=64):
    import equinox as eqx
    import jax
    from _common import feature_mlp, peaks

    mkey, hkey, xkey = jax.random.split(jax.random.PRNGKey(seed), 3)
    head = eqx.nn.Linear(width, "scalar", key=hkey, dtype=dtype)
    x = jax.random.uniform(xkey, (n, 2), minval=-3.0, maxval=3.0)
    return feature_mlp(width, key=mkey, dtype=dtype), head, x.astype(dtype), peaks(x).astype(dtype)


def run(sizes, repeats):
    import functools

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from _common import interleaved_medians

    from vploss import vploss_msereg

    def plain_loss(model_and_head, x, y):
        model, head = model_and_head
        pred = jax.vmap(lambda xi: head(model(xi)))(x)
        return 0.5 * jnp.mean((pred - y) ** 2)

    plain_step = eqx.filter_jit(eqx.filter_value_and_grad(plain_loss))

    def vp_step(solver):
        loss = lambda model, x, y: vploss_msereg(model, x, y, alpha2=1e-6, solver=solver)  # noqa: E731
        return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))

    def table_row(n, width, solvers):
        model, head, x, y = _problem(n, jnp.float32, width=width)
        steps = {"plain": (plain_step, (model, head))}
        steps.update({s: (vp_step(s), model) for s in solvers})
        times = interleaved_medians(
            {name: functools.partial(step, params, x, y) for name, (step, params) in steps.items()},
            repeats,
        )
        base = times["plain"]
        cells = " ".join(f"{times[s] / base:9.3f}" for s in solvers)
        print(f"{n:>6} {width:>5} {base:9.3f} {cells}")

    print(f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(default)')}")
    print("ratio of the median value_and_grad step time to the plain head's")
    print(f"{'N':>6} {'m':>5} {'plain ms':>9} " + " ".join(f"{s:>9}" for s in SOLVERS))
    for n in sizes:
        table_row(n, 64, SOLVERS)
    print(f"{'N':>6} {'m':>5} {'plain ms':>9} " + " ".join(f"{s:>9}" for s in WIDE_SOLVERS))
    table_row(256, 1024, WIDE_SOLVERS)


def accuracy(n):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from vploss import vploss_msereg

    def flat_grad(model, x, y, alpha2, solver):
        loss = lambda m: vploss_msereg(m, x, y, alpha2=alpha2, solver=solver)[0]  # noqa: E731
        grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
        leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
        return jnp.concatenate([g.ravel().astype(jnp.float64) for g in leaves])

    m64, _, x64, y64 = _problem(n, jnp.float64)
    m32, _, x32, y32 = _problem(n, jnp.float32)
    print(f"\nfloat32 gradient, relative error against float64 (N = {n}):")
    print(f"{'alpha2':>8} " + " ".join(f"{s:>9}" for s in SOLVERS))
    for alpha2 in (1e-6, 1e-4):
        reference = flat_grad(m64, x64, y64, alpha2, "svd")
        errors = []
        for solver in SOLVERS:
            g = flat_grad(m32, x32, y32, jnp.float32(alpha2), solver)
            errors.append(float(jnp.linalg.norm(g - reference) / jnp.linalg.norm(reference)))
        print(f"{alpha2:8.0e} " + " ".join(f"{e:9.1e}" for e in errors))


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--child", choices=["speed", "accuracy"])
    args = parser.parse_args()
    if args.child == "speed":
        run(args.sizes, args.repeats)
        return
    if args.child == "accuracy":
        accuracy(4096)
        return
    for threads in ("1", None):
        env = dict(os.environ)
        env.pop("OPENBLAS_NUM_THREADS", None)
        if threads is not None:
            env["OPENBLAS_NUM_THREADS"] = threads
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "speed",
            "--repeats",
            str(args.repeats),
            "--sizes",
            *map(str, args.sizes),
        ]
        subprocess.run(cmd, env=env, check=True)
        print()
    subprocess.run([sys.executable, __file__, "--child", "accuracy"], check=True)


if __name__ == "__main__":
    main()
