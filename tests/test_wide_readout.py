"""Readout losses with wide features and few samples (N < m + 1): the kernel (dual)
Newton method, `KernelNewton`, which `solver="auto"` picks there, and the readout's
implicit derivative through the same kernel form. Values against independent
references (a NumPy Newton method, SciPy's `trust-exact`, the optimality conditions in
NumPy), derivatives against central differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import vploss
from vploss._readout_losses.objective import ReadoutArgs, ReadoutObjective
from vploss._readout_losses.solvers import AutoNewton

from .helpers import inner_objective64, logistic_reference, READOUT_CASES
from .test_precision import _sub_jaxprs, assert_full_precision


N, M = 24, 60
X = jax.random.normal(jax.random.PRNGKey(0), (N, M)) / np.sqrt(M) * 3
# Another batch: its readout, a warm start here, has components outside X's span.
OTHER = jax.random.normal(jax.random.PRNGKey(4), (N, M)) / np.sqrt(M) * 3
Y_BINARY = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(jnp.float64)
Y_TWO = jnp.stack([Y_BINARY, (X[:, 2] > 0).astype(jnp.float64)], axis=1)
Y_CLASS = jnp.argmax(X[:, :3] + 0.3 * X[:, 3:6], axis=1)
COUNTS = jax.random.poisson(jax.random.PRNGKey(1), jnp.exp(X[:, 0])).astype(jnp.float64)
LABELS = {"bce": Y_BINARY, "ce": Y_CLASS, "poisson": COUNTS}
WEIGHTS = jax.random.uniform(jax.random.PRNGKey(2), (N,), minval=0.2, maxval=3.0).at[:3].set(0.0)
ALPHA2 = 1e-3


def identity(features):
    return features


def scaled_tanh(scale):
    return lambda v: jnp.tanh(scale * v)


# Compiled once per loss, shapes and options, and shared by the tests.
@eqx.filter_jit
def fit(name, x, y, **kwargs):
    """`(loss, readout)` of loss `name` on the features `x`, `alpha2 = ALPHA2`."""
    return READOUT_CASES[name](identity, x, y, **{"alpha2": ALPHA2, **kwargs})


def fit_scaled(name, scale, **kwargs):
    """`(loss, readout)` of loss `name` with the features `tanh(scale·X)`."""
    return READOUT_CASES[name](scaled_tanh(scale), X, LABELS[name], alpha2=ALPHA2, **kwargs)


def flat(readout):
    """The readout's coefficients as one vector."""
    return jnp.concatenate(
        [jnp.ravel(leaf) for leaf in (readout.weight, readout.bias) if leaf is not None]
    )


# Central differences of the derivatives need minimisers far tighter than the default
# tolerance, whose solution error moves the envelope gradient by about 1e-6 here.
TIGHT = vploss.KernelNewton(gtol=1e-12)


@eqx.filter_jit
def forward(name, scale, **kwargs):
    """The loss and the flat readout at `scale`, and their derivatives in it (forward
    mode), with the `TIGHT` solver."""
    return jax.jvp(
        lambda s: (lambda out: (out[0], flat(out[1])))(fit_scaled(name, s, solver=TIGHT, **kwargs)),
        (scale,),
        (jnp.ones_like(scale),),
    )


def coefficients(readout):
    """`[W, b]ᵀ` of a readout, `(p, k)`, in float64."""
    weight = np.atleast_2d(np.asarray(readout.weight, np.float64))
    if readout.bias is None:
        return weight.T
    return np.concatenate([weight, np.atleast_1d(np.asarray(readout.bias))[:, None]], axis=1).T


def objective64(name, features, y, alpha2, weights=None, use_bias=True):
    """The inner objective of loss `name` in NumPy float64 (`inner_objective64`), with
    `y` the loss's labels."""
    case = READOUT_CASES[name]
    return inner_objective64(case.reference, features, case.targets(y), alpha2, weights, use_bias)


def scipy_reference(name, features, y, alpha2, weights=None, use_bias=True):
    """The minimiser by `scipy.optimize.minimize(method="trust-exact")` on
    `objective64`, polished by Newton steps to a gradient of 1e-14."""
    evaluate, shape = objective64(name, features, y, alpha2, weights, use_bias)
    result = scipy.optimize.minimize(
        lambda c: evaluate(c)[0],
        np.zeros(shape[0] * shape[1]),
        jac=lambda c: evaluate(c)[1].ravel(),
        hess=lambda c: evaluate(c)[2],
        method="trust-exact",
        options={"gtol": 1e-10},
    )
    coef = result.x
    # Newton steps from there, to the rounding of the gradient.
    for _ in range(3):
        _, gradient, hessian = evaluate(coef)
        coef = coef - np.linalg.solve(hessian, gradient.ravel())
    value, gradient, _ = evaluate(coef)
    assert np.max(np.abs(gradient)) <= 1e-14
    return value, coef.reshape(shape)


