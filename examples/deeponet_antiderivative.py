# %% [markdown]
# # Operator learning: a VarPro DeepONet for the antiderivative
#
# A DeepONet (Lu et al., "Learning nonlinear operators via DeepONet", Nature Machine
# Intelligence 2021) learns an operator $G$ between function spaces: a *branch*
# network $b$ reads the input function $u$ at fixed sensors, a *trunk* network $t$
# reads the query point $y$, and the prediction is bilinear in their features,
# $G(u)(y) \approx \sum_{k,l} b_k(u)\,C_{kl}\,t_l(y)$ + bias.
#
# `vploss.vploss_deeponet` solves the readout $C$ (and the bias) exactly inside the
# loss: on a grid of $n$ functions by $m$ points the problem is a Kronecker-structured
# ridge regression, solved through two small SVDs, and Adam trains only the two
# networks. Here the operator is the antiderivative $G(u)(y) = \int_0^y u$, on inputs
# drawn from a Gaussian random field, and the same DeepONet with its readout trained
# by Adam is the baseline.
#
# As a script: `python examples/deeponet_antiderivative.py [--quick] [--out DIR]`
# (under a minute on a shared 2-core CPU); it prints the test errors and saves
# `deeponet_antiderivative.png`.

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
from _antiderivative import antiderivative_data

import vploss


# %% [markdown]
# ## Data
#
# Input functions from a Gaussian random field of length scale 0.2 on $[0, 1]$, read
# at 100 sensors; their exact antiderivatives (the cumulative trapezoid rule on a fine
# grid) at 101 query points. 300 functions for training, 300 for testing.

# %%
parser = argparse.ArgumentParser(description="A VarPro DeepONet for the antiderivative.")
parser.add_argument("--quick", action="store_true", help="a few seconds' run")
parser.add_argument("--out", default=".", help="folder for the figure")
args = parser.parse_args([] if "ipykernel" in sys.modules else None)
steps = 100 if args.quick else 3000

u_train, y, s_train = (jnp.asarray(a, jnp.float32) for a in antiderivative_data(300, seed=0))
u_test, _, s_test = (jnp.asarray(a, jnp.float32) for a in antiderivative_data(300, seed=1))
print(f"u: {u_train.shape}, y: {y.shape}, G(u)(y): {s_train.shape}")

# %% [markdown]
# ## The networks and the loss
#
# Branch 100 → 40 → 40 → 40 and trunk 1 → 40 → 40 → 40, tanh. The loss takes both
# networks, the sensor values of the $n$ functions `(n, 100)`, the $m$ query points
# `(m, 1)` and the targets `(n, m)`, and returns the reduced loss and the fitted
# readout, a `vploss.DeepONetReadout`; `readout.predict(B, T)` predicts a grid from
# the branch features `B` `(n, p)` and the trunk features `T` `(m, q)`.

# %%
kb, kt, kc = jax.random.split(jax.random.PRNGKey(0), 3)
branch = eqx.nn.MLP(100, 40, 40, 2, activation=jnp.tanh, key=kb)
trunk = eqx.nn.MLP(1, 40, 40, 2, activation=jnp.tanh, key=kt)


def varpro_loss(nets):
    loss, _ = vploss.vploss_deeponet(nets[0], nets[1], u_train, y, s_train)
    return loss


def with_ones(f):
    return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)


def plain_prediction(params, u):
    branch, trunk, coef = params
    return with_ones(jax.vmap(branch)(u)) @ coef @ with_ones(jax.vmap(trunk)(y)).T


def plain_loss(params):
    return 0.5 * jnp.mean((plain_prediction(params, u_train) - s_train) ** 2)


def relative_error(prediction):
    return float(jnp.linalg.norm(prediction - s_test) / jnp.linalg.norm(s_test))


# %% [markdown]
# ## Training
#
# Full-batch Adam, the same number of steps for both, each at its learning rate from
# the benchmark (`benchmarks/deeponet.py`). The VarPro step costs more (two SVDs of
# the centred features and the projection of the targets), so the comparison at
# equal wall time is on the page "Operator learning (DeepONet)".


# %%
def train(loss_fn, params, lr, steps):
    optimiser = optax.adam(lr)

    @eqx.filter_jit
    def step(params, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(params)
        updates, state = optimiser.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(loss)
    return params, np.asarray(losses), time.perf_counter() - start


varpro_nets, varpro_curve, varpro_time = train(varpro_loss, (branch, trunk), 3e-3, steps)
coef = jax.random.normal(kc, (41, 41)) / np.sqrt(40)
plain_params, plain_curve, plain_time = train(plain_loss, (branch, trunk, coef), 3e-4, steps)

# The readout fitted on the training set for the final networks.
_, readout = vploss.vploss_deeponet(varpro_nets[0], varpro_nets[1], u_train, y, s_train)
varpro_test = readout.predict(jax.vmap(varpro_nets[0])(u_test), jax.vmap(varpro_nets[1])(y))
plain_test = plain_prediction(plain_params, u_test)
print(f"{steps} Adam steps, relative L2 test error:")
print(f"  VarPro (C exact): {relative_error(varpro_test):.2e}  ({varpro_time:.1f} s)")
print(f"  Adam on C too:    {relative_error(plain_test):.2e}  ({plain_time:.1f} s)")

# %% [markdown]
# ## Predictions
#
# The training losses, and three test functions: their antiderivatives and the two
# predictions.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].semilogy(varpro_curve, label="VarPro (C exact)")
axes[0].semilogy(plain_curve, label="Adam on C too")
axes[0].set_xlabel("Adam steps")
axes[0].set_ylabel("training loss")
axes[0].legend()
for i, color in zip(range(3), ["C0", "C1", "C2"], strict=True):
    axes[1].plot(y[:, 0], s_test[i], color=color, lw=3, alpha=0.4)
    axes[1].plot(y[:, 0], varpro_test[i], color=color, ls="-")
    axes[1].plot(y[:, 0], plain_test[i], color=color, ls=":")
axes[1].set_xlabel("y")
axes[1].set_title("exact (thick), VarPro (solid), Adam on C (dotted)")
out = pathlib.Path(args.out)
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "deeponet_antiderivative.png", dpi=100, bbox_inches="tight")
print(f"saved {out / 'deeponet_antiderivative.png'}")
