"""The antiderivative operator of the DeepONet example and benchmark: Gaussian random
field inputs, generated offline with NumPy, and their exact antiderivatives."""

import functools

import numpy as np


def antiderivative_data(num_functions, *, seed, length_scale=0.2, sensors=100, points=101):
    r"""`(u, y, s)`: `num_functions` input functions $u$ drawn from a zero-mean Gaussian
    random field on $[0, 1]$ with the covariance $\exp(-(x - x')^2/(2\ell^2))$, $\ell$ =
    `length_scale` (as Lu et al., 2021), sampled at `sensors` equispaced sensors,
    shape `(n, sensors)`; the query points $y$, `points` equispaced in $[0, 1]$, shape
    `(points, 1)`; and $s = G(u)(y) = \int_0^y u$, shape `(n, points)`, by the
    cumulative trapezoid rule on a fine grid of 2001 points (its error, about
    $10^{-7}$ of the values, is far below what the networks reach). The field is
    sampled through the eigendecomposition of its covariance on the fine grid (its
    Cholesky factor does not exist in floating point: the covariance of a smooth field
    is numerically singular)."""
    fine, factor = _field_factor(length_scale)
    rng = np.random.default_rng(seed)
    fields = rng.standard_normal((num_functions, factor.shape[1])) @ factor.T
    steps = 0.5 * (fields[:, 1:] + fields[:, :-1]) * np.diff(fine)
    integral = np.concatenate([np.zeros((num_functions, 1)), np.cumsum(steps, axis=1)], axis=1)
    sensor_index = np.round(np.linspace(0, len(fine) - 1, sensors)).astype(int)
    point_index = np.round(np.linspace(0, len(fine) - 1, points)).astype(int)
    return fields[:, sensor_index], fine[point_index, None], integral[:, point_index]


@functools.cache
def _field_factor(length_scale):
    fine = np.linspace(0.0, 1.0, 2001)
    covariance = np.exp(-0.5 * (fine[:, None] - fine[None, :]) ** 2 / length_scale**2)
    values, vectors = np.linalg.eigh(covariance)
    keep = values > 1e-10 * values[-1]
    return fine, vectors[:, keep] * np.sqrt(values[keep])
