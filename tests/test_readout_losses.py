"""Checks every readout loss (`AbstractReadoutLoss`) must pass, run over the shared
list `READOUT_CASES` (tests/helpers.py); the per-loss files keep what is specific to one
loss (references, labels, the solvers' corner cases)."""

import dataclasses
import typing
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import (
    cases,
    cast,
    DEFAULT_RUN_CASE,
    directional_derivative_check,
    flatten,
    LOSS_CASES,
    LossCase,
    mlp,
    READOUT_CASES,
    READOUT_SOLVERS,
    RIDGE_SOLVERS,
    taylor_remainders,
)


N = 40
X = jax.random.normal(jax.random.PRNGKey(0), (N, 3))
_SCORE = jnp.sin(2 * X[:, 0] + X[:, 1])


@dataclasses.dataclass(frozen=True)
class Case:
    """A loss case on this file's data: `X`, labels from `_SCORE`, `alpha2 = 1e-2`."""

    case: LossCase
    y: Any

    def __getattr__(self, name):  # the loss case's fields
        return getattr(self.case, name)

    def __call__(self, model, x=X, y=None, **kwargs):
        y = self.y if y is None else y
        return self.case(model, x, y, alpha2=1e-2, **kwargs)


LOSSES = {name: Case(case, case.labels(_SCORE)) for name, case in READOUT_CASES.items()}


# Where a check compiles long, only `DEFAULT_RUN_CASE` (the Poisson loss) runs it by
# default and every other case with the slow tests: the logistic losses' curvature is
# diagonal like the Poisson loss's (the same code), or rank-one like the softmax loss's,
# whose solvers the default run checks in test_softmax.py and test_wide_readout.py (with
# weights, under jit and vmap). A new loss runs these with -m slow.
LONG_CHECK = pytest.mark.parametrize("case", cases(LOSSES, default=(DEFAULT_RUN_CASE,)))
# Integer weights: 0 drops a sample, 2 and 3 repeat it.
WEIGHTS = np.resize([1, 0, 2, 1, 3], N)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(LOSSES))
def test_loss_gradient_and_curvature_match_the_reference(case):
    """On random logits, the loss object's `loss` is the reference's per-sample loss, its
    gradient (`jax.grad`) the reference's, and the Hessian from its `curvature`,
    `diag(d_j) - u_j u_jᵀ`, both the reference's and `jax.hessian` of its own `loss`: a
    wrong `curvature` and a wrong reference are each caught."""
    n = 5
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    y = case.labels(jax.random.normal(keys[0], (n,), jnp.float64))
    labels = case.loss.labels(y, n).values
    k = labels.shape[1]
    logits = jax.random.normal(keys[1], (n, k), jnp.float64)
    value, gradient, hessian = case.reference(np.asarray(logits), case.targets(y))

    per_sample = jax.jit(case.loss.loss)
    np.testing.assert_allclose(per_sample(logits, labels), value, rtol=1e-12, atol=1e-14)
    summed_grad = jax.grad(lambda z: jnp.sum(case.loss.loss(z, labels)))(logits)
    np.testing.assert_allclose(summed_grad, gradient, rtol=1e-12, atol=1e-14)
    curvature = case.loss.curvature(logits, labels)
    dense = jax.vmap(jnp.diag)(curvature.diagonal)
    if curvature.rank_one is not None:
        dense = dense - jnp.einsum("ja,jb->jab", curvature.rank_one, curvature.rank_one)
    np.testing.assert_allclose(dense, hessian, rtol=1e-12, atol=1e-14)
    # Sample j's loss depends on its own logits only: the diagonal blocks of the Hessian.
    one_sample = jax.hessian(lambda z, t: case.loss.loss(z[None], t[None])[0])
    autodiff = jax.vmap(one_sample)(logits, labels)
    np.testing.assert_allclose(dense, autodiff, rtol=1e-12, atol=1e-14)


