"""Nonlinear least-squares training at equal wall time: VarPro-LM (`vploss.least_squares`)
against Levenberg–Marquardt on the whole network (nlls-gram) and Adam, on a regression
problem and three linear PDEs, at several widths.

Problems (float64; every residual row `√(w_j/S)·(û(z_j) − t_j)`, `S = Σ w`):

- `peaks`: MATLAB's `peaks` on 2000 random training points in [-3, 3]² (a new draw per
  seed), test error on 4096 others (as `benchmarks/peaks_lm.py`). Features: the MLP of
  `examples/_peaks.py`, `feature_map(key, m, depth)` with `depth=1`: 2 → m → m, tanh
  (m² + 4m parameters, as `peaks_lm.py`'s), not its default two hidden layers
  (2 → m → m → m, 52k parameters at m = 160). Even so a step of the whole-network LM
  costs about 9 s at m = 80 and 36 s at m = 160 on one core (a 2000 × 26k Jacobian at
  m = 160), so these widths get a few steps in their budget; `--depth 0` is one tanh
  layer, `tanh(Az + c)` (`examples/pde_varpro.py`'s `feature_map`, weights within
  ±1/√2), cheap at every width; `--depth 2` the default MLP. Equal weights, an
  intercept.
- `poisson`, `heat`: the problems of `examples/pde_varpro.py` (its `Problem`s,
  `collocation`, `PDEFeatures`, `feature_map`, `plain_residual`, `test_error`, Adam's
  step), 32 × 32 interior points and 32 per constrained side: 1152 rows for Poisson
  (four sides), 1120 for heat (x = 0, x = 1, t = 0); boundary weight β = 100 (each
  block a mean, the boundary block β times the interior's); features `tanh(Az + c)` of
  2 inputs (4m + 1 parameters with the readout); test error on the example's 101 × 101
  grid. (The example trains when imported, so its definitions are loaded without its
  top-level statements: `load_definitions`.)
- `helmholtz`: `u'' + k²u = f` on (0, 1), k = 4, with `u(x) = sin(3πx) + x²` (so
  `f = (k² − 9π²) sin(3πx) + 2 + k²x²`, `u(0) = 0`, `u(1) = 1`), in the same style: 1000
  interior points at cell midpoints and the two end points (1002 rows), β = 100,
  features `tanh(ax + c)` (`a`, `c` uniform within ±4) with the operator applied by
  `PDEFeatures` (which applies it to the constant feature too: k² here, not 0); test
  error on 1001 uniform points.

Methods, from the same hidden parameters in each seed:

- `varpro`: `vploss.least_squares` (Levenberg–Marquardt on the variable projection
  residual, only the hidden parameters trained; `use_bias=False` and the rows' `weights`
  for the PDEs, which carry their ones column in `PDEFeatures`), its defaults unless
  `--jacobian`, `--alpha2` say otherwise. Driven by its `callback`, which records the
  time and the test error of the current model and readout after every step and stops
  the solve when the budget is spent.
- `nlls`: `nlls_gram.LevenbergMarquardt` on the plain residual of the whole network
  (hidden parameters and the linear head together; the readout initialised uniform
  within ±1/√m), with its own defaults (geodesic acceleration, its Jacobian, the
  Cholesky auto form), stepped by hand with `init`/`update` (one `eqx.filter_jit` of
  `update`, compiled once per problem and width and reused across seeds). Its own
  Jacobian pushes the identity basis of the smaller side through the whole batch
  (`jax.linearize`, then `vmap` over parameters or residual entries), which does not use
  that each row depends on one sample only.
- `nlls-ps` (not run by default): the same solver and residual, its derivative the
  per-sample Jacobian (`jax.vmap` of `jax.grad` of each row, one reverse pass per
  sample, handed over through a `jax.custom_jvp`), as `benchmarks/peaks_lm.py`'s
  reference; at m = 40 its steps cost 1/5 to 1/30 of `nlls`'s.
- `adam`: `optax.adam` on half the sum of squares of the same plain residual (full
  batch), at the best of the learning rates 1e-3, 3e-3, 1e-2 (the lowest final test error
  of seed 0; the other seeds use it). Its test error is evaluated after every 10th step.

Timing: every run trains for the same budget (`--budget` seconds at m ≤ 40, scaled by
m/40 above: 2× at m = 80, 4× at m = 160; `--flat-budget` keeps it fixed), compilation
excluded (a warm-up on each problem and width before the first seed: `least_squares`
with `max_steps=1`, one step of the others), all methods in one process, one after the
other. The clock runs over the steps only: `block_until_ready` before each reading, the
test-error evaluation after each step paused out (for VarPro, the time spent in the
callback is subtracted). `nlls`'s `init` is timed (its first `update` forms the
Jacobian), as is everything `least_squares` does before its first callback.

Reported, per problem and width (medians over `--seeds` seeds): the relative L2 test
error at 10%, 33% and 100% of the budget (that of the last step finished by then; `—`
when none had), steps taken, ms/step (training seconds / steps), and the step cost: the
median of a run's per-step times after its first 3 steps, accepted and rejected steps
alike (a rejected step reuses the Jacobian in both LM solvers, so is cheaper). Then the
step-cost ratio VarPro / nlls-gram (and / `nlls-ps` when run) for every problem and
width (median over seeds of the per-run ratio of step costs; both measured in their own
runs of the same seed, one after the other, so under the same load), and the method
with the lowest median error at each time mark.

Usage: `python benchmarks/least_squares.py [--quick] [--seeds 3] [--budget 10]
[--problems peaks poisson heat helmholtz] [--widths 20 40 80 160]
[--methods varpro nlls nlls-ps adam] [--jacobian golub_pereyra|kaufman]
[--alpha2 A|gcv] [--depth 1]`;
`--quick` is a smoke test (tiny sizes, one seed, 1.5 s per run), not a measurement.
"""

