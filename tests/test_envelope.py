"""The shared core: `envelope_minimise` returns min_w J(w; a) with the envelope
derivative, for any objective and solver, without differentiating the solver."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vploss._core.envelope import (
    AbstractInnerSolver,
    autodiff_hessian_solve,
    envelope_minimise,
    implicit_solution_jvp,
)


def quartic_objective(w, args):
    """J(w; a, s) = Σ_i (w_i⁴/4 + s w_i²/2 − a_i w_i): strictly convex for s > 0."""
    a, s = args
    return jnp.sum(w**4 / 4 + s * w**2 / 2 - a * w)


class NewtonWhileLoop(AbstractInnerSolver):
    """Newton's method on ∇J = w³ + s w − a in a `lax.while_loop`, which reverse-mode
    autodiff cannot differentiate: the core must never try."""

    def __call__(self, objective, args, init):
        del objective
        a, s = args
        w0 = jnp.zeros_like(a) if init is None else init

        def body(carry):
            w, k = carry
            return w - (w**3 + s * w - a) / (3 * w**2 + s), k + 1

        def cond(carry):
            w, k = carry
            return (jnp.max(jnp.abs(w**3 + s * w - a)) > 1e-14) & (k < 100)

        w, steps = jax.lax.while_loop(cond, body, (w0, 0))
        return w, steps

    def solution_jvp(self, objective, solution, stats, args, t_args):
        solve = autodiff_hessian_solve(objective, solution, args)
        return implicit_solution_jvp(solve, objective, solution, args, t_args)


@jax.jit  # compiled once per transformation, not dispatched op by op
def reduced(a, s):
    return envelope_minimise(quartic_objective, NewtonWhileLoop(), (a, s))


def test_value_and_minimiser():
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    value, w, steps = reduced(a, s)
    np.testing.assert_allclose(w**3 + s * w - a, 0.0, atol=1e-12)
    np.testing.assert_allclose(value, quartic_objective(w, (a, s)), rtol=1e-14)
    assert 0 < int(steps) < 100


def test_reverse_mode_is_the_envelope_gradient():
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    ga, gs = jax.grad(lambda a, s: reduced(a, s)[0], argnums=(0, 1))(a, s)
    _, w, _ = reduced(a, s)
    # ∂J/∂a = −w*, ∂J/∂s = ½‖w*‖²; also against central differences.
    np.testing.assert_allclose(ga, -w, rtol=1e-12)
    np.testing.assert_allclose(gs, 0.5 * jnp.sum(w**2), rtol=1e-12)
    h = 1e-6
    e = jnp.array([0.3, -0.1, 0.8])
    fd = (reduced(a + h * e, s)[0] - reduced(a - h * e, s)[0]) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(ga, e), fd, rtol=1e-8)


def test_forward_mode_and_jit_and_vmap():
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    e = jnp.array([0.3, -0.1, 0.8])
    _, jvp = jax.jvp(lambda a: reduced(a, s)[0], (a,), (e,))
    _, w, _ = reduced(a, s)
    np.testing.assert_allclose(jvp, -jnp.vdot(w, e), rtol=1e-12)
    batch = jnp.stack([a, 2 * a, -a])
    grads = jax.jit(jax.vmap(jax.grad(lambda a: reduced(a, s)[0])))(batch)
    for i in range(3):
        np.testing.assert_allclose(grads[i], -reduced(batch[i], s)[1], rtol=1e-12)


# The traced-ness of `a` at each call of the objective, recorded by
# `recording_objective` (a module-level function: the objective is static).
CALLS = []


def recording_objective(w, args):
    a, _ = args
    CALLS.append(isinstance(a, jax.core.Tracer))
    return quartic_objective(w, args)


@pytest.mark.slow
def test_undifferentiated_arguments_get_no_tangent():
    """Only `s` is differentiated: `a` must not receive a materialised tangent (the
    backward pass of a large batch would carry N×m zeros). Run eagerly, `a` is a
    concrete array, so a call of the objective that sees it as a tracer is a JVP with a
    zero tangent for it. The derivative is ½‖w*‖²."""
    a = jnp.array([1.0, -2.0, 0.5])
    CALLS.clear()
    gs = jax.grad(lambda s: envelope_minimise(recording_objective, NewtonWhileLoop(), (a, s))[0])(
        jnp.asarray(0.7)
    )
    np.testing.assert_allclose(gs, 0.5 * jnp.sum(reduced(a, 0.7)[1] ** 2), rtol=1e-12)
    assert CALLS, "the derivative rule never called the objective"
    assert not any(CALLS), f"`a` was differentiated (traced) in calls {CALLS}"
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: reduced(a, s)[0]))(jnp.asarray(0.7))
    assert "while" in str(jaxpr)  # the solver runs once, forward only


def test_warm_start_is_used():
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    _, w, cold = envelope_minimise(quartic_objective, NewtonWhileLoop(), (a, s))
    _, w2, warm = envelope_minimise(quartic_objective, NewtonWhileLoop(), (a, s), w)
    np.testing.assert_allclose(w2, w, rtol=1e-12)
    assert int(warm) < int(cold)


def test_minimiser_carries_the_implicit_derivative():
    """dw*/d(a, s) by the implicit function theorem (the default dense Hessian solve),
    in both modes, against the closed form: (3w² + s) dw = da − w ds."""
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    _, w, _ = reduced(a, s)
    jac_a, jac_s = jax.jacrev(lambda a, s: reduced(a, s)[1], argnums=(0, 1))(a, s)
    np.testing.assert_allclose(jac_a, jnp.diag(1 / (3 * w**2 + s)), rtol=1e-12)
    np.testing.assert_allclose(jac_s, -w / (3 * w**2 + s), rtol=1e-12)
    fwd_a = jax.jacfwd(lambda a: reduced(a, s)[1])(a)
    np.testing.assert_allclose(fwd_a, jac_a, rtol=1e-12)


@pytest.mark.slow
def test_second_derivatives_are_exact():
    """d²L/ds² = d(½‖w*‖²)/ds = ⟨w*, dw*/ds⟩ needs the minimiser's derivative, which the
    rule provides by differentiating itself; checked against finite differences."""
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    _, w, _ = reduced(a, s)
    second = jax.hessian(lambda s: reduced(a, s)[0])(s)
    np.testing.assert_allclose(second, jnp.vdot(w, -w / (3 * w**2 + s)), rtol=1e-10)
    hessian_a = jax.hessian(lambda a: reduced(a, s)[0])(a)
    np.testing.assert_allclose(hessian_a, -jnp.diag(1 / (3 * w**2 + s)), rtol=1e-10)


def test_gradient_alone_does_not_solve_with_the_hessian():
    """The minimiser's tangent is dead code when only the value is differentiated: the
    dense Hessian (a Cholesky factorisation) is not in the compiled gradient."""
    a = jnp.array([1.0, -2.0, 0.5])
    s = jnp.asarray(0.7)
    value_only = jax.jit(jax.grad(lambda a: reduced(a, s)[0])).lower(a).compile().as_text()
    with_minimiser = (
        jax.jit(jax.grad(lambda a: jnp.sum(reduced(a, s)[1]))).lower(a).compile().as_text()
    )
    assert "potrf" in with_minimiser.lower() or "cholesky" in with_minimiser.lower()
    assert "potrf" not in value_only.lower() and "cholesky" not in value_only.lower()


class _NegativeData(eqx.Module):
    """A `check`: a runtime error when some `a_i` is negative (the data flag, reduced
    to a scalar before the solve) or the minimiser is not finite."""

    negative: jax.Array

    def __call__(self, value, solution, stats):
        del stats
        out = eqx.error_if((value, solution), self.negative, "negative data")
        return eqx.error_if(out, ~jnp.all(jnp.isfinite(solution)), "minimiser not finite")


def checked(a, s):
    check = _NegativeData(jnp.any(a < 0))
    return envelope_minimise(quartic_objective, NewtonWhileLoop(), (a, s), check=check)


_DERIVATIVES_ALONE = {
    "grad": lambda f: jax.grad(lambda a: f(a)[0]),
    "value_and_grad": lambda f: jax.value_and_grad(lambda a: f(a)[0]),
    "jvp-tangent-alone": lambda f: lambda a: jax.jvp(lambda a: f(a)[0], (a,), (a,))[1],
    "minimiser-jacobian": lambda f: jax.jacfwd(lambda a: f(a)[1]),
    "vmap-grad": lambda f: jax.vmap(jax.grad(lambda a: f(a)[0])),
}


@pytest.mark.parametrize("name", _DERIVATIVES_ALONE)
def test_check_fires_when_only_a_derivative_is_used(name):
    """`check` runs on the minimiser the derivative rule reads, so it is live in a
    compiled step that outputs a derivative and nothing else (an `eqx.error_if` on
    the returned value is dead code there), and it changes no result."""
    s = jnp.asarray(0.7)
    transform = _DERIVATIVES_ALONE[name]
    good = jnp.array([[3.0, 0.0, 2.5], [3.0, 4.0, 2.5]])
    bad = good.at[1, 0].set(-1.0)
    if name != "vmap-grad":
        good, bad = good[0], bad[1]
    fn = eqx.filter_jit(transform(lambda a: checked(a, s)))
    expected = transform(lambda a: reduced(a, s))(good)
    for leaf, ref in zip(jax.tree.leaves(fn(good)), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(leaf, ref)
    with pytest.raises(eqx.EquinoxRuntimeError, match="negative data"):
        jax.block_until_ready(fn(bad))


def test_unchecked_value_is_dead_code_under_grad():
    """What `check` is for: the same `eqx.error_if` on the returned value does not fire
    when only the gradient is output (if this ever fails, JAX keeps such checks)."""
    s = jnp.asarray(0.7)

    def value_checked(a):
        value, _, _ = reduced(a, s)
        return eqx.error_if(value, jnp.any(a < 0), "negative data")

    bad = jnp.array([-1.0, 2.0, 0.5])
    gradient = eqx.filter_jit(jax.grad(value_checked))(bad)
    assert np.all(np.isfinite(np.asarray(gradient)))
