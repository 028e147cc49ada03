# %% [markdown]
# # Variable projection for linear PDEs: Poisson and heat equations
#
# Dong and Yang (J. Comput. Phys. 2022, arXiv:2201.09989) train networks that solve
# linear PDEs by variable projection: the network's output layer is linear in its
# coefficients, so the collocation equations are a linear least-squares problem in them,
# solved exactly, and only the hidden layers are trained (by a Gauss–Newton method on
# the reduced residual). They report errors that fall exponentially with the number of
# collocation points and of features. This example does the same with `vploss` and
# compares it with a PINN trained by Adam and with Levenberg–Marquardt on the whole
# network, at equal wall time.
#
# Two problems on the unit square, both with exact solutions:
#
# - **Poisson**: $-\Delta u = f$ on $(0,1)^2$, $u = g$ on the boundary, with
#   $u(x, y) = \sin(2\pi x)\sin(\pi y) + xy$, so $f = 5\pi^2\sin(2\pi x)\sin(\pi y)$
#   and the boundary data $g = xy$ (on the edges, where the sine term vanishes) is not
#   zero on the sides $x = 1$ and $y = 1$.
# - **Heat**: $u_t = \kappa u_{xx}$ for $x \in (0,1)$, $t \in (0, 1]$, $\kappa = 0.1$,
#   with $u(x, t) = e^{-\kappa\pi^2 t}\sin(\pi x) + \tfrac12 e^{-4\kappa\pi^2 t}
#   \sin(2\pi x) + e^{-\kappa t}\cos x$ (each term solves the equation); the initial
#   condition $u(x, 0)$ and the time-dependent boundary values $u(0, t) = e^{-\kappa t}$,
#   $u(1, t) = e^{-\kappa t}\cos 1$ are taken from it.
#
# The network is one hidden layer of $m$ tanh features, $f_\theta(z) = \tanh(Az + c)$,
# with a linear readout: $u(z) = \hat W\,[f_\theta(z), 1]$.

# %% [markdown]
# ## What the full run measured
#
#     python examples/pde_varpro.py            # about 11 minutes on one CPU core
#     python examples/pde_varpro.py --quick    # under a minute
#
# The measured tables are in `docs/pde.md`, and the stored notebook in `docs/examples/`
# holds the full output.

# %%
import argparse
import functools
import pathlib
import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import vploss  # noqa: E402


try:
    import nlls_gram
except ImportError:  # optional: the full-network LM then runs optimistix's solver
    nlls_gram = None


# %%
parser = argparse.ArgumentParser(description="VarPro for the Poisson and heat equations.")
parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed, short runs")
parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
parser.add_argument("--seeds", type=int, default=3, help="median over this many seeds")
parser.add_argument("--seconds", type=float, default=8.0, help="training time of one run")
parser.add_argument(
    "--alpha2", default="rounding", help='readout penalty: a number, "rounding" or "gcv"'
)
parser.add_argument(
    "--boundary-weight", type=float, default=100.0, help="of the boundary block, interior 1"
)
# `parse_known_args`: a notebook kernel passes arguments of its own.
args, _ = parser.parse_known_args()

if args.quick:
    seeds, seconds, features, points = 1, 0.5, 12, 8
    learning_rates = (1e-2,)
    study_features, study_points, study_steps, study_seconds = (8, 12), (6, 8), 20, 0.5
else:
    seeds, seconds, features, points = args.seeds, args.seconds, 40, 16
    learning_rates = (1e-3, 3e-3, 1e-2)
    study_features, study_points, study_steps, study_seconds = (
        (10, 20, 30, 40),
        (5, 10, 15, 20),
        100,
        25.0,
    )
study_fixed_points, study_fixed_features = max(study_points), max(study_features)
alpha2 = args.alpha2 if args.alpha2 in ("rounding", "gcv") else float(args.alpha2)
boundary_weight = args.boundary_weight


