"""Speed of `vploss_bce` and `vploss_ce` against plain trainable heads, float32.

Times, interleaved, one jitted `value_and_grad` step (median over repeats) of

- `vploss_bce` (MLP 2 → 64 → 64 → m = 32, tanh, N = 4096, points inside/outside the
  unit circle) against the same MLP with a plain trainable logistic head, and against
  a seed-style baseline: the readout from `jax.scipy.optimize.minimize` (BFGS, 256
  iterations, from zero with the identity as initial inverse Hessian, sum loss with
  ±1 labels) under `stop_gradient`. Each method's inner gradient norm is printed.
- `vploss_ce` (MLP 2 → 64 → 64 → m = 64, K = 10 classes by angle and radius) against
  the same MLP with a plain trainable softmax head.

VarPro steps are timed cold (readout from zero) and warm (from the readout of the
previous Adam step, as in a training loop); the inner iterations saved by the warm
start are printed.

    python benchmarks/logistic_step.py [--repeats 30] [--alpha2 1e-4]
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.optimize
import numpy as np
import optax

from vploss import vploss_bce, vploss_ce


N = 4096


def _problem(width, num_classes, seed=0):
    mkey, hkey, xkey = jax.random.split(jax.random.PRNGKey(seed), 3)
    model = eqx.nn.MLP(2, width, 64, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=mkey)
    x = jax.random.uniform(xkey, (N, 2), minval=-2.0, maxval=2.0)
    inside = jnp.sum(x**2, axis=1) < 1
    if num_classes is None:
        return model, eqx.nn.Linear(width, "scalar", key=hkey), x, inside.astype(jnp.float32)
    angle = jnp.floor((jnp.arctan2(x[:, 1], x[:, 0]) / jnp.pi + 1) * num_classes / 2)
    y = (angle.astype(jnp.int32) + inside) % num_classes
    return model, eqx.nn.Linear(width, num_classes, key=hkey), x, y


def _median_ms(times):
    return 1e3 * float(np.median(times))


def _interleaved(steps, repeats):
    for step in steps.values():
        jax.block_until_ready(step())
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step())
            times[name].append(time.perf_counter() - start)
    return {name: _median_ms(t) for name, t in times.items()}


def _moved(model):
    """The model after one Adam step on its parameters (a warm start's situation)."""
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, _ = optax.adam(1e-3).update(
        jax.tree.map(jnp.sign, params), optax.adam(1e-3).init(params)
    )
    return eqx.apply_updates(model, updates)


def seed_style_readout(features, y, alpha2):
    """The baseline's inner solve: BFGS on the sum loss with ±1 labels."""
    fhat = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)
    signs = 2 * y - 1

    def sum_loss(w):
        return jnp.sum(jax.nn.softplus(-signs * (fhat @ w))) + 0.5 * alpha2 * jnp.sum(w**2)

    w0 = jnp.zeros(fhat.shape[1], features.dtype)
    w = jax.scipy.optimize.minimize(sum_loss, w0, method="BFGS", options={"maxiter": 256}).x
    return jax.lax.stop_gradient(w)


def bce(repeats, alpha2):
    model, head, x, y = _problem(32, None)
    moved = _moved(model)

    def plain(mh):
        m, h = mh
        logits = jax.vmap(lambda xi: h(m(xi)))(x)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    def varpro(m, init):
        return vploss_bce(m, x, y, alpha2=alpha2, init=init)

    def seed(m):
        features = jax.vmap(m)(x)
        w = seed_style_readout(features, y, alpha2 * N)
        logits = features @ w[:-1] + w[-1]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    plain_step = eqx.filter_jit(eqx.filter_value_and_grad(plain))
    vp_step = eqx.filter_jit(eqx.filter_value_and_grad(varpro, has_aux=True))
    seed_step = eqx.filter_jit(eqx.filter_value_and_grad(seed))
    (_, previous), _ = vp_step(model, None)
    times = _interleaved(
        {
            "plain": lambda: plain_step((moved, head)),
            "vploss_bce cold": lambda: vp_step(moved, None),
            "vploss_bce warm": lambda: vp_step(moved, previous),
            "seed BFGS": lambda: seed_step(moved),
        },
        repeats,
    )
    _report("vploss_bce, MLP 2-64-64-32, N = 4096", times)
    (_, cold), _ = vp_step(moved, None)
    (_, warm), _ = vp_step(moved, previous)
    # The seed's readout, scored by the gradient of the same mean objective.
    features = jax.vmap(moved)(x)
    w = seed_style_readout(features, y, alpha2 * N)
    fhat = jnp.concatenate([features, jnp.ones((N, 1))], axis=1)
    grad = fhat.T @ (jax.nn.sigmoid(fhat @ w) - y) / N + alpha2 * w
    print(
        f"  inner max|grad|: vploss_bce cold {float(cold.stats.gradient_norm):.1e} "
        f"({int(cold.stats.num_steps)} steps), warm {float(warm.stats.gradient_norm):.1e} "
        f"({int(warm.stats.num_steps)} steps); seed BFGS {float(jnp.max(jnp.abs(grad))):.1e}"
    )
    print(
        f"  ratio vploss_bce warm / seed BFGS: {times['vploss_bce warm'] / times['seed BFGS']:.3f} "
        f"(cold {times['vploss_bce cold'] / times['seed BFGS']:.3f}); goal <= 0.3"
    )


def ce(repeats, alpha2, num_classes=10):
    model, head, x, y = _problem(64, num_classes)
    moved = _moved(model)

    def plain(mh):
        m, h = mh
        logits = jax.vmap(lambda xi: h(m(xi)))(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def varpro(m, init, solver):
        return vploss_ce(
            m, x, y, alpha2=alpha2, num_classes=num_classes, init=init, solver=solver, throw=False
        )

    plain_step = eqx.filter_jit(eqx.filter_value_and_grad(plain))
    vp_step = eqx.filter_jit(eqx.filter_value_and_grad(varpro, has_aux=True))
    steps = {"plain": lambda: plain_step((moved, head))}
    stats = {}
    for solver in ("newton-cg", "newton"):
        (_, previous), _ = vp_step(model, None, solver)
        steps[f"{solver} cold"] = lambda s=solver: vp_step(moved, None, s)
        steps[f"{solver} warm"] = lambda s=solver, p=previous: vp_step(moved, p, s)
        stats[solver] = [vp_step(moved, init, solver)[0][1].stats for init in (None, previous)]
    times = _interleaved(steps, repeats)
    _report(f"vploss_ce, K = {num_classes}, m = 64, N = 4096 (auto = newton)", times)
    for solver, (cold, warm) in stats.items():
        print(
            f"  {solver}: inner steps cold {int(cold.num_steps)}, warm {int(warm.num_steps)}; "
            f"max|grad| {float(cold.gradient_norm):.1e} / {float(warm.gradient_norm):.1e}; "
            f"converged {bool(cold.converged)} / {bool(warm.converged)}"
        )


def _report(title, times):
    base = times["plain"]
    print(f"{title}, alpha2 = {ARGS.alpha2:g}")
    for name, ms in times.items():
        print(f"  {name:18s} {ms:9.2f} ms  ratio to plain {ms / base:7.2f}")


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--alpha2", type=float, default=1e-4)
    ARGS = parser.parse_args()
    bce(ARGS.repeats, ARGS.alpha2)
    ce(ARGS.repeats, ARGS.alpha2)


if __name__ == "__main__":
    main()
