# %% [markdown]
# # Two moons: a convex potential flow trained with VarPro
#
# A convex potential flow (Huang et al., 2021) models a density on $\mathbb R^n$ by the
# gradient map of a convex potential $\Phi$: $z = \nabla\Phi(x)$ is pushed onto a
# standard normal, so that
#
# $$\log p(x) = \log\mathcal N\big(\nabla\Phi(x); 0, I\big) + \log\det\nabla^2\Phi(x).$$
#
# Here the potential is linear in its readout $(w, c, a)$ on the features $u_\theta$ of
# an input-convex network (`vploss.ICNN`, 4 layers of 32 units),
#
# $$\Phi(x) = \sum_i w_i u_i(x) + \frac c2\|x\|^2 + a^\top x, \qquad w \ge 0,\ c \ge 0,$$
#
# and the negative log-likelihood is convex in the readout. `vploss.vploss_cpflow`
# solves for it by a log-barrier interior-point method inside the loss and returns
# the reduced loss, whose gradient in $\theta$ is the envelope gradient (Chen, 2023,
# applied variable projection to this problem). Three trainings start from the same
# network:
#
# - **full Adam**: the readout is trained by Adam too, $w = \operatorname{softplus}(\tilde
#   w)$, $c = \operatorname{softplus}(\tilde c)$ keeping it feasible (mini-batches of 64);
# - **Adam-VarPro**: Adam on the network only, the readout solved for inside
#   `vploss_cpflow` (mini-batches of 256);
# - **Adam→L-BFGS-VarPro**: the same for half the budget, then `optax.lbfgs` on the full
#   training set.
#
# Each method's Adam learning rate is chosen from $\{10^{-2}, 3\cdot10^{-2}, 10^{-1},
# 3\cdot10^{-1}, 1\}$ by the validation NLL on the first seed (Adam→L-BFGS-VarPro uses
# Adam-VarPro's). All get the same work, counted in units of one forward and backward
# pass of one sample (the inner solves of VarPro are not counted: they act on the
# $m + n + 1$ readout entries, given the features). The table reports negative
# log-likelihoods in nats, the constant $\frac n2 \log 2\pi$ included, on standardised
# data.
#
# As a script: `python examples/moons_flow.py [--quick] [--out DIR]` (about four
# minutes on two CPU cores at full size; seconds with `--quick`). The stored outputs
# were computed on a 2-core CPU shared with other jobs: the times are indicative only.

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
from sklearn.datasets import make_moons
from tqdm import tqdm

import vploss


jax.config.update("jax_enable_x64", True)

ALPHA2 = 1e-4
ADAM_BATCH = 64
VARPRO_BATCH = 256


# %% [markdown]
# ## The three trainings
#
# `FullModel` holds the network and a raw readout for full Adam; the VarPro steps
# differentiate `vploss_cpflow`'s reduced loss in the network alone. The L-BFGS phase
# counts the extra loss evaluations of its line search as work.


# %%
def moons(num, seed):
    x, _ = make_moons(num, noise=0.05, random_state=seed)
    return x


def batches(key, x, size):
    """An endless stream of mini-batches drawn without replacement per epoch."""
    while True:
        key, sub = jax.random.split(key)
        order = np.asarray(jax.random.permutation(sub, x.shape[0]))
        for start in range(0, x.shape[0] - size + 1, size):
            yield x[order[start : start + size]]


def softplus_inverse(y):
    return y + np.log(-np.expm1(-y))


class FullModel(eqx.Module):
    """The network and a raw readout, all trained by Adam."""

    features: vploss.ICNN
    raw_weight: jax.Array
    raw_quadratic: jax.Array
    linear: jax.Array

    def flow(self):
        return vploss.CPFlow(
            jax.nn.softplus(self.raw_weight),
            jax.nn.softplus(self.raw_quadratic),
            self.linear,
        )


def mean_nll(flow, model, x):
    return -jnp.mean(jax.vmap(flow.log_prob, in_axes=(None, 0))(model, x))


@eqx.filter_jit
def full_step(params, opt_state, x, optimiser):
    def loss(params):
        flow = params.flow()
        penalty = jnp.sum(flow.weight**2) + flow.quadratic**2 + jnp.sum(flow.linear**2)
        return mean_nll(flow, params.features, x) + 0.5 * ALPHA2 * penalty

    value, grads = eqx.filter_value_and_grad(loss)(params)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state, value


def varpro_loss(model, x):
    return vploss.vploss_cpflow(model, x, alpha2=ALPHA2)[0]


