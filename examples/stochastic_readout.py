# %% [markdown]
# # Mini-batch VarPro with a stochastic readout (MNIST-1D)
#
# MNIST-1D (Greydanus, 2020) is a 1-D analogue of MNIST that the `mnist1d` package
# generates offline: 4000 training and 1000 test signals of length 40, 10 classes. Its
# authors report about 68% test accuracy for an MLP. All three runs train the same MLP
# feature map $f_\theta: \mathbb R^{40} \to \mathbb R^{32}$ (ReLU hidden layers of 100,
# tanh output) with Adam on the same mini-batches of 128 signals:
#
# - **Plain**: a softmax head trained by Adam with $\theta$.
# - **Per-batch VarPro**: `vploss.vploss_ce` fits the head exactly on each mini-batch
#   ($\alpha_2 = 10^{-3}$), warm-started from the previous one.
# - **Windowed VarPro**: `vploss.WindowedReadout` fits the head exactly on the current
#   batch and the last 4 batches' stored features, with its penalty chosen at every step
#   by the evidence (MacKay's fixed point), so it needs no $\alpha_2$:
#
# $$\hat W_k = \operatorname*{argmin}_{\hat W}\ \frac{1}{|\mathcal W_k|}\sum_{j \in
# \mathcal W_k}\big[\operatorname{logsumexp}(z_j) - z_{j,y_j}\big] +
# \frac{\alpha_k}{2}\|\hat W\|_F^2, \qquad \alpha_{k+1} = \frac{\gamma_k}{|\mathcal
# W_k|\,\|\hat W_k\|_F^2}.$$
#
# The gradient for $\theta$ is that of the current batch's loss at $\hat W_k$.
#
# The readout a step returns was fitted to a few batches, and to the features before
# that step's update, so it does not predict: each evaluation refits the readout to the
# current features on the whole training set (`vploss.refit_readout`, with the training's
# $\alpha_2 = 10^{-3}$, or for the windowed run the evidence rule, now applied to the
# 4000 signals) and predicts with `vploss.VPModel`. The table also shows the accuracy
# with the step's own readout ("as trained").
#
# As a script: `python examples/stochastic_readout.py [--quick] [--out DIR]`. The
# outputs stored with this notebook were computed on a 2-core CPU shared with other
# jobs: the wall times are indicative only.

# %%
import argparse
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from mnist1d.data import get_dataset_args, make_dataset
from tqdm import tqdm

import vploss


NUM_CLASSES = 10
BATCH = 128
ALPHA2 = 1e-3
#: The penalty each VarPro run's readout is refitted with: the one it trained with, or the
#: rule that chose it.
REFIT_ALPHA2 = {"per-batch": ALPHA2, "windowed": "evidence"}

# %% [markdown]
# ## The training step
#
# The stochastic readout has an `init`/`update` interface like an Optax optimiser: its
# state (the readout, the memory of the last batches' features and labels, the penalty)
# is a pytree that the step takes and returns. `update` returns `(loss, (readout,
# state))`, so `eqx.filter_value_and_grad(..., has_aux=True)` gives the gradient for the
# network alone.


# %%
def make_step(kind, optimiser, rule):
    def loss_fn(params, xb, yb, state):
        if kind == "windowed":
            return rule.update(params, xb, yb, state)
        if kind == "per-batch":
            loss, readout = vploss.vploss_ce(
                params, xb, yb, alpha2=ALPHA2, num_classes=NUM_CLASSES, init=state
            )
            return loss, (readout, readout)
        net, head = params
        logits = jax.vmap(lambda xi: head(net(xi)))(xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), (head, state)

    @eqx.filter_jit
    def step(params, opt_state, state, xb, yb):
        (loss, (readout, state)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            params, xb, yb, state
        )
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, state, readout

    return step


