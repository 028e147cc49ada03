# %% [markdown]
# # Outer second-order training: Levenberg–Marquardt on the VarPro residual
#
# MATLAB's `peaks` surface, 2000 training points on [-3, 3]², a tanh MLP feature map
# 2→32→32 (1,152 parameters, plus the 33 of the affine readout), float64. Five methods,
# the first two from `examples/peaks_approximation.py`:
#
# 1. **Adam, plain head**: θ and the head `(w, b)` trained together on the mean squared
#    error (best of three learning rates).
# 2. **Adam, VarPro**: θ trained on the reduced loss `vploss_msereg` (best of three).
# 3. **LM, VarPro**: `vploss.least_squares`, Levenberg–Marquardt on the reduced residual
#    `r(θ) = (F̂Ŵ*(θ) − Y)/√N` with the readout `Ŵ*(θ)` solved exactly at every point
#    (its defaults: Kaufman's Jacobian, the unregularised readout `alpha2 = 0`, Nielsen's
#    damping, geodesic acceleration).
# 4. **LM, full network (optimistix)**: `optimistix.LevenbergMarquardt` on the plain
#    residual `(ŷ − y)/√N` of θ and the head together.
# 5. **LM, full network (nlls-gram)**: the Levenberg–Marquardt of the optional package
#    `nlls-gram` (geodesic acceleration, the smaller of the normal and dual systems) on
#    the same residual, when it is importable (not in `--quick` mode).
#
# Both full-network solvers get the per-sample Jacobian of the residual (below).

# %% [markdown]
# ## What the full run measured
#
#     python examples/outer_second_order.py            # 12 minutes on one CPU core
#     python examples/outer_second_order.py --quick    # under a minute
#
# Measured (2000 training points, MLP 2→32→32 tanh features, float64; medians of 3 seeds,
# one core of a 2-core CPU shared with other jobs; LM runs stop after 400 steps, 60 s of
# training or at the test error 1e-5; the notebook in `docs/examples/` holds the output):
#
#     method                          s/step  error@30  error@100   final   s to 1e-3  s to 1e-4
#     Adam, plain head (lr 1e-2)      0.0014    0.70      0.46     8.6e-3  not reached
#     Adam, VarPro (lr 1e-2)          0.0017    0.11      0.033    3.2e-3  not reached
#     LM, VarPro (least_squares)       0.33    2.8e-3    1.1e-4   1.8e-5      13.6       36.2
#     LM, full network (optimistix)    0.57    2.7e-2    8.2e-4   7.8e-4      51.5   not reached
#     LM, full network (nlls-gram)     0.27    1.5e-2    5.6e-5   9.9e-6      13.5       24.3
#
# VarPro-LM makes the most progress in the first steps (2.8e-3 after 30 steps, against
# 1.5e-2 and 2.7e-2 for the full network); full-network nlls-gram, whose tail converges
# faster per step, is ahead from about 1e-3 on and reaches 1e-5 in 52 s.

# %%
import argparse
import functools
import pathlib
import sys
import time

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402


# The peaks data, the feature map and the Adam baselines are shared with
# `peaks_approximation.py` through `examples/_peaks.py`: found next to this script, or
# from a notebook kernel started anywhere inside the repository.
_here = pathlib.Path(globals().get("__file__", "_")).resolve().parent
_dirs = (_here, *(parent / "examples" for parent in _here.parents))
sys.path.insert(0, str(next(d for d in _dirs if (d / "_peaks.py").exists())))
from _peaks import feature_map, peaks, relative_error, train_plain, train_varpro  # noqa: E402

import vploss  # noqa: E402


try:
    import nlls_gram
except ImportError:  # optional: the curves that need it are skipped
    nlls_gram = None

# %%
parser = argparse.ArgumentParser(
    description="Levenberg–Marquardt on the VarPro residual against Adam, on peaks."
)
parser.add_argument("--quick", action="store_true", help="small data, few steps")
parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
parser.add_argument("--seeds", type=int, default=3, help="median over this many seeds")
parser.add_argument("--adam-steps", type=int, default=5000)
parser.add_argument("--lm-steps", type=int, default=400)
parser.add_argument("--lm-seconds", type=float, default=60.0, help="time budget of one LM run")
parser.add_argument("--stop-error", type=float, default=1e-5, help="LM runs stop at this error")
parser.add_argument("--alpha2", type=float, default=1e-6, help="readout penalty of Adam, VarPro")
# `parse_known_args`: a notebook kernel passes arguments of its own.
args, _ = parser.parse_known_args()

