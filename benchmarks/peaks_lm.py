"""Levenberg–Marquardt to 1e-5 on peaks: VarPro (`vpresidual_msereg`) with several
choices of the readout penalty, against nlls-gram's full-network LM, in the same run.

The problem of `examples/outer_second_order.py`: MATLAB's `peaks` on 2000 training points
in [-3, 3]², an MLP 2 → 32 → 32 (tanh) feature map (1,152 parameters; the full network
adds the 33 of its affine head), float64, test error on 4096 points. Every method is
nlls-gram's `LevenbergMarquardt` (geodesic acceleration, its default settings) from the
same initialisation; the VarPro ones get the Jacobian assembled by
`vploss.vpjacobian_msereg`, handed over as a dense matrix.

Methods:

- `full network, per-sample J` (the reference): the plain residual `(ŷ − y)/√N` of θ and
  the head, its Jacobian formed per sample (`jax.vmap` of `jax.grad`) and handed over as
  a dense matrix (as in `examples/outer_second_order.py`); `full network`: the same
  residual with nlls-gram's own Jacobian (the same iterates up to rounding, more seconds per
  step).
- `VarPro, alpha2=A`: a fixed readout penalty (the library default is 1e-6; `alpha2=0`
  uses `solver="svd"`); `VarPro, alpha2=gcv`: chosen by generalised cross-validation at
  every evaluation of the residual (held fixed in the derivative).
- `VarPro, validation`: every `--every` steps, the penalty of the grid 1e-14 … 1e-2 whose
  readout fitted on 80% of the training points predicts the other 20% best; the LM runs on
  all the training points with it (solver state re-initialised, damping kept).
- `VarPro, continuation`: alpha2 starts at 1e-6 and is divided by 10, down to `--floor`,
  whenever the loss has fallen by less than 10% over 5 accepted steps (solver state
  re-initialised, damping kept).
- `VarPro, then full network`: VarPro with `alpha2="gcv"` until its loss falls by less
  than half over 5 accepted steps, then the full network (per-sample Jacobian, a fresh
  solver) from the trained features and the fitted readout.

Reported per method: seconds to test errors 1e-3, 1e-4, 1e-5 (training time only; the
test evaluation after each step is not timed), the final error, steps, seconds per step,
and the ratio of each time to the reference's in the same seed (median over seeds). A run
stops at `--target`, after `--max-steps` steps or `--max-seconds` seconds.

Usage: `python benchmarks/peaks_lm.py [--quick] [--seeds 3] [--methods ...]`; `--quick`
is a smoke test (300 points, width 16, a few seconds per method), not a measurement.
"""

import argparse
import dataclasses
import functools
import time

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import nlls_gram  # noqa: E402
import numpy as np  # noqa: E402
from _common import interleaved_medians, peaks  # noqa: E402
from _peaks import feature_map, relative_error  # noqa: E402  (on the path via _common)
from jax.flatten_util import ravel_pytree  # noqa: E402

import vploss  # noqa: E402


REFERENCE = "full network, per-sample J"
QUICK = (REFERENCE, "VarPro, alpha2=1e-6", "VarPro, then full network")
LEVELS = (1e-3, 1e-4, 1e-5)
GRID = tuple(10.0**e for e in range(-14, -1))  # the validation method's penalties


@dataclasses.dataclass(frozen=True)
class Setup:
    n_train: int
    width: int
    max_steps: int
    max_seconds: float
    target: float
    every: int  # validation: steps between penalty choices
    floor: float  # continuation: the smallest penalty


def make_data(seed, n_train):
    key_data, key_test, key_model = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.uniform(key_data, (n_train, 2), minval=-3.0, maxval=3.0)
    x_test = jax.random.uniform(key_test, (4096, 2), minval=-3.0, maxval=3.0)
    return (x, peaks(x), x_test, peaks(x_test)), key_model


def flat(tree):
    return ravel_pytree(tree)[0]


