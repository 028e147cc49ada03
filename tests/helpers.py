"""Shared fixtures for the tests: small models, data and derivative checks, and the
lists every shared check runs over: `LOSS_CASES` (the losses) and `READOUT_SOLVERS`,
`RIDGE_SOLVERS` (the inner solvers by name and object)."""

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import vploss


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
    """The logistic (sigmoid, or softmax with `softmax=True`) readout and loss by
    `newton_reference`. `labels` are `(N, k)` probabilities (rows summing to 1 for
    softmax). Returns `(loss, coef)`."""
    case = LOSS_CASES["ce" if softmax else "bce"]
    return newton_reference(case.reference, features, labels, alpha2, use_bias=use_bias)


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
    """`(evaluate, zero)`: the logistic inner problem with a bias (`inner_objective64`)
    and the zero readout."""
    evaluate, shape = inner_objective64(LOSS_CASES["bce"].reference, features, labels, alpha2)
    return evaluate, np.zeros(shape)


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


# The losses, as the shared checks run them. Each reference is written from the loss's
# definition in NumPy float64, independently of the library: `reference(logits, targets)`
# with `(N, k)` logits and `(N, k)` float targets (`LossCase.targets`) gives the
# per-sample loss `ℓ_j`, its gradient `∂ℓ_j/∂z_j` and its Hessian `∂²ℓ_j/∂z_j²`.


def _squared_reference(z, y):
    return (
        0.5 * np.sum((z - y) ** 2, axis=1),
        z - y,
        np.broadcast_to(np.eye(z.shape[1]), (*z.shape, z.shape[1])),
    )


def _diagonal(values):
    return np.einsum("ja,ab->jab", values, np.eye(values.shape[1]))


def _sigmoid_reference(z, y):
    mean = 1 / (1 + np.exp(-z))
    return np.sum(np.logaddexp(0, z) - y * z, axis=1), mean - y, _diagonal(mean * (1 - mean))


def _softmax_reference(z, y):
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.sum(np.exp(z - zmax), axis=1))
    mean = np.exp(z - lse[:, None])
    return (
        lse - np.sum(y * z, axis=1),
        mean - y,
        _diagonal(mean) - np.einsum("ja,jb->jab", mean, mean),
    )


def _poisson_reference(z, y):
    mean = np.exp(z)
    return np.sum(mean - y * z, axis=1), mean - y, _diagonal(mean)


# Hashed by identity (`eq=False`): a case is a static argument of compiled functions.
@dataclasses.dataclass(frozen=True, eq=False)
class LossCase:
    """One loss: `function(model, x, y, **kwargs, ...)` is the public loss, `loss` its
    `AbstractReadoutLoss` (`None` for the closed-form ridge loss), `labels(score)` makes
    targets of the loss's kind from a real score of shape `(N,)`, `invalid` is a target
    the loss refuses, `reference` its NumPy definition (above) and `kwargs` the loss's
    own arguments (`num_classes`)."""

    name: str
    function: Callable[..., Any]
    loss: Any
    labels: Callable[[Any], Any]
    invalid: Any
    reference: Callable[..., Any]
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __call__(self, model, x, y, **kwargs):
        return self.function(model, x, y, **self.kwargs, **kwargs)

    def targets(self, y):
        """`y` as `(N, k)` float64 targets of `reference` (class labels one-hot)."""
        y = np.asarray(y)
        if "num_classes" in self.kwargs and np.issubdtype(y.dtype, np.integer):
            y = np.eye(self.kwargs["num_classes"])[y]
        return np.asarray(y, np.float64).reshape(len(y), -1)


#: Every loss, one entry each (adding a loss to the library adds one here). The ridge
#: loss first; `READOUT_CASES` are the iterative readout losses.
LOSS_CASES = {
    case.name: case
    for case in [
        LossCase("msereg", vploss.vploss_msereg, None, lambda s: s, jnp.inf, _squared_reference),
        LossCase(
            "bce",
            vploss.vploss_bce,
            vploss.SigmoidBinaryCrossEntropy(),
            lambda s: (s > 0).astype(s.dtype),
            7.0,
            _sigmoid_reference,
        ),
        LossCase(
            "ce",
            vploss.vploss_ce,
            vploss.SoftmaxCrossEntropy(num_classes=3),
            lambda s: jnp.digitize(s, jnp.array([-0.5, 0.5])),
            99,
            _softmax_reference,
            {"num_classes": 3},
        ),
        LossCase(
            "poisson",
            vploss.vploss_poisson,
            vploss.PoissonLogLikelihood(),
            lambda s: jax.random.poisson(jax.random.PRNGKey(1), jnp.exp(s)).astype(s.dtype),
            -1.0,
            _poisson_reference,
        ),
    ]
}
READOUT_CASES = {name: case for name, case in LOSS_CASES.items() if case.loss is not None}


