"""Shared fixtures for the tests: small models, data and derivative checks."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


#: The example scripts (modules whose names start with "_" hold code they share).
EXAMPLE_SCRIPTS = sorted(
    p
    for p in (pathlib.Path(__file__).parent.parent / "examples").glob("*.py")
    if not p.name.startswith("_")
)


def mlp(in_size=3, width=8, depth=2, features=6, *, dtype=jnp.float64, seed=0):
    """A small tanh MLP feature map `in_size → width → ... → features`."""
    model = eqx.nn.MLP(
        in_size,
        features,
        width,
        depth,
        activation=jnp.tanh,
        final_activation=jnp.tanh,
        key=jax.random.PRNGKey(seed),
    )
    return cast(model, dtype)


def cast(tree, dtype):
    """Casts the floating-point array leaves of `tree` to `dtype`."""
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def random_direction(tree, seed=1):
    """A random perturbation with the structure of the inexact leaves of `tree`."""
    params = eqx.filter(tree, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def tree_dot(a, b):
    la = jax.tree.leaves(eqx.filter(a, eqx.is_inexact_array))
    lb = jax.tree.leaves(eqx.filter(b, eqx.is_inexact_array))
    return sum(jnp.vdot(x, y) for x, y in zip(la, lb, strict=True))


def flatten(tree):
    """The inexact leaves of `tree` as one float64 NumPy vector."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


def along(tree, direction, h):
    """`tree + h * direction` on the inexact leaves."""
    return eqx.apply_updates(tree, jax.tree.map(lambda d: h * d, direction))


def directional_derivative_check(loss_fn, model, *, seed=1, h=1e-6):
    """Central finite difference of `loss_fn` along a random direction, and the
    directional derivative from `eqx.filter_grad`. Returns `(fd, ad)`."""
    direction = random_direction(model, seed)
    grad = eqx.filter_grad(loss_fn)(model)
    ad = float(tree_dot(grad, direction))
    fd = float(
        (loss_fn(along(model, direction, h)) - loss_fn(along(model, direction, -h))) / (2 * h)
    )
    return fd, ad


def taylor_remainders(loss_fn, model, *, seed=1, h0=1e-3, halvings=4):
    """`|L(θ + h v) − L(θ) − h ⟨∇L, v⟩|` for `h = h0, h0/2, ...`. For the true gradient
    these fall as O(h²): a ratio of about 4 per halving."""
    direction = random_direction(model, seed)
    grad = eqx.filter_grad(loss_fn)(model)
    slope = tree_dot(grad, direction)
    base = loss_fn(model)
    hs = [h0 / 2**i for i in range(halvings)]
    return np.array(
        [abs(float(loss_fn(along(model, direction, h)) - base - h * slope)) for h in hs]
    )


def ridge_reference(features, targets, alpha2, use_bias=True, weights=None):
    """The ridge readout and loss from `numpy.linalg.lstsq` on the stacked system
    `[F̂/√N; √alpha2 I] Ŵᵀ ≈ [Y/√N; 0]` (float64; with `weights`, the rows scaled by
    `√(w_j/S)` instead). Returns `(loss, coef)`."""
    a, b = stacked_ridge(np.asarray(features, np.float64), targets, alpha2, use_bias, weights)
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    loss = 0.5 * np.sum((a @ coef - b) ** 2)
    return loss, coef


def ridge_float32_error_bound(features, targets, alpha2, use_bias=True):
    """A bound on the relative error of a ridge readout computed in float32 by a
    backward-stable method (QR, SVD or refined Cholesky of the stacked system), from
    least-squares perturbation theory (Wedin; Higham, *Accuracy and Stability*, Thm.
    20.1): `eps32·(2κ + κ²·η)`, with `κ` the condition number of the stacked matrix
    `A = [F̂/√N; √alpha2 I]` and `η = ‖r‖/(‖A‖‖x‖)` the relative residual of the
    float64 solution `x`. (The normal equations without refinement reach `eps32·κ²`
    regardless of the residual: far above the bound when the fit is good.)
    Returns `(bound, coef)` with the float64 coefficients."""
    a, b = stacked_ridge(np.asarray(features, np.float64), targets, alpha2, use_bias)
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    singular = np.linalg.svd(a, compute_uv=False)
    kappa = singular[0] / singular[-1]
    eta = np.linalg.norm(a @ coef - b) / (singular[0] * np.linalg.norm(coef))
    return float(np.finfo(np.float32).eps * (2 * kappa + kappa**2 * eta)), coef