# --- residuals ---------------------------------------------------------------------------


def varpro_residual(static, x, y, alpha2, solver):
    """`(params, a) -> (r, readout)`, `vpresidual_msereg` whose derivative is the matrix of
    `vpjacobian_msereg` (one per linearisation). The penalty is `alpha2`, or the traced
    argument `a` when `alpha2` is None (so that changing it does not recompile)."""

    def penalty(a):
        return a if alpha2 is None else alpha2

    @jax.custom_jvp
    def residual(params, a):
        model = eqx.combine(params, static)
        return vploss.vpresidual_msereg(model, x, y, alpha2=penalty(a), solver=solver)

    @residual.defjvp
    def residual_jvp(primals, tangents):
        params, a = primals
        model = eqx.combine(params, static)
        jac, r, readout = vploss.vpjacobian_msereg(model, x, y, alpha2=penalty(a), solver=solver)
        zeros = jax.tree.map(jnp.zeros_like, readout)
        return (r, readout), (jac @ flat(tangents[0]), zeros)

    return residual


def plain_residual(static, x, y, per_sample):
    """The full network's residual `(ŷ − y)/√N`; with `per_sample`, its derivative is the
    per-sample Jacobian (`jax.vmap` of `jax.jacrev` over samples), formed once."""
    scale = jnp.sqrt(jnp.asarray(x.shape[0], y.dtype))

    def predict(params, xj):
        features, head = eqx.combine(params, static)
        return head(features(xj))

    def residual(params, a):
        return (jax.vmap(lambda xj: predict(params, xj))(x) - y) / scale, None

    if not per_sample:
        return residual
    wrapped = jax.custom_jvp(residual)

    @wrapped.defjvp
    def wrapped_jvp(primals, tangents):
        params, a = primals
        jac = jax.vmap(lambda xj: flat(jax.grad(predict)(params, xj)))(x) / scale
        return residual(params, a), (jac @ flat(tangents[0]), None)

    return wrapped


# --- one LM run --------------------------------------------------------------------------


class Run:
    """nlls-gram's LM on `residual(params, a)`, stepped by hand; `a` is the penalty (an
    array argument, so that a new value re-initialises the state without recompiling)."""

    #: nlls-gram's geodesic acceleration (its default), set by `--no-geodesic`.
    geodesic = True

    def __init__(self, residual, params, a):
        self.solver = nlls_gram.LevenbergMarquardt(
            residual, has_aux=True, geodesic_acceleration=self.geodesic
        )
        self.init = jax.jit(self.solver.init)
        self.step = jax.jit(self.solver.update)
        self.params, self.a = params, jnp.asarray(a, jnp.float64)
        self.state = self.init(params, self.a)
        jax.block_until_ready(self.step(params, self.state, self.a))  # compiles

    def update(self):
        self.params, self.state, info = self.step(self.params, self.state, self.a)
        return info

    def restart(self, params):
        """The state re-initialised at `params` (a fresh damping)."""
        self.params = params
        self.state = self.init(params, self.a)

    def set_penalty(self, a):
        """A new penalty: the state re-initialised at the current parameters (the
        cached Jacobian belongs to the old one), the damping kept."""
        self.a = jnp.asarray(a, jnp.float64)
        damping = self.state.damping
        self.state = dataclasses.replace(self.init(self.params, self.a), damping=damping)


def validation_penalty(static, x, y, fraction=0.8):
    """`params -> alpha2`: the grid penalty whose readout, fitted on the first `fraction`
    of the training points, predicts the rest best (one SVD for the whole grid)."""
    split = int(fraction * x.shape[0])

    @jax.jit
    def choose(params):
        model = eqx.combine(params, static)
        features = jax.vmap(model)(x)
        features = jnp.concatenate([features, jnp.ones_like(features[:, :1])], axis=1)
        fit, held = features[:split], features[split:]
        u, s, vt = jnp.linalg.svd(fit / jnp.sqrt(split), full_matrices=False)
        projected = u.T @ y[:split] / jnp.sqrt(split)
        grid = jnp.asarray(GRID)
        coef = vt.T @ (s / (s**2 + grid[:, None]) * projected).T  # (p, grid)
        errors = jnp.sum((held @ coef - y[split:, None]) ** 2, axis=0)
        return grid[jnp.argmin(errors)]

    return choose