if args.quick:
    n_train, width, seeds = 300, 16, 1
    adam_steps, lm_steps, lm_seconds = 200, 20, 10.0
    learning_rates = (1e-2,)
else:
    n_train, width, seeds = 2000, 32, args.seeds
    adam_steps, lm_steps, lm_seconds = args.adam_steps, args.lm_steps, args.lm_seconds
    learning_rates = (3e-3, 1e-2, 3e-2)
depth = 1  # 2 → width → width
stop_error = args.stop_error


def make_data(seed):
    key_data, key_test, key_model = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.uniform(key_data, (n_train, 2), minval=-3.0, maxval=3.0)
    x_test = jax.random.uniform(key_test, (4096, 2), minval=-3.0, maxval=3.0)
    return (x, peaks(x), x_test, peaks(x_test)), key_model


def network(key):
    """The feature map and a linear head, split into parameters and the rest."""
    head = eqx.nn.Linear(width, "scalar", key=jax.random.split(key)[1])
    return eqx.partition((feature_map(key, width, depth), head), eqx.is_inexact_array)


# %% [markdown]
# ## The full network's Jacobian
#
# Each Levenberg–Marquardt step of the full network needs the Jacobian of its residual
# (`N` rows, 1,185 columns). Row `j` depends on sample `j` only: it is the gradient of
# one sample's prediction, and `jax.vmap` over samples of `jax.grad` forms all rows in
# one batched reverse pass. optimistix's Jacobian (and nlls-gram's) instead pushes every
# parameter direction through the whole batch, at several times the cost. `per_sample`
# hands this Jacobian to either solver through a custom JVP rule: the linearisation the
# solver takes is the product with the matrix, formed once per linearisation.
# `vploss.least_squares` forms the Jacobian of the reduced residual in the same way.


# %%
def flat(tree):
    return ravel_pytree(tree)[0]


def predict(params, static, xj):
    features, head = eqx.combine(params, static)
    return head(features(xj))


def plain_residual(params, static, x, y):
    """The full network's residual `(ŷ − y)/√N`."""
    prediction = jax.vmap(predict, in_axes=(None, None, 0))(params, static, x)
    return (prediction - y) / jnp.sqrt(x.shape[0])


def per_sample_jacobian(params, static, x):
    """The Jacobian of `plain_residual` in the flattened parameters, `(N, P)`."""
    row = lambda xj: flat(jax.grad(predict)(params, static, xj))  # noqa: E731
    return jax.vmap(row)(x) / jnp.sqrt(x.shape[0])


def per_sample(static, x, y):
    """`params -> plain_residual(params, static, x, y)` whose derivative is the
    per-sample Jacobian."""

    @jax.custom_jvp
    def residual(params):
        return plain_residual(params, static, x, y)

    @residual.defjvp
    def residual_jvp(primals, tangents):
        (params,), (tangent,) = primals, tangents
        return residual(params), per_sample_jacobian(params, static, x) @ flat(tangent)

    return residual


def check_jacobian(seed=0):
    """The per-sample Jacobian against `jax.jacfwd`, on a small batch."""
    (x, y, _, _), key = make_data(seed)
    params, static = network(key)
    x, y = x[:64], y[:64]
    theta, unflatten = ravel_pytree(params)
    reference = jax.jacfwd(lambda t: plain_residual(unflatten(t), static, x, y))(theta)
    deviation = jnp.max(jnp.abs(per_sample_jacobian(params, static, x) - reference))
    print(f"per-sample Jacobian, max deviation from jax.jacfwd: {deviation:.1e}")
    assert deviation < 1e-12 * jnp.max(jnp.abs(reference))


check_jacobian()


# %% [markdown]
# ## Levenberg–Marquardt runs
#
# The clock runs over the steps only: compilation comes before (a first call), and the
# test error after each step is evaluated with the clock paused. `vploss.least_squares`
# reports every step, accepted or rejected, to its `callback`, which records the test
# error of the current model and readout and stops the run at the time budget or the
# error goal. The full-network solvers are stepped by hand (optimistix's `init`/`step`,
# nlls-gram's `init`/`update`); optimistix solves the damped system by the normal
# equations, `lx.Normal(lx.Cholesky())`.


