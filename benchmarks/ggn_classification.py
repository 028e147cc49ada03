"""Second-order VarPro training against first-order and quasi-Newton baselines at equal
wall time, on classification: MNIST-1D (10 classes, `vploss_ce`) and the circle problem
of `examples/circle_classification.py` (binary, `vploss_bce`).

Methods (every run of one problem gets the same `--seconds` of training time;
compilation is excluded by a warm-up call of each compiled step, and so is evaluation):

- `ggn-exact`: `vploss.GeneralisedGaussNewton` (Levenberg–Marquardt on the generalised
  Gauss–Newton matrix, truncated CG, the library's defaults) on `vploss.vpggn(...,
  jacobian="exact")` over the full training set, driven by optimistix's interactive
  stepping (`solver.init`, then a compiled `solver.step` per step), so the trust region
  persists across steps. The inner solve is warm-started from the last accepted
  readout, passed to `fn` through `args` (updated between steps).
- `ggn-fixed`: the same with `jacobian="fixed_readout"` (Kaufman's approximation).
- `vp-adam-full`, `vp-adam-mb`: Adam on the reduced loss (`vploss_ce` / `vploss_bce`),
  full batch or mini-batches of 128 (the readout warm-started from the previous
  step's; evaluated with the readout refitted on the whole training set).
- `vp-adam-mb-budget`: `vp-adam-mb` with the inner solve inexact,
  `solver=vploss.BudgetedNewtonCG()` (one Newton–CG update of at most 10 CG iterations
  from the previous step's readout); evaluated likewise, the refit exact.
- `adam-full`, `adam-mb`: Adam on the network and a trainable linear head (plain
  cross-entropy), full batch or mini-batches of 128.
- `lbfgs`: `optax.lbfgs` (zoom line search, memory 10) on the network and head, full
  batch, plain cross-entropy.

Adam's learning rate is tuned per method over `--lrs` (default 1e-3, 3e-3, 1e-2): the
rate with the best median final test accuracy over the seeds (test = validation here,
as in the other benchmarks; it favours the baselines, which are tuned and VarPro-GGN is
not). Recorded against training seconds and steps: test accuracy, training accuracy and
the unpenalised training cross-entropy of the predictor (network and its head).

Usage: `python benchmarks/ggn_classification.py {mnist1d,circle} [--seconds S]
[--seeds N] [--out DIR] [--quick]`; `--quick` is a smoke test (one seed, one learning
rate, a 1.5 s budget, a subset of MNIST-1D), not a measurement. Writes
`ggn_classification_<problem>.json` (all curves and the summary), `..._summary.csv` and
`..._<problem>.png` to `--out`.
"""

import argparse
import csv
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import vploss  # noqa: E402


BATCH = 128
# Steps per compiled call (a `lax.scan`) of each method: the state is evaluated only
# between calls, so cheap steps are grouped to keep Python's dispatch out of the timing.
UNIT = {
    "adam-mb": 20,
    "vp-adam-mb": 10,
    "vp-adam-mb-budget": 20,
    "adam-full": 5,
    "vp-adam-full": 2,
    "lbfgs": 5,
}
METHODS = (
    "ggn-exact",
    "ggn-fixed",
    "vp-adam-full",
    "vp-adam-mb",
    "vp-adam-mb-budget",
    "adam-full",
    "adam-mb",
    "lbfgs",
)
TUNED = ("vp-adam-full", "vp-adam-mb", "vp-adam-mb-budget", "adam-full", "adam-mb")
# Evaluations per run at most (at the first step after each 1/EVALS of the budget).
EVALS = 40


class Problem(eqx.Module):
    name: str = eqx.field(static=True)
    x: Any
    y: Any
    x_test: Any
    y_test: Any
    num_classes: int | None = eqx.field(static=True)  # None: binary (vploss_bce)
    alpha1: float = eqx.field(static=True)
    alpha2: float = eqx.field(static=True)

    @property
    def binary(self):
        return self.num_classes is None

    def vp_loss(self):
        """The readout loss and its keyword arguments."""
        kwargs = dict(alpha1=self.alpha1, alpha2=self.alpha2, throw=False)
        if self.binary:
            return vploss.vploss_bce, kwargs
        return vploss.vploss_ce, dict(kwargs, num_classes=self.num_classes)

    def data_loss(self, logits, labels):
        if self.binary:
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def accuracy(self, logits, labels):
        if self.binary:
            return jnp.mean((logits > 0) == (labels > 0.5))
        return jnp.mean(jnp.argmax(logits, axis=1) == labels)