# %% [markdown]
# ## Operator features
#
# For a linear operator $\mathcal L$, $\mathcal L u = \hat W\,\mathcal L[f_\theta, 1]$:
# the PDE rows are linear in the readout too, with the operator applied to each
# feature. The per-sample map below returns $\mathcal L[f_\theta, 1](z)$ at an interior
# point and $[f_\theta, 1](z)$ at a boundary point (the operator's image of the constant
# feature is computed like the others: 0 for $-\Delta$ and $\partial_t - \kappa
# \partial_{xx}$, but not for an operator with a zeroth-order term). It carries the
# ones column itself, so the losses are called with `use_bias=False`. Each sample
# $(z, b)$ says by its flag $b$ which row it is; both rows are computed and one is
# selected (`jax.vmap` turns a branch into a select anyway; the boundary rows are few).
#
# The derivatives of the per-sample feature map are taken by forward over forward mode,
# `jax.jacfwd(jax.jacfwd(...))`: with two inputs that is four tangent passes through all
# $m$ features at once. `jax.hessian` (forward over reverse) would take one reverse pass
# per feature, $m$ times the work, and the Jacobian in θ multiplies that again by $m$
# (measured: 2.4 s a Levenberg–Marquardt step at $20 \times 20$ points and $m = 50$, out
# of memory at $30 \times 30$ and $m = 200$; 0.33 s and 13 s with forward over forward).


# %%
def hessian(function, z):
    """The second derivatives of each output of `function` at `z`: `(m, d, d)`."""
    return jax.jacfwd(jax.jacfwd(function))(z)


def neg_laplacian(function, z):
    """`-Δ function` at `z`, for each output of `function`."""
    return -jnp.trace(hessian(function, z), axis1=-2, axis2=-1)


kappa = 0.1


def heat_operator(function, z):
    """`∂_t function − κ ∂_xx function` at `z = (x, t)`, for each output."""
    return jax.jacfwd(function)(z)[:, 1] - kappa * hessian(function, z)[:, 0, 0]


class PDEFeatures(eqx.Module):
    """Per sample `(z, on_boundary)`: `L[f, 1](z)` inside, `[f, 1](z)` on the boundary."""

    feature_map: eqx.Module
    operator: Callable = eqx.field(static=True)

    def __call__(self, sample):
        z, on_boundary = sample[:-1], sample[-1]
        augmented = lambda point: jnp.append(self.feature_map(point), 1.0)  # noqa: E731
        return jnp.where(on_boundary > 0, augmented(z), self.operator(augmented, z))


def feature_map(key, width, scale=2.0):
    """`tanh(A z + c)`, `width` features of 2 inputs. The default initialisation
    (uniform within ±1/√2) is nearly linear on the unit square; `scale` widens it."""
    layer = eqx.nn.Linear(2, width, key=key)
    scaled = (scale * layer.weight, scale * layer.bias)
    layer = eqx.tree_at(lambda linear: (linear.weight, linear.bias), layer, scaled)
    return eqx.nn.Sequential([layer, eqx.nn.Lambda(jnp.tanh)])


# %% [markdown]
# ## The problems and the rows
#
# Collocation points on a uniform grid: $q \times q$ interior points and $q$ points on
# each constrained side (four for Poisson; $x = 0$, $x = 1$ and $t = 0$ for heat).
# The rows are weighted so that each block is a mean and the boundary block has
# `--boundary-weight` $\beta$ times the weight of the interior block: $w_j = 1/N_i$
# inside, $\beta/N_b$ on the boundary. Without it the weight of the boundary would
# depend on how many points each set has; and a boundary error is not damped as an
# interior residual is (for Poisson, an interior residual of frequency $k$ moves the
# solution by about residual$/k^2$, a boundary error moves it by itself), so the
# boundary rows are worth more than the interior ones. $\beta = 100$ is the default; the
# weight study below measures 1, 10 and 100.


# %%
class Problem(NamedTuple):
    name: str
    operator: Callable
    exact: Callable  # u(z) for one point z
    source: Callable  # (L u)(z) for one point z
    sides: tuple  # (axis, value) of each side where u is given


def poisson_exact(z):
    x, y = z[0], z[1]
    return jnp.sin(2 * jnp.pi * x) * jnp.sin(jnp.pi * y) + x * y


def heat_exact(z):
    x, t = z[0], z[1]
    return (
        jnp.exp(-kappa * jnp.pi**2 * t) * jnp.sin(jnp.pi * x)
        + 0.5 * jnp.exp(-4 * kappa * jnp.pi**2 * t) * jnp.sin(2 * jnp.pi * x)
        + jnp.exp(-kappa * t) * jnp.cos(x)
    )