import argparse
import ast
import dataclasses
import importlib.metadata
import pathlib
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import nlls_gram  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import peaks  # noqa: E402  (puts examples/ on the path)
from _peaks import feature_map as peaks_feature_map, relative_error  # noqa: E402

import vploss  # noqa: E402


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
METHODS = {
    "varpro": "VarPro-LM",
    "nlls": "LM, whole network (nlls-gram)",
    "nlls-ps": "the same, per-sample Jacobian",
    "adam": "Adam",
}
DEFAULT_METHODS = ("varpro", "nlls", "adam")
LEARNING_RATES = (1e-3, 3e-3, 1e-2)
MARKS = (0.1, 1 / 3, 1.0)  # fractions of the budget
SKIP = 3  # steps left out of the step cost at the start of a run
BETA = 100.0  # the weight of the boundary block, the interior's being 1


def load_definitions(path, names):
    """The module at `path` with only its imports, functions, classes and the
    assignments to `names` run: `examples/pde_varpro.py` trains and plots when imported,
    and its definitions are what this benchmark reuses."""
    tree = ast.parse(path.read_text())
    kept = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef)
        or (
            isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id in names for t in node.targets)
        )
    ]
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    sys.modules[path.stem] = module
    exec(compile(ast.Module(kept, type_ignores=[]), str(path), "exec"), module.__dict__)
    return module


pde = load_definitions(EXAMPLES / "pde_varpro.py", {"kappa", "problems", "grid", "test_points"})
pde.boundary_weight = BETA  # `collocation` reads it; the example sets it from its options


# --- the problems ------------------------------------------------------------------------


class Augmented(eqx.Module):
    """A feature map with a ones column appended (the whole network's intercept)."""

    features: eqx.Module

    def __call__(self, x):
        return jnp.append(self.features(x), 1.0)


@dataclasses.dataclass(frozen=True)
class Task:
    """One problem at one size: training rows, how to build the models, the test error."""

    name: str
    rows: str  # a description of the training rows
    samples: Any  # (N, d)
    targets: Any  # (N,)
    weights: Any  # (N,), or None for equal weights
    use_bias: bool  # whether VarPro fits an intercept (the PDE features carry theirs)
    features: Callable  # (key, width) -> the VarPro model: one sample -> its features
    augmented: Callable  # VarPro model -> the whole network's features (with ones)
    test_error: Callable  # (augmented features, coefficients (width + 1,)) -> error

    @property
    def data(self):
        """`(samples, targets, weights)` of `pde.plain_residual` and `pde.adam_step`."""
        weights = jnp.ones_like(self.targets) if self.weights is None else self.weights
        return self.samples, self.targets, weights