@LONG_CHECK
def test_envelope_gradient_float64(case):
    """The gradient is the derivative of the reduced loss: central differences agree to
    1e-6 and the Taylor remainder falls as O(h²) (docs/index.md, 'The envelope theorem')."""
    model = mlp()
    loss_fn = eqx.filter_jit(lambda m: case(m, alpha1=1e-3)[0])
    fd, ad = directional_derivative_check(loss_fn, model)
    assert abs(fd - ad) <= 1e-6 * abs(ad)
    remainders = taylor_remainders(loss_fn, model)
    np.testing.assert_allclose(remainders[:-1] / remainders[1:], 4.0, rtol=0.15)


@LONG_CHECK
def test_weights_are_repeated_and_dropped_samples(case):
    """Integer weights give the loss, readout and gradient of the data set with each
    sample repeated that many times (zero: dropped)."""
    model = mlp()
    repeat = np.repeat(np.arange(N), WEIGHTS)

    def weighted(m):
        return case(m, weights=jnp.asarray(WEIGHTS), gtol=1e-12)

    def repeated(m):
        return case(m, x=X[repeat], y=case.y[repeat], gtol=1e-12)

    # Compiled: run eagerly, the solver's loops compile one by one.
    value_and_grad = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(f, has_aux=True))  # noqa: E731
    (loss, readout), grad = value_and_grad(weighted)(model)
    (expected, expected_readout), expected_grad = value_and_grad(repeated)(model)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(readout.weight, expected_readout.weight, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(readout.bias, expected_readout.bias, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flatten(grad), flatten(expected_grad), rtol=1e-8, atol=1e-12)


@LONG_CHECK
def test_warm_start_and_non_convergence(case):
    model = mlp()
    _, cold = case(model)
    _, warm = case(model, init=cold)
    assert int(warm.stats.num_steps) < int(cold.stats.num_steps)
    _, readout = case(model, max_steps=1, throw=False)
    assert not bool(readout.stats.converged)
    assert int(readout.stats.num_steps) == 1
    with pytest.raises(Exception, match="did not converge"):
        case(model, max_steps=1)
    # Also when only the gradient is used.
    with pytest.raises(Exception, match="did not converge"):
        eqx.filter_grad(lambda m: case(m, max_steps=1)[0])(model)


@LONG_CHECK
def test_jit_and_vmap(case):
    model = mlp()
    loss = lambda x: case(model, x=x)[0]  # noqa: E731
    batched = jax.jit(jax.vmap(loss))(jnp.stack([X, -X]))
    np.testing.assert_allclose(batched[0], loss(X), rtol=1e-10)
    np.testing.assert_allclose(batched[1], loss(-X), rtol=1e-10)


@LONG_CHECK
def test_float32_loss_matches_float64_on_the_same_features(case):
    """A float32 model: the loss is within the solve's tolerance (`loss_tolerance`,
    $\\sqrt\\varepsilon|J| + 16\\varepsilon(1 + |J|)$) plus the rounding of the mean
    of the per-sample terms ($16\\varepsilon(1 + |J|)$ again) of the float64 loss on the
    same (float32) features."""
    model32 = cast(mlp(), jnp.float32)
    x32 = X.astype(jnp.float32)
    y32 = case.y.astype(jnp.float32) if jnp.issubdtype(case.y.dtype, jnp.floating) else case.y
    features = jax.vmap(model32)(x32)
    loss32, _ = case(model32, x=x32, y=y32)
    loss64, _ = case(lambda f: f, x=features.astype(jnp.float64))
    assert loss32.dtype == jnp.float32
    eps = float(jnp.finfo(jnp.float32).eps)
    value = abs(float(loss64))
    assert abs(float(loss32) - float(loss64)) <= eps**0.5 * value + 32 * eps * (1 + value)


@pytest.mark.slow
@LONG_CHECK
def test_solver_objects_equal_their_names(case):
    """Every solver name is sugar for its object (`READOUT_SOLVERS`): the same loss."""
    model = mlp()
    for name, solver in READOUT_SOLVERS.items():
        # The quasi-Newton solvers stall at gradients of 1e-9 to 1e-7 here (their line
        # search cannot resolve the last digits): a looser tolerance for them.
        gtol = 1e-6 if name in ("bfgs", "lbfgs") else 1e-11
        by_name, readout = case(model, solver=name, gtol=gtol)
        by_object, _ = case(model, solver=solver(gtol=gtol))
        np.testing.assert_allclose(by_object, by_name, rtol=1e-12)
        if name == "budgeted-newton-cg":
            # One update by default: a spent budget, which is no error.
            assert readout.stats.result in (vploss.RESULTS.successful, vploss.RESULTS.budget_spent)
            assert int(readout.stats.num_steps) <= 1
            continue
        assert bool(readout.stats.converged)
        # A Newton–CG direction takes at least one CG iteration and at most ten times
        # the cap (20 at this gtol) in the final polish; Cholesky directions take none.
        if name == "newton":
            assert int(readout.stats.cg_steps) == 0
        elif name == "newton-cg":
            steps, cg_steps = int(readout.stats.num_steps), int(readout.stats.cg_steps)
            assert 1 <= cg_steps <= 10 * 20 * steps
    with pytest.raises(ValueError, match="belong to the solver object"):
        case(model, solver=vploss.Newton(), gtol=1e-6)
    with pytest.raises(ValueError, match="gtol"):
        vploss.Newton(gtol=-1.0)


def _solver_names(function):
    """The names the `solver` argument of `function` accepts, from its signature."""
    hint = typing.get_type_hints(function)["solver"]
    literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal]
    return {name for literal in literals for name in typing.get_args(literal)}