problems = (
    Problem(
        "Poisson",
        neg_laplacian,
        poisson_exact,
        lambda z: 5 * jnp.pi**2 * jnp.sin(2 * jnp.pi * z[0]) * jnp.sin(jnp.pi * z[1]),
        ((0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)),
    ),
    Problem(
        "heat",
        heat_operator,
        heat_exact,
        lambda z: jnp.zeros_like(z[0]),
        ((0, 0.0), (0, 1.0), (1, 0.0)),
    ),
)


def collocation(problem, q):
    """`(samples, targets, weights)`: samples `(N, 3)` rows `(z, on_boundary)`."""
    inner = (np.arange(q) + 0.5) / q  # cell midpoints, off the boundary
    interior = np.stack(np.meshgrid(inner, inner, indexing="ij"), -1).reshape(-1, 2)
    along = np.linspace(0.0, 1.0, q)
    boundary = []
    for axis, value in problem.sides:
        side = np.empty((q, 2))
        side[:, axis], side[:, 1 - axis] = value, along
        boundary.append(side)
    boundary = np.concatenate(boundary)
    z = jnp.asarray(np.concatenate([interior, boundary]))
    flag = jnp.concatenate([jnp.zeros(len(interior)), jnp.ones(len(boundary))])
    targets = jnp.where(flag > 0, jax.vmap(problem.exact)(z), jax.vmap(problem.source)(z))
    weights = jnp.where(flag > 0, boundary_weight / len(boundary), 1.0 / len(interior))
    return jnp.column_stack([z, flag]), targets, weights


grid = np.linspace(0.0, 1.0, 101)
test_points = jnp.asarray(np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2))


# %% [markdown]
# ## The three methods
#
# - **VarPro-LM**: `vploss.least_squares`, Levenberg–Marquardt on the reduced residual
#   of the operator features (`use_bias=False`, the rows' `weights=`); only θ is
#   trained, the readout is solved exactly at every point (its defaults: Kaufman's
#   Jacobian, the readout penalty at the rounding level of the features, geodesic
#   acceleration). Its `callback` records the test error and stops at the time budget.
# - **PINN, Adam**: the same features with a trainable readout $c$: the residual rows
#   are $\sqrt{w_j/S}\,([\mathcal L f_\theta, 1](z_j)\,c - f(z_j))$ inside and
#   $\sqrt{w_j/S}\,([f_\theta, 1](z_j)\,c - g(z_j))$ on the boundary (linearity again),
#   the loss half their sum of squares.
# - **LM, full network**: nlls-gram's `LevenbergMarquardt` on that residual, θ and $c$
#   together, with the Jacobian formed per sample (each row depends on one sample: one
#   reverse pass of one sample per row, far cheaper than nlls-gram's own Jacobian here);
#   optimistix's `LevenbergMarquardt` when nlls-gram is not installed.
#
# Each step is compiled once per problem size: the model's non-array parts, the data
# and Adam's learning rate are arguments, so seeds, weights and rates reuse it.


# %%
def flat(tree):
    return ravel_pytree(tree)[0]


def plain_residual(params, args):
    """The PINN residual of the network `(features, readout)`."""
    static, (samples, targets, weights) = args
    model, readout = eqx.combine(params, static)
    rows = jax.vmap(model)(samples) @ readout - targets
    return rows * jnp.sqrt(weights / jnp.sum(weights))


class Method(NamedTuple):
    init: Callable  # (params, static, data) -> state
    step: Callable  # (params, state, static, data) -> (params, state)
    solution: Callable  # (model, state) -> (PDEFeatures, readout coefficients)


def optimistix_lm(residual):
    """A `Method` stepping optimistix's Levenberg–Marquardt on `residual(params, args)`."""
    solver = optx.LevenbergMarquardt(rtol=0.0, atol=0.0, linear_solver=lx.Normal(lx.Cholesky()))

    # Compiled, so that every state has the same non-array part: the state holds a
    # jaxpr, compared by identity, and a new one would recompile `step` for every run.
    @eqx.filter_jit
    def init(params, static, data):
        f_struct = jax.eval_shape(lambda: residual(params, (static, data)))
        args, aux_struct = (static, data), None
        return solver.init(residual, params, args, {}, f_struct, aux_struct, frozenset())

    @eqx.filter_jit
    def step(params, state, static, data):
        params, state, _ = solver.step(residual, params, (static, data), {}, state, frozenset())
        return params, state

    return Method(init, step, lambda model, state: model)