def assert_minimiser(name, readout, reference, x=X, y=None, **kwargs):
    """The readout is the minimiser to the solver's tolerance: the NumPy gradient of the
    objective at it is at most `sqrt(eps)` (the default `gtol`, the scaled test being
    the stricter), and it is within `|∇J|/alpha2` (strong convexity) of the
    reference minimiser."""
    y = LABELS[name] if y is None else y
    evaluate, _ = objective64(name, x, y, ALPHA2, **kwargs)
    coef = coefficients(readout)
    gradient = evaluate(coef.ravel())[1]
    assert np.max(np.abs(gradient)) <= float(jnp.finfo(jnp.float64).eps) ** 0.5
    assert np.linalg.norm(coef - reference) <= np.linalg.norm(gradient) / ALPHA2 + 1e-10


def chosen(loss, num_samples, width, num_outputs):
    """The solver `AutoNewton` chooses for a problem of this shape."""
    args = ReadoutArgs(
        jnp.zeros((num_samples, width + 1)),
        jnp.zeros((num_samples, num_outputs)),
        jnp.asarray(ALPHA2),
        use_bias=True,
    )
    return type(AutoNewton().choose(ReadoutObjective(loss), args))


@pytest.mark.parametrize("case", READOUT_CASES.values(), ids=READOUT_CASES.keys())
def test_auto_picks_the_kernel_form_when_wide(case):
    """The issue's shape, N = 200 and m = 2000, takes `KernelNewton`; a tall one does
    not."""
    loss, num_outputs = case.loss, case.kwargs.get("num_classes", 1)
    assert chosen(loss, 200, 2000, num_outputs) is vploss.KernelNewton
    assert chosen(loss, 2000, 20, num_outputs) is vploss.Newton


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from _shapes(sub)


@pytest.mark.slow
def test_issue_shape_forms_no_primal_array_and_is_exact():
    """N = 200, m = 2000 (the issue's case): the default solver's loss, its gradient and
    the readout's derivative form no array with two axes of length m + 1 (no Gram
    matrix, no Hessian; they took 43 s there), and the readout is the minimiser to the
    solver's tolerance (`assert_minimiser`, against the optimality conditions alone)."""
    num_samples, width = 200, 2000
    x = jax.random.normal(jax.random.PRNGKey(3), (num_samples, width)) / np.sqrt(width) * 3
    y = (x[:, 0] - x[:, 1] > 0).astype(jnp.float64)

    def loss_and_readout(scale):
        value, readout = vploss.vploss_bce(lambda v: scale * v, x, y, alpha2=ALPHA2)
        return value, jnp.sum(jnp.sin(readout.weight))

    jaxpr = jax.make_jaxpr(jax.jacfwd(loss_and_readout))(jnp.asarray(1.0)).jaxpr
    wide = [s for s in _shapes(jaxpr) if sum(d >= width + 1 for d in s) >= 2]
    assert not wide, wide

    value, readout = fit("bce", x, y)
    assert bool(readout.stats.converged)
    evaluate, _ = objective64("bce", x, y, ALPHA2)
    gradient = evaluate(coefficients(readout).ravel())[1]
    eps = float(jnp.finfo(jnp.float64).eps)
    assert np.max(np.abs(gradient)) <= eps**0.5
    tolerance = eps**0.5 * float(value) + 16 * eps * (1 + float(value))
    assert np.sum(gradient**2) / (2 * ALPHA2) <= tolerance


@pytest.mark.slow  # jit and vmap of the same solver are checked for every loss elsewhere
def test_jit_vmap_two_outputs_no_bias_against_numpy_newton():
    """`solver="auto"` under `jit` and `vmap` over two problems (two binary outputs, no
    bias) against the NumPy Newton method `logistic_reference`."""
    labels = jnp.stack([Y_TWO, 1 - Y_TWO])
    values, readouts = eqx.filter_jit(jax.vmap(lambda y: fit("bce", X, y, use_bias=False)))(labels)
    for i, y in enumerate(labels):
        readout = jax.tree.map(lambda leaf, i=i: leaf[i], readouts)
        ref_value, ref_coef = logistic_reference(X, y, ALPHA2, use_bias=False)
        assert bool(readout.stats.converged) and int(readout.stats.fallback_steps) == 0
        np.testing.assert_allclose(float(values[i]), ref_value, rtol=1e-12)
        assert_minimiser("bce", readout, ref_coef, y=y, use_bias=False)


@pytest.mark.slow
def test_weighted_softmax_against_scipy_and_primal_newton():
    """Softmax (rank-one curvature, the classes' basis) with per-sample weights, three of
    them zero: against SciPy's `trust-exact` on the weighted objective, and against
    `Newton` on the primal Hessian, which takes the same steps (exact Newton either
    way, the same iterates up to rounding)."""
    value, readout = fit("ce", X, Y_CLASS, weights=WEIGHTS, solver="kernel-newton")
    ref_value, ref_coef = scipy_reference("ce", X, Y_CLASS, ALPHA2, weights=WEIGHTS)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-12)
    assert_minimiser("ce", readout, ref_coef, weights=WEIGHTS)
    assert int(readout.stats.fallback_steps) == 0 and bool(readout.stats.converged)
    _, primal = fit("ce", X, Y_CLASS, weights=WEIGHTS, solver="newton")
    assert int(readout.stats.num_steps) == int(primal.stats.num_steps)


