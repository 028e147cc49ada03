"""Predictive uncertainty from the fitted readout (`vploss.readout_posterior`).

(a) Regression, friedman1 with noise 1 (`sklearn.datasets.make_friedman1`): a tanh MLP
feature map trained with `vploss_msereg` (the recipe of the page "Choosing the
penalties": standardised targets, `alpha1 = 0.03`, full-batch Adam), then the coverage
of the central 90% predictive intervals of the Bayesian linear regression posterior on
held-out data (goal: within 2 points of 90%), with the noise estimated by the evidence
(`noise="evidence"`) and, for comparison, by the plain mean square residual and with
the readout's own uncertainty left out (noise only).

(b) Classification, scikit-learn digits (train / validation / test 60/20/20): a tanh MLP
trained with `vploss_ce` on mini-batches, the readout then fitted on the whole training
set; test NLL and expected calibration error (15 bins) of the last-layer Laplace
predictive (probit; the bridge and Monte Carlo for comparison; at the training penalty
and at the evidence's) against the plain softmax of the readout and against temperature
scaling fitted on the validation split (goal: better NLL and ECE than the plain softmax).

Medians over three seeds (the split and the initialisation), float32 on the CPU.

    OPENBLAS_NUM_THREADS=1 python benchmarks/uncertainty.py [--quick]
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.stats import norm
from sklearn.datasets import load_digits, make_friedman1

import vploss


NUM_CLASSES = 10
CE_ALPHA2 = 1e-3
RIDGE_ALPHA2 = 1e-6
FRIEDMAN_ALPHA1 = 0.03  # λ = alpha1 / var(y) on standardised targets


def mlp(in_size, width, depth, key):
    return eqx.nn.MLP(
        in_size, width, width, depth, activation=jnp.tanh, final_activation=jnp.tanh, key=key
    )


def adam(params, loss_fn, batches, learning_rate):
    """Adam on `loss_fn(params, batch, readout) -> (loss, readout)` over `batches`,
    each step warm-started from the last readout."""
    optimiser = optax.adam(learning_rate)
    dynamic, static = eqx.partition(params, eqx.is_inexact_array)

    @eqx.filter_jit
    def step(dynamic, state, batch, readout):
        grad_fn = jax.value_and_grad(
            lambda d: loss_fn(eqx.combine(d, static), batch, readout), has_aux=True
        )
        (_, readout), grads = grad_fn(dynamic)
        updates, state = optimiser.update(grads, state)
        return eqx.apply_updates(dynamic, updates), state, readout

    state = optimiser.init(dynamic)
    readout = loss_fn(params, batches[0], None)[1]
    for batch in batches:
        dynamic, state, readout = step(dynamic, state, batch, readout)
    return eqx.combine(dynamic, static)


# --- (a) friedman1 -------------------------------------------------------------------


def friedman(seed, steps, width):
    n_train, n_val, n_test = 600, 200, 2000
    x, y = make_friedman1(n_samples=n_train + n_val + n_test, noise=1.0, random_state=seed)
    train, val, test = np.split(np.arange(len(y)), [n_train, n_train + n_val])
    x = (x - x[train].mean(0)) / x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    y = (y - y_mean) / y_std
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    model = mlp(10, width, 2, jax.random.PRNGKey(seed))

    def loss_fn(model, batch, readout):
        del readout
        return vploss.vploss_msereg(
            model, x[train], y[train], alpha1=FRIEDMAN_ALPHA1, alpha2=RIDGE_ALPHA2
        )

    model = adam(model, loss_fn, [None] * steps, 3e-3)

    @eqx.filter_jit
    def posterior_of(model, noise):
        return vploss.readout_posterior(
            model, x[train], y[train], loss=vploss.vploss_msereg, alpha2=RIDGE_ALPHA2, noise=noise
        )

    features = jax.vmap(model)(x[test])
    z = norm.ppf(0.95)
    out = {}
    evidence = posterior_of(model, "evidence")
    # The noise by moments on the validation split: its mean square error less the
    # readout's own (latent) variance there.
    val_mean, val_variance = jax.vmap(evidence.latent)(jax.vmap(model)(x[val]))
    val_noise = np.mean((np.asarray(y[val]) - val_mean[:, 0]) ** 2) - np.mean(val_variance)
    posteriors = {
        "evidence": evidence,
        "residual": posterior_of(model, "residual"),
        "validation": posterior_of(model, jnp.asarray(val_noise, jnp.float32)),
    }
    for name, posterior in posteriors.items():
        mean, variance = jax.vmap(posterior.predict)(features)
        error = np.abs(np.asarray(y[test] - mean))
        out[f"coverage (%), noise={name}"] = 100 * np.mean(error <= z * np.sqrt(variance))
        nll = 0.5 * np.log(2 * np.pi * variance) + 0.5 * error**2 / variance
        out[f"test NLL (standardised), noise={name}"] = float(np.mean(nll))
        out[f"noise sd, noise={name}"] = np.sqrt(float(posterior.noise[0])) * y_std
        if name == "evidence":
            noise_only = np.sqrt(float(posterior.noise[0]))
            out["coverage (%), noise=evidence, without the readout's variance"] = 100 * np.mean(
                error <= z * noise_only
            )
            out["test RMSE"] = float(np.sqrt(np.mean(error**2)) * y_std)
    return out


# --- (b) digits ----------------------------------------------------------------------


def expected_calibration_error(probabilities, labels, bins=15):
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return 100 * total


def nll(probabilities, labels):
    return float(-np.mean(np.log(np.maximum(probabilities[np.arange(len(labels)), labels], 1e-12))))


def temperature(logits, labels):
    """The temperature minimising the validation NLL (a grid on log T, then refined)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))

    def score(t):
        return nll(np.asarray(jax.nn.softmax(logits / t, axis=1)), labels)

    return min(grid, key=score)


