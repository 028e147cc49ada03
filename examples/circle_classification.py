# %% [markdown]
# # Circle classification: logistic VarPro against a plain network
#
# Points of $[-2, 2]^2$ are labelled $y = 1$ inside the unit circle and $y = 0$
# outside. Both runs train the same tanh MLP feature map $f_\theta: \mathbb R^2 \to
# \mathbb R^{16}$ with Adam ($10^{-2}$, full batch of 512 points).
#
# - **Plain**: a logistic head $(w, b)$ is trained by Adam together with $\theta$, on
#   the mean sigmoid cross-entropy.
# - **VarPro**: `vploss.vploss_bce` fits the head exactly inside the loss,
#
# $$L(\theta) = \min_{w, b}\ \frac1N\sum_{j=1}^N \big[\operatorname{softplus}(z_j) -
# y_j z_j\big] + \frac{\alpha_2}{2}\big(\|w\|^2 + b^2\big), \qquad z_j = w^\top
# f_\theta(x_j) + b,$$
#
# by damped Newton on the strictly convex inner problem ($\alpha_2 = 10^{-4}$), and
# Adam trains only $\theta$ on $L$. Each step warm-starts the Newton solve from the
# previous step's readout (`init=readout`), so it takes only a few Newton steps.
#
# As a script: `python examples/circle_classification.py [--quick] [--out DIR]`; it
# prints the training loss and test accuracy at fixed steps and saves the decision
# boundaries as `circle_classification.png`.

# %%
import argparse
import pathlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from tqdm import tqdm

import vploss
from vploss import vploss_bce


ALPHA2 = 1e-4


# %% [markdown]
# ## Data, model and training loop
#
# Both kinds share one loop. The VarPro loss returns `(loss, readout)`; the readout is
# carried from step to step as the warm start. The plain loss returns its `readout`
# argument unchanged (`None`) so that both kinds have the same signature. A step's
# readout was fitted to the features before that step's update, so to predict,
# `vploss.refit_readout` fits it again to the current features (a few Newton passes
# over the 512 points from the carried readout) and `vploss.VPModel` joins the two into
# the network that classifies one point.


# %%
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

    def trained_network(params, readout):
        net, head = eqx.combine(params, static)
        if kind == "plain":
            return eqx.nn.Sequential([net, head])
        readout = vploss.refit_readout(net, [(x, y)], loss=vploss_bce, alpha2=ALPHA2, init=readout)
        return vploss.VPModel(net, readout)

    readout = vploss_bce(model[0], x, y, alpha2=ALPHA2)[1] if kind == "varpro" else None
    rows = []
    for i in tqdm(range(1, steps + 1), desc=kind, leave=False, disable=None):
        params, state, loss, readout = step(params, state, readout)
        if i in checkpoints:
            network = trained_network(params, readout)
            accuracy = jnp.mean((jax.vmap(network)(x_test) > 0) == (y_test > 0.5))
            rows.append((i, float(loss), float(accuracy)))
    return rows, trained_network(params, readout)


# %% [markdown]
# ## Training
#
# 1000 Adam steps at full size (40 with `--quick`), 512 training and 2048 test points.
# In a notebook kernel the defaults are used.

# %%
parser = argparse.ArgumentParser(description="Circle classification with vploss_bce.")
parser.add_argument("--quick", action="store_true", help="a few seconds' run")
parser.add_argument("--out", default=".", help="folder for the figure")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
steps = 40 if args.quick else 1000
checkpoints = sorted({steps // 8, steps // 4, steps // 2, steps})
dkey, tkey, mkey = jax.random.split(jax.random.PRNGKey(0), 3)
x, y = sample(dkey, 512)
x_test, y_test = sample(tkey, 2048)
results = {
    kind: train(kind, x, y, x_test, y_test, steps, checkpoints, mkey)
    for kind in ("plain", "varpro")
}

print(f"{'step':>6} {'plain loss':>11} {'plain acc':>10} {'varpro loss':>12} {'varpro acc':>11}")
for (i, pl, pa), (_, vl, va) in zip(results["plain"][0], results["varpro"][0], strict=True):
    print(f"{i:>6} {pl:11.4f} {pa:10.3f} {vl:12.4f} {va:11.3f}")

# %% [markdown]
# The two losses are not the same function. The VarPro loss includes the readout
# penalty $\frac{\alpha_2}{2}\|(w, b)\|^2$, which on separable data keeps the fitted
# readout finite and the loss above zero, while the plain network's unpenalised
# cross-entropy keeps falling as its head grows. Compare the test accuracies instead: on
# this easy problem, in the run stored here, both classifiers are at about 99% from the
# first checkpoint (125 steps) on. Each step fits the readout on the whole training set,
# so the step's own readout is only one update behind the features: in this run it
# predicted the test points with the same accuracies as the refitted one.
#
# ## Decision boundaries
#
# The zero level set of the logits (black) against the unit circle (dashed), over the
# training points.

# %%
grid = jnp.linspace(-2, 2, 200)
gx, gy = jnp.meshgrid(grid, grid)
points = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
for ax, kind in zip(axes, ("plain", "varpro"), strict=True):
    logits = jax.vmap(results[kind][1])(points).reshape(gx.shape)
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
