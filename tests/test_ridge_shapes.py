"""The shape-adaptive ridge solver: `solver="auto"` takes the dual (kernel) form when
there are fewer samples than coefficients, the primal (Gram) form otherwise, and both
give the same loss, readout and gradient."""

import equinox as eqx
import jax
import numpy as np
import pytest

from vploss import CholeskyRidge, DualRidge, vploss_msereg
from vploss._ridge.loss import _ridge_solver

from .helpers import flatten, mlp


@pytest.mark.parametrize(
    "num_samples, num_coefficients, expected",
    [(6, 7, DualRidge), (7, 7, CholeskyRidge), (256, 4097, DualRidge), (4096, 257, CholeskyRidge)],
)
def test_auto_picks_the_form_by_shape(num_samples, num_coefficients, expected):
    solver = _ridge_solver("auto", num_samples, num_coefficients, alpha2=1e-3, intercept=True)
    assert isinstance(solver.method, expected)


@pytest.mark.parametrize(
    "num_samples", [pytest.param(n, marks=pytest.mark.slow) for n in (9, 40)]
)  # fewer, more samples than features
def test_dual_equals_primal(num_samples):
    model = mlp(3, features=16)
    x = jax.random.normal(jax.random.PRNGKey(0), (num_samples, 3))
    y = np.stack([np.sin(x[:, 0]), np.cos(x[:, 1])], axis=1)
    results = {}
    for solver in ("dual", "cholesky"):
        loss_fn = lambda m, s=solver: vploss_msereg(m, x, y, alpha2=1e-3, solver=s)
        (loss, readout), grad = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        results[solver] = (loss, readout.weight, readout.bias, flatten(grad))
    for dual, primal in zip(results["dual"], results["cholesky"], strict=True):
        np.testing.assert_allclose(dual, primal, rtol=1e-10, atol=1e-13)