# %%
def run_varpro_lm(model, data):
    x, y, x_test, y_test = data
    test_error = eqx.filter_jit(
        lambda model, readout: relative_error(
            jax.vmap(lambda xj: readout(model(xj)))(x_test), y_test
        )
    )
    vploss.least_squares(model, x, y, max_steps=1)  # compiles
    initial = vploss.least_squares(model, x, y, max_steps=0)
    errors, times, paused = [float(test_error(model, initial.readout))], [0.0], 0.0

    def callback(progress):
        nonlocal paused
        jax.block_until_ready(progress.model)
        now = time.perf_counter()
        times.append(now - start - paused)
        errors.append(float(test_error(progress.model, progress.readout)))
        paused += time.perf_counter() - now
        return times[-1] > lm_seconds or errors[-1] <= stop_error

    start = time.perf_counter()
    solution = vploss.least_squares(model, x, y, max_steps=lm_steps, callback=callback)
    curve = np.arange(len(errors)), np.array(errors), np.array(times)
    return curve, solution.stats.termination


def optimistix_stepper(residual, params):
    solver = optx.LevenbergMarquardt(rtol=0.0, atol=0.0, linear_solver=lx.Normal(lx.Cholesky()))
    problem = lambda p, args: (residual(p), None)  # noqa: E731
    f_struct, aux_struct = jax.eval_shape(lambda: problem(params, None))
    state = solver.init(problem, params, None, {}, f_struct, aux_struct, frozenset())

    @eqx.filter_jit
    def step(params, state):
        params, state, _ = solver.step(problem, params, None, {}, state, frozenset())
        return params, state

    return step, state


def nlls_gram_stepper(residual, params):
    solver = nlls_gram.LevenbergMarquardt(residual)
    state = solver.init(params)

    @jax.jit
    def step(params, state):
        params, state, _ = solver.update(params, state)
        return params, state

    return step, state


def run_network_lm(make_stepper, params, static, data):
    x, y, x_test, y_test = data
    step, state = make_stepper(per_sample(static, x, y), params)
    test_error = eqx.filter_jit(
        lambda p: relative_error(
            jax.vmap(predict, in_axes=(None, None, 0))(p, static, x_test), y_test
        )
    )
    jax.block_until_ready(step(params, state))  # compiles
    errors, times, elapsed = [float(test_error(params))], [0.0], 0.0
    for _ in range(lm_steps):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        errors.append(float(test_error(params)))
        times.append(elapsed)
        if elapsed > lm_seconds or errors[-1] <= stop_error:
            break
    return np.arange(len(errors)), np.array(errors), np.array(times)


# %% [markdown]
# ## The comparison
#
# Each method from the same initialisation per seed (data and initialisation change with
# the seed). Adam runs at three learning rates on the first seed; the best (lowest final
# test error) runs on the other seeds. The LM runs stop at the `--stop-error` test error,
# after `--lm-steps` steps or after `--lm-seconds` of training.


# %%
def run_all(seed, learning_rates):
    data, key = make_data(seed)
    record = sorted(
        {int(s) for s in np.geomspace(1, adam_steps, 40)}
        | {s for s in (30, 100, 2000) if s <= adam_steps}
    )
    adam = {
        "Adam, plain head": lambda lr: train_plain(key, data, adam_steps, lr, width, record, depth),
        "Adam, VarPro": lambda lr: train_varpro(
            key, data, adam_steps, lr, width, args.alpha2, record, depth
        ),
    }
    runs = {}
    for name, train in adam.items():
        for lr in learning_rates[name]:
            _, errors, times = train(lr)
            runs[(name, lr)] = (
                np.array(record),
                np.array([errors[s] for s in record]),
                np.array([times[s] for s in record]),
            )
    curve, termination = run_varpro_lm(feature_map(key, width, depth), data)
    runs[("LM, VarPro (least_squares)", None)] = curve
    params, static = network(key)
    lm = functools.partial(run_network_lm, params=params, static=static, data=data)
    runs[("LM, full network (optimistix)", None)] = lm(optimistix_stepper)
    if nlls_gram is not None and not args.quick:
        runs[("LM, full network (nlls-gram)", None)] = lm(nlls_gram_stepper)
    for (name, _), (steps, errors, times) in runs.items():
        if name.startswith("LM"):
            stop = f", stopped by: {termination}" if "VarPro" in name else ""
            print(
                f"seed {seed}, {name}: {steps[-1]} steps in {times[-1]:.1f} s, "
                f"test error {errors[-1]:.2e}{stop}"
            )
    return runs


