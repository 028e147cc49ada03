"""`newton_direction`: the Newton direction by Cholesky and its two fallbacks."""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

from vploss._core.newton import newton_direction


def _direction(hessian, gradient):
    operator = lx.MatrixLinearOperator(jnp.asarray(hessian), lx.positive_semidefinite_tag)
    direction, is_newton = jax.jit(newton_direction)(operator, jnp.asarray(gradient))
    return np.asarray(direction), bool(is_newton)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_positive_definite_hessian_gives_the_newton_direction(dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    hessian = (a @ a.T + np.eye(5)).astype(dtype)
    gradient = rng.standard_normal(5).astype(dtype)
    direction, is_newton = _direction(hessian, gradient)
    assert is_newton
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(direction, np.linalg.solve(hessian, gradient), rtol=rtol)


def test_nearly_singular_hessian_takes_the_shifted_direction():
    # A pivot of -1e-7, below the shift n ε max|H_ii| = 2.4e-7: the plain factor is NaN,
    # the shifted one is (H + δI)⁻¹g.
    hessian = np.diag([1.0, -1e-7]).astype(np.float32)
    gradient = np.array([1.0, 1e-3], np.float32)
    direction, is_newton = _direction(hessian, gradient)
    assert not is_newton
    shift = 2 * np.finfo(np.float32).eps
    expected = gradient / (np.diag(hessian) + shift)
    np.testing.assert_allclose(direction, expected, rtol=1e-5)


def test_indefinite_hessian_takes_the_gradient_step():
    # No small shift makes it positive definite: the gradient step g / tr|H|.
    hessian = np.diag([1.0, -1.0])
    gradient = np.array([1.0, 2.0])
    direction, is_newton = _direction(hessian, gradient)
    assert not is_newton
    np.testing.assert_array_equal(direction, gradient / 2)
