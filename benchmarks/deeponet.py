"""VarPro DeepONet (`vploss.vploss_deeponet`) against the same DeepONet with its readout
trained by Adam, at equal wall time, on the antiderivative operator $G(u)(y) =
\\int_0^y u$.

Data (`examples/_antiderivative.py`): input functions from a Gaussian random field of
length scale 0.2 on [0, 1] at 100 sensors, the exact antiderivative (cumulative
trapezoid on a fine grid) at 101 query points; 500 training and 500 test functions.
Both methods use the same branch MLP 100 → 40 → 40 → 40 and trunk MLP 1 → 40 → 40 → 40
(tanh, float32) and the same bilinear readout with bias, $[b; 1]^\\top\\hat C[t; 1]$:

- `varpro`: Adam on the branch and trunk, the readout solved exactly inside the loss
    (`vploss_deeponet`, default `alpha2 = 1e-6`), full batch;
- `adam`: Adam on branch, trunk and $\\hat C$ (initialised $N(0, 1/p)$), the mean
    squared error, full batch.

Each run trains for the same number of wall-clock seconds (after a compiled warm-up
step), then reports the relative L2 test error $\\|\\hat U - U\\|_F/\\|U\\|_F$ on the test
functions (VarPro with the readout fitted on the training set for the final networks).
Learning rates are tuned per method on a grid (the median over the seeds of the final
training loss decides), errors are medians over 3 seeds.

`--problem diffusion-reaction` learns instead the solution operator of $s_t = 0.01
s_{xx} + 0.01 s^2 + u(x)$ on $[0, 1]^2$ (zero initial and boundary values; Lu et al.'s
second example) from the source $u$ at 101 sensors to $s$ at 21 × 21 points $(x, t)$,
by finite differences (`diffusion_reaction_data`), with a trunk of input size 2.

Usage: `OPENBLAS_NUM_THREADS=1 python benchmarks/deeponet.py [--problem P] [--quick]
[--seconds S]`;
`--quick` trains 3 s per run on one seed at one learning rate each (a smoke test, not a
measurement).
"""

import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from _antiderivative import _field_factor, antiderivative_data  # noqa: E402

import vploss  # noqa: E402


WIDTH = 40


def diffusion_reaction_data(num_functions, *, seed, diffusion=0.01, rate=0.01, grid=101):
    r"""`(u, y, s)` for the diffusion-reaction operator of Lu et al. (2021): $s_t =
    D s_{xx} + k s^2 + u(x)$ on $[0, 1]^2$ with zero initial and boundary values, $D
    = k = 0.01$, the source $u$ a Gaussian random field of length scale 0.2 (at
    `grid` sensors); finite differences on a `grid` × `grid` mesh in $(x, t)$,
    implicit in the diffusion and explicit in the reaction and source; $s$ at the
    21 × 21 points $(x, t)$ of every fifth mesh line, `y` of shape `(441, 2)`."""
    fine, factor = _field_factor(0.2)
    rng = np.random.default_rng(seed)
    fields = rng.standard_normal((num_functions, factor.shape[1])) @ factor.T
    x = np.linspace(0.0, 1.0, grid)
    u = fields[:, np.round(np.linspace(0, len(fine) - 1, grid)).astype(int)]
    h, dt = x[1] - x[0], 1.0 / (grid - 1)
    inner = grid - 2
    laplacian = (np.eye(inner, k=1) + np.eye(inner, k=-1) - 2 * np.eye(inner)) / h**2
    step = np.linalg.inv(np.eye(inner) - dt * diffusion * laplacian)
    state = np.zeros((num_functions, inner))
    history = [np.zeros((num_functions, grid))]
    for _ in range(grid - 1):
        state = (state + dt * (rate * state**2 + u[:, 1:-1])) @ step.T
        history.append(np.pad(state, ((0, 0), (1, 1))))
    solution = np.stack(history, axis=2)  # (n, x, t)
    lines = np.arange(0, grid, 5)
    xx, tt = np.meshgrid(x[lines], x[lines], indexing="ij")
    y = np.stack([xx.ravel(), tt.ravel()], axis=1)
    return u, y, solution[:, lines][:, :, lines].reshape(num_functions, -1)