#: The one readout loss that the long shared checks of the readout losses
#: (tests/test_readout_losses.py) run in the default run: every other readout case, and
#: every case added to `LOSS_CASES`, runs them with `-m slow` only.
DEFAULT_RUN_CASE = "poisson"


def cases(of=LOSS_CASES, *, default=None):
    """`pytest.param`s of the cases `of` (a mapping from the cases' names, every loss by
    default), all in the default run; with `default` (names), only those, and every
    other case, a new one included, among the slow tests (opt-in)."""

    unknown = set(default or ()) - set(of)
    assert not unknown, f"no such cases: {sorted(unknown)}"
    return [
        pytest.param(
            case,
            id=name,
            marks=[pytest.mark.slow] if default is not None and name not in default else [],
        )
        for name, case in of.items()
    ]


#: The inner solvers of the readout losses and of the ridge loss: each name and what
#: makes the object it stands for from the solver's options (`solver="newton",
#: gtol=g` is `vploss.Newton(gtol=g)`).
READOUT_SOLVERS = {
    "auto": vploss.AutoNewton,
    "newton": vploss.Newton,
    "newton-cg": vploss.NewtonCG,
    "kernel-newton": vploss.KernelNewton,
    "budgeted-newton-cg": vploss.BudgetedNewtonCG,
    # Cauchy criteria off: the gradient test stops them.
    "bfgs": functools.partial(vploss.QuasiNewton, optx.BFGS(rtol=0.0, atol=0.0)),
    "lbfgs": functools.partial(vploss.QuasiNewton, optx.LBFGS(rtol=0.0, atol=0.0)),
}
RIDGE_SOLVERS = {
    "auto": vploss.AutoRidge,
    "cholesky": vploss.CholeskyRidge,
    "svd": vploss.SVDRidge,
    "dual": vploss.DualRidge,
}


def inner_objective64(reference, features, targets, alpha2, weights=None, use_bias=True):
    """The inner objective `J(W) = Σ_j w_j ℓ(F̂_j W, y_j)/Σw + alpha2/2 |W|²` of the loss
    `reference` (a `LossCase.reference`), in NumPy float64: `(evaluate, (p, k))` with
    `evaluate(coef) -> (J, ∇J, ∇²J)` for `coef` = Ŵᵀ of shape `(p, k)` or flattened, the
    Hessian as a `(pk, pk)` matrix. `targets` are `(N, k)` floats (`LossCase.targets`)."""
    features = np.asarray(features, np.float64)
    n = features.shape[0]
    if use_bias:
        features = np.concatenate([features, np.ones((n, 1))], axis=1)
    targets = np.asarray(targets, np.float64).reshape(n, -1)
    omega = np.ones(n) if weights is None else np.asarray(weights, np.float64) * n / np.sum(weights)
    p, k = features.shape[1], targets.shape[1]

    def evaluate(coef):
        coef = np.reshape(coef, (p, k))
        per_sample, gradient, curvature = reference(features @ coef, targets)
        value = np.sum(omega * per_sample) / n + 0.5 * alpha2 * np.sum(coef**2)
        grad = features.T @ (omega[:, None] * gradient) / n + alpha2 * coef
        hess = (
            np.einsum("j,jp,jab,jq->paqb", omega, features, curvature, features, optimize=True) / n
        )
        return value, grad, hess.reshape(p * k, p * k) + alpha2 * np.eye(p * k)

    return evaluate, (p, k)


def newton_reference(reference, features, targets, alpha2, weights=None, use_bias=True):
    """The readout and loss of `inner_objective64` by a dense NumPy Newton method with
    step halving, float64, to a gradient of 1e-14. Returns `(loss, coef)`."""
    evaluate, shape = inner_objective64(reference, features, targets, alpha2, weights, use_bias)
    coef = np.zeros(shape)
    for _ in range(200):
        value, grad, hess = evaluate(coef)
        if np.max(np.abs(grad)) <= 1e-14:
            break
        step = np.linalg.solve(hess, grad.ravel()).reshape(shape)
        t = 1.0
        while evaluate(coef - t * step)[0] > value and t > 1e-10:
            t /= 2
        coef = coef - t * step
    return evaluate(coef)[0], coef
