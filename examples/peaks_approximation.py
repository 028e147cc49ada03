"""Regress MATLAB's `peaks` surface with an MLP: a plain trainable linear head against
the variable projection loss `vploss_msereg`, both trained with Adam.

The network is a feature map `f_θ: ℝ² → ℝ⁶⁴` (tanh MLP). The plain model trains θ and a
linear head `(w, b)` together on the mean squared error. VarPro trains only θ on the
reduced loss `min_{w,b} ½ mean (w·f_θ(x) + b − y)² + alpha2/2 ‖(w, b)‖²`, whose readout is
solved exactly inside the loss. Each method is run at a few learning rates and the best
is reported, so the comparison is against tuned Adam.

    python examples/peaks_approximation.py            # about a minute on 2 CPU cores
    python examples/peaks_approximation.py --quick    # a few seconds
"""

import argparse
import pathlib
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vploss import vploss_msereg  # noqa: E402


def peaks(x):
    """MATLAB's `peaks` function of a point `x = (a, b)`."""
    a, b = x[..., 0], x[..., 1]
    return (
        3 * (1 - a) ** 2 * jnp.exp(-(a**2) - (b + 1) ** 2)
        - 10 * (a / 5 - a**3 - b**5) * jnp.exp(-(a**2) - b**2)
        - jnp.exp(-((a + 1) ** 2) - b**2) / 3
    )


def feature_map(key, width, depth=2):
    return eqx.nn.MLP(
        2, width, width, depth, activation=jnp.tanh, final_activation=jnp.tanh, key=key
    )


def relative_error(pred, y):
    return jnp.linalg.norm(pred - y) / jnp.linalg.norm(y)


def train_plain(key, data, steps, lr, width, record, depth=2):
    x, y, x_test, y_test = data
    fkey, hkey = jax.random.split(key)
    params = (feature_map(fkey, width, depth), eqx.nn.Linear(width, "scalar", key=hkey))
    predict = lambda p, x: jax.vmap(lambda xi: p[1](p[0](xi)))(x)  # noqa: E731
    optimiser = optax.adam(lr)
    state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(lambda p: 0.5 * jnp.mean((predict(p, x) - y) ** 2))(
            params
        )
        updates, state = optimiser.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    test_error = eqx.filter_jit(lambda p: relative_error(predict(p, x_test), y_test))
    return _loop(step, params, state, steps, record, test_error, f"plain lr={lr:g}")


def train_varpro(key, data, steps, lr, width, alpha2, record, depth=2):
    x, y, x_test, y_test = data
    model = feature_map(key, width, depth)
    optimiser = optax.adam(lr)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    loss_fn = lambda m: vploss_msereg(m, x, y, alpha2=alpha2)  # noqa: E731

    @eqx.filter_jit
    def step(model, state):
        (loss, readout), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    @eqx.filter_jit
    def test_error(model):
        _, readout = loss_fn(model)
        return relative_error(jax.vmap(lambda xi: readout(model(xi)))(x_test), y_test)

    return _loop(step, model, state, steps, record, test_error, f"VarPro lr={lr:g}")


def _loop(step, params, state, steps, record, test_error, label):
    errors, times = {}, {}
    elapsed = 0.0
    jax.block_until_ready(step(params, state))  # compile outside the timed loop
    for i in tqdm(range(1, steps + 1), desc=label, leave=False):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - start
        if i in record:
            errors[i] = float(test_error(params))
            times[i] = elapsed
    return params, errors, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: small data, few steps")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("."), help="folder for the figure"
    )
    parser.add_argument("--alpha2", type=float, default=1e-6, help="VarPro readout penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    steps = 60 if args.quick else args.steps
    n_train, width = (256, 16) if args.quick else (2048, 64)
    learning_rates = (1e-2,) if args.quick else (3e-3, 1e-2, 3e-2)
    record = sorted({s for s in (10, 30, 100, 300, 1000, 3000, 10000, steps) if s <= steps})

    key_data, key_test, key_model = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    x = jax.random.uniform(key_data, (n_train, 2), minval=-3.0, maxval=3.0)
    x_test = jax.random.uniform(key_test, (4096, 2), minval=-3.0, maxval=3.0)
    data = (x, peaks(x), x_test, peaks(x_test))

    runs = {}
    for lr in learning_rates:
        runs[("plain", lr)] = train_plain(key_model, data, steps, lr, width, record)
        runs[("VarPro", lr)] = train_varpro(key_model, data, steps, lr, width, args.alpha2, record)

    best = {}
    for method in ("plain", "VarPro"):
        lr = min((lr for m, lr in runs if m == method), key=lambda lr: runs[(method, lr)][1][steps])
        best[method] = (lr, *runs[(method, lr)])

    network = f"MLP 2→{width}→{width}→{width}"
    print(f"\nTest relative error on peaks (N = {n_train} training points, {network}, Adam)")
    header = f"{'steps':>7} " + " ".join(f"{f'{m} (lr={best[m][0]:g})':>22}" for m in best)
    print(header)
    for s in record:
        print(f"{s:>7} " + " ".join(f"{best[m][2][s]:22.3e}" for m in best))
    print(f"{'seconds':>7} " + " ".join(f"{best[m][3][steps]:22.1f}" for m in best))

    _figure(args.out, data, best, record, width)


def _figure(out, data, best, record, width):
    _, _, x_test, y_test = data
    grid = jnp.linspace(-3.0, 3.0, 101)
    xg = jnp.stack(jnp.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    model = best["VarPro"][1]
    x, y, _, _ = data
    _, readout = vploss_msereg(model, x, y)
    pred = jax.vmap(lambda xi: readout(model(xi)))(xg).reshape(101, 101)
    truth = peaks(xg).reshape(101, 101)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    im = axes[0].contourf(grid, grid, truth, levels=30, cmap="viridis")
    axes[0].set_title("peaks")
    fig.colorbar(im, ax=axes[0])
    im = axes[1].contourf(grid, grid, jnp.abs(pred - truth), levels=30, cmap="magma")
    axes[1].set_title("|VarPro fit − peaks|")
    fig.colorbar(im, ax=axes[1])
    for method, (lr, _, errors, times) in best.items():
        axes[2].loglog(record, [errors[s] for s in record], "o-", label=f"{method} (lr={lr:g})")
        axes[3].loglog([times[s] for s in record], [errors[s] for s in record], "o-", label=method)
    axes[2].set_xlabel("Adam steps")
    axes[3].set_xlabel("training wall time (s)")
    for ax in axes[2:]:
        ax.set_ylabel("test relative error")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "peaks_approximation.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