def networks(seed, sensors, points_dim=1):
    kb, kt, kc = jax.random.split(jax.random.PRNGKey(seed), 3)
    branch = eqx.nn.MLP(sensors, WIDTH, WIDTH, 2, activation=jnp.tanh, key=kb)
    trunk = eqx.nn.MLP(points_dim, WIDTH, WIDTH, 2, activation=jnp.tanh, key=kt)
    coef = jax.random.normal(kc, (WIDTH + 1, WIDTH + 1)) / np.sqrt(WIDTH)
    return branch, trunk, coef


def relative_error(prediction, targets):
    return float(jnp.linalg.norm(prediction - targets) / jnp.linalg.norm(targets))


def with_ones(features):
    return jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)


def plain_prediction(params, u, y):
    branch, trunk, coef = params
    b, t = with_ones(jax.vmap(branch)(u)), with_ones(jax.vmap(trunk)(y))
    return b @ coef @ t.T


def train(method, data, seed, lr, seconds):
    """`(test error, steps, final training loss)` after `seconds` of full-batch Adam."""
    (u, y, s), (u_test, _, s_test) = data
    branch, trunk, coef = networks(seed, u.shape[1], y.shape[1])
    if method == "varpro":
        params = (branch, trunk)

        def loss_fn(p):
            return vploss.vploss_deeponet(p[0], p[1], u, y, s)[0]
    else:
        params = (branch, trunk, coef)

        def loss_fn(p):
            return 0.5 * jnp.mean((plain_prediction(p, u, y) - s) ** 2)

    optimiser = optax.adam(lr)

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, state = optimiser.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
    jax.block_until_ready(step(params, state))  # compile
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            params, state, loss = step(params, state)
        jax.block_until_ready(loss)
        steps += 10
    final_loss = float(loss_fn(params))
    if method == "varpro":
        branch, trunk = params
        _, readout = vploss.vploss_deeponet(branch, trunk, u, y, s)
        prediction = readout.predict(jax.vmap(branch)(u_test), jax.vmap(trunk)(y))
    else:
        prediction = plain_prediction(params, u_test, y)
    return relative_error(prediction, s_test), steps, final_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few seconds")
    parser.add_argument("--seconds", type=float, default=None, help="training seconds per run")
    parser.add_argument(
        "--problem", choices=["antiderivative", "diffusion-reaction"], default="antiderivative"
    )
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    seeds = (0,) if args.quick else (0, 1, 2)
    grids = (
        {"varpro": (3e-3,), "adam": (3e-3,)}
        if args.quick
        else {"varpro": (1e-3, 3e-3), "adam": (3e-4, 1e-3, 3e-3, 1e-2)}
    )
    n_train, n_test = (100, 100) if args.quick else (500, 500)
    make = antiderivative_data if args.problem == "antiderivative" else diffusion_reaction_data
    train_set = make(n_train, seed=1000)
    test_set = make(n_test, seed=2000)
    data = tuple(tuple(jnp.asarray(a, jnp.float32) for a in d) for d in (train_set, test_set))
    points = train_set[1].shape[0]
    print(f"{args.problem}: {n_train} training and {n_test} test functions, {points} points,")
    print(f"{seconds:g} s of training per run, seeds {seeds}, {jax.devices()[0].platform}")
    results = {}
    for method, rates in grids.items():
        for lr in rates:
            runs = [train(method, data, seed, lr, seconds) for seed in seeds]
            results[(method, lr)] = runs
            errors = [r[0] for r in runs]
            print(
                f"  {method:>6} lr={lr:<6g} test rel. L2 {np.median(errors):.2e} "
                f"(seeds {', '.join(f'{e:.2e}' for e in errors)}), steps "
                f"{int(np.median([r[1] for r in runs]))}, train loss "
                f"{np.median([r[2] for r in runs]):.2e}"
            )
    print("\n| method | learning rate | steps | relative L2 test error (median) |")
    print("|---|---|---|---|")
    best = {}
    for method, rates in grids.items():
        lr = min(rates, key=lambda lr: np.median([r[2] for r in results[(method, lr)]]))
        runs = results[(method, lr)]
        best[method] = float(np.median([r[0] for r in runs]))
        steps = int(np.median([r[1] for r in runs]))
        print(f"| {method} | {lr:g} | {steps} | {best[method]:.2e} |")
    print(f"\nratio adam / varpro: {best['adam'] / best['varpro']:.1f}")


if __name__ == "__main__":
    main()
