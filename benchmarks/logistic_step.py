"""Speed of `vploss_bce` and `vploss_ce` against plain trainable heads, float32.

Times, interleaved, one jitted `value_and_grad` step (median over repeats) of

- `vploss_bce` (MLP 2 → 64 → 64 → m = 32, tanh, N = 4096, points inside/outside the
  unit circle) against the same MLP with a plain trainable logistic head, and against
  a seed-style baseline: the readout from `jax.scipy.optimize.minimize` (BFGS, 256
  iterations, from zero with the identity as initial inverse Hessian, sum loss with
  ±1 labels) under `stop_gradient`, at alpha2 = 1e-6. The
  iterations and the inner gradient norm (of the same mean objective) of each method
  are printed.
- `vploss_ce` (MLP 2 → 64 → 64 → m = 64, K = 10 classes by angle and radius) against
  the same MLP with a plain trainable softmax head, with the exact Newton method and
  Newton–CG, at each `--ce-alpha2`.

Each is measured at the random initialisation and at a realistic point of training
(after `--train-steps` Adam steps of VarPro training, where the classes have become
nearly separable in feature space). VarPro steps are timed cold (readout from zero)
and warm (from the readout fitted before the last Adam step, as in a training loop).

    OPENBLAS_NUM_THREADS=1 python benchmarks/logistic_step.py [--repeats 30]
"""

import argparse
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.optimize
import optax
from _common import adam_steps, angle_classes, feature_mlp, inside_circle, interleaved_medians

from vploss import vploss_bce, vploss_ce


N = 4096


def _problem(width, num_classes, seed=0):
    mkey, hkey, xkey = jax.random.split(jax.random.PRNGKey(seed), 3)
    model = feature_mlp(width, key=mkey)
    x = jax.random.uniform(xkey, (N, 2), minval=-2.0, maxval=2.0)
    if num_classes is None:
        return model, eqx.nn.Linear(width, "scalar", key=hkey), x, inside_circle(x)
    y = angle_classes(x, num_classes)
    return model, eqx.nn.Linear(width, num_classes, key=hkey), x, y


def seed_style_readout(features, y, alpha2):
    """The baseline's inner solve: BFGS on the sum loss with ±1 labels; the readout
    under `stop_gradient` and BFGS's iteration count."""
    fhat = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)
    signs = 2 * y - 1

    def sum_loss(w):
        return jnp.sum(jax.nn.softplus(-signs * (fhat @ w))) + 0.5 * alpha2 * jnp.sum(w**2)

    w0 = jnp.zeros(fhat.shape[1], features.dtype)
    result = jax.scipy.optimize.minimize(sum_loss, w0, method="BFGS", options={"maxiter": 256})
    return jax.lax.stop_gradient(result.x), result.nit