def mnist1d_problem(quick=False):
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, x_test = (jnp.asarray(data[name], jnp.float32) for name in ("x", "x_test"))
    y, y_test = (jnp.asarray(data[name]) for name in ("y", "y_test"))
    if quick:
        x, y = x[:512], y[:512]
    # alpha1 > 0: see the docs page (keeps the GGN definite in the directions that only
    # rescale saturated features; small enough not to change the accuracy).
    return Problem("mnist1d", x, y, x_test, y_test, 10, alpha1=1e-5, alpha2=1e-3)


def mnist1d_model(seed):
    """MLP 40 → 100 → 100: ReLU hidden layer, tanh features."""
    key = jax.random.PRNGKey(seed)
    return eqx.nn.MLP(40, 100, 100, 1, activation=jax.nn.relu, final_activation=jnp.tanh, key=key)


def circle_problem(quick=False):
    """The data of `examples/circle_classification.py`: 512 training and 2048 test
    points of [-2, 2]², labelled by the unit circle."""

    def sample(key, n):
        x = jax.random.uniform(key, (n, 2), minval=-2.0, maxval=2.0)
        return x, (jnp.sum(x**2, axis=1) < 1).astype(jnp.float32)

    dkey, tkey, _ = jax.random.split(jax.random.PRNGKey(0), 3)
    x, y = sample(dkey, 512)
    x_test, y_test = sample(tkey, 2048)
    return Problem("circle", x, y, x_test, y_test, None, alpha1=1e-5, alpha2=1e-3)


def circle_model(seed):
    """The example's feature map: MLP 2 → 32 → 32 → 16, tanh."""
    key = jax.random.PRNGKey(seed)
    return eqx.nn.MLP(2, 16, 32, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=key)


PROBLEMS: dict[str, tuple[Callable[..., Problem], Callable[[int], Any]]] = {
    "mnist1d": (mnist1d_problem, mnist1d_model),
    "circle": (circle_problem, circle_model),
}


# --- methods --------------------------------------------------------------------------


class Method(eqx.Module):
    """The compiled pieces of one method (built once per configuration, reused for
    every seed so that each compiles once):

    - `init(model, seed) -> carry`;
    - `advance(carry) -> (carry, info)`: `unit` training steps;
    - `predictor(carry) -> (net, head)`: the network and the head that predicts
        (for mini-batch VarPro, the readout refitted on the whole training set).
    """

    init: Callable
    advance: Callable
    predictor: Callable
    unit: int = eqx.field(static=True)
    cg: Callable | None = None


def _head(problem, model, seed):
    k = "scalar" if problem.binary else problem.num_classes
    m = jax.eval_shape(model, problem.x[0]).shape[0]
    return eqx.nn.Linear(m, k, key=jax.random.PRNGKey(10_000 + seed))


def _logits(net, head, x):
    return jax.vmap(lambda xi: head(net(xi)))(x)


def _batches(key, problem, unit):
    key, sub = jax.random.split(key)
    return key, jax.random.randint(sub, (unit, BATCH), 0, problem.x.shape[0])