@eqx.filter_jit
def varpro_step(model, opt_state, x, optimiser):
    value, grads = eqx.filter_value_and_grad(varpro_loss)(model, x)
    updates, opt_state = optimiser.update(grads, opt_state, model)
    return eqx.apply_updates(model, updates), opt_state, value


@eqx.filter_jit
def lbfgs_step(model, opt_state, x, optimiser):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss = lambda p: varpro_loss(eqx.combine(p, static), x)
    value, grads = optax.value_and_grad_from_state(loss)(params, state=opt_state)
    updates, opt_state = optimiser.update(
        grads, opt_state, params, value=value, grad=grads, value_fn=loss
    )
    evaluations = optax.tree_utils.tree_get(opt_state, "num_linesearch_steps")
    return eqx.combine(optax.apply_updates(params, updates), static), opt_state, value, evaluations


@eqx.filter_jit
def fit_readout(model, x):
    return vploss.vploss_cpflow(model, x, alpha2=ALPHA2)[1]


def train_full(model, x_train, work, key, lr):
    m = model.input_layers[-1].out_features
    params = FullModel(
        model,
        jnp.full((m,), softplus_inverse(1 / m)),
        jnp.asarray(softplus_inverse(1.0)),
        jnp.zeros(2),
    )
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
    stream = batches(key, x_train, ADAM_BATCH)
    history, done = [], 0
    for _ in tqdm(range(work // ADAM_BATCH), desc="full Adam", leave=False, disable=None):
        params, opt_state, value = full_step(params, opt_state, next(stream), optimiser)
        done += ADAM_BATCH
        history.append((done, float(value)))
    return params.features, params.flow(), history


def train_varpro(model, x_train, work, key, lr, lbfgs_fraction=0.0):
    optimiser = optax.adam(lr)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    stream = batches(key, x_train, VARPRO_BATCH)
    adam_work = int(work * (1 - lbfgs_fraction))
    history, done = [], 0
    name = "Adam-VarPro" if lbfgs_fraction == 0 else "Adam→L-BFGS-VarPro"
    bar = tqdm(total=work, desc=name, leave=False, disable=None)
    while done + VARPRO_BATCH <= adam_work:
        model, opt_state, value = varpro_step(model, opt_state, next(stream), optimiser)
        done += VARPRO_BATCH
        bar.update(VARPRO_BATCH)
        history.append((done, float(value)))
    if lbfgs_fraction > 0:
        optimiser = optax.lbfgs()
        opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
        n = x_train.shape[0]
        while done + n <= work:
            model, opt_state, value, evaluations = lbfgs_step(model, opt_state, x_train, optimiser)
            # One gradient plus the line search's extra evaluations of the loss.
            cost = n * (1 + max(int(evaluations) - 1, 0))
            done += cost
            bar.update(cost)
            history.append((done, float(value)))
    bar.close()
    return model, fit_readout(model, x_train), history


def tune_learning_rate(train, x_train, x_val, work, learning_rates=(1e-2, 3e-2, 1e-1, 3e-1, 1.0)):
    """The Adam learning rate of `train` with the best validation NLL on the first
    seed."""
    init_key, data_key, _ = jax.random.split(jax.random.PRNGKey(0), 3)
    model = vploss.ICNN(2, 32, 32, 4, key=init_key)
    scores = {}
    for lr in learning_rates:
        features, flow, _ = train(model, x_train, work, data_key, lr)
        scores[lr] = evaluate(features, flow, {"val": x_val})["val"]
    return min(scores, key=scores.get)


# %% [markdown]
# ## Evaluation and figure


# %%
def evaluate(model, flow, splits):
    return {name: float(eqx.filter_jit(mean_nll)(flow, model, x)) for name, x in splits.items()}


def plot(results, x_train, out, key):
    fig, axes = plt.subplots(2, len(results) + 1, figsize=(4 * (len(results) + 1), 8))
    grid = np.linspace(-3, 3, 120)
    points = np.stack(np.meshgrid(grid, grid), axis=-1).reshape(-1, 2)
    log_probs = eqx.filter_jit(
        jax.vmap(lambda flow, model, x: flow.log_prob(model, x), in_axes=(None, None, 0))
    )
    sample = eqx.filter_jit(lambda flow, model, key: flow.sample(model, key, 500))
    for column, (name, (model, flow, history)) in enumerate(results.items()):
        density = np.exp(np.asarray(log_probs(flow, model, points))).reshape(120, 120)
        axes[0, column].imshow(density, origin="lower", extent=(-3, 3, -3, 3), cmap="viridis")
        axes[0, column].set_title(f"{name}: density")
        samples = np.asarray(sample(flow, model, key))
        axes[1, column].scatter(*x_train[:500].T, s=2, c="lightgray", label="data")
        axes[1, column].scatter(*samples.T, s=2, c="tab:red", label="samples")
        axes[1, column].set(xlim=(-3, 3), ylim=(-3, 3), title=f"{name}: samples")
        work, loss = np.array(history).T
        axes[0, -1].plot(work / 1e3, loss, label=name)
    axes[0, -1].set(
        xlabel="work (thousand samples)", ylabel="training loss (nats)", title="training loss"
    )
    axes[0, -1].set_ylim(top=3)
    axes[0, -1].legend()
    axes[1, 0].legend(loc="lower left")
    axes[1, -1].axis("off")
    fig.tight_layout()
    path = out / "moons_flow.png"
    fig.savefig(path, dpi=100)
    return path


# %% [markdown]
# ## Settings
#
# 512 training points, 24 576 samples of work per method and two seeds at full size;
# `--quick` runs one seed with a fixed learning rate. In a notebook kernel the defaults
# are used. The data are standardised with the training set's mean and deviation.

# %%
parser = argparse.ArgumentParser(description="A convex potential flow on two moons.")
parser.add_argument("--quick", action="store_true", help="a few seconds' smoke run")
parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."))
parser.add_argument("--seeds", type=int, default=None)
parser.add_argument("--work", type=int, default=None, help="samples per method")
parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate with --quick")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
seeds = args.seeds or (1 if args.quick else 2)
work = args.work or (2 * 1024 if args.quick else 24 * 1024)
num_train = 256 if args.quick else 512
args.out.mkdir(parents=True, exist_ok=True)

x_train, x_val, x_test = moons(num_train, 0), moons(512, 1), moons(2048, 2)
mean, std = x_train.mean(0), x_train.std(0)
x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
splits = {"train": x_train, "val": x_val, "test": x_test}

# %% [markdown]
# ## Training
#
# The learning rates are tuned first (five trainings per method on the first seed),
# then every method is trained from each seed's initialisation. The figure shows, for
# the first seed, each flow's density and samples drawn through the inverse flow
# $x = (\nabla\Phi)^{-1}(z)$, and the training loss against work.

# %%
# Each method's Adam learning rate is tuned on the validation set (first seed).
if args.quick:
    full_lr = varpro_lr = args.lr
else:
    full_lr = tune_learning_rate(train_full, x_train, x_val, work)
    varpro_lr = tune_learning_rate(train_varpro, x_train, x_val, work)
methods = ("full Adam", "Adam-VarPro", "Adam→L-BFGS-VarPro")
scores = {name: [] for name in methods}
timings = {name: 0.0 for name in methods}
for seed in range(seeds):
    key = jax.random.PRNGKey(seed)
    init_key, data_key, sample_key = jax.random.split(key, 3)
    model = vploss.ICNN(2, 32, 32, 4, key=init_key)
    results = {}
    for name in methods:
        start = time.perf_counter()
        if name == "full Adam":
            results[name] = train_full(model, x_train, work, data_key, full_lr)
        else:
            fraction = 0.5 if "L-BFGS" in name else 0.0
            results[name] = train_varpro(model, x_train, work, data_key, varpro_lr, fraction)
        timings[name] += time.perf_counter() - start
        scores[name].append(evaluate(*results[name][:2], splits))
    if seed == 0:
        path = plot(results, x_train, args.out, sample_key)

# %%
print(f"\nTwo moons, ICNN 4 x 32, {work} samples of work per method, {seeds} seed(s);")
print(f"Adam learning rates (tuned on validation): full Adam {full_lr:g}, VarPro {varpro_lr:g}.")
print("NLL in nats, mean ± std over seeds, (n/2) log 2π included:\n")
header = f"{'method':<22}{'train':>16}{'validation':>16}{'test':>16}{'time (s)':>10}"
print(header)
print("-" * len(header))
for name in methods:
    cells = []
    for split in splits:
        values = np.array([s[split] for s in scores[name]])
        cells.append(f"{values.mean():>9.3f} ± {values.std():.3f}")
    row = "".join(f"{c:>16}" for c in cells)
    print(f"{name:<22}{row}{timings[name] / seeds:>10.1f}")
print(f"\nFigure saved to {path}")

# %% [markdown]
# ## Results
#
# In the run stored here, at equal work, both VarPro trainings reach a test NLL about
# 0.2 nats lower than full Adam (1.28 against 1.48), with a much smaller spread over the
# seeds, and their training loss falls faster from the start. L-BFGS on the full
# training set in the second half matches Adam-VarPro here but does not improve on it.
# The extra wall time of VarPro is the barrier solve on every batch, which the work
# count leaves out: full Adam's steps are the cheapest per sample.
