"""Full-precision matmuls: on recent NVIDIA GPUs a float32 matmul at the default
precision runs in TF32 (about 10 mantissa bits), which ruins a Gram matrix, a Hessian
or a Jacobian. Every `dot_general` the library emits, in every loss's value and
gradient and in the derivative of its readout, must ask for `Precision.HIGHEST`.

The jaxprs are inspected, so this runs (and fails) on a CPU as on a GPU. The models
here are elementwise (no matmul of their own), so every `dot_general` found is the
library's."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jex_core

import vploss
from vploss._readout_losses.objective import ReadoutObjective
from vploss._refit import _moments_readout, _readout_loss_sums, _ridge_moments

from .helpers import READOUT_CASES


HIGHEST = jax.lax.Precision.HIGHEST


class Elementwise(eqx.Module):
    """`u_i(x) = softplus(⟨a_i, x⟩)` with the inner products as sums of products (no
    `dot_general`): smooth features, convex in `x`, for every loss."""

    weight: jax.Array

    def __call__(self, sample):
        return jax.nn.softplus(jnp.sum(self.weight * sample, axis=1))


X = jax.random.normal(jax.random.PRNGKey(0), (12, 2))
MODEL = Elementwise(jax.random.normal(jax.random.PRNGKey(1), (4, 2)))
Y = jnp.sin(X[:, 0])
Y_BINARY = (X[:, 0] > 0).astype(X.dtype)


def _sub_jaxprs(value):
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jex_core.ClosedJaxpr):
            yield item.jaxpr
        elif isinstance(item, jex_core.Jaxpr):
            yield item


def dot_precisions(jaxpr):
    """The `precision` of every `dot_general` in `jaxpr` and its sub-jaxprs (`jit`,
    `custom_jvp`, `while`, `cond`, ...)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn.params["precision"]
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from dot_precisions(sub)


def assert_full_precision(fn, *args):
    precisions = list(dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr))
    assert precisions, "no dot_general found: the inspection is broken"
    low = [p for p in precisions if p not in (HIGHEST, (HIGHEST, HIGHEST))]
    assert not low, f"{len(low)} of {len(precisions)} dot_generals below HIGHEST: {low}"


def loss_and_readout(loss):
    """The loss plus a function of the readout: `value_and_grad` of it runs the
    envelope gradient and the readout's implicit derivative."""

    def fn(model):
        value, readout = loss(model)
        return value + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(readout))

    return fn


def _readout_loss(case, solver):
    return lambda m: case(m, X, case.labels(Y), alpha2=1e-3, solver=solver)


LOSSES = {
    "msereg-cholesky": lambda m: vploss.vploss_msereg(m, X, Y, alpha2=1e-3),
    "msereg-svd": lambda m: vploss.vploss_msereg(m, X, Y, alpha2=0.0),
    "msereg-dual": lambda m: vploss.vploss_msereg(m, X[:4], Y[:4], solver="dual"),
    "msereg-gcv": lambda m: vploss.vploss_msereg(m, X, Y, alpha2="gcv"),
    "cpflow": lambda m: vploss.vploss_cpflow(m, X, alpha2=1e-3),
}
# Every readout loss with every Newton solver ("auto" is "newton" at this shape; the
# quasi-Newton solvers are optimistix's, which forms its BFGS updates at the default
# precision). The matmuls are the solvers' and the objective's, the same for every
# loss: the default run keeps the softmax loss's (rank-one curvature, the most).
SOLVER_CASES = [
    pytest.param(
        _readout_loss(case, solver),
        id=f"{name}-{solver}",
        marks=[] if name == "ce" or solver == "auto" else [pytest.mark.slow],
    )
    for name, case in READOUT_CASES.items()
    for solver in ("auto", "newton-cg", "kernel-newton")
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss", [pytest.param(loss, id=name) for name, loss in LOSSES.items()] + SOLVER_CASES
)
def test_loss_and_readout_derivatives_at_full_precision(loss):
    assert_full_precision(eqx.filter_value_and_grad(loss_and_readout(loss)), MODEL)


def test_reduced_residual_and_its_jacobians_at_full_precision():
    def residual(m):
        return vploss.vpresidual_msereg(m, X, Y, alpha2=1e-3)[0]

    assert_full_precision(eqx.filter_jacfwd(residual), MODEL)
    assert_full_precision(eqx.filter_jacrev(residual), MODEL)
    assert_full_precision(lambda m: vploss.vpjacobian_msereg(m, X, Y, alpha2=1e-3)[0], MODEL)


@pytest.mark.slow
def test_fitted_flow_log_prob_at_full_precision():
    _, flow = vploss.vploss_cpflow(MODEL, X, alpha2=1e-3)
    assert_full_precision(jax.vmap(lambda x: flow.log_prob(MODEL, x)), X)
    # `flow.inverse` is not checked: its `optimistix.BFGS` forms outer products with
    # `jnp.tensordot` at the default precision (optimistix/_solver/quasi_newton.py).


def test_streaming_refit_at_full_precision():
    """`refit_readout` runs eagerly; its jitted pieces are inspected."""
    coef = jnp.zeros((5, 1))
    assert_full_precision(lambda x, y: _ridge_moments(MODEL, x, y, True), X, Y[:, None])
    assert_full_precision(
        lambda x, y, w, c: _readout_loss_sums(
            ReadoutObjective(vploss.SigmoidBinaryCrossEntropy()), MODEL, x, y, w, c, True
        ),
        X,
        Y_BINARY[:, None],
        jnp.ones(X.shape[0]),
        coef,
    )
    moments, _ = _ridge_moments(MODEL, X, Y[:, None], True)
    assert_full_precision(lambda m: _moments_readout(m, jnp.asarray(1e-3), True), moments)
