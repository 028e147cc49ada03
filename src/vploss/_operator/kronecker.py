r"""The Kronecker-structured ridge problem of a bilinear readout, solved exactly through
two small eigendecompositions.

With branch features $B$ `(n, p)`, trunk features $T$ `(m, q)`, targets $U$ `(n, m)` and
separable weights $w_f$ (over the functions, rows) and $w_p$ (over the points, columns),

$$J(D) = \frac{1}{2S_fS_p}\sum_{i,j} w_{f,i}\,w_{p,j}\,\bigl(\tilde b_i^\top D\,\tilde t_j
- U_{ij}\bigr)^2 + \frac{\alpha}{2}\|D\|_F^2,$$

where, with a bias, $\tilde b_i = [b_i - \mu_b;\ 1]$ and $\tilde t_j = [t_j - \mu_t;\ 1]$
are the features centred by their weighted means and a constant appended (without a
bias, the raw features). With the scaled rows $Z_b = \operatorname{diag}(\sqrt{w_f/S_f})
\tilde B$, $Z_t = \operatorname{diag}(\sqrt{w_p/S_p})\tilde T$ and $\tilde U =
\operatorname{diag}(\sqrt{w_f/S_f})\,U\operatorname{diag}(\sqrt{w_p/S_p})$ the normal
equations are $G_b D G_t + \alpha D = Z_b^\top\tilde U Z_t$ with the Gram matrices $G_b =
Z_b^\top Z_b = V_b\Lambda_bV_b^\top$, $G_t = Z_t^\top Z_t = V_t\Lambda_tV_t^\top$, so

$$D = V_b\bigl[(V_b^\top Z_b^\top\tilde U Z_t V_t)\oslash(\lambda_b\lambda_t^\top +
\alpha)\bigr]V_t^\top,$$

$O(p^3 + q^3)$ plus passes over the data, never the $pq\times pq$ system. Centring makes
each Gram matrix block-diagonal (the constant feature is orthogonal to the centred
ones), so a common offset of the features never enters a Gram matrix or an
eigendecomposition: this is the Kronecker analogue of the ridge loss's centred problem.
The penalty is isotropic in these coordinates, so the problem keeps its Kronecker
structure and the fit does not change when a constant is added to any feature.
"""

from typing import Any, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .._core.envelope import AbstractInnerSolver, implicit_solution_jvp, Objective, Tangent
from .._core.numerics import column_mean, matmul, unit_scaled


KroneckerArgs: TypeAlias = tuple[
    Float[Array, "n p"],
    Float[Array, "m q"],
    Float[Array, "n m"],
    Scalar,
    Float[Array, " n"] | None,
    Float[Array, " m"] | None,
]
KroneckerStats: TypeAlias = tuple[
    Float[Array, "P P"], Float[Array, " P"], Float[Array, "Q Q"], Float[Array, " Q"]
]


def scale_of(weights: Float[Array, " n"] | None, size: int, dtype: Any) -> Float[Array, " n"]:
    r"""$w_i/S$ (the weights normalised to sum to one), or $1/n$ without weights."""
    if weights is None:
        return jnp.full((size,), 1 / size, dtype)
    weights = unit_scaled(weights)
    return weights / jnp.sum(weights)


def centred_features(
    features: Float[Array, "n p"], weights: Float[Array, " n"] | None, bias: bool
) -> tuple[Float[Array, "n P"], Float[Array, " p"]]:
    r"""$\tilde F = [F - \mathbf 1\mu^\top,\ \mathbf 1]$ with the (weighted) column means
    $\mu$ (two-pass, so the centred columns sum to zero in working precision), and
    $\mu$; without a bias, $F$ itself and zero means."""
    if not bias:
        return features, jnp.zeros(features.shape[1], features.dtype)
    mean = column_mean(features, weights)
    ones = jnp.ones((features.shape[0], 1), features.dtype)
    return jnp.concatenate([features - mean, ones], axis=1), mean


class KroneckerObjective(eqx.Module):
    r"""$J(D; B, T, U, \alpha, w_f, w_p)$ of the module docstring, the centring done
    inside, so that its partial derivatives in $B$ and $T$ (the envelope gradient)
    include the means' dependence on the features."""

    bias: bool = eqx.field(static=True)

    def __call__(self, coef: Float[Array, "P Q"], args: KroneckerArgs) -> Scalar:
        branch, trunk, targets, alpha2, weights_f, weights_p = args
        zb, _ = centred_features(branch, weights_f, self.bias)
        zt, _ = centred_features(trunk, weights_p, self.bias)
        sf = scale_of(weights_f, branch.shape[0], branch.dtype)
        sp = scale_of(weights_p, trunk.shape[0], trunk.dtype)
        residual = matmul(matmul(zb, coef), zt.T) - targets
        data = 0.5 * matmul(sf, matmul(residual**2, sp))
        return data + 0.5 * alpha2 * jnp.sum(coef**2)


