from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, ArrayLike, Float, Scalar, Shaped

from ._checks import as_alpha, as_batch, as_flag, as_targets, check_finite, check_finite_inputs
from ._envelope import envelope_minimise
from ._features import augment, evaluate_features, parameter_penalty
from ._misc import matmul
from ._readout import readout_from_coefficients, VPLinear


RidgeArgs: TypeAlias = tuple[Float[Array, "N p"], Float[Array, "N k"], Scalar]

#: Default readout penalty of `vploss_msereg`; see its docstring for the reasoning.
DEFAULT_RIDGE_ALPHA2 = 1e-6


def ridge_objective(coef: Float[Array, "p k"], args: RidgeArgs) -> Scalar:
    r"""$J(\hat W; \hat F, Y, \alpha_2) = \frac{1}{2N}\|\hat F \hat W^\top - Y\|_F^2
    + \frac{\alpha_2}{2}\|\hat W\|_F^2$, with `coef` $= \hat W^\top$."""
    features, targets, alpha2 = args
    residual = matmul(features, coef) - targets
    return 0.5 * jnp.sum(residual**2) / features.shape[0] + 0.5 * alpha2 * jnp.sum(coef**2)


def _refined_cholesky_solve(
    gram: Float[Array, "n n"],
    alpha2: Scalar,
    rhs: Float[Array, "n k"],
    residual: Callable[[Array], Array],
    refine_steps: int,
) -> Float[Array, "n k"]:
    r"""Solves $(G + \alpha_2 I) X = B$ for a Gram matrix $G$ formed in working precision.

    In float32 the Gram matrix of ill-conditioned features may be numerically
    indefinite, and its solution loses twice the digits of a QR or SVD solve. So the
    Cholesky factor is taken of $G + \delta I$ with $\delta = \max(\alpha_2,
    \varepsilon\,\mathrm{tr}\,G)$ (always positive definite, so never a NaN), and used
    as a preconditioner for iterative refinement $X \leftarrow X + (G + \delta I)^{-1}
    R(X)$, where the caller computes the residual $R(X) = B - (G + \alpha_2 I) X$ from
    the tall features rather than from $G$. The fixed point solves the exact
    regularised problem; each step multiplies the error along an eigenvector of $G$
    with eigenvalue $\lambda$ by $(\delta - \alpha_2)/(\lambda + \delta)$. With
    $\alpha_2 = 0$ this filters the directions with $\lambda \lesssim
    \varepsilon\,\mathrm{tr}\,G$ out smoothly (a pseudo-inverse), and the iterates stay
    in the range of $G$, so they converge to the minimum-norm solution.
    """
    n = gram.shape[0]
    eps = jnp.finfo(gram.dtype).eps
    # `tiny` keeps the factor finite for all-zero features with alpha2 = 0 (then the
    # right-hand side is zero too, and so is the solution).
    shift = jnp.maximum(jnp.maximum(alpha2, eps * jnp.trace(gram)), jnp.finfo(gram.dtype).tiny)
    factor = jnp.linalg.cholesky(gram + shift * jnp.eye(n, dtype=gram.dtype))
    solve = lambda b: jsl.cho_solve((factor, True), b)  # noqa: E731
    solution = solve(rhs)
    for _ in range(refine_steps):
        solution = solution + solve(residual(solution))
    return solution


class CholeskyRidge(eqx.Module):
    """Primal normal equations: the `(p, p)` Gram matrix `F̂ᵀF̂/N` (one matmul, a sum
    over samples), a shifted Cholesky factor and `refine_steps` steps of iterative
    refinement. Cost `O(N p² + p³)`; memory `O(N p + p²)`."""

    refine_steps: int = 2

    def __call__(self, args: RidgeArgs, init: Any) -> tuple[Float[Array, "p k"], None]:
        del init
        features, targets, alpha2 = args
        n = features.shape[0]

        def residual(coef):
            return matmul(features.T, targets - matmul(features, coef)) / n - alpha2 * coef

        gram = matmul(features.T, features) / n
        rhs = matmul(features.T, targets) / n
        return _refined_cholesky_solve(gram, alpha2, rhs, residual, self.refine_steps), None