def train(method, data, key, setup):
    """Runs one method; returns the test errors and the training seconds after each step
    (index 0: the start) and a note on the penalty or the switch."""
    x, y, x_test, y_test = data
    width = setup.width
    features = feature_map(key, width, 1)
    params, static = eqx.partition(features, eqx.is_inexact_array)
    kind, _, option = method.partition(", ")
    evaluate_penalty = None  # the penalty the test readout is fitted with
    choose, schedule, switch = None, None, None
    if kind == "full network":
        head = eqx.nn.Linear(width, "scalar", key=jax.random.split(key)[1])
        params, static = eqx.partition((features, head), eqx.is_inexact_array)
        run = Run(plain_residual(static, x, y, option == "per-sample J"), params, 0.0)

        @jax.jit
        def test_error(params, a):
            features, head = eqx.combine(params, static)
            return relative_error(jax.vmap(lambda xj: head(features(xj)))(x_test), y_test)

    else:
        solver = "auto"
        if option.startswith("alpha2="):
            value = option.removeprefix("alpha2=")
            evaluate_penalty = "gcv" if value == "gcv" else float(value)
            solver = "svd" if evaluate_penalty == 0 else "auto"
            start = 0.0 if value == "gcv" else evaluate_penalty
            residual = varpro_residual(static, x, y, evaluate_penalty, solver)
        elif option.startswith("then full"):
            # VarPro (GCV penalty) until its loss stalls, then the full network from the
            # features and the fitted readout.
            evaluate_penalty = "gcv"
            residual = varpro_residual(static, x, y, evaluate_penalty, solver)
            start = 0.0
            head = eqx.nn.Linear(width, "scalar", key=jax.random.split(key)[1])
            full_params, full_static = eqx.partition((features, head), eqx.is_inexact_array)
            fit = jax.jit(
                lambda p: vploss.vpresidual_msereg(eqx.combine(p, static), x, y, alpha2="gcv")[1]
            )
            jax.block_until_ready(fit(params))  # compiles
            switch = {
                "fit": fit,
                "run": Run(plain_residual(full_static, x, y, True), full_params, 0.0),
                "static": full_static,
                "history": [],
                "at": None,
            }
        else:
            residual = varpro_residual(static, x, y, None, solver)
            start = 1e-6
            if option == "validation":
                choose = validation_penalty(static, x, y)
                start = float(choose(params))
            else:
                schedule = {"history": []}
        run = Run(residual, params, start)

        @jax.jit
        def test_error(params, a):
            model = eqx.combine(params, static)
            penalty = a if evaluate_penalty is None else evaluate_penalty
            _, readout = vploss.vpresidual_msereg(model, x, y, alpha2=penalty, solver=solver)
            return relative_error(jax.vmap(lambda xj: readout(model(xj)))(x_test), y_test)

    if switch is not None:
        varpro_error = test_error

        def test_error(params, a):
            if switch["at"] is None:
                return varpro_error(params, a)
            features, head = eqx.combine(params, switch["static"])
            return relative_error(jax.vmap(lambda xj: head(features(xj)))(x_test), y_test)

    errors, times, alphas, elapsed = [float(test_error(run.params, run.a))], [0.0], [0.0], 0.0
    for i in range(1, setup.max_steps + 1):
        start_time = time.perf_counter()
        if switch is not None and switch["at"] is None and stalled(switch["history"], 0.5):
            readout = switch["fit"](run.params)
            head = switch["run"].params[1]
            head = eqx.tree_at(
                lambda h: (h.weight, h.bias),
                head,
                (readout.weight.reshape(head.weight.shape), readout.bias.reshape(head.bias.shape)),
            )
            varpro_params = run.params
            run, switch["at"] = switch["run"], i
            run.restart((varpro_params, head))
        if choose is not None and i % setup.every == 0:
            alpha = choose(run.params)
            if float(alpha) != float(run.a):
                run.set_penalty(alpha)
        info = run.update()
        # The stall tests look at accepted steps only (a rejected step does not move).
        accepted = bool(info.accepted)
        if switch is not None and switch["at"] is None and accepted:
            switch["history"].append(float(info.loss))
        if schedule is not None and accepted:
            schedule["history"].append(float(info.loss))
            if stalled(schedule["history"], 0.9) and run.a > setup.floor:
                run.set_penalty(max(float(run.a) / 10, setup.floor))
                schedule["history"].clear()
        jax.block_until_ready(run.params)
        elapsed += time.perf_counter() - start_time
        errors.append(float(test_error(run.params, run.a)))
        times.append(elapsed)
        alphas.append(float(run.a))
        if errors[-1] <= setup.target or elapsed > setup.max_seconds:
            break
    note = (
        f", last alpha2 {alphas[-1]:.1e}" if kind == "VarPro" and evaluate_penalty is None else ""
    )
    if switch is not None:
        at = switch["at"]
        note = f", switched to the full network before step {at}" if at else ", never switched"
    return np.array(errors), np.array(times), note


