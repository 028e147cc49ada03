"""Points inside or outside the unit circle: `vploss_bce` against a plain network.

Both runs train the same tanh MLP feature map with Adam. The plain network also trains
its logistic head by gradient descent; the VarPro run fits the head exactly inside the
loss (warm-started from the previous step's readout) and trains only the features.
Prints the training loss and the test accuracy at fixed steps and saves the decision
boundaries as `circle_classification.png`.

    python examples/circle_classification.py [--quick] [--out DIR]
"""

import argparse
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import optax
from tqdm import tqdm

from vploss import vploss_bce


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ALPHA2 = 1e-4


def sample(key, n):
    x = jax.random.uniform(key, (n, 2), minval=-2.0, maxval=2.0)
    return x, (jnp.sum(x**2, axis=1) < 1).astype(jnp.float32)


def features(key):
    return eqx.nn.MLP(2, 16, 32, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=key)


def train(kind, x, y, x_test, y_test, steps, checkpoints, key):
    fkey, hkey = jax.random.split(key)
    model = (features(fkey), eqx.nn.Linear(16, "scalar", key=hkey))
    optimiser = optax.adam(1e-2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    state = optimiser.init(params)

    def loss_fn(params, readout):
        net, head = eqx.combine(params, static)
        if kind == "varpro":
            return vploss_bce(net, x, y, alpha2=ALPHA2, init=readout)
        logits = jax.vmap(lambda xi: head(net(xi)))(x)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)), readout

    @eqx.filter_jit
    def step(params, state, readout):
        (loss, readout), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, readout)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(params, updates), state, loss, readout

    def predictor(params, readout):
        net, head = eqx.combine(params, static)
        head = readout if kind == "varpro" else head
        return lambda xs: jax.vmap(lambda xi: head(net(xi)))(xs)

    readout = vploss_bce(model[0], x, y, alpha2=ALPHA2)[1] if kind == "varpro" else None
    rows = []
    for i in tqdm(range(1, steps + 1), desc=kind, leave=False):
        params, state, loss, readout = step(params, state, readout)
        if i in checkpoints:
            accuracy = jnp.mean((predictor(params, readout)(x_test) > 0) == (y_test > 0.5))
            rows.append((i, float(loss), float(accuracy)))
    return rows, predictor(params, readout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds' run")
    parser.add_argument("--out", default=".", help="folder for the figure")
    args = parser.parse_args()
    steps = 40 if args.quick else 1000
    checkpoints = sorted({steps // 8, steps // 4, steps // 2, steps})
    dkey, tkey, mkey = jax.random.split(jax.random.PRNGKey(0), 3)
    x, y = sample(dkey, 512)
    x_test, y_test = sample(tkey, 2048)
    results = {
        kind: train(kind, x, y, x_test, y_test, steps, checkpoints, mkey)
        for kind in ("plain", "varpro")
    }

    print(
        f"{'step':>6} {'plain loss':>11} {'plain acc':>10} {'varpro loss':>12} {'varpro acc':>11}"
    )
    for (i, pl, pa), (_, vl, va) in zip(results["plain"][0], results["varpro"][0], strict=True):
        print(f"{i:>6} {pl:11.4f} {pa:10.3f} {vl:12.4f} {va:11.3f}")

    grid = jnp.linspace(-2, 2, 200)
    gx, gy = jnp.meshgrid(grid, grid)
    points = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
    for ax, kind in zip(axes, ("plain", "varpro"), strict=True):
        logits = results[kind][1](points).reshape(gx.shape)
        ax.contourf(gx, gy, logits > 0, levels=1, cmap="RdBu", alpha=0.3)
        ax.contour(gx, gy, logits, levels=[0], colors="k")
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, ls="--", color="gray"))
        ax.scatter(x[:, 0], x[:, 1], c=y, s=4, cmap="RdBu")
        ax.set_title(f"{kind}: test accuracy {results[kind][0][-1][2]:.3f}")
        ax.set_aspect("equal")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "circle_classification.png", dpi=100, bbox_inches="tight")
    print(f"saved {out / 'circle_classification.png'}")


if __name__ == "__main__":
    main()