class DualRidge(eqx.Module):
    """Dual (kernel) form for `N < p`: `Ŵᵀ = F̂ᵀ C` with `(F̂F̂ᵀ/N + alpha2 I) C = Y/N`,
    solved like `CholeskyRidge` on the `(N, N)` kernel matrix. Cost `O(N² p + N³)`;
    memory `O(N p + N²)`."""

    refine_steps: int = 2

    def __call__(self, args: RidgeArgs, init: Any) -> tuple[Float[Array, "p k"], None]:
        del init
        features, targets, alpha2 = args
        n = features.shape[0]

        def residual(dual):
            return (targets - matmul(features, matmul(features.T, dual))) / n - alpha2 * dual

        kernel = matmul(features, features.T) / n
        dual = _refined_cholesky_solve(kernel, alpha2, targets / n, residual, self.refine_steps)
        return matmul(features.T, dual), None


class SVDRidge(eqx.Module):
    r"""The regularised SVD solution: with `F̂/√N = U S Vᵀ`,
    `Ŵᵀ = V diag(s/(s² + alpha2)) Uᵀ Y/√N`. With `alpha2 = 0`, singular values below
    `eps·max(N, p)·s_max` are dropped (the pseudo-inverse, as `numpy.linalg.lstsq`). The most
    robust choice, but LAPACK on a tall matrix is slow with multi-threaded OpenBLAS on
    a busy machine. Cost `O(N p²)`; memory `O(N p)`."""

    def __call__(self, args: RidgeArgs, init: Any) -> tuple[Float[Array, "p k"], None]:
        del init
        features, targets, alpha2 = args
        scale = jnp.sqrt(jnp.asarray(features.shape[0], features.dtype))
        u, s, vt = jnp.linalg.svd(features / scale, full_matrices=False)
        # Only an unregularised problem needs a cut-off: with alpha2 > 0 the filter
        # s/(s² + alpha2) is bounded, and cutting would discard real directions.
        eps = jnp.finfo(features.dtype).eps
        cutoff = jnp.where(alpha2 > 0, 0, eps * max(features.shape) * s[0])
        safe_s = jnp.where(s > cutoff, s, 1)
        filtered = jnp.where(s > cutoff, safe_s / (safe_s**2 + alpha2), 0)
        coef = matmul(vt.T, filtered[:, None] * matmul(u.T, targets / scale))
        return coef, None


RidgeSolverName: TypeAlias = Literal["auto", "svd", "cholesky", "dual"]
_RIDGE_SOLVERS = ("auto", "svd", "cholesky", "dual")


def _ridge_solver(
    name: str, num_samples: int, num_coefficients: int, unregularised: bool
) -> eqx.Module:
    if name == "auto":
        if unregularised:
            # Only the SVD tells the null space apart from rounding noise, which the
            # minimum-norm (pseudo-inverse) readout needs.
            name = "svd"
        elif num_samples < num_coefficients:
            name = "dual"
        else:
            name = "cholesky"
    if name == "cholesky":
        return CholeskyRidge()
    if name == "dual":
        return DualRidge()
    if name == "svd":
        return SVDRidge()
    raise ValueError(f"`solver` must be one of {_RIDGE_SOLVERS}; got {name!r}.")