class RelativeCG(lx.CG):
    """Conjugate gradients stopped at `||r|| <= rtol ||b||` (Euclidean norms) or
    `max_steps`, keeping the last iterate if the curvature `p·Ap` stops being
    positive.

    The solver the measurements in docs/ggn_classification.md were taken with:
    `lineax.CG` tests the residual component by component and declares a breakdown (a
    NaN solution) when `p·Ap <= 200·P·eps·r·r`, a test not scaled by the operator's
    norm: in float32, with P = 14,200 parameters, that is any direction whose Rayleigh
    quotient is below 0.34, and the mean-loss GGN's are far smaller. (The library's
    default now scales CG's tolerance and falls back to a damped gradient step.)"""

    def compute(self, state, vector, options):
        operator, _ = state

        def dot(a, b):
            pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
            return sum(jnp.vdot(u, v) for u, v in pairs)

        b_norm2 = dot(vector, vector)
        zero = jax.tree.map(jnp.zeros_like, vector)

        def cond(value):
            _, r, _, gamma, step, ok = value
            return ok & (step < self.max_steps) & (gamma > self.rtol**2 * b_norm2)

        def body(value):
            y, r, p, gamma, step, _ = value
            ap = operator.mv(p)
            curvature = dot(p, ap)
            ok = curvature > 0
            alpha = jnp.where(ok, gamma / jnp.where(ok, curvature, 1), 0)
            y = jax.tree.map(lambda a, b: a + alpha * b, y, p)
            r = jax.tree.map(lambda a, b: a - alpha * b, r, ap)
            new_gamma = dot(r, r)
            p = jax.tree.map(lambda a, b: a + (new_gamma / gamma) * b, r, p)
            return y, r, p, new_gamma, step + jnp.where(ok, 1, 0), ok

        init = (zero, vector, vector, b_norm2, jnp.array(0), jnp.array(True))
        y, _, _, gamma, steps, _ = jax.lax.while_loop(cond, body, init)
        result = lx.RESULTS.where(
            gamma > self.rtol**2 * b_norm2, lx.RESULTS.max_steps_reached, lx.RESULTS.successful
        )
        return y, result, {"num_steps": steps, "max_steps": self.max_steps}


def ggn_method(problem, static, jacobian, library_cg=False):
    loss, kwargs = problem.vp_loss()
    linear_solver = (
        lx.CG(rtol=1e-2, atol=0.0, max_steps=50)
        if library_cg
        else RelativeCG(rtol=1e-2, atol=0.0, max_steps=50)
    )
    solver = vploss.GeneralisedGaussNewton(rtol=0.0, atol=0.0, linear_solver=linear_solver)

    def fn(params, init):
        model = eqx.combine(params, static)
        return vploss.vpggn(
            loss, model, problem.x, problem.y, jacobian=jacobian, init=init, **kwargs
        )

    @eqx.filter_jit
    def first_readout(params):
        return loss(eqx.combine(params, static), problem.x, problem.y, **kwargs)[1]

    def init(model, seed):
        params = eqx.filter(model, eqx.is_inexact_array)
        readout = first_readout(params)
        f_struct, aux_struct = eqx.filter_eval_shape(fn, params, readout)
        state = eqx.filter_jit(solver.init)(
            fn, params, readout, {}, f_struct, aux_struct, frozenset()
        )
        return params, state, readout

    @eqx.filter_jit
    def advance(carry):
        params, state, readout = carry
        new, state, aux = solver.step(fn, params, readout, {}, state, frozenset())
        moved = jax.tree.reduce(
            jnp.logical_or, jax.tree.map(lambda a, b: jnp.any(a != b), new, params)
        )
        info = dict(
            moved=moved,
            objective=state.f_info.f,
            step_size=state.search_state.step_size,
            inner_converged=aux.readout.stats.converged,
        )
        # The accepted point's readout warm-starts the next inner solves.
        return (new, state, aux.readout), info

    @eqx.filter_jit
    def cg(carry):
        """The CG iterations of the damped solve that the last step made (recomputed:
        optimistix's descent does not keep the linear solve's statistics)."""
        params, state, readout = carry
        _, gradient, ggn, _ = vploss.ggn_operator(fn, params, readout)
        damping = 1 / state.search_state.step_size
        operator = ggn + damping * lx.IdentityLinearOperator(ggn.in_structure())
        operator = lx.TaggedLinearOperator(operator, lx.positive_semidefinite_tag)
        solution = lx.linear_solve(operator, gradient, solver.linear_solver, throw=False)
        return solution.stats["num_steps"]

    def predictor(carry):
        params, _, readout = carry
        return eqx.combine(params, static), readout

    return Method(init, advance, predictor, 1, cg)