def peaks_task(seed, n_train, depth):
    key_data, key_test = jax.random.split(jax.random.PRNGKey(1000 + seed))
    x = jax.random.uniform(key_data, (n_train, 2), minval=-3.0, maxval=3.0)
    x_test = jax.random.uniform(key_test, (4096, 2), minval=-3.0, maxval=3.0)
    y_test = peaks(x_test)

    if depth == 0:  # one tanh layer (`eqx.nn.MLP` of depth 0 has no activation)
        features, layers = lambda key, width: pde.feature_map(key, width, scale=1.0), ""
    else:
        features = lambda key, width: peaks_feature_map(key, width, depth)
        layers = " → m" * depth
    return Task(
        "peaks",
        f"{n_train} points, 2 → m{layers} tanh",
        x,
        peaks(x),
        None,
        True,
        features,
        Augmented,
        lambda features, coefficients: peaks_test_error(features, coefficients, x_test, y_test),
    )


@eqx.filter_jit
def peaks_test_error(features, coefficients, x_test, y_test):
    return relative_error(jax.vmap(features)(x_test) @ coefficients, y_test)


def pde_task(problem, q):
    samples, targets, weights = pde.collocation(problem, q)
    sides = len(problem.sides)
    return Task(
        problem.name,
        f"{q}×{q} interior + {sides}×{q} boundary = {len(targets)} rows",
        samples,
        targets,
        weights,
        False,
        lambda key, width: pde.varpro_model(problem, key, width),
        lambda model: model,
        lambda features, coefficients: pde.test_error(problem, features, coefficients),
    )


# Helmholtz on (0, 1): u'' + k²u = f, u = sin(3πx) + x².
WAVENUMBER = 4.0


def helmholtz_operator(function, z):
    """`function'' + k² function` at `z = (x,)`, for each output."""
    return pde.hessian(function, z)[:, 0, 0] + WAVENUMBER**2 * function(z)


def helmholtz_exact(z):
    return jnp.sin(3 * jnp.pi * z[0]) + z[0] ** 2


def helmholtz_source(z):
    x = z[0]
    return (WAVENUMBER**2 - 9 * jnp.pi**2) * jnp.sin(3 * jnp.pi * x) + 2 + (WAVENUMBER * x) ** 2


HELMHOLTZ = pde.Problem(
    "Helmholtz", helmholtz_operator, helmholtz_exact, helmholtz_source, ((0, 0.0), (0, 1.0))
)
HELMHOLTZ_TEST = jnp.linspace(0.0, 1.0, 1001)[:, None]


def feature_map_1d(key, width, scale=4.0):
    """`tanh(a x + c)`, `width` features of one input, `a` and `c` uniform within
    ±`scale` (`pde.feature_map`'s in one dimension, wider: the solution oscillates)."""
    layer = eqx.nn.Linear(1, width, key=key)
    scaled = (scale * layer.weight, scale * layer.bias)
    layer = eqx.tree_at(lambda linear: (linear.weight, linear.bias), layer, scaled)
    return eqx.nn.Sequential([layer, eqx.nn.Lambda(jnp.tanh)])


@eqx.filter_jit
def helmholtz_test_error(features, coefficients):
    exact = jax.vmap(helmholtz_exact)(HELMHOLTZ_TEST)
    predicted = jax.vmap(features.feature_map)(HELMHOLTZ_TEST) @ coefficients[:-1]
    predicted = predicted + coefficients[-1]
    return jnp.linalg.norm(predicted - exact) / jnp.linalg.norm(exact)


def helmholtz_task(n_interior):
    """`n_interior` points at cell midpoints and the two ends, weighted as
    `pde.collocation` weights its rows."""
    interior = (np.arange(n_interior) + 0.5) / n_interior
    z = jnp.asarray(np.concatenate([interior, [0.0, 1.0]]))[:, None]
    flag = jnp.concatenate([jnp.zeros(n_interior), jnp.ones(2)])
    exact, source = jax.vmap(helmholtz_exact)(z), jax.vmap(helmholtz_source)(z)
    targets = jnp.where(flag > 0, exact, source)
    weights = jnp.where(flag > 0, BETA / 2, 1.0 / n_interior)
    return Task(
        "Helmholtz",
        f"{n_interior} interior + 2 boundary = {n_interior + 2} rows",
        jnp.column_stack([z, flag]),
        targets,
        weights,
        False,
        lambda key, width: pde.PDEFeatures(feature_map_1d(key, width), helmholtz_operator),
        lambda model: model,
        helmholtz_test_error,
    )