def per_sample_residual(params, args):
    """`plain_residual` whose Jacobian is formed once per linearisation, row by row:
    row j depends on sample j only, so one reverse pass of one sample gives it."""
    static, (samples, targets, weights) = args
    scale = jnp.sqrt(weights / jnp.sum(weights))

    def row(p, sample):
        model, readout = eqx.combine(p, static)
        return model(sample) @ readout

    @jax.custom_jvp
    def residual(p):
        return (jax.vmap(lambda s: row(p, s))(samples) - targets) * scale

    @residual.defjvp
    def residual_jvp(primals, tangents):
        (p,), (t,) = primals, tangents
        jacobian = jax.vmap(lambda s: flat(jax.grad(row)(p, s)))(samples) * scale[:, None]
        return residual(p), jacobian @ flat(t)

    return residual(params)


if nlls_gram is None:
    full_lm = optimistix_lm(per_sample_residual)
    full_name = "LM, full network (optimistix)"
else:
    full_solver = nlls_gram.LevenbergMarquardt(per_sample_residual)

    @eqx.filter_jit
    def full_step(params, state, static, data):
        params, state, _ = full_solver.update(params, state, (static, data))
        return params, state

    full_lm = Method(
        lambda params, static, data: full_solver.init(params, (static, data)),
        full_step,
        lambda model, state: model,
    )
    full_name = "LM, full network (nlls-gram)"


@eqx.filter_jit
def adam_step(params, state, static, data, lr):
    grads = jax.grad(lambda p: 0.5 * jnp.sum(plain_residual(p, (static, data)) ** 2))(params)
    updates, state = optax.adam(lr).update(grads, state, params)
    return optax.apply_updates(params, updates), state


def pinn_adam(lr):
    lr = jnp.asarray(lr)  # traced, so that every rate runs the same compiled step
    return Method(
        lambda params, static, data: optax.adam(lr).init(params),
        lambda params, state, static, data: adam_step(params, state, static, data, lr),
        lambda model, state: model,
    )


# %% [markdown]
# Each run trains for a fixed wall time (compilation excluded) and records the test
# error at geometrically spaced steps (the error evaluation is not timed).


# %%
def varpro_model(problem, key, width):
    return PDEFeatures(feature_map(key, width), problem.operator)


def plain_model(problem, key, width):
    """The features and a readout initialised like `eqx.nn.Linear`'s."""
    feature_key, readout_key = jax.random.split(key)
    bound = 1 / np.sqrt(width)
    readout = jax.random.uniform(readout_key, (width + 1,), minval=-bound, maxval=bound)
    return (varpro_model(problem, feature_key, width), readout)


@eqx.filter_jit
def test_error(problem, model, coefficients):
    """Relative L2 error of `u(z) = [f_θ(z), 1]·coefficients` on the test grid."""
    exact = jax.vmap(problem.exact)(test_points)
    features = jax.vmap(model.feature_map)(test_points)
    predicted = features @ coefficients[:-1] + coefficients[-1]
    return jnp.linalg.norm(predicted - exact) / jnp.linalg.norm(exact)