def adam_method(problem, static, lr, varpro, full, unit, budget=False):
    """Adam; `varpro`: on the reduced loss (the network only), else on the network and
    a trainable head; `full`: full batch, else mini-batches of `BATCH`; `budget`: the
    training steps' inner solves by `vploss.BudgetedNewtonCG()` (the refits exact)."""
    optimiser = optax.adam(lr)
    loss, kwargs = problem.vp_loss()
    step_kwargs = dict(kwargs, solver=vploss.BudgetedNewtonCG()) if budget else kwargs

    def loss_fn(params, xb, yb, readout):
        if varpro:
            return loss(eqx.combine(params, static), xb, yb, init=readout, **step_kwargs)
        net, head = eqx.combine(params, static)
        return problem.data_loss(_logits(net, head, xb), yb), readout

    @eqx.filter_jit
    def first_readout(params):
        return loss(eqx.combine(params, static), problem.x, problem.y, **kwargs)[1]

    def init(model, seed):
        readout = None
        if varpro:
            params = eqx.filter(model, eqx.is_inexact_array)
            readout = first_readout(params)
        else:
            params = eqx.filter((model, _head(problem, model, seed)), eqx.is_inexact_array)
        key = jax.random.PRNGKey(1000 + seed)
        return params, optimiser.init(params), readout, key

    @eqx.filter_jit
    def advance(carry):
        params, opt_state, readout, key = carry
        key, batches = _batches(key, problem, unit)

        def step(inner, index):
            params, opt_state, readout = inner
            xb, yb = (problem.x, problem.y) if full else (problem.x[index], problem.y[index])
            (value, readout), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, xb, yb, readout
            )
            updates, opt_state = optimiser.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, readout), value

        (params, opt_state, readout), values = jax.lax.scan(
            step, (params, opt_state, readout), batches
        )
        return (params, opt_state, readout, key), dict(objective=values[-1])

    @eqx.filter_jit
    def refit(params, readout):
        net = eqx.combine(params, static)
        return loss(net, problem.x, problem.y, init=readout, **kwargs)[1]

    def predictor(carry):
        params, _, readout, _ = carry
        if not varpro:
            return eqx.combine(params, static)
        # Full batch: the readout fitted at the last step's parameters is refitted at
        # the current ones (a warm start: one or two Newton steps), as for mini-batches.
        return eqx.combine(params, static), refit(params, readout)

    return Method(init, advance, predictor, unit)


def lbfgs_method(problem, static, unit):
    optimiser = optax.lbfgs()

    def value_fn(params):
        net, head = eqx.combine(params, static)
        return problem.data_loss(_logits(net, head, problem.x), problem.y)

    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def init(model, seed):
        params = eqx.filter((model, _head(problem, model, seed)), eqx.is_inexact_array)
        return params, optimiser.init(params)

    @eqx.filter_jit
    def advance(carry):
        def step(inner, _):
            params, state = inner
            value, grad = value_and_grad(params, state=state)
            updates, state = optimiser.update(
                grad, state, params, value=value, grad=grad, value_fn=value_fn
            )
            return (optax.apply_updates(params, updates), state), value

        carry, values = jax.lax.scan(step, carry, None, length=unit)
        return carry, dict(objective=values[-1])

    def predictor(carry):
        return eqx.combine(carry[0], static)

    return Method(init, advance, predictor, unit)


def build(method, problem, model, lr):
    """`method`'s compiled pieces; `model` gives the static parts of the network."""
    if method.startswith(("ggn", "vp")):
        static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
    else:
        static = eqx.filter((model, _head(problem, model, 0)), eqx.is_inexact_array, inverse=True)
    if method.startswith("ggn"):
        return ggn_method(problem, static, "exact" if method == "ggn-exact" else "fixed_readout")
    if method == "lbfgs":
        return lbfgs_method(problem, static, UNIT[method])
    return adam_method(
        problem,
        static,
        lr,
        varpro=method.startswith("vp"),
        full=method.endswith("full"),
        unit=UNIT[method],
        budget=method.endswith("budget"),
    )


# --- runs -----------------------------------------------------------------------------