def make_task(name, seed, sizes, depth):
    if name == "peaks":
        return peaks_task(seed, sizes["peaks"], depth)
    if name == "helmholtz":
        return helmholtz_task(sizes["helmholtz"])
    problem = {p.name.lower(): p for p in pde.problems}[name]
    return pde_task(problem, sizes["pde"])


# --- the runs ----------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One run: the training seconds and the test error after each step, the seconds of
    each step, the compile seconds of its warm-up (0 when it had none) and a note."""

    times: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    steps: list = dataclasses.field(default_factory=list)
    compile: float = 0.0
    note: str = ""

    def add(self, elapsed, error):
        self.steps.append(elapsed - (self.times[-1] if self.times else 0.0))
        self.times.append(elapsed)
        self.errors.append(float(error))

    def error_at(self, seconds):
        """The error of the last step finished within `seconds` whose error was
        evaluated (NaN: none)."""
        times, errors = np.asarray(self.times), np.asarray(self.errors)
        known = ~np.isnan(errors)
        index = np.searchsorted(times[known], seconds, side="right") - 1
        return errors[known][index] if index >= 0 else np.nan

    def step_cost(self):
        """The median seconds of a step after the first `SKIP` (of all, if fewer)."""
        steps = self.steps[SKIP:] if len(self.steps) > 2 * SKIP else self.steps
        return float(np.median(steps)) if steps else np.nan


def coefficients_of(readout):
    """A `VPLinear`'s coefficients over the features, then its intercept if it has one."""
    weight = jnp.reshape(readout.weight, -1)
    return weight if readout.bias is None else jnp.append(weight, jnp.reshape(readout.bias, -1))


def initial_models(task, key, width):
    """The VarPro model and the whole network `(augmented features, readout)`, with the
    same hidden parameters; the readout uniform within ±1/√m (as `eqx.nn.Linear`)."""
    feature_key, readout_key = jax.random.split(key)
    model = task.features(feature_key, width)
    bound = 1 / np.sqrt(width)
    readout = jax.random.uniform(readout_key, (width + 1,), minval=-bound, maxval=bound)
    return model, (task.augmented(model), readout)


def run_varpro(task, model, budget, options, warm_up):
    """`vploss.least_squares` until `budget` training seconds, via its callback."""
    record = Record()
    keywords = {"use_bias": task.use_bias, "weights": task.weights, **options}
    if warm_up:
        start = time.perf_counter()
        solution = vploss.least_squares(model, task.samples, task.targets, max_steps=1, **keywords)
        jax.block_until_ready(solution.model)
        record.compile = time.perf_counter() - start
    paused = 0.0

    def callback(progress):
        nonlocal paused
        jax.block_until_ready((progress.model, progress.readout, progress.loss))
        now = time.perf_counter()
        elapsed = now - start - paused
        features = task.augmented(progress.model)
        record.add(elapsed, task.test_error(features, coefficients_of(progress.readout)))
        paused += time.perf_counter() - now
        return elapsed >= budget

    start = time.perf_counter()
    solution = vploss.least_squares(
        model, task.samples, task.targets, max_steps=10**9, callback=callback, **keywords
    )
    if not record.times or record.times[-1] < budget:
        termination = getattr(solution.stats, "termination", "?")
        record.note = f"stopped before the budget: {termination}"
    return record


# nlls-gram's LM, its defaults, on the example's plain residual (with its own Jacobian,
# or the example's per-sample one); one compiled `update` per problem and width.
NLLS = {
    "nlls": nlls_gram.LevenbergMarquardt(pde.plain_residual),
    "nlls-ps": nlls_gram.LevenbergMarquardt(pde.per_sample_residual),
}


@eqx.filter_jit
def nlls_init(solver, params, static, data):
    return solver.init(params, (static, data))


@eqx.filter_jit
def nlls_update(solver, params, state, static, data):
    params, state, info = solver.update(params, state, (static, data))
    return params, state, info.accepted