def _root(scale: Float[Array, " n"]) -> Float[Array, " n"]:
    positive = scale > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, scale, 1)), 0)


def scaled_problem(
    args: KroneckerArgs, bias: bool
) -> tuple[Float[Array, "n P"], Float[Array, "m Q"], Float[Array, "n m"]]:
    r"""$(Z_b, Z_t, \tilde U)$: the centred features and the targets with rows and columns
    scaled by $\sqrt{w/S}$."""
    branch, trunk, targets, _, weights_f, weights_p = args
    zb, _ = centred_features(branch, weights_f, bias)
    zt, _ = centred_features(trunk, weights_p, bias)
    rf = _root(scale_of(weights_f, branch.shape[0], branch.dtype))
    rp = _root(scale_of(weights_p, trunk.shape[0], trunk.dtype))
    return zb * rf[:, None], zt * rp[:, None], targets * rf[:, None] * rp[None, :]


def _eigh(gram: Float[Array, "P P"]) -> tuple[Float[Array, "P P"], Float[Array, " P"]]:
    values, vectors = jnp.linalg.eigh(gram)
    return vectors, jnp.maximum(values, 0)


def kronecker_solve(
    stats: KroneckerStats, alpha2: Scalar, rhs: Float[Array, "P Q"]
) -> Float[Array, "P Q"]:
    r"""$(G_b\otimes G_t + \alpha I)^{+}$ `rhs` through the eigendecompositions: a
    product $\lambda_{b,k}\lambda_{t,l}$ below $\varepsilon\max(P, Q)$ times the largest
    is treated as zero, so that with $\alpha = 0$ and rank-deficient features it is a
    pseudo-inverse (never a division by zero)."""
    vb, lb, vt, lt = stats
    product = lb[:, None] * lt[None, :]
    eps = jnp.finfo(product.dtype).eps * max(product.shape)
    product = jnp.where(product > eps * jnp.max(product), product, 0)
    denom = product + alpha2
    inverse = jnp.where(denom > 0, 1 / jnp.where(denom > 0, denom, 1), 0)
    inner = matmul(matmul(vb.T, rhs), vt) * inverse
    return matmul(matmul(vb, inner), vt.T)


class KroneckerRidgeSolver(AbstractInnerSolver):
    r"""The minimiser of `KroneckerObjective` in closed form: the eigendecompositions of
    the two Gram matrices $G_b$ `(P, P)` and $G_t$ `(Q, Q)`, and `refine_steps` steps of
    iterative refinement with the residual of the normal equations formed from the
    scaled data, $Z_b^\top(\tilde U - Z_bDZ_t^\top)Z_t - \alpha D$ (the difference is
    taken in data space, before the products, so the error is not that of the squared
    condition number alone). Its derivative is implicit (`solution_jvp`): the Hessian
    $G_b\otimes G_t + \alpha I$ is applied as the objective's exact Hessian-vector
    product inside a `jax.lax.custom_linear_solve` whose solve is the one above, so no
    eigendecomposition is ever differentiated, to any order."""

    refine_steps: int = eqx.field(static=True, default=2)
    bias: bool = eqx.field(static=True, default=True)

    def __call__(
        self, objective: Objective, args: KroneckerArgs, init: Any
    ) -> tuple[Float[Array, "P Q"], KroneckerStats]:
        del objective, init
        alpha2 = args[3]
        zb, zt, target = scaled_problem(args, self.bias)
        vb, lb = _eigh(matmul(zb.T, zb))
        vt, lt = _eigh(matmul(zt.T, zt))
        stats = (vb, lb, vt, lt)
        coef = kronecker_solve(stats, alpha2, matmul(matmul(zb.T, target), zt))

        def refine(_, coef):
            residual = target - matmul(matmul(zb, coef), zt.T)
            normal = matmul(matmul(zb.T, residual), zt) - alpha2 * coef
            return coef + kronecker_solve(stats, alpha2, normal)

        coef = jax.lax.fori_loop(0, self.refine_steps, refine, coef)
        return coef, jax.lax.stop_gradient(stats)

    def solution_jvp(
        self,
        objective: Objective,
        solution: Float[Array, "P Q"],
        stats: KroneckerStats,
        args: KroneckerArgs,
        t_args: Tangent,
    ) -> Float[Array, "P Q"]:
        alpha2 = args[3]

        def hessian_solve(rhs):
            def matvec(v):
                gradient = lambda c: jax.grad(objective)(c, args)  # noqa: E731
                return jax.jvp(gradient, (solution,), (v,))[1]

            def solve(_, b):
                x = kronecker_solve(stats, alpha2, b)
                # One refinement step against the exact Hessian.
                return x + kronecker_solve(stats, alpha2, b - matvec(x))

            return jax.lax.custom_linear_solve(matvec, rhs, solve, symmetric=True)

        return implicit_solution_jvp(hessian_solve, objective, solution, args, t_args)