def logistic_reference(features, labels, alpha2, softmax=False, use_bias=True):
    """The logistic (sigmoid, or softmax with `softmax=True`) readout and loss by a
    dense NumPy Newton method with step halving, float64, to a gradient of 1e-14,
    written independently of the library. `labels` are `(N, k)` probabilities (rows
    summing to 1 for softmax). Returns `(loss, coef)`."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.float64)
    n = features.shape[0]
    if use_bias:
        features = np.concatenate([features, np.ones((n, 1))], axis=1)
    p, k = features.shape[1], labels.shape[1]

    def value_grad_hess(coef):
        z = features @ coef
        if softmax:
            zmax = z.max(axis=1, keepdims=True)
            lse = zmax[:, 0] + np.log(np.sum(np.exp(z - zmax), axis=1))
            data = np.sum(lse - np.sum(labels * z, axis=1)) / n
            s = np.exp(z - lse[:, None])
            curvature = np.einsum("ja,ab->jab", s, np.eye(k)) - np.einsum("ja,jb->jab", s, s)
        else:
            data = np.sum(np.logaddexp(0, z) - labels * z) / n
            s = 1 / (1 + np.exp(-z))
            curvature = np.einsum("ja,ab->jab", s * (1 - s), np.eye(k))
        value = data + 0.5 * alpha2 * np.sum(coef**2)
        grad = features.T @ (s - labels) / n + alpha2 * coef
        hess = np.einsum("jp,jab,jq->paqb", features, curvature, features) / n
        hess = hess.reshape(p * k, p * k) + alpha2 * np.eye(p * k)
        return value, grad, hess

    coef = np.zeros((p, k))
    for _ in range(200):
        value, grad, hess = value_grad_hess(coef)
        if np.max(np.abs(grad)) <= 1e-14:
            break
        step = np.linalg.solve(hess, grad.ravel()).reshape(p, k)
        t = 1.0
        while value_grad_hess(coef - t * step)[0] > value and t > 1e-10:
            t /= 2
        coef = coef - t * step
    return value_grad_hess(coef)[0], coef


def stacked_ridge(features, targets, alpha2, use_bias=True, weights=None):
    """`[F̂/√N; √alpha2 I]` and `[Y/√N; 0]` in the dtype of `features`; with per-sample
    `weights`, the rows scaled by `√(w_j/S)` (S their sum) instead of `1/√N`."""
    features = np.asarray(features)
    targets = np.asarray(targets).reshape(len(features), -1)
    n = len(features)
    if weights is None:
        scale = np.full((n, 1), 1 / np.sqrt(n))
    else:
        weights = np.asarray(weights, np.float64)
        scale = np.sqrt(weights / weights.sum())[:, None]
    if use_bias:
        features = np.c_[features, np.ones(n, features.dtype)]
    p = features.shape[1]
    a = np.r_[features * scale, np.sqrt(alpha2) * np.eye(p)].astype(features.dtype)
    b = np.r_[targets * scale, np.zeros((p, targets.shape[1]))].astype(features.dtype)
    return a, b


def ridge_loss64(features, targets, alpha2, coef, use_bias=True, weights=None):
    """The (weighted) ridge objective of the stacked coefficients `coef`, in float64."""
    a, b = stacked_ridge(
        np.asarray(features, np.float64),
        np.asarray(targets, np.float64),
        alpha2,
        use_bias,
        weights,
    )
    return 0.5 * np.sum((a @ np.asarray(coef, np.float64) - b) ** 2)


def stacked_coef(readout):
    """`[W, b]ᵀ` of a `VPLinear` as a NumPy array."""
    weight = np.asarray(readout.weight).T
    if readout.bias is None:
        return weight
    return np.r_[weight, np.asarray(readout.bias)[None]]


def same_precision_ridge_loss(features, targets, alpha2, use_bias=True, weights=None):
    """The float64 loss of the same-precision backward-stable solve, and a floor for
    problems fitted to rounding level (interpolation): the residual of a computed
    solution cannot be resolved below ~eps·|y| per sample, so the loss below ~(c·eps)²
    times ½ mean(y²); c = 100. With `weights`, of the weighted problem."""
    a, b = stacked_ridge(features, targets, alpha2, use_bias, weights)
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    eps = np.finfo(np.asarray(features).dtype).eps
    floor = (100 * eps) ** 2 * 0.5 * np.mean(np.asarray(targets, np.float64) ** 2)
    return ridge_loss64(features, targets, alpha2, coef, use_bias, weights), floor


def repeated(weights, *arrays):
    """`arrays` with sample j repeated `weights[j]` times (integer weights; a zero
    drops the sample): the data set that integer weights stand for."""
    index = np.repeat(np.arange(len(weights)), np.asarray(weights))
    return tuple(np.asarray(a)[index] for a in arrays)


def scanned_updates(rule, model):
    """`run(state, xs, ys) -> (state, losses)`: the stochastic readout `rule`'s `update`
    on the batches `(xs[i], ys[i])` in turn, in one compiled `lax.scan`."""

    @eqx.filter_jit
    def run(state, xs, ys):
        def body(state, batch):
            loss, (_, state) = rule.update(model, *batch, state)
            return state, loss

        return jax.lax.scan(body, state, (xs, ys))

    return run


def logistic_problem(features, labels, alpha2):
    """`(evaluate, zero)`: `evaluate(coef)` gives `J`, its gradient and its Hessian (as a
    `(pk, pk)` matrix) for the logistic inner problem with a bias, `coef` = Ŵᵀ of shape
    `(p, k)`, in NumPy float64, written independently of the library; `zero` is the
    zero readout."""
    features = np.asarray(features, np.float64)
    features = np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)
    labels = np.asarray(labels, np.float64).reshape(features.shape[0], -1)
    n, p = features.shape
    k = labels.shape[1]

    def evaluate(coef):
        z = features @ coef
        s = 1 / (1 + np.exp(-z))
        value = np.sum(np.logaddexp(0, z) - labels * z) / n + 0.5 * alpha2 * np.sum(coef**2)
        grad = features.T @ (s - labels) / n + alpha2 * coef
        hess = np.einsum("jp,jc,cd,jq->pcqd", features, s * (1 - s), np.eye(k), features) / n
        return value, grad, hess.reshape(p * k, p * k) + alpha2 * np.eye(p * k)

    return evaluate, np.zeros((p, k))


def armijo_updates(evaluate, coef, direction, count, slope=0.1):
    """`count` updates `coef - t d` from `coef`, `d = direction(gradient, Hessian)` and `t`
    the first of 1, 1/2, 1/4, ... that decreases `J` by the fraction `slope` of the
    predicted decrease `t gᵀd` (the library's Armijo tests, their allowance for rounding
    aside), for `evaluate(coef) -> (J, gradient, Hessian)`."""
    for _ in range(count):
        value, grad, hess = evaluate(coef)
        step = direction(grad, hess)
        t = 1.0
        while evaluate(coef - t * step)[0] > value - slope * t * np.vdot(grad, step):
            t /= 2
        coef = coef - t * step
    return coef


def newton_step(grad, hess):
    """The Newton direction `H⁻¹g` (for `armijo_updates`), `grad` of any shape."""
    return np.linalg.solve(hess, grad.ravel()).reshape(grad.shape)