def run_nlls(task, network, budget, method, warm_up):
    record = Record()
    solver = NLLS[method]
    params, static = eqx.partition(network, eqx.is_inexact_array)
    data = task.data
    if warm_up:
        start = time.perf_counter()
        state = nlls_init(solver, params, static, data)
        jax.block_until_ready(nlls_update(solver, params, state, static, data))
        record.compile = time.perf_counter() - start
    rejected, elapsed = 0, 0.0
    start = time.perf_counter()
    state = nlls_init(solver, params, static, data)
    while elapsed < budget:
        params, state, accepted = nlls_update(solver, params, state, static, data)
        jax.block_until_ready((params, state))
        elapsed += time.perf_counter() - start
        features, readout = eqx.combine(params, static)
        record.add(elapsed, task.test_error(features, readout))
        rejected += not bool(accepted)
        start = time.perf_counter()
    record.note = f"{rejected} rejected"
    return record


def run_adam(task, network, budget, learning_rate, warm_up):
    record = Record()
    params, static = eqx.partition(network, eqx.is_inexact_array)
    data, lr = task.data, jnp.asarray(learning_rate)
    state = optax.adam(lr).init(params)
    if warm_up:
        start = time.perf_counter()
        jax.block_until_ready(pde.adam_step(params, state, static, data, lr))
        record.compile = time.perf_counter() - start
    elapsed = 0.0
    while elapsed < budget:
        start = time.perf_counter()
        params, state = pde.adam_step(params, state, static, data, lr)
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        # The error after every 10th step (and the first few): Adam takes many.
        if len(record.steps) < 10 or elapsed >= budget or (len(record.times) + 1) % 10 == 0:
            features, readout = eqx.combine(params, static)
            record.add(elapsed, task.test_error(features, readout))
        else:
            record.add(elapsed, np.nan)
    record.note = f"lr {learning_rate:g}"
    return record


# --- the report --------------------------------------------------------------------------


def median(values):
    values = [v for v in values if not np.isnan(v)]
    return float(np.median(values)) if values else np.nan


def cell(value, fmt):
    return f"{'—':>{len(format(1.0, fmt))}}" if np.isnan(value) else format(value, fmt)


def print_width(task, width, budget, runs, seeds, learning_rate):
    marks = [fraction * budget for fraction in MARKS]
    print(
        f"\n{task.name}, m = {width}: {task.rows}, {budget:g} s per run; relative L2 test "
        f"error, median of {seeds} seed{'s' * (seeds > 1)}"
    )
    header = " ".join(f"{f'@{m:.3g}s':>9}" for m in marks)
    print(f"{'method':>30} {'lr':>6} {'steps':>7} {'ms/step':>8} {'step ms':>8} {header}")
    for method, records in runs.items():
        steps = median([len(r.times) for r in records])
        ms = median([1e3 * r.times[-1] / len(r.times) for r in records if r.times])
        cost = median([1e3 * r.step_cost() for r in records])
        lr = f"{learning_rate:g}" if method == "adam" else ""
        errors = " ".join(cell(median([r.error_at(m) for r in records]), "9.2e") for m in marks)
        print(
            f"{METHODS[method]:>30} {lr:>6} {cell(steps, '7.0f')} {cell(ms, '8.1f')} "
            f"{cell(cost, '8.1f')} {errors}",
            flush=True,
        )