def vploss_msereg(
    model: Callable[..., Any],
    x: Shaped[ArrayLike, "N ..."],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike = DEFAULT_RIDGE_ALPHA2,
    use_bias: bool = True,
    solver: RidgeSolverName | str = "auto",
) -> tuple[Float[Array, ""], VPLinear]:
    r"""Variable projection loss for least squares with a ridge-penalised affine readout.

    With features $F = $ `jax.vmap(model)(x)` of shape `(N, m)`, $\hat F = [F, 1]$ and
    targets $Y$ of shape `(N, k)`,

    $$L(\theta) = \min_{\hat W}\ \frac{1}{2N}\sum_{j=1}^N \|\hat W \hat f_j - y_j\|^2
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    where $\hat W = [W, b]$ (the bias is penalised with the weights) and $\theta$ are
    the model's inexact-array leaves. The minimiser is
    $\hat W^{*\top} = (\hat F^\top \hat F/N + \alpha_2 I)^{+}\hat F^\top Y/N$.

    The gradient is the envelope gradient $\nabla L = \partial_\theta J(\theta, \hat
    W^*)$ (a custom JVP rule, forward and reverse mode): it costs one vector-Jacobian
    product of the model and never differentiates the solver.

    **Solvers** (`solver=`):

    - `"cholesky"`: the `(m+1, m+1)` Gram matrix, a shifted Cholesky factor and two
        steps of iterative refinement with the residual of the tall problem. Its only
        reduction over samples is a matmul, so it shards along the batch. In float32
        its gradient is as accurate as an SVD or QR solve of the tall matrix (measured
        against float64), at the cost of one Gram matrix, and it avoids LAPACK on the
        tall matrix altogether.
    - `"dual"`: the same on the `(N, N)` kernel matrix $\hat F\hat F^\top/N$, for
        `N < m + 1` (overparameterised features). It couples all samples, so a batch
        sharded over devices is gathered: use `"cholesky"` there.
    - `"svd"`: the regularised SVD of the tall matrix $\hat F/\sqrt N$; with
        `alpha2 = 0`, singular values below a relative cut-off are dropped. It gathers
        a sharded batch too.
    - `"auto"` (default): `"svd"` when `alpha2` is (concretely) zero, else `"dual"`
        when `N < m + 1`, else `"cholesky"`.

    With `alpha2 = 0` and rank-deficient features every solver gives the least-squares
    value and finite gradients, never a NaN; `"svd"` (and so `"auto"`) and `"dual"`
    return the minimum-norm (pseudo-inverse) readout, while `"cholesky"` returns a
    least-squares readout whose component in the null space of $\hat F$ is set by
    rounding (the Gram matrix cannot tell that null space from noise).

    **Default `alpha2 = 1e-6`.** Small enough not to bias the fit of features of order
    one (it shrinks a direction of $\hat F^\top \hat F/N$ with eigenvalue $\lambda$ by
    $\lambda/(\lambda + \alpha_2)$), large enough to keep the inner problem strictly
    convex. With it the float32 gradient of an MLP's reduced loss is within about
    1e-3 of the float64 one (measured; see `benchmarks/`), well inside mini-batch
    noise. Raise it (1e-4) for more float32 accuracy or as a genuine regulariser.

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`, floating point.
    - `y`: the targets, shape `(N,)` or `(N, k)`.
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout, `>= 0`.
    - `use_bias`: whether the readout has a bias $b$ (a column of ones in $\hat F$).
    - `solver`: `"auto"`, `"cholesky"`, `"dual"` or `"svd"`, as above. A traced
        `alpha2` (a JAX array under `jit`) counts as non-zero for `"auto"`.

    **Returns:**

    `(loss, readout)`: the reduced loss (a scalar) and the fitted `VPLinear`, so that
    `readout(model(x[j]))` predicts `y[j]`. The readout carries no derivative: only the
    loss is differentiable.

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes or
    hyperparameters; a runtime error (`eqx.error_if`) when `x`, `y`, the features or the
    loss are not finite.
    """
    x = as_batch("x", x)
    num_samples = x.shape[0]
    targets, scalar_output = as_targets("y", y, num_samples)
    use_bias = as_flag("use_bias", use_bias)
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=False)
    features = evaluate_features(model, x)
    dtype = jnp.result_type(features.dtype, targets.dtype)
    features = augment(features.astype(dtype), use_bias)
    unregularised = not isinstance(alpha2, jax.core.Tracer) and float(alpha2) == 0
    inner_solver = _ridge_solver(solver, num_samples, features.shape[1], unregularised)
    value, coef, _ = envelope_minimise(
        ridge_objective,
        inner_solver,
        (features, targets.astype(dtype), alpha2.astype(dtype)),
    )
    value = check_finite_inputs(value, x=x, y=targets)
    value = check_finite(value, coef, "The ridge loss `vploss_msereg`")
    loss = value + parameter_penalty(model, alpha1.astype(dtype))
    return loss, readout_from_coefficients(coef, use_bias, scalar_output)