def evaluator(problem):
    @eqx.filter_jit
    def evaluate(net, head):
        train = _logits(net, head, problem.x)
        test = _logits(net, head, problem.x_test)
        return dict(
            train_ce=problem.data_loss(train, problem.y),
            train_acc=problem.accuracy(train, problem.y),
            test_acc=problem.accuracy(test, problem.y_test),
        )

    return evaluate


def _typed_as(leaf, struct):
    if not eqx.is_array(leaf):
        return leaf
    if struct.weak_type and leaf.shape == () and leaf.dtype != jnp.bool_:
        return jnp.asarray(leaf.item())  # a Python scalar: weakly typed
    return jnp.array(leaf, dtype=struct.dtype)


def run(method_name, method, problem, model, seed, seconds, evaluate, cg_diagnostic=True):
    """Trains for `seconds` of compiled-step time. Returns the rows `(steps, seconds,
    test accuracy, train cross-entropy, train accuracy)`, the seconds of each call of
    `advance` and the per-call info (GGN: accepted moves, CG iterations)."""
    carry = method.init(model, seed)
    # Typed as the steps return it: a leaf weakly typed on one side only would compile
    # the step a second time, inside the timing.
    returned = eqx.filter_eval_shape(method.advance, carry)[0]
    carry = jax.tree.map(_typed_as, carry, returned, is_leaf=lambda a: a is None)
    # Warm-up (compilation): the result is discarded, the state is not advanced.
    jax.block_until_ready(method.advance(carry))
    jax.block_until_ready(evaluate(*method.predictor(carry)))
    if method.cg is not None and cg_diagnostic:
        jax.block_until_ready(method.cg(carry))
    metrics = evaluate(*method.predictor(carry))
    rows = [(0, 0.0, *(float(metrics[k]) for k in ("test_acc", "train_ce", "train_acc")))]
    call_seconds, extra = [], dict(moved=[], cg=[], step_size=[], inner_converged=[])
    elapsed, steps, next_eval, calls = 0.0, 0, seconds / EVALS, 0
    while elapsed < seconds:
        start = time.perf_counter()
        carry, info = method.advance(carry)
        jax.block_until_ready(carry)
        took = time.perf_counter() - start
        elapsed += took
        call_seconds.append(took)
        steps += method.unit
        calls += 1
        if method.cg is not None:
            extra["moved"].append(bool(info["moved"]))
            extra["step_size"].append(float(info["step_size"]))
            extra["inner_converged"].append(bool(info["inner_converged"]))
            # The CG count at steps 1, 2, 4, 8, ... (a recomputation: it costs a step).
            if cg_diagnostic and calls & (calls - 1) == 0:
                extra["cg"].append((steps, int(method.cg(carry))))
        if elapsed >= next_eval or elapsed >= seconds:
            metrics = evaluate(*method.predictor(carry))
            row = (
                steps,
                elapsed,
                *(float(metrics[k]) for k in ("test_acc", "train_ce", "train_acc")),
            )
            rows.append(row)
            if not np.isfinite(row[3]):
                break
            next_eval = (np.floor(elapsed / (seconds / EVALS)) + 1) * seconds / EVALS
    return dict(
        method=method_name,
        seed=seed,
        rows=rows,
        seconds_per_step=float(np.median(call_seconds)) / method.unit,
        steps=steps,
        **({k: v for k, v in extra.items()} if method.cg is not None else {}),
    )


def at_time(rows, t):
    """The row of the last evaluation at or before `t` seconds."""
    return [row for row in rows if row[1] <= t + 1e-9][-1]


def reach(rows, target):
    for row in rows:
        if row[2] >= target:
            return row[0], row[1]
    return None