def leaders(runs, budget):
    """The method with the lowest median error at each mark (`—`: no method had a step)."""
    names = []
    for fraction in MARKS:
        errors = {
            method: median([r.error_at(fraction * budget) for r in records])
            for method, records in runs.items()
        }
        errors = {method: e for method, e in errors.items() if not np.isnan(e)}
        if errors:
            best = min(errors, key=errors.get)
            names.append(f"{best} {errors[best]:.1e}")
        else:
            names.append("—")
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test (about a minute)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=10.0, help="seconds per run at m ≤ 40 (scaled by m/40)"
    )
    parser.add_argument("--flat-budget", action="store_true", help="the same budget at all m")
    parser.add_argument("--problems", nargs="+", default=["peaks", "poisson", "heat", "helmholtz"])
    parser.add_argument("--widths", nargs="+", type=int, default=[20, 40, 80, 160])
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS)
    )
    parser.add_argument("--depth", type=int, default=1, help="peaks' MLP depth (0: one tanh layer)")
    parser.add_argument(
        "--jacobian", choices=["golub_pereyra", "kaufman"], help="VarPro's (default: its own)"
    )
    parser.add_argument("--alpha2", help="VarPro's readout penalty, a number or gcv")
    args = parser.parse_args()
    if args.quick:
        seeds, budget = 1, 1.5
        sizes = {"peaks": 300, "pde": 10, "helmholtz": 200}
        if args.widths == parser.get_default("widths"):
            args.widths = [10]
    else:
        seeds, budget = args.seeds, args.budget
        sizes = {"peaks": 2000, "pde": 32, "helmholtz": 1000}
    options = {}
    if args.jacobian is not None:
        options["solver"] = vploss.VarProLevenbergMarquardt(jacobian=args.jacobian)
    if args.alpha2 is not None:
        options["alpha2"] = args.alpha2 if args.alpha2 == "gcv" else float(args.alpha2)
    if "varpro" in args.methods and not hasattr(vploss, "least_squares"):
        sys.exit("this vploss has no `least_squares`: leave out `varpro` (--methods)")

    print(
        f"{jax.devices()[0].platform}, float64; methods {', '.join(args.methods)}; VarPro "
        f"options {options or 'its defaults'}; nlls-gram {importlib.metadata.version('nlls-gram')}"
    )
    ratios, leads = {}, {}
    for name in args.problems:
        for width in args.widths:
            scale = 1.0 if args.flat_budget else max(1.0, width / 40)
            seconds = budget * scale
            runs = {method: [] for method in args.methods}
            learning_rate = None
            for seed in range(seeds):
                task = make_task(name, seed, sizes, args.depth)
                model, network = initial_models(task, jax.random.PRNGKey(seed), width)
                warm = seed == 0
                for method in args.methods:
                    if method == "varpro":
                        record = run_varpro(task, model, seconds, options, warm)
                    elif method in NLLS:
                        record = run_nlls(task, network, seconds, method, warm)
                    elif learning_rate is None:
                        tried = [
                            run_adam(task, network, seconds, lr, warm and lr == LEARNING_RATES[0])
                            for lr in LEARNING_RATES
                        ]
                        finals = [r.error_at(seconds) for r in tried]
                        record = tried[int(np.nanargmin(finals))]
                        learning_rate = LEARNING_RATES[int(np.nanargmin(finals))]
                        record.note += " (of " + ", ".join(f"{e:.1e}" for e in finals) + ")"
                    else:
                        record = run_adam(task, network, seconds, learning_rate, False)
                    runs[method].append(record)
                    compile_note = f", compile {record.compile:.1f} s" if record.compile else ""
                    print(
                        f"  {task.name} m={width} seed {seed} {method}: {len(record.times)} "
                        f"steps, {record.times[-1] if record.times else 0:.1f} s, final "
                        f"{record.error_at(seconds):.2e}, step {1e3 * record.step_cost():.1f}"
                        f" ms, {record.note}{compile_note}",
                        flush=True,
                    )
            print_width(task, width, seconds, runs, seeds, learning_rate)
            for lm in NLLS:
                if "varpro" in runs and lm in runs:
                    ratios[lm, task.name, width] = median(
                        [
                            v.step_cost() / n.step_cost()
                            for v, n in zip(runs["varpro"], runs[lm], strict=True)
                        ]
                    )
            leads[task.name, width, seconds] = leaders(runs, seconds)

    for lm in NLLS:
        names = list(dict.fromkeys(problem for key, problem, _ in ratios if key == lm))
        if not names:
            continue
        print(
            f"\nStep cost, varpro / {lm} (median over seeds of the per-run ratio of the step costs)"
        )
        print(f"{'problem':>10} " + " ".join(f"{f'm={w}':>8}" for w in args.widths))
        for problem in names:
            values = [ratios.get((lm, problem, w), np.nan) for w in args.widths]
            print(f"{problem:>10} " + " ".join(cell(v, "8.2f") for v in values))
    print("\nLowest median test error at 10%, 33% and 100% of the budget")
    print(f"{'problem':>10} {'m':>4} {'budget':>7} " + " ".join(f"{f'{f:.0%}':>26}" for f in MARKS))
    for (problem, width, seconds), names in leads.items():
        print(f"{problem:>10} {width:>4} {seconds:>6g}s " + " ".join(f"{n:>26}" for n in names))


if __name__ == "__main__":
    main()