def bce(repeats, alpha2, train_steps):
    model, head, x, y = _problem(32, None)

    def plain(mh):
        m, h = mh
        logits = jax.vmap(lambda xi: h(m(xi)))(x)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    def varpro(m, init):
        return vploss_bce(m, x, y, alpha2=alpha2, init=init, throw=False)

    def seed(m):
        features = jax.vmap(m)(x)
        # The sum loss's penalty alpha2·N is the mean objective's alpha2.
        w, _ = seed_style_readout(features, y, alpha2 * N)
        logits = features @ w[:-1] + w[-1]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    @eqx.filter_jit
    def seed_stats(m):
        features = jax.vmap(m)(x)
        w, nit = seed_style_readout(features, y, alpha2 * N)
        fhat = jnp.concatenate([features, jnp.ones((N, 1))], axis=1)
        grad = fhat.T @ (jax.nn.sigmoid(fhat @ w) - y) / N + alpha2 * w
        return nit, jnp.max(jnp.abs(grad))

    plain_step = eqx.filter_jit(eqx.filter_value_and_grad(plain))
    vp_step = eqx.filter_jit(eqx.filter_value_and_grad(varpro, has_aux=True))
    seed_step = eqx.filter_jit(eqx.filter_value_and_grad(seed))
    for point, num_steps in (
        ("initialisation", 1),
        (f"after {train_steps} Adam steps", train_steps),
    ):
        # The warm start is the readout before the last Adam step.
        moved, previous = adam_steps(model, varpro, num_steps)
        times = interleaved_medians(
            {
                "plain": functools.partial(plain_step, (moved, head)),
                "vploss_bce cold": functools.partial(vp_step, moved, None),
                "vploss_bce warm": functools.partial(vp_step, moved, previous),
                "seed BFGS": functools.partial(seed_step, moved),
            },
            repeats,
        )
        _report(f"vploss_bce, m = 32, N = {N}, {point}, alpha2 = {alpha2:g}", times)
        for name, init in (("cold", None), ("warm", previous)):
            stats = vp_step(moved, init)[0][1].stats
            _print_stats(f"vploss_bce {name}", stats)
        nit, grad_norm = seed_stats(moved)
        print(f"    {'seed BFGS':18s} steps {int(nit):3d}  max|grad| {float(grad_norm):.1e}")
        seed_ms = times["seed BFGS"]
        print(
            f"  vploss_bce / seed BFGS: warm {times['vploss_bce warm'] / seed_ms:.3f}, "
            f"cold {times['vploss_bce cold'] / seed_ms:.3f} (goal <= 0.3)"
        )


def ce(repeats, alphas, train_steps, num_classes=10):
    model, head, x, y = _problem(64, num_classes)

    def plain(mh):
        m, h = mh
        logits = jax.vmap(lambda xi: h(m(xi)))(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    def varpro(m, init, alpha2, solver="auto"):
        return vploss_ce(
            m, x, y, alpha2=alpha2, num_classes=num_classes, init=init, solver=solver, throw=False
        )

    plain_step = eqx.filter_jit(eqx.filter_value_and_grad(plain))
    vp_step = eqx.filter_jit(eqx.filter_value_and_grad(varpro, has_aux=True))
    for point, num_steps in (
        ("initialisation", 1),
        (f"after {train_steps} Adam steps", train_steps),
    ):
        for alpha2 in alphas:
            # The warm start is the readout before the last Adam step.
            loss = functools.partial(varpro, alpha2=alpha2)
            moved, previous = adam_steps(model, loss, num_steps)
            steps = {"plain": functools.partial(plain_step, (moved, head))}
            for solver in ("newton-cg", "newton"):
                for name, init in (("cold", None), ("warm", previous)):
                    steps[f"{solver} {name}"] = functools.partial(
                        vp_step, moved, init, alpha2, solver
                    )
            times = interleaved_medians(steps, repeats)
            title = f"vploss_ce, K = {num_classes}, m = 64, N = {N}, {point}, alpha2 = {alpha2:g}"
            _report(title, times)
            for name, step in steps.items():
                if name != "plain":
                    _print_stats(name, step()[0][1].stats)


def _report(title, times):
    base = times["plain"]
    print(title)
    for name, ms in times.items():
        print(f"  {name:18s} {ms:9.2f} ms  ratio to plain {ms / base:7.2f}")


def _print_stats(name, stats):
    print(
        f"    {name:18s} steps {int(stats.num_steps):3d}  max|grad| "
        f"{float(stats.gradient_norm):.1e}  converged {bool(stats.converged)}"
    )


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--bce-alpha2", type=float, default=1e-6)
    parser.add_argument("--ce-alpha2", type=float, nargs="+", default=[1e-4, 1e-6])
    parser.add_argument("--train-steps", type=int, default=300, choices=range(2, 10**6))
    parser.add_argument("--skip", choices=["bce", "ce"])
    args = parser.parse_args()
    if args.skip != "bce":
        bce(args.repeats, args.bce_alpha2, args.train_steps)
    if args.skip != "ce":
        ce(args.repeats, args.ce_alpha2, args.train_steps)


if __name__ == "__main__":
    main()