def train(problem, method, model, data, budget, max_steps=None):
    """`(steps, errors, seconds)` of `budget` seconds or `max_steps` steps of training."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = method.init(params, static, data)
    step = lambda params, state: method.step(params, state, static, data)  # noqa: E731
    jax.block_until_ready(step(params, state))  # compile outside the timed loop
    record = Recorder(problem, budget, max_steps)
    elapsed = 0.0
    while not record.done(elapsed):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        solution = lambda p=params, s=state: method.solution(eqx.combine(p, static), s)  # noqa: E731
        record(elapsed, solution)
    return record.arrays()


class Recorder:
    """The test error at geometrically spaced steps (and the last), with the seconds."""

    def __init__(self, problem, budget, max_steps):
        self.problem, self.budget, self.max_steps = problem, budget, max_steps
        self.steps, self.errors, self.times = [], [], []
        self.count, self.next_record = 0, 1

    def done(self, elapsed):
        return elapsed >= self.budget or self.count == self.max_steps

    def __call__(self, elapsed, solution):
        self.count += 1
        if self.count >= self.next_record or self.done(elapsed):
            self.steps.append(self.count)
            self.errors.append(float(test_error(self.problem, *solution())))
            self.times.append(elapsed)
            self.next_record = max(self.count + 1, int(self.count * 1.1))

    def arrays(self):
        return np.array(self.steps), np.array(self.errors), np.array(self.times)


def train_varpro(problem, model, data, budget, max_steps=None):
    """`vploss.least_squares` for `budget` seconds or `max_steps` steps: its callback
    records the error (not timed) and stops the solve."""
    samples, targets, weights = data
    keywords = {"use_bias": False, "weights": weights, "alpha2": alpha2}
    vploss.least_squares(model, samples, targets, max_steps=1, **keywords)  # compile
    record = Recorder(problem, budget, max_steps)
    clock = {"start": time.perf_counter(), "paused": 0.0}

    def callback(progress):
        now = time.perf_counter()
        elapsed = now - clock["start"] - clock["paused"]
        record(elapsed, lambda: (progress.model, coefficients(progress.readout)))
        clock["paused"] += time.perf_counter() - now
        return record.done(elapsed)

    vploss.least_squares(
        model, samples, targets, max_steps=max_steps or 10**6, callback=callback, **keywords
    )
    return record.arrays()


def coefficients(readout):
    """The readout's coefficients over `[f_θ, 1]` (the ones column is a feature)."""
    return jnp.reshape(readout.weight, -1)


# %% [markdown]
# ## The comparison
#
# Adam runs at three learning rates on the first seed; the best (lowest final error)
# runs on the other seeds. Seeds change the initialisation; the grid is fixed. The
# table gives the median over seeds of the error reached after a tenth, a third and all
# of the time budget.


# %%
def compare(problem):
    data = collocation(problem, points)
    runs = {"VarPro-LM": [], full_name: [], "PINN, Adam": []}
    tuned = None
    for seed in range(seeds):
        key = jax.random.PRNGKey(seed)
        varpro, plain = varpro_model(problem, key, features), plain_model(problem, key, features)
        runs["VarPro-LM"].append(train_varpro(problem, varpro, data, seconds))
        runs[full_name].append(train(problem, full_lm, plain, data, seconds))
        if tuned is None:
            tried = {
                lr: train(problem, pinn_adam(lr), plain, data, seconds) for lr in learning_rates
            }
            tuned = min(tried, key=lambda lr: tried[lr][1][-1])
            runs["PINN, Adam"].append(tried[tuned])
        else:
            runs["PINN, Adam"].append(train(problem, pinn_adam(tuned), plain, data, seconds))
    return runs, tuned


def median_at(runs, mark):
    """Median over seeds of the error at the last record within `mark` seconds."""
    return np.median([r[1][np.searchsorted(r[2], mark, side="right") - 1] for r in runs])


marks = [seconds / 10, seconds / 3, seconds]
results = {}
for problem in problems:
    runs, tuned = compare(problem)
    results[problem.name] = runs
    print(
        f"\n{problem.name}: {points}×{points} interior points, {features} features, "
        f"boundary weight {boundary_weight:g}, alpha2 {alpha2}; relative L2 test error, "
        f"median of {seeds} seed{'s' * (seeds > 1)}"
    )
    header = " ".join(f"{f'@{m:.3g}s':>9}" for m in marks)
    print(f"{'method':>29} {'lr':>6} {'steps':>7} {'ms/step':>8} {header}")
    for name, method_runs in runs.items():
        steps = np.median([r[0][-1] for r in method_runs])
        ms = np.median([1e3 * r[2][-1] / r[0][-1] for r in method_runs])
        lr = f"{tuned:g}" if name == "PINN, Adam" else ""
        errors = " ".join(f"{median_at(method_runs, m):9.2e}" for m in marks)
        print(f"{name:>29} {lr:>6} {steps:7.0f} {ms:8.2f} {errors}", flush=True)


