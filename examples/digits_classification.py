# %% [markdown]
# # Handwritten digits: softmax VarPro against a plain network
#
# scikit-learn's bundled 8×8 digit images (1797 of them, 10 classes; 70% for training,
# 30% for testing), pixels scaled to $[0, 1]$. Both runs train the same tanh MLP
# feature map $f_\theta: \mathbb R^{64} \to \mathbb R^{16}$ with Adam
# ($3\cdot 10^{-3}$) on the same mini-batches of 128 images.
#
# - **Plain**: a softmax head $(W, b)$, $W \in \mathbb R^{10\times 16}$, trained by
#   Adam with $\theta$ on the mean softmax cross-entropy.
# - **VarPro**: `vploss.vploss_ce` fits the head exactly on each mini-batch,
#
# $$L(\theta) = \min_{W, b}\ \frac1N\sum_{j=1}^N \big[\operatorname{logsumexp}(z_j)
# - z_{j, y_j}\big] + \frac{\alpha_2}{2}\|[W, b]\|_F^2, \qquad z_j = W f_\theta(x_j)
# + b,$$
#
# ($\alpha_2 = 10^{-3}$), warm-started from the previous step's readout, and Adam
# trains only $\theta$. The readout has $10 \times 17 = 170$ coefficients, so the
# inner solver is exact Newton (Newton–CG takes over above 256).
#
# As a script: `python examples/digits_classification.py [--quick] [--out DIR]`. The
# outputs stored with this notebook were computed on a 2-core CPU shared with other
# jobs: the wall times are indicative only.

# %%
import argparse
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import vploss
from vploss import vploss_ce


ALPHA2 = 1e-3
NUM_CLASSES = 10
WIDTH = 16


# %% [markdown]
# ## Training loop
#
# The VarPro readout is fitted on the first mini-batch before training, then carried
# from step to step as the warm start. It is not what predicts: each step's readout was
# fitted on that step's 128 images, to the features before the step's update. To
# evaluate, `vploss.refit_readout` fits the readout to the current features on the whole
# training set (a few Newton passes from the carried readout), and `vploss.VPModel`
# joins the two into the network that predicts one image. Only the training steps are
# timed, after one compiling call; the evaluations are not.


# %%
def train(kind, data, steps, batch, evaluate_every, key):
    x, y, x_test, y_test = data
    fkey, hkey, bkey = jax.random.split(key, 3)
    net = eqx.nn.MLP(64, WIDTH, 64, 1, activation=jnp.tanh, final_activation=jnp.tanh, key=fkey)
    params, static = eqx.partition(
        (net, eqx.nn.Linear(WIDTH, NUM_CLASSES, key=hkey)), eqx.is_inexact_array
    )
    optimiser = optax.adam(3e-3)
    state = optimiser.init(params)

    def loss_fn(params, xb, yb, readout):
        net, head = eqx.combine(params, static)
        if kind == "varpro":
            return vploss_ce(net, xb, yb, alpha2=ALPHA2, num_classes=NUM_CLASSES, init=readout)
        logits = jax.vmap(lambda xi: head(net(xi)))(xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), readout

    @eqx.filter_jit
    def step(params, state, xb, yb, readout):
        (loss, readout), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb, readout)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(params, updates), state, loss, readout

    def trained_network(params, readout):
        net, head = eqx.combine(params, static)
        if kind == "plain":
            return eqx.nn.Sequential([net, head])
        readout = vploss.refit_readout(
            net, [(x, y)], loss=vploss_ce, alpha2=ALPHA2, num_classes=NUM_CLASSES, init=readout
        )
        return vploss.VPModel(net, readout)

    @eqx.filter_jit
    def accuracy(network):
        return jnp.mean(jnp.argmax(jax.vmap(network)(x_test), axis=1) == y_test)

    batches = np.asarray(jax.random.randint(bkey, (steps, batch), 0, x.shape[0]))
    readout = None
    if kind == "varpro":
        readout = vploss_ce(net, x[:batch], y[:batch], alpha2=ALPHA2, num_classes=NUM_CLASSES)[1]
    # Compile outside the timed loop.
    jax.block_until_ready(step(params, state, x[batches[0]], y[batches[0]], readout))
    rows, elapsed = [], 0.0
    for i in tqdm(range(1, steps + 1), desc=kind, leave=False, disable=None):
        start = time.perf_counter()
        params, state, loss, readout = step(
            params, state, x[batches[i - 1]], y[batches[i - 1]], readout
        )
        jax.block_until_ready(loss)
        elapsed += time.perf_counter() - start
        if i % evaluate_every == 0:
            network = trained_network(params, readout)
            rows.append((i, elapsed, float(loss), float(accuracy(network))))
    return rows


# %% [markdown]
# ## Training
#
# 1500 steps, evaluated every 100 (30 steps with `--quick`). In a notebook kernel the
# defaults are used.

# %%
parser = argparse.ArgumentParser(description="Handwritten digits with vploss_ce.")
parser.add_argument("--quick", action="store_true", help="a few seconds' run")
parser.add_argument("--out", default=".", help="folder for the figure")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
steps, every = (30, 10) if args.quick else (1500, 100)
digits = load_digits()
x = (digits.data / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.3, random_state=0)
data = tuple(map(jnp.asarray, (x_train, y_train, x_test, y_test)))
key = jax.random.PRNGKey(0)
results = {kind: train(kind, data, steps, 128, every, key) for kind in ("plain", "varpro")}

print(f"{'step':>6} {'plain s':>8} {'plain acc':>10} {'varpro s':>9} {'varpro acc':>11}")
for (i, pt, _, pa), (_, vt, _, va) in zip(results["plain"], results["varpro"], strict=True):
    print(f"{i:>6} {pt:8.2f} {pa:10.3f} {vt:9.2f} {va:11.3f}")

# %% [markdown]
# ## Accuracy against steps and time
#
# Each VarPro step solves a 170-unknown convex problem by Newton's method, so it costs
# more than a plain step; the right panel compares the two at equal training time.

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for kind, rows in results.items():
    rows = np.array(rows)
    axes[0].plot(rows[:, 0], rows[:, 3], marker="o", label=kind)
    axes[1].plot(rows[:, 1], rows[:, 3], marker="o", label=kind)
axes[0].set_xlabel("step")
axes[1].set_xlabel("wall time of the training steps (s)")
for ax in axes:
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "digits_classification.png", dpi=100, bbox_inches="tight")
print(f"saved {out / 'digits_classification.png'}")

# %% [markdown]
# ## Results
#
# In the run stored here both networks reach 96–97% test accuracy within 300 steps and
# stay there, VarPro from the first evaluation on (96.7% at step 100, the plain network
# 93.5%; the last mini-batch's readout, with which this example used to predict, gave
# 94.4% there). On this small problem the plain softmax head, trained by the same Adam,
# then does as well as the VarPro readout (the plain run ends at 97.4%, VarPro at 96.1%,
# within the fluctuation of either over its last few hundred steps). The step times were
# measured on a busy shared machine and do not compare the costs reliably; the
# benchmarks page has controlled ratios.