def test_the_shared_lists_hold_every_loss_and_solver():
    """`LOSS_CASES` holds every public `vploss_*` loss with labels (the flow's has none;
    `vploss_glm` takes a loss object, each case's `loss`), and `READOUT_SOLVERS` and
    `RIDGE_SOLVERS` every solver name the losses accept. The DeepONet's loss has two
    feature maps and its own tests (`test_deeponet.py`)."""
    public = {name for name in dir(vploss) if name.startswith("vploss_")}
    assert public - {"vploss_cpflow", "vploss_glm", "vploss_deeponet"} == {
        case.function.__name__ for case in LOSS_CASES.values()
    }
    for case in READOUT_CASES.values():
        assert _solver_names(case.function) == set(READOUT_SOLVERS)
    assert _solver_names(vploss.vploss_msereg) == set(RIDGE_SOLVERS)


@pytest.mark.slow
@LONG_CHECK
def test_the_generic_loss_and_the_refit_take_the_loss_object(case):
    """`vploss_glm(loss, ...)` is the named function; `refit_readout` takes the loss
    object (or the function) and weighted batches, and fits the same readout."""
    model = mlp()
    weights = jnp.asarray(WEIGHTS, jnp.float64)
    loss, readout = case(model, weights=weights, gtol=1e-12)
    generic, _ = vploss.vploss_glm(
        case.loss, model, X, case.y, alpha2=1e-2, weights=weights, gtol=1e-12
    )
    np.testing.assert_allclose(generic, loss, rtol=1e-14)
    batches = [(X[i : i + 15], case.y[i : i + 15], weights[i : i + 15]) for i in range(0, N, 15)]
    for loss_argument in (case.loss, case.function):
        refit = vploss.refit_readout(
            model, batches, loss=loss_argument, alpha2=1e-2, gtol=1e-11, **case.kwargs
        )
        np.testing.assert_allclose(refit.weight, readout.weight, rtol=1e-8, atol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("case", cases(LOSSES))
def test_bad_weights(case):
    model = mlp()
    with pytest.raises(ValueError, match=r"`weights` of .* must have shape \(N,\)"):
        case(model, weights=jnp.ones(N - 1))
    with pytest.raises(TypeError, match="weights"):
        case(model, weights=jnp.ones(N, bool))
    for bad, match in [
        (-jnp.ones(N), "must be >= 0"),
        (jnp.zeros(N), "sum to zero"),
        (jnp.ones(N).at[3].set(jnp.nan), "not finite"),
    ]:
        with pytest.raises(Exception, match=match):
            case(model, weights=bad)
    # Checked when only the gradient is used, too.
    with pytest.raises(Exception, match="must be >= 0"):
        eqx.filter_grad(lambda m: case(m, weights=-jnp.ones(N))[0])(model)


class _WrongShapes(vploss.AbstractReadoutLoss):
    """A custom loss whose methods return the wrong shapes (per `wrong`)."""

    wrong: str = eqx.field(static=True)
    name = "a custom loss"

    def labels(self, y, num_samples):
        return vploss.Labels(jnp.reshape(y, (num_samples, -1)), False, jnp.array(False), "")

    def loss(self, logits, labels):
        per_output = 0.5 * (logits - labels) ** 2
        return per_output if self.wrong == "loss" else jnp.sum(per_output, axis=1)

    def curvature(self, logits, labels):
        diagonal = jnp.ones_like(logits)
        return vploss.Curvature(diagonal[:, 0] if self.wrong == "curvature" else diagonal, None)

    def basis(self, num_outputs):
        return np.ones((num_outputs, num_outputs)) if self.wrong == "basis" else None


@pytest.mark.parametrize("wrong", ["loss", "curvature", "basis"])
def test_a_custom_loss_with_wrong_shapes_gets_a_clear_error(wrong):
    y = jnp.stack([X[:, 0], X[:, 1]], axis=1)
    with pytest.raises(ValueError, match=rf"`_WrongShapes.{wrong}\("):
        vploss.vploss_glm(_WrongShapes(wrong), mlp(), X, y, alpha2=1e-2)


def test_solver_objects_check_their_minimiser():
    with pytest.raises(TypeError, match="AbstractQuasiNewton"):
        vploss.QuasiNewton(vploss.Newton())
    with pytest.raises(TypeError, match="AbstractMinimiser"):
        vploss.OptimistixMinimiser("bfgs")


@pytest.mark.slow
@pytest.mark.parametrize("function", [vploss.vploss_bce, vploss.vploss_msereg])
def test_weights_of_any_scale(function):
    """The loss does not depend on the weights' overall scale, and its gradient in them
    scales inversely, in float32 too: the derivative of w/Σw holds w/(Σw)², which
    overflowed at weights of 1e20 and underflowed at 1e-30."""
    model = cast(mlp(), jnp.float32)
    x, y = X.astype(jnp.float32), LOSSES["bce"].y.astype(jnp.float32)
    weights = jnp.asarray(np.resize([1.0, 0.5, 2.0], N), jnp.float32)
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda w: function(model, x, y, alpha2=1e-2, weights=w)[0])
    )
    loss, grad = value_and_grad(weights)
    for scale in (1e20, 1e-30):
        scaled_loss, scaled_grad = value_and_grad(scale * weights)
        np.testing.assert_allclose(scaled_loss, loss, rtol=1e-6)
        np.testing.assert_allclose(scale * scaled_grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_auto_chooses_newton_by_the_cost_of_a_hessian():
    """`"auto"` takes exact Newton where a Hessian costs few Hessian-vector products (one
    output, 300 features: about 50) and Newton–CG where it costs many (ten classes, 48
    features: the rank-one term of nine columns, about 320), and both converge."""
    features = jax.random.normal(jax.random.PRNGKey(0), (200, 300))
    logistic = (features[:, 0] > 0).astype(features.dtype)
    bce = jax.jit(lambda f, y: vploss.vploss_bce(lambda s: s, f, y, alpha2=1e-2)[1].stats)
    stats = bce(features, logistic)
    assert int(stats.cg_steps) == 0 and bool(stats.converged)

    classes = jnp.argmax(features[:, :10], axis=1)
    ce = jax.jit(
        lambda f, y: vploss.vploss_ce(lambda s: s, f, y, alpha2=1e-2, num_classes=10)[1].stats
    )
    stats = ce(features[:, :48], classes)
    assert int(stats.cg_steps) > 0 and bool(stats.converged)