# %%
fig, axes = plt.subplots(2, 2, figsize=(12, 8))
for row, (name, runs) in zip(axes, results.items(), strict=True):
    for method, method_runs in runs.items():
        steps, errors, times = method_runs[0]
        row[0].loglog(steps, errors, label=method)
        row[1].loglog(times, errors, label=method)
    row[0].set_xlabel("steps")
    row[1].set_xlabel("training wall time (s)")
    for ax in row:
        ax.set_ylabel(f"{name}: relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
axes[0, 0].legend()
fig.suptitle("first seed")
fig.tight_layout()
args.out.mkdir(parents=True, exist_ok=True)
path = args.out / "pde_varpro.png"
fig.savefig(path, dpi=120)
print(f"saved {path}")


# %% [markdown]
# ## The boundary weight
#
# VarPro-LM in the comparison's setting with β = 1, 10 and 100 (first seed, the same
# time budget).


# %%
print(f"\nVarPro-LM error after {seconds:g} s against the boundary weight β")
print(f"{'problem':>8} " + " ".join(f"{f'β={b:g}':>9}" for b in (1, 10, 100)))
for problem in problems:
    samples, targets, weights = collocation(problem, points)
    on_boundary = samples[:, -1] > 0
    model = varpro_model(problem, jax.random.PRNGKey(0), features)
    errors = []
    for beta in (1.0, 10.0, 100.0):
        data = (samples, targets, jnp.where(on_boundary, weights * beta / boundary_weight, weights))
        errors.append(train_varpro(problem, model, data, seconds)[1][-1])
    print(f"{problem.name:>8} " + " ".join(f"{e:9.2e}" for e in errors), flush=True)


# %% [markdown]
# ## Error against the number of features and of collocation points
#
# Dong and Yang's claim: with the other resolution large enough, the error falls
# exponentially in the number of features and of collocation points. VarPro-LM on the
# first seed, $m$ features at $q \times q$ interior points, run to near convergence:
# `study_steps` steps or `study_seconds`, whichever comes first (a fixed time would
# give the larger problems fewer steps, and measure that instead). An exponential law
# $e \approx C \rho^{n}$ is a straight line of $\log_{10} e$ against $n$; the slope of a
# least-squares fit is printed (decades per feature, or per point along a side), with
# the correlation of the fit.


# %%
def slope(sizes, errors):
    """Least-squares slope of log10(error) against size and the fit's correlation."""
    logs = np.log10(errors)
    return np.polyfit(sizes, logs, 1)[0], np.corrcoef(sizes, logs)[0, 1]


@functools.cache  # the largest size is on both axes
def study_error(problem, q, width):
    """`(error, steps)` at the end of the run."""
    model = varpro_model(problem, jax.random.PRNGKey(0), width)
    data = collocation(problem, q)
    steps, errors, _ = train_varpro(problem, model, data, study_seconds, study_steps)
    return errors[-1], steps[-1]


study = {}
# --quick: one problem, as each size compiles its own step.
for problem in problems[:1] if args.quick else problems:
    by_features, feature_steps = zip(
        *(study_error(problem, study_fixed_points, m) for m in study_features), strict=True
    )
    by_points, point_steps = zip(
        *(study_error(problem, q, study_fixed_features) for q in study_points), strict=True
    )
    study[problem.name] = (by_features, by_points)
    print(f"\n{problem.name}: VarPro-LM error after {study_steps} steps or {study_seconds:g} s")
    print(f"  {study_fixed_points}×{study_fixed_points} interior points, m features:")
    for m, e, n in zip(study_features, by_features, feature_steps, strict=True):
        print(f"    m = {m:4d}  {e:.2e}  ({n} steps)")
    print("    log10 slope per feature {:.4f} (correlation {:.2f})".format(
        *slope(study_features, by_features)))  # fmt: skip
    print(f"  {study_fixed_features} features, q×q interior points:")
    for q, e, n in zip(study_points, by_points, point_steps, strict=True):
        print(f"    q = {q:4d}  {e:.2e}  ({n} steps)")
    print("    log10 slope per point along a side {:.4f} (correlation {:.2f})".format(
        *slope(study_points, by_points)))  # fmt: skip

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, (by_features, by_points) in study.items():
    axes[0].semilogy(study_features, by_features, "o-", label=name)
    axes[1].semilogy(study_points, by_points, "o-", label=name)
axes[0].set_xlabel(f"features m ({study_fixed_points}² interior points)")
axes[1].set_xlabel(f"interior points per side q ({study_fixed_features} features)")
for ax in axes:
    ax.set_ylabel("relative L2 error")
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend()
fig.tight_layout()
path = args.out / "pde_varpro_convergence.png"
fig.savefig(path, dpi=120)
print(f"saved {path}")