def train(kind, data, steps, evaluate_every, key, lr=3e-3):
    x, y, x_test, y_test = data
    fkey, hkey, bkey = jax.random.split(key, 3)
    net = eqx.nn.MLP(40, 32, 100, 2, activation=jax.nn.relu, final_activation=jnp.tanh, key=fkey)
    rule = vploss.WindowedReadout(vploss.SoftmaxCrossEntropy(num_classes=NUM_CLASSES), memory=4)
    if kind == "plain":
        params, state = (net, eqx.nn.Linear(32, NUM_CLASSES, key=hkey)), None
    elif kind == "per-batch":
        params = net
        _, state = vploss.vploss_ce(
            net, x[:BATCH], y[:BATCH], alpha2=ALPHA2, num_classes=NUM_CLASSES
        )
    else:
        params, state = net, rule.init(net, x[:BATCH], y[:BATCH])
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
    step = make_step(kind, optimiser, rule)
    accuracy = eqx.filter_jit(
        lambda network: jnp.mean(jnp.argmax(jax.vmap(network)(x_test), axis=1) == y_test)
    )

    def evaluate(params, readout):
        """Test accuracy of the network (VarPro: with the readout refitted to the current
        features on the whole training set) and, for VarPro, with the step's readout."""
        if kind == "plain":
            return float(accuracy(eqx.nn.Sequential(params))), np.nan
        refitted = vploss.refit_readout(
            params, [(x, y)], loss=rule.loss, alpha2=REFIT_ALPHA2[kind], init=readout
        )
        network = vploss.VPModel(params, refitted)
        return float(accuracy(network)), float(accuracy(vploss.VPModel(params, readout)))

    batches = np.asarray(jax.random.randint(bkey, (steps, BATCH), 0, x.shape[0]))
    # Compile outside the timed loop (on a copy: the state is not advanced).
    jax.block_until_ready(step(params, opt_state, state, x[batches[0]], y[batches[0]]))
    rows, elapsed = [], 0.0
    for i in tqdm(range(1, steps + 1), desc=kind, leave=False, disable=None):
        # The penalty this step solves with (the new state holds the next step's).
        penalty = state.alpha2 if kind == "windowed" else np.nan
        start = time.perf_counter()
        params, opt_state, state, readout = step(
            params, opt_state, state, x[batches[i - 1]], y[batches[i - 1]]
        )
        jax.block_until_ready(params)
        elapsed += time.perf_counter() - start
        if i % evaluate_every == 0:
            rows.append((i, elapsed, *evaluate(params, readout), float(penalty)))
    return np.array(rows)


# %% [markdown]
# ## Training
#
# 3000 steps (about 100 epochs), evaluated every 100 (60 steps with `--quick`). The
# seconds count the training steps only: neither the evaluations nor the refits.

# %%
parser = argparse.ArgumentParser(description="MNIST-1D with a stochastic VarPro readout.")
parser.add_argument("--quick", action="store_true", help="a few seconds' run")
parser.add_argument("--out", default=".", help="folder for the figure")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
steps, every = (60, 20) if args.quick else (3000, 100)
dataset = make_dataset(get_dataset_args())
data = (
    jnp.asarray(dataset["x"], jnp.float32),
    jnp.asarray(dataset["y"]),
    jnp.asarray(dataset["x_test"], jnp.float32),
    jnp.asarray(dataset["y_test"]),
)
key = jax.random.PRNGKey(0)
results = {
    kind: train(kind, data, steps, every, key) for kind in ("plain", "per-batch", "windowed")
}

# The VarPro runs' accuracy with the readout refitted, then with the step's own readout.
print(
    f"{'step':>6}{'plain s':>9}{'plain acc':>11}"
    + "".join(f"{kind + ' s':>13}{kind + ' acc':>15}{'as trained':>12}" for kind in REFIT_ALPHA2)
)
for i in range(len(results["plain"])):
    plain = results["plain"][i]
    cells = "".join(
        f"{results[kind][i, 1]:13.1f}{results[kind][i, 2]:15.3f}{results[kind][i, 3]:12.3f}"
        for kind in REFIT_ALPHA2
    )
    print(f"{int(plain[0]):>6}{plain[1]:9.1f}{plain[2]:11.3f}{cells}")

# %% [markdown]
# ## Accuracy and the chosen penalty
#
# Left: held-out accuracy against steps (dashed: the VarPro runs with their step's own
# readout); middle: against training time (a windowed step solves a 330-unknown softmax
# regression over 640 samples, so it costs several plain steps); right: the penalty the
# evidence chose at each step.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for kind, rows in results.items():
    (line,) = axes[0].plot(rows[:, 0], rows[:, 2], marker="o", ms=3, label=kind)
    axes[1].plot(rows[:, 1], rows[:, 2], marker="o", ms=3, label=kind)
    if kind in REFIT_ALPHA2:
        axes[0].plot(rows[:, 0], rows[:, 3], ls="--", lw=1, color=line.get_color())
axes[2].semilogy(results["windowed"][:, 0], results["windowed"][:, 4], marker="o", ms=3)
axes[0].set_xlabel("Adam steps")
axes[1].set_xlabel("training seconds")
for ax in axes[:2]:
    ax.set_ylabel("test accuracy")
    ax.legend()
axes[2].set_xlabel("Adam steps")
axes[2].set_ylabel(r"evidence penalty $\alpha_k$")
fig.tight_layout()
fig.savefig(f"{args.out}/stochastic_readout.png", dpi=120)

# %% [markdown]
# ## What the run shows
#
# In the run stored here, refitting raises the per-batch run's accuracy by 9 to 14
# points over the first 1000 steps and by 2 to 9 over the last 1000 (0.582 against
# 0.559 at step 3000), but not to plain Adam's 0.66: the features that per-batch VarPro
# trains are worse too, not only its readout. The windowed readout predicts almost as
# well as the refitted one (1 to 4 points below it over the first 500 steps, within 1.5
# points after), and the windowed run is ahead of plain Adam over the first 600 steps
# (by 3 to 10 points) and level with it after (0.673 against 0.663 at step 3000).
#
# The documentation's page Mini-batch training (`docs/stochastic.md`) has the measured
# medians over seeds, the learning-rate and penalty sensitivity grid, and where the
# stochastic readout does not pay off.