def digits(seed, steps, width):
    data = load_digits()
    x = np.asarray(data.data / 16.0, np.float32)
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    n = len(y)
    train, val, test = np.split(order, [int(0.6 * n), int(0.8 * n)])
    model = mlp(64, width, 1, jax.random.PRNGKey(seed))
    batch_size = 128
    rng = np.random.default_rng(seed + 100)
    batches = [rng.choice(train, batch_size, replace=False) for _ in range(steps)]
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(model, batch, readout):
        return vploss.vploss_ce(
            model, xj[batch], yj[batch], alpha2=CE_ALPHA2, num_classes=NUM_CLASSES, init=readout
        )

    model = adam(model, loss_fn, batches, 3e-3)

    @eqx.filter_jit
    def posterior_of(model, alpha2, prior_alpha2=None):
        return vploss.readout_posterior(
            model,
            xj[train],
            yj[train],
            loss=vploss.vploss_ce,
            alpha2=alpha2,
            num_classes=NUM_CLASSES,
            prior_alpha2=prior_alpha2,
        )

    start = time.perf_counter()
    posterior = jax.block_until_ready(posterior_of(model, CE_ALPHA2))
    build_time = time.perf_counter() - start
    evidence = posterior_of(model, "evidence")
    f_val, f_test = jax.vmap(model)(xj[val]), jax.vmap(model)(xj[test])
    logits_val = jax.vmap(posterior.readout)(f_val)
    logits_test = jax.vmap(posterior.readout)(f_test)
    t = temperature(logits_val, y[val])
    # The prior precision of the covariance tuned on the validation NLL (the mean stays
    # the readout fitted with CE_ALPHA2): Laplace Redux's post-hoc grid search.
    grid = CE_ALPHA2 * 10.0 ** np.arange(0, 4.25, 0.25)
    tuned = {
        prior: posterior_of(model, CE_ALPHA2, jnp.asarray(prior, jnp.float32)) for prior in grid
    }
    scores = {
        prior: nll(np.asarray(jax.vmap(p.predict)(f_val), np.float64), y[val])
        for prior, p in tuned.items()
    }
    prior = min(scores, key=scores.get)
    chosen = tuned[prior]
    key = jax.random.PRNGKey(seed)

    def mc(posterior):
        return jax.vmap(lambda f: posterior.predict(f, method="mc", key=key, num_samples=1000))(
            f_test
        )

    rows = {
        "plain softmax (the readout's)": jax.nn.softmax(logits_test, axis=1),
        "temperature scaling (validation)": jax.nn.softmax(logits_test / t, axis=1),
        "Laplace at alpha2, probit": jax.vmap(posterior.predict)(f_test),
        "Laplace at alpha2, Monte Carlo (1000)": mc(posterior),
        "Laplace at the evidence's alpha2, probit": jax.vmap(evidence.predict)(f_test),
        "Laplace, prior tuned (validation), probit": jax.vmap(chosen.predict)(f_test),
        "Laplace, prior tuned (validation), bridge": jax.vmap(
            lambda f: chosen.predict(f, method="bridge")
        )(f_test),
        "Laplace, prior tuned (validation), Monte Carlo (1000)": mc(chosen),
    }
    out = {}
    for name, probabilities in rows.items():
        probabilities = np.asarray(probabilities, np.float64)
        out[name] = (
            nll(probabilities, y[test]),
            expected_calibration_error(probabilities, y[test]),
            100 * np.mean(probabilities.argmax(1) == y[test]),
        )
    return out, (build_time, t, float(evidence.alpha2), prior)


