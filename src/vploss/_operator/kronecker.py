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


def _padded_svd(
    rows: Float[Array, "n P"],
) -> tuple[Float[Array, "n P"], Float[Array, " P"], Float[Array, "P P"]]:
    r"""The thin SVD $Z = U\operatorname{diag}(s)V^\top$ with a square $V$ `(P, P)`
    (zero rows are appended when $n < P$, so that $V$ spans the null space too); $U$
    is cut back to the $n$ rows of $Z$."""
    n, width = rows.shape
    padded = jnp.concatenate([rows, jnp.zeros((max(width - n, 0), width), rows.dtype)])
    left, singular, right = jnp.linalg.svd(padded, full_matrices=False)
    return left[:n], singular, right.T


def _inverse(product: Float[Array, "P Q"], alpha2: Scalar, cut: float) -> Float[Array, "P Q"]:
    r"""$1/(\pi + \alpha)$ for the products $\pi$ of eigenvalues; with $\alpha = 0$,
    zero where $\pi \le$ `cut` times the largest (a pseudo-inverse: no division by
    zero, no amplified rounding)."""
    keep = (product > cut * jnp.max(product)) | (alpha2 > 0)
    denom = product + alpha2
    return jnp.where(keep, 1 / jnp.where(keep, denom, 1), 0)


def kronecker_solve(
    stats: KroneckerStats, alpha2: Scalar, rhs: Float[Array, "P Q"]
) -> Float[Array, "P Q"]:
    r"""$(G_b\otimes G_t + \alpha I)^{+}$ `rhs` through the eigendecompositions $G =
    V\Lambda V^\top$ in `stats` (with $\alpha = 0$, products of eigenvalues below
    $(\varepsilon\max(P, Q))^2$ times the largest are dropped)."""
    vb, lb, vt, lt = stats
    product = lb[:, None] * lt[None, :]
    cut = float(jnp.finfo(product.dtype).eps * max(product.shape)) ** 2
    inner = matmul(matmul(vb.T, rhs), vt) * _inverse(product, alpha2, cut)
    return matmul(matmul(vb, inner), vt.T)


class KroneckerRidgeSolver(AbstractInnerSolver):
    r"""The minimiser of `KroneckerObjective` in closed form, by the regularised SVD of
    the two scaled feature matrices, $Z_b = U_bS_bV_b^\top$ and $Z_t = U_tS_tV_t^\top$
    (so $G_b = V_bS_b^2V_b^\top$, $G_t = V_tS_t^2V_t^\top$):

    $$D = V_b\bigl[(U_b^\top\tilde UU_t)\odot\frac{s_bs_t^\top}{(s_bs_t^\top)^2 +
    \alpha}\bigr]V_t^\top,$$

    the Kronecker analogue of the ridge loss's regularised SVD: the data are projected
    on the singular vectors, never squared into a Gram matrix, so the error follows
    the condition number of the features, not its square (an eigendecomposition of the
    float32 Gram matrices lost every direction below $\varepsilon\lambda_{\max}$ and
    gave a loss 50 times too large on a DeepONet at initialisation). Then
    `refine_steps` steps of iterative refinement with the residual $\tilde U -
    Z_bDZ_t^\top$ formed in data space and projected the same way. With $\alpha = 0$,
    products $s_{b,k}s_{t,l}$ below $\varepsilon\max(n, m, P, Q)$ times the largest
    are dropped (the minimum-norm least-squares readout).

    Its derivative is implicit (`solution_jvp`): the Hessian $G_b\otimes G_t + \alpha I$
    is applied as the objective's exact Hessian-vector product inside a
    `jax.lax.custom_linear_solve` whose solve uses the same decompositions, so no
    decomposition is ever differentiated, to any order."""

    refine_steps: int = eqx.field(static=True, default=1)
    bias: bool = eqx.field(static=True, default=True)

    def __call__(
        self, objective: Objective, args: KroneckerArgs, init: Any
    ) -> tuple[Float[Array, "P Q"], KroneckerStats]:
        del objective, init
        alpha2 = args[3]
        zb, zt, target = scaled_problem(args, self.bias)
        ub, sb, vb = _padded_svd(zb)
        ut, st, vt = _padded_svd(zt)
        product = sb[:, None] * st[None, :]
        size = max(*zb.shape, *zt.shape)
        inverse = _inverse(product**2, alpha2, float(jnp.finfo(zb.dtype).eps * size) ** 2)

        def project(residual):
            return matmul(matmul(ub.T, residual), ut)

        def back(inner):
            return matmul(matmul(vb, inner), vt.T)

        coef = back(product * project(target) * inverse)

        def refine(_, coef):
            residual = target - matmul(matmul(zb, coef), zt.T)
            inner = matmul(matmul(vb.T, coef), vt)
            return coef + back((product * project(residual) - alpha2 * inner) * inverse)

        coef = jax.lax.fori_loop(0, self.refine_steps, refine, coef)
        return coef, jax.lax.stop_gradient((vb, sb**2, vt, st**2))

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