@pytest.mark.slow
def test_float32():
    """Softmax with float32 features (exact in float64): the float32 readout's
    objective, evaluated in float64, is within the solver's loss tolerance
    `sqrt(eps)·J + 16·eps·(1 + J)` of the minimum, bounded rigorously by strong
    convexity, `|∇J|²/(2 alpha2)` with the float64 gradient at the float32 readout;
    the float32 loss is off by that plus the rounding of its own evaluation,
    `16·eps·(1 + J)`."""
    x32 = X.astype(jnp.float32)
    value, readout = fit("ce", x32, Y_CLASS, alpha2=jnp.float32(ALPHA2))
    assert value.dtype == jnp.float32 and bool(readout.stats.converged)
    ref_value, _ = scipy_reference("ce", x32, Y_CLASS, ALPHA2)
    evaluate, _ = objective64("ce", x32, Y_CLASS, ALPHA2)
    gradient = evaluate(coefficients(readout).ravel())[1]
    excess = np.sum(gradient**2) / (2 * ALPHA2)
    eps = float(jnp.finfo(jnp.float32).eps)
    rounding = 16 * eps * (1 + ref_value)
    assert excess <= eps**0.5 * ref_value + rounding
    assert abs(float(value) - ref_value) <= excess + rounding


def central_difference(fn, scale, h=1e-5):
    return jax.tree.map(lambda a, b: (a - b) / (2 * h), fn(scale + h), fn(scale - h))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("ce", {"weights": WEIGHTS}),
        pytest.param("poisson", {"use_bias": False}, marks=pytest.mark.slow),
    ],
)
def test_values_and_derivatives(name, kwargs):
    """With the features `tanh(s·X)`: the loss against SciPy's `trust-exact`; its
    envelope derivative and the readout's implicit derivative (the kernel form of the
    Hessian solve) in forward mode against central differences, and in reverse mode
    against forward mode."""
    scale = jnp.asarray(1.3)
    (value, readout), (t_value, t_readout) = forward(name, scale, **kwargs)
    features = jnp.tanh(scale * X)
    ref_value, _ = scipy_reference(name, features, LABELS[name], ALPHA2, **kwargs)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-12)

    fd_value, fd_readout = central_difference(lambda s: forward(name, s, **kwargs)[0], scale)
    np.testing.assert_allclose(t_value, fd_value, rtol=1e-7)
    atol = 1e-7 * float(jnp.max(jnp.abs(fd_readout)))
    np.testing.assert_allclose(t_readout, fd_readout, rtol=1e-6, atol=atol)

    # Reverse mode: the gradient of the loss plus a random combination of the readout.
    direction = jax.random.normal(jax.random.PRNGKey(5), t_readout.shape)

    def combined(s):
        loss, readout = fit_scaled(name, s, solver=TIGHT, **kwargs)
        return loss + jnp.vdot(direction, flat(readout))

    gradient = eqx.filter_jit(jax.grad(combined))(scale)
    np.testing.assert_allclose(gradient, t_value + jnp.vdot(direction, t_readout), rtol=1e-10)


@pytest.mark.slow  # as the other losses' second-derivative checks
def test_second_derivative_against_central_differences():
    """The second derivative of the reduced loss differentiates the kernel Hessian
    solve itself (the Poisson loss's square-root factors)."""
    scale = jnp.asarray(1.3)
    second = jax.jacfwd(lambda s: forward("poisson", s, use_bias=False)[1][0])(scale)
    fd = central_difference(lambda s: forward("poisson", s, use_bias=False)[1][0], scale)
    np.testing.assert_allclose(second, fd, rtol=1e-6)


@pytest.mark.slow
def test_warm_start_from_another_batch():
    """A warm start fitted on other features has components outside these features'
    span, where the Hessian is alpha2·I: the kernel form solves them exactly too, and a
    start at the solution needs no step."""
    _, other = fit("ce", OTHER, Y_CLASS, weights=WEIGHTS, solver="kernel-newton")
    value, warm = fit("ce", X, Y_CLASS, weights=WEIGHTS, solver="kernel-newton", init=other)
    ref_value, ref_coef = scipy_reference("ce", X, Y_CLASS, ALPHA2, weights=WEIGHTS)
    assert bool(warm.stats.converged)
    np.testing.assert_allclose(float(value), ref_value, rtol=1e-12)
    assert_minimiser("ce", warm, ref_coef, weights=WEIGHTS)
    _, again = fit("ce", X, Y_CLASS, weights=WEIGHTS, solver="kernel-newton", init=warm)
    assert int(again.stats.num_steps) <= 1


def test_kernel_path_at_full_precision():
    """Every matmul of the kernel form asks for `Precision.HIGHEST` (TF32 on GPUs)."""

    def fn(scale):
        value, readout = fit_scaled("ce", scale)
        return value + jnp.sum(jnp.sin(readout.weight))

    assert_full_precision(jax.grad(fn), jnp.asarray(1.3))