def stalled(history, factor, window=5):
    """Whether the loss has fallen by less than `factor` over the last `window` accepted
    steps."""
    return len(history) > window and history[-1] > factor * history[-1 - window]


def first_below(errors, values, level):
    """`values` at the first step whose test error is at most `level` (inf: never)."""
    hit = np.nonzero(errors <= level)[0]
    return values[hit[0]] if hit.size else np.inf


def summarise(errors, times):
    steps = len(errors) - 1
    return {
        **{f"s→{level:.0e}": first_below(errors, times, level) for level in LEVELS},
        **{f"n→{level:.0e}": first_below(errors, np.arange(steps + 1), level) for level in LEVELS},
        "final": errors[-1],
        "steps": steps,
        "s/step": times[-1] / max(steps, 1),
    }


def print_table(rows, title):
    """`rows`: method → list over seeds of `summarise` dicts with ratio entries."""
    print(f"\n{title}")
    columns = [f"s→{level:.0e}" for level in LEVELS] + [f"n→{level:.0e}" for level in LEVELS]
    columns += ["final", "steps", "s/step"]
    columns += [f"×ref {level:.0e}" for level in LEVELS]
    header = f"| {'method':<34} | " + " | ".join(f"{c:>9}" for c in columns) + " |"
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for method, seeds in rows.items():
        cells = []
        for column in columns:
            value = float(np.median([s[column] for s in seeds]))
            if column == "steps" or (column.startswith("n→") and np.isfinite(value)):
                cells.append(f"{value:9.0f}")
            elif column in ("final",):
                cells.append(f"{value:9.1e}")
            elif column == "s/step":
                cells.append(f"{value:9.3f}")
            elif np.isinf(value) or np.isnan(value):
                cells.append(f"{'—':>9}")
            elif column.startswith("×"):
                cells.append(f"{value:9.2f}")
            else:
                cells.append(f"{value:9.1f}")
        print(f"| {method:<34} | " + " | ".join(cells) + " |")