def median_table(results):
    keys = results[0].keys()
    return {k: np.median(np.array([r[k] for r in results]), axis=0) for k in keys}


def main():
    global CE_ALPHA2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small networks")
    parser.add_argument("--only", choices=("friedman", "digits"), help="run one part")
    parser.add_argument(
        "--alpha2", type=float, default=CE_ALPHA2, help="the readout penalty of the digits run"
    )
    args = parser.parse_args()
    CE_ALPHA2 = args.alpha2
    seeds = (0, 1, 2)
    f_steps, d_steps, width = (100, 60, 32) if args.quick else (1000, 600, 64)

    if args.only in (None, "friedman"):
        results = [friedman(seed, f_steps, width) for seed in seeds]
        table = median_table(results)
        print(f"## (a) friedman1, noise 1: MLP 10-{width}-{width}, {f_steps} Adam steps")
        print(
            f"medians over seeds {seeds}; per seed: "
            + "; ".join(f"{r['coverage (%), noise=evidence']:.1f}" for r in results)
            + " (coverage, evidence)\n"
        )
        print("| quantity | median |\n|---|---|")
        for name, value in table.items():
            print(f"| {name} | {value:.3f} |")
        coverage = table["coverage (%), noise=evidence"]
        met = abs(coverage - 90) <= 2
        print(
            "\ngoal (90% intervals cover 88-92%), evidence noise: "
            f"{'met' if met else 'not met'} ({coverage:.1f}%)"
        )
        coverage = table["coverage (%), noise=validation"]
        met = abs(coverage - 90) <= 2
        print(f"goal, validation noise: {'met' if met else 'not met'} ({coverage:.1f}%)\n")

    if args.only == "friedman":
        return
    runs = [digits(seed, d_steps, width) for seed in seeds]
    table = median_table([r for r, _ in runs])
    build, temperatures, alphas, priors = zip(*[info for _, info in runs], strict=True)
    print(f"## (b) digits: MLP 64-{width}, {d_steps} Adam steps on batches of 128")
    print(
        f"first posterior build (compilation included): {np.median(build):.1f} s; "
        f"temperatures {np.round(temperatures, 2)}; evidence alpha2 {np.round(alphas, 5)}; "
        f"tuned prior_alpha2 {np.round(priors, 5)} (training alpha2 = {CE_ALPHA2})\n"
    )
    print("| predictive | test NLL | ECE (%, 15 bins) | accuracy (%) |\n|---|---|---|---|")
    for name, (loss, ece, accuracy) in table.items():
        print(f"| {name} | {loss:.4f} | {ece:.2f} | {accuracy:.1f} |")
    plain = table["plain softmax (the readout's)"]
    for name in table:
        if name.startswith("Laplace") and "probit" in name:
            laplace = table[name]
            met = laplace[0] < plain[0] and laplace[1] < plain[1]
            print(
                f"goal ({name}: better NLL and ECE than the plain softmax): "
                f"{'met' if met else 'not met'}"
            )


if __name__ == "__main__":
    main()