def experiment(name, seconds, seeds, lrs, out, quick):
    make_problem, make_model = PROBLEMS[name]
    problem = make_problem(quick)
    evaluate = evaluator(problem)
    print(
        f"{name}: {problem.x.shape[0]} train / {problem.x_test.shape[0]} test, "
        f"alpha1 {problem.alpha1:g}, alpha2 {problem.alpha2:g}, {seconds} s per run, "
        f"{seeds} seeds, float32",
        flush=True,
    )
    configs = []
    for method in METHODS:
        for lr in lrs if method in TUNED else (None,):
            configs.append((method, lr))
    runs = {}
    for method, lr in configs:
        compiled = build(method, problem, make_model(0), lr)
        for seed in range(seeds):
            model = make_model(seed)
            started = time.perf_counter()
            result = run(method, compiled, problem, model, seed, seconds, evaluate, not quick)
            result["lr"] = lr
            runs.setdefault((method, lr), []).append(result)
            final = at_time(result["rows"], seconds)
            print(
                f"  {method:>12} lr {lr or 0:<6g} seed {seed}: {result['steps']:6d} steps, "
                f"{1e3 * result['seconds_per_step']:8.2f} ms/step, test acc {final[2]:.3f}, "
                f"train CE {final[3]:.4f} ({time.perf_counter() - started:.1f} s wall)",
                flush=True,
            )
    # The learning rate of each tuned method: the best median final test accuracy.
    chosen = {}
    for method in METHODS:
        candidates = {lr: r for (m, lr), r in runs.items() if m == method}
        score = {
            lr: np.median([at_time(r["rows"], seconds)[2] for r in rs])
            for lr, rs in candidates.items()
        }
        chosen[method] = max(score, key=lambda lr: (np.nan_to_num(score[lr], nan=-1), -(lr or 0)))
    summary = summarise(runs, chosen, seconds, seeds)
    print_summary(name, summary, seconds, seeds)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ggn_classification_{name}.json"
    payload = dict(
        problem=name,
        seconds=seconds,
        seeds=seeds,
        alpha1=problem.alpha1,
        alpha2=problem.alpha2,
        train=int(problem.x.shape[0]),
        test=int(problem.x_test.shape[0]),
        chosen_lr={m: lr for m, lr in chosen.items()},
        summary=summary,
        runs=[r for rs in runs.values() for r in rs],
    )
    path.write_text(json.dumps(payload, indent=1))
    with open(out / f"ggn_classification_{name}_summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    plot(name, runs, chosen, seconds, out / f"ggn_classification_{name}.png")
    print(f"wrote {path}, the summary CSV and the plot to {out}")


def summarise(runs, chosen, seconds, seeds):
    # Target: the median final test accuracy of plain mini-batch Adam at its chosen rate.
    base = (
        runs[("adam-mb", chosen["adam-mb"])] if "adam-mb" in chosen else next(iter(runs.values()))
    )
    target = float(np.median([at_time(r["rows"], seconds)[2] for r in base]))
    summary = []
    for method in METHODS:
        rs = runs[(method, chosen[method])]
        row = dict(method=method, lr=chosen[method] or "")
        for frac in (0.25, 0.5, 1.0):
            row[f"acc_{int(100 * frac)}"] = float(
                np.median([at_time(r["rows"], frac * seconds)[2] for r in rs])
            )
        row["train_ce_100"] = float(np.median([at_time(r["rows"], seconds)[3] for r in rs]))
        row["train_acc_100"] = float(np.median([at_time(r["rows"], seconds)[4] for r in rs]))
        hits = [reach([x for x in r["rows"] if x[1] <= seconds], target) for r in rs]
        reached = [h for h in hits if h is not None]
        row["target"] = target
        row["reached"] = f"{len(reached)}/{len(rs)}"
        # The median over seeds, a seed that never reached it counted as infinite.
        times = sorted([h[1] for h in reached] + [np.inf] * (len(rs) - len(reached)))
        row["time_to_target"] = float(np.median(times))
        row["ms_per_step"] = 1e3 * float(np.median([r["seconds_per_step"] for r in rs]))
        row["steps"] = float(np.median([r["steps"] for r in rs]))
        if method.startswith("ggn"):
            row["accepted"] = float(np.median([sum(r["moved"]) for r in rs]))
            cg = [c for r in rs for _, c in r["cg"]] or [np.nan]
            row["cg_median"] = float(np.median(cg))
            row["cg_max"] = float(np.max(cg))
            row["inner_unconverged"] = int(sum(not c for r in rs for c in r["inner_converged"]))
        summary.append(row)
    keys = sorted(
        {k for row in summary for k in row},
        key=lambda k: list(summary[0]).index(k) if k in summary[0] else 99,
    )
    return [{k: row.get(k, "") for k in keys} for row in summary]


def print_summary(name, summary, seconds, seeds):
    target = summary[0]["target"]
    print(
        f"\n{name}: medians of {seeds} seeds, {seconds} s per run; target = plain mini-batch "
        f"Adam's final test accuracy {target:.3f}"
    )
    print(
        f"{'method':>12} {'lr':>6} {'acc@25%':>8} {'acc@50%':>8} {'acc@100%':>8} "
        f"{'trainCE':>8} {'t→target':>9} {'ms/step':>9} {'steps':>7} "
        f"{'GGN accepted / CG med, max':>26}"
    )
    for row in summary:
        lr = f"{row['lr']:.0e}" if row["lr"] != "" else "-"
        t = row["time_to_target"]
        t = f"{t:6.2f} s" if np.isfinite(t) else "  never"
        ggn = ""
        if row["method"].startswith("ggn"):
            ggn = f"{row['accepted']:.0f} / {row['cg_median']:.0f}, {row['cg_max']}"
        print(
            f"{row['method']:>12} {lr:>6} {row['acc_25']:8.3f} {row['acc_50']:8.3f} "
            f"{row['acc_100']:8.3f} {row['train_ce_100']:8.4f} {t:>9} {row['ms_per_step']:9.2f} "
            f"{row['steps']:7.0f} {ggn:>26} ({row['reached']})"
        )


def _median_curve(rs, column, grid, axis):
    """The median over seeds of each run's last value at or before each grid point."""
    values = []
    for r in rs:
        rows = np.asarray(r["rows"])
        index = np.searchsorted(rows[:, axis], grid, side="right") - 1
        curve = rows[np.clip(index, 0, None), column]
        curve[index < 0] = np.nan
        values.append(curve)
    return np.nanmedian(np.asarray(values), axis=0)


def plot(name, runs, chosen, seconds, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    grid_t = np.linspace(0, seconds, 400)
    for method in METHODS:
        rs = runs[(method, chosen[method])]
        label = method + (f" (lr {chosen[method]:.0e})" if chosen[method] else "")
        style = "-" if method.startswith(("ggn", "vp")) else "--"
        (line,) = axes[0].plot(grid_t, _median_curve(rs, 2, grid_t, 1), style, label=label)
        axes[1].semilogy(grid_t, _median_curve(rs, 3, grid_t, 1), style, color=line.get_color())
        max_steps = max(r["rows"][-1][0] for r in rs)
        grid_s = np.unique(np.geomspace(1, max(max_steps, 1), 300).astype(int))
        axes[2].semilogx(grid_s, _median_curve(rs, 2, grid_s, 0), style, color=line.get_color())
    axes[0].set_xlabel("training seconds (compilation excluded)")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_xlabel("training seconds")
    axes[1].set_ylabel("training cross-entropy (no penalty)")
    axes[2].set_xlabel("steps")
    axes[2].set_ylabel("test accuracy")
    lo = 0.5 if name == "circle" else 0.1
    for ax in (axes[0], axes[2]):
        ax.set_ylim(lo, None)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: medians of {len(next(iter(runs.values())))} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", choices=sorted(PROBLEMS))
    parser.add_argument("--seconds", type=float, default=None, help="training seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--out", default="benchmark_results", help="folder for JSON, CSV, PNG")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="a smoke test (< 60 s)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.problem == "mnist1d" else 8.0)
    seeds, lrs = args.seeds, args.lrs
    if args.quick:
        seconds, seeds, lrs = min(seconds, 1.0), 1, [3e-3]
        if args.methods == list(METHODS):
            # Compilation dominates a smoke test: one method of each kind.
            args.methods = ["ggn-exact", "vp-adam-mb", "adam-mb"]
    METHODS = tuple(m for m in METHODS if m in args.methods)
    experiment(args.problem, seconds, seeds, lrs, pathlib.Path(args.out), args.quick)