def step_costs(data, key, width, repeats):
    """Median seconds of one LM step that forms the Jacobian (from the initial state, so
    never a rejected step's reuse), the methods called in turn (`interleaved_medians`)."""
    x, y, _, _ = data
    features = feature_map(key, width, 1)
    params, static = eqx.partition(features, eqx.is_inexact_array)
    head = eqx.nn.Linear(width, "scalar", key=jax.random.split(key)[1])
    full_params, full_static = eqx.partition((features, head), eqx.is_inexact_array)
    runs = {
        REFERENCE: Run(plain_residual(full_static, x, y, True), full_params, 0.0),
        "VarPro, alpha2=1e-6": Run(varpro_residual(static, x, y, 1e-6, "auto"), params, 1e-6),
        "VarPro, alpha2=gcv": Run(varpro_residual(static, x, y, "gcv", "auto"), params, 0.0),
    }
    steps = {
        name: functools.partial(run.step, run.params, run.state, run.a)
        for name, run in runs.items()
    }
    return {name: ms / 1e3 for name, ms in interleaved_medians(steps, repeats).items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test (under a minute)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--max-seconds", type=float, default=200.0, help="per run")
    parser.add_argument("--target", type=float, default=1e-5, help="stop at this test error")
    parser.add_argument("--every", type=int, default=5, help="validation: steps per choice")
    parser.add_argument("--floor", type=float, default=1e-12, help="continuation: last alpha2")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            REFERENCE,
            "full network",
            "VarPro, alpha2=1e-6",
            "VarPro, alpha2=gcv",
            "VarPro, validation",
            "VarPro, continuation",
            "VarPro, then full network",
        ],
        help="any of the defaults, or 'VarPro, alpha2=A' for a number A",
    )
    parser.add_argument(
        "--no-geodesic",
        action="store_true",
        help="turn nlls-gram's geodesic acceleration off (a second directional derivative "
        "of the residual per step)",
    )
    args = parser.parse_args()
    Run.geodesic = not args.no_geodesic
    if args.quick:
        setup = Setup(300, 16, 40, 4.0, args.target, args.every, args.floor)
        seeds = 1
        if args.methods == parser.get_default("methods"):
            args.methods = list(QUICK)
    else:
        setup = Setup(2000, 32, args.max_steps, args.max_seconds, args.target, args.every,
                      args.floor)  # fmt: skip
        seeds = args.seeds
    methods = list(dict.fromkeys([REFERENCE, *args.methods]))
    print(f"peaks: N = {setup.n_train}, MLP 2→{setup.width}→{setup.width} tanh, float64, "
          f"{jax.devices()[0].platform}; runs stop at test error {setup.target:g}, "
          f"{setup.max_steps} steps or {setup.max_seconds:g} s; geodesic acceleration "
          f"{'on' if Run.geodesic else 'off'}")  # fmt: skip
    data, key = make_data(0, setup.n_train)
    costs = step_costs(data, key, setup.width, 3 if args.quick else 9)
    print("One LM step with a new Jacobian, interleaved medians (seed 0's initial point):")
    for name, seconds in costs.items():
        print(f"  {name:<34} {seconds:.3f} s  ({seconds / costs[REFERENCE]:.2f} × reference)")
    rows = {method: [] for method in methods}
    for seed in range(seeds):
        data, key = make_data(seed, setup.n_train)
        results = {}
        for method in methods:
            errors, times, note = train(method, data, key, setup)
            results[method] = summarise(errors, times)
            print(f"  seed {seed} {method}: {results[method]['steps']} steps, "
                  f"{times[-1]:.1f} s, final {errors[-1]:.2e}{note}", flush=True)  # fmt: skip
        reference = results[REFERENCE]
        for method, result in results.items():
            for level in LEVELS:
                column = f"s→{level:.0e}"
                result[f"×ref {level:.0e}"] = (
                    result[column] / reference[column] if np.isfinite(reference[column]) else np.nan
                )
            rows[method].append(result)
        if seeds > 1:
            print_table({m: [r] for m, r in results.items()}, f"seed {seed}")
    print_table(rows, f"median over {seeds} seed{'s' * (seeds > 1)} (×ref: time / {REFERENCE}'s)")


if __name__ == "__main__":
    main()