# The learning rates are tuned on the first seed (lowest final test error); the other
# seeds run each Adam method at its tuned rate only.
all_runs = [run_all(0, {name: learning_rates for name in ("Adam, plain head", "Adam, VarPro")})]
tuned = {
    name: min(
        (lr for m, lr in all_runs[0] if m == name), key=lambda lr: all_runs[0][(name, lr)][1][-1]
    )
    for name in ("Adam, plain head", "Adam, VarPro")
}
all_runs += [run_all(seed, {name: (lr,) for name, lr in tuned.items()}) for seed in range(1, seeds)]


# %% [markdown]
# ## Medians over seeds and the table


# %%
def median_curve(curves):
    """Median over seeds of error and time, on the steps all runs reached."""
    length = min(len(c[0]) for c in curves)
    steps = curves[0][0][:length]
    errors = np.median([c[1][:length] for c in curves], axis=0)
    times = np.median([c[2][:length] for c in curves], axis=0)
    return steps, errors, times


def first_reaching(curve, level):
    """(steps, seconds) when the error first falls to `level`, else (inf, inf)."""
    steps, errors, times = curve
    hit = np.nonzero(errors <= level)[0]
    return (steps[hit[0]], times[hit[0]]) if hit.size else (np.inf, np.inf)


def error_at(curve, step):
    """The error after `step` steps, nan if the run did not record it."""
    steps, errors, _ = curve
    hit = np.nonzero(steps == step)[0]
    return errors[hit[0]] if hit.size else np.nan


best = {name: tuned.get(name) for name, _ in all_runs[-1]}
seed_curves = {name: [runs[(name, lr)] for runs in all_runs] for name, lr in best.items()}
curves = {name: median_curve(runs) for name, runs in seed_curves.items()}

adam_mark = min(2000, adam_steps)
adam_level = np.median([c[1][list(c[0]).index(adam_mark)] for c in seed_curves["Adam, plain head"]])
marks = [m for m in (30, 100) if m <= lm_steps]
levels = (1e-3, 1e-4, 1e-5)
print(
    f"\nTest relative error on peaks (N = {n_train}, MLP 2→{width}→{width}, float64; medians "
    f"over {seeds} seed{'s' * (seeds > 1)})"
)
columns = ["lr", "steps", "s/step"] + [f"@{m}" for m in marks] + ["final"]
columns += [f"steps→A{adam_mark}"] + [f"s→1e{np.log10(level):.0f}" for level in levels]
print(f"{'method':>29} " + " ".join(f"{c:>9}" for c in columns))
for name, lr in best.items():
    runs = seed_curves[name]
    row = {
        "lr": "" if lr is None else f"{lr:g}",
        "steps": f"{np.median([r[0][-1] for r in runs]):.0f}",
        "s/step": f"{np.median([r[2][-1] / r[0][-1] for r in runs]):.3g}",
    }
    row.update({f"@{m}": f"{np.median([error_at(r, m) for r in runs]):.2e}" for m in marks})
    row["final"] = f"{np.median([r[1][-1] for r in runs]):.2e}"
    row[f"steps→A{adam_mark}"] = (
        f"{np.median([first_reaching(r, adam_level)[0] for r in runs]):.0f}"
    )
    for level in levels:
        row[f"s→1e{np.log10(level):.0f}"] = (
            f"{np.median([first_reaching(r, level)[1] for r in runs]):.1f}"
        )
    print(f"{name:>29} " + " ".join(f"{row[c]:>9}" for c in columns))
print(
    f"(@n: error after n steps; final: at the last step; steps→A{adam_mark}: steps to plain "
    f"Adam's error at step {adam_mark}, {adam_level:.2e}; s→e: seconds to error e; inf: "
    "not reached)"
)

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
for name, (steps, errors, times) in curves.items():
    style = "--" if name.startswith("Adam") else "-"
    axes[0].loglog(np.maximum(steps, 1), errors, style, label=name)
    axes[1].loglog(np.maximum(times, 1e-3), errors, style, label=name)
axes[0].set_xlabel("steps")
axes[1].set_xlabel("training wall time (s)")
for ax in axes:
    ax.set_ylabel("test relative error")
    ax.grid(True, which="both", alpha=0.3)
axes[0].legend()
fig.suptitle(f"peaks, N = {n_train}, median of {seeds} seed{'s' * (seeds > 1)}")
fig.tight_layout()
args.out.mkdir(parents=True, exist_ok=True)
path = args.out / "outer_second_order.png"
fig.savefig(path, dpi=120)
print(f"saved {path}")
