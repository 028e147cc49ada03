"""The effect of OpenBLAS's threading on the library's paths that call LAPACK, on a quiet
and on a loaded CPU.

JAX runs its CPU matmuls on XLA's own thread pool, but its CPU linear algebra (Cholesky,
triangular solves, eigendecompositions, SVDs) are custom calls into LAPACK and BLAS,
which jaxlib takes from SciPy's bundled OpenBLAS. OpenBLAS starts one thread per core
unless `OPENBLAS_NUM_THREADS` says otherwise, and its threads spin while they wait for
work: on a CPU that other processes keep busy, a small threaded call waits for threads
that are not running.

The script measures each path in four fresh processes (the variable is read when
OpenBLAS loads): `OPENBLAS_NUM_THREADS=1` and unset (OpenBLAS's default, one thread per
core), each on the machine as it is ("quiet") and with one busy-loop process per core
started for the measurement and killed afterwards ("loaded"). Each path is one jitted
`value_and_grad` step (or, for `refit_readout` and `least_squares`, one call), compiled
first; the time is the median of `--repeats` calls, all paths interleaved in the same
process. Also printed: the LAPACK/BLAS custom calls in each path's compiled programs
(from XLA's dump of the optimised HLO), the OpenBLAS libraries loaded (threadpoolctl,
if installed) and the load average before each configuration.

First the routines alone (float32, random matrices): the Cholesky factor (`potrf`) of
order 64-256, a Cholesky solve with 10 right-hand sides (two `trsm`), the symmetric
eigendecomposition (`syevd`) of order 32-128 and the thin SVD (`gesdd`) of 1024 × 8-256
matrices. Then the library's paths, float32, the feature map an MLP 2 → 64 → 64 → m
(tanh), targets the peaks surface (ridge) or labels of the inputs (classification):

- `vploss_msereg`: the default solver (`"cholesky"` for N >= m + 1, `"dual"` below), and
  `solver="svd"`, `solver="cholesky"`, `alpha2="gcv"`;
- `vploss_bce`, `vploss_ce` (K = 10 classes): the default solver, warm started from the
  readout of the same batch as in a training loop;
- `SlimTik(memory=8).update` (batches of N) and `WindowedReadout(SoftmaxCrossEntropy(10),
  memory=4).update` (batches of N/4), with a filled memory;
- `refit_readout` for `vploss_msereg` and (m <= 64) `vploss_ce` over 4 batches of N/4;
- (m <= 64) `least_squares(max_steps=1)`: one Levenberg–Marquardt step (float64, an MLP
  2 → w → w, tanh, w = m/2, on N/4 samples of peaks).

    python benchmarks/blas_threads.py           # (N, m) = (1024, 32), (1024, 64), (4096, 256); wide (256, 256)
    python benchmarks/blas_threads.py --quick   # (256, 32), wide (64, 64), 3 repeats: a smoke test

The whole run takes about an hour on a busy 2-core machine (the slow configurations
are the point); `--quick` a few minutes.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time


SHAPES = ((1024, 32), (1024, 64), (4096, 256))
WIDE = (256, 256)
QUICK_SHAPES = ((256, 32),)
QUICK_WIDE = (64, 64)
# The routines alone, float32: (name, rows, columns).
ROUTINES = (
    [("potrf: jnp.linalg.cholesky", n, n) for n in (64, 128, 256)]
    + [("trsm: cho_solve, 10 right-hand sides", n, n) for n in (64, 128)]
    + [("syevd: jnp.linalg.eigh", n, n) for n in (32, 64, 128)]
    + [("gesdd: jnp.linalg.svd", 1024, m) for m in (8, 32, 256)]
)
QUICK_ROUTINES = (("potrf: jnp.linalg.cholesky", 256, 256), ("gesdd: jnp.linalg.svd", 256, 32))
NUM_CLASSES = 10
CONFIGS = (("quiet", "1"), ("quiet", None), ("loaded", "1"), ("loaded", None))


def _paths(shapes, wide, routines):
    """The measured paths: (name, N, m) in table order. `refit_readout` of the softmax
    loss and `least_squares` only up to m = 64 (at m = 256 a pass of the former factors
    a Hessian of order 2570, the latter's Jacobian has 17k columns)."""
    rows = list(routines)
    for n, m in shapes:
        rows += [
            ("vploss_msereg (default: cholesky)", n, m),
            ('vploss_msereg solver="svd"', n, m),
            ('vploss_msereg alpha2="gcv"', n, m),
            ("vploss_bce (default)", n, m),
            ("vploss_ce K=10 (default)", n, m),
            ("SlimTik.update", n, m),
            ("WindowedReadout.update, ce K=10", n, m),
            ("refit_readout, msereg", n, m),
        ]
        if m <= 64:
            rows += [("refit_readout, ce K=10", n, m), ("least_squares, 1 step", n, m)]
    n, m = wide
    rows += [
        ("vploss_msereg (default: dual)", n, m),
        ('vploss_msereg solver="cholesky"', n, m),
        ('vploss_msereg solver="svd"', n, m),
    ]
    return rows


def _routine(name, rows, columns):
    """A zero-argument callable of one linear-algebra routine on a random float32
    matrix (`rows × columns`; a positive definite one for the square cases)."""
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl

    a = jax.random.normal(jax.random.PRNGKey(0), (rows, columns), jnp.float32)
    gram = a.T @ a / rows + jnp.eye(columns, dtype=jnp.float32)
    if name.startswith("potrf"):
        fn, args = jnp.linalg.cholesky, (gram,)
    elif name.startswith("trsm"):
        rhs = jnp.ones((columns, 10), jnp.float32)
        fn, args = lambda f, b: jsl.cho_solve((f, True), b), (jnp.linalg.cholesky(gram), rhs)
    elif name.startswith("syevd"):
        fn, args = jnp.linalg.eigh, (gram,)
    else:
        fn, args = lambda z: jnp.linalg.svd(z, full_matrices=False), (a,)
    compiled = jax.jit(fn)
    return lambda: compiled(*args)


def _step(name, n, m):
    """A zero-argument callable running the path once (compiled on its first call)."""
    if name.startswith(("potrf", "trsm", "syevd", "gesdd")):
        return _routine(name, n, m)
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from _common import angle_classes, feature_mlp, peaks

    import vploss

    key = jax.random.PRNGKey(0)
    mkey, xkey = jax.random.split(key)
    x = jax.random.uniform(xkey, (n, 2), jnp.float32, minval=-3.0, maxval=3.0)
    model = feature_mlp(m, key=mkey)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y = peaks(x)
    labels = angle_classes(x / 3, NUM_CLASSES)
    binary = (labels % 2).astype(jnp.float32)

    def value_and_grad(loss, *args):
        step = eqx.filter_jit(
            eqx.filter_value_and_grad(lambda p, *a: loss(eqx.combine(p, static), *a), has_aux=True)
        )
        return lambda: step(params, *args)

    if name.startswith("vploss_msereg"):
        options = {}
        if "gcv" in name:
            options["alpha2"] = "gcv"
        for solver in ("svd", "cholesky", "dual"):
            if f'"{solver}"' in name:
                options["solver"] = solver
        return value_and_grad(lambda mod: vploss.vploss_msereg(mod, x, y, **options))
    if name.startswith(("vploss_bce", "vploss_ce")):
        if name.startswith("vploss_bce"):
            loss = lambda mod, init: vploss.vploss_bce(  # noqa: E731
                mod, x, binary, alpha2=1e-4, init=init, throw=False
            )
        else:
            loss = lambda mod, init: vploss.vploss_ce(  # noqa: E731
                mod, x, labels, alpha2=1e-4, num_classes=NUM_CLASSES, init=init, throw=False
            )
        init = eqx.filter_jit(loss)(model, None)[1]
        return value_and_grad(loss, init)
    if name.startswith(("SlimTik", "WindowedReadout")):
        if name.startswith("SlimTik"):
            rule, batch, targets = vploss.SlimTik(memory=8), n, y
        else:
            rule = vploss.WindowedReadout(
                vploss.SoftmaxCrossEntropy(num_classes=NUM_CLASSES), memory=4, throw=False
            )
            batch, targets = n // 4, labels
        update = eqx.filter_jit(rule.update)
        state = rule.init(model, x[:batch], targets[:batch])
        for i in range(rule.memory + 1):  # fill the memory with other batches
            other = jnp.roll(x, 17 * (i + 1), axis=0)[:batch]
            other_targets = (
                peaks(other) if targets is y else angle_classes(other / 3, NUM_CLASSES)
            )
            _, (_, state) = update(model, other, other_targets, state)
        return value_and_grad(
            lambda mod, state: rule.update(mod, x[:batch], targets[:batch], state), state
        )
    if name.startswith("refit_readout"):
        quarter = n // 4
        if name.endswith("msereg"):
            batches = [(x[i : i + quarter], y[i : i + quarter]) for i in range(0, n, quarter)]
            return lambda: vploss.refit_readout(
                model, batches, loss=vploss.vploss_msereg, alpha2=1e-6
            ).weight
        batches = [(x[i : i + quarter], labels[i : i + quarter]) for i in range(0, n, quarter)]
        return lambda: vploss.refit_readout(
            model, batches, loss=vploss.vploss_ce, alpha2=1e-4, num_classes=NUM_CLASSES
        ).weight
    if name.startswith("least_squares"):
        width = max(m // 2, 8)
        samples = max(n // 4, 64)
        net = eqx.nn.MLP(2, width, width, 1, activation=jnp.tanh, final_activation=jnp.tanh, key=mkey)
        net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, net)
        xs = x[:samples].astype(jnp.float64)
        ys = peaks(xs)
        return lambda: vploss.least_squares(net, xs, ys, max_steps=1).readout.weight
    raise ValueError(name)


def _lapack_targets(directory, seen):
    """The LAPACK/BLAS custom-call targets in the optimised HLO XLA dumped since `seen`
    (a set of file names, updated), by routine name without the prefix and suffix."""
    found = set()
    for path in sorted(pathlib.Path(directory).glob("*after_optimizations.txt")):
        if path.name in seen:
            continue
        seen.add(path.name)
        for target in re.findall(r'custom_call_target="(?:lapack|blas)_([a-z0-9]+?)(?:_ffi)?"', path.read_text()):
            found.add(target)
    return sorted(found)


def _blas_libraries():
    """The OpenBLAS builds loaded in this process, with their thread counts."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        names = set()
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "openblas" in line.lower():
                    names.add(pathlib.Path(line.split()[-1]).name)
        return sorted(names)
    return [
        f"{pathlib.Path(info['filepath']).name} {info['version']} ({info['num_threads']} threads)"
        for info in threadpool_info()
        if info["user_api"] == "blas"
    ]


def child(spec):
    """Measures every path of `spec` in this process; prints one JSON line."""
    import jax

    jax.config.update("jax_enable_x64", True)  # least_squares in float64; the rest float32
    import numpy as np

    paths = [tuple(p) for p in spec["paths"]]
    steps, targets = {}, {}
    seen = set()
    dump = os.environ.get("BLAS_THREADS_DUMP")
    for name, n, m in paths:
        key = f"{name} | {n} x {m}"
        step = _step(name, n, m)
        jax.block_until_ready(step())  # compile, and warm up
        steps[key] = step
        if dump:
            targets[key] = _lapack_targets(dump, seen)
    times = {key: [] for key in steps}
    for _ in range(spec["repeats"]):
        for key, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[key].append(time.perf_counter() - start)
    result = {
        "times": {key: 1e3 * float(np.median(t)) for key, t in times.items()},
        "targets": targets,
        "blas": _blas_libraries(),
    }
    print(json.dumps(result))


def _busy_loops(count):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def run(spec, threads, dump=None):
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    if threads is not None:
        env["OPENBLAS_NUM_THREADS"] = threads
    if dump:
        env["BLAS_THREADS_DUMP"] = dump
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text"
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout[-3000:] + result.stderr[-5000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (quick: 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        shapes, wide, routines = QUICK_SHAPES, QUICK_WIDE, QUICK_ROUTINES
    else:
        shapes, wide, routines = SHAPES, WIDE, ROUTINES
    repeats = args.repeats or (3 if args.quick else 7)
    spec = {"paths": _paths(shapes, wide, routines), "repeats": repeats}
    cores = os.cpu_count() or 1
    results, loads = {}, {}
    with tempfile.TemporaryDirectory() as dump:
        for load, threads in CONFIGS:
            loops = _busy_loops(cores) if load == "loaded" else []
            try:
                if loops:
                    time.sleep(1)
                loads[load, threads] = open("/proc/loadavg").read().split()[0]
                first = not results
                results[load, threads] = run(spec, threads, dump if first else None)
            finally:
                for loop in loops:
                    loop.kill()
                    loop.wait()
    targets = results["quiet", "1"]["targets"]
    print(f"{cores} cores; OpenBLAS loaded: {'; '.join(results['quiet', None]['blas'])}")
    print(
        "load average (1 min) before each configuration: "
        + ", ".join(f"{load} {threads or 'default'}: {loads[load, threads]}" for load, threads in CONFIGS)
    )
    print(f"loaded = {cores} busy-loop processes; median of {repeats}, ms\n")
    print(
        "| path | N × m | quiet, 1 thread | quiet, default | ratio | loaded, 1 thread "
        "| loaded, default | ratio | LAPACK/BLAS calls |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in results["quiet", "1"]["times"]:
        name, shape = key.split(" | ")
        cells = []
        for load in ("quiet", "loaded"):
            one = results[load, "1"]["times"][key]
            default = results[load, None]["times"][key]
            cells += [f"{one:.2f}", f"{default:.2f}", f"{default / one:.1f}"]
        print(f"| `{name}` | {shape} | " + " | ".join(cells) + f" | {', '.join(targets[key]) or '-'} |")


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    main()
