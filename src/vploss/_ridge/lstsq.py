r"""Ridge least squares with a penalised intercept, solved accurately for features with
large offsets and scales, and differentiated without differentiating a decomposition.

**The centred problem** (`intercept.py`): the penalised intercept is eliminated and the
features centred, which leaves the isotropic ridge problem $\min_W \frac12\|ZW - T\|^2 +
\frac\alpha2\|W\|^2$ with the same minimum and without the features' common offset;
every method here solves that problem.

**Derivatives.** `ridge_lstsq` has a custom JVP rule built from the same solves
(implicit differentiation of the normal equations), and those solves are
`jax.lax.custom_linear_solve`s, differentiated through their matrix-vector products
and transposed as the same symmetric solve, so a Cholesky factor, an SVD or an
eigendecomposition is never differentiated, to any order: second derivatives are exact
and finite at repeated singular values (whose decomposition derivatives divide by
$s_i^2 - s_j^2$).
"""

import abc
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.tree_util as jtu
from jaxtyping import Array, Float, Scalar

from .._core.numerics import matmul, row_mean, unit_scaled
from .intercept import centre, eliminated_row, with_intercept


# An array or a `Stack`: anything with `+`.
T = TypeVar("T", bound=Any)


class Stack(eqx.Module):
    r"""A matrix with one extra row, $\begin{bmatrix}R\\ e^\top\end{bmatrix}$, kept as two
    arrays so that the `(N, ·)` block keeps its sharding along the samples."""

    rows: Float[Array, "N c"]
    extra: Float[Array, " c"]

    def __add__(self, other: "Stack") -> "Stack":
        return jtu.tree_map(jnp.add, self, other)

    def __sub__(self, other: "Stack") -> "Stack":
        return jtu.tree_map(jnp.subtract, self, other)

    def scale(self, factor: Scalar) -> "Stack":
        return jtu.tree_map(lambda a: factor * a, self)

    def mv(self, x: Float[Array, "c k"]) -> "Stack":
        r"""$Zx$, a stack with `k` columns."""
        return Stack(matmul(self.rows, x), matmul(self.extra, x))

    def rmv(self, a: "Stack") -> Float[Array, "c k"]:
        r"""$Z^\top a$ for a stack `a` with `k` columns."""
        return matmul(self.rows.T, a.rows) + self.extra[:, None] * a.extra[None, :]

    def dense(self) -> Float[Array, "R c"]:
        return jnp.concatenate([self.rows, self.extra[None, :]])


def sample_scale(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""$\sqrt{w_j/S}$ with $S = \sum_j w_j$: the factor of sample $j$'s row in the
    weighted problem, so that the sum of its squared rows is the weighted mean. A zero
    weight gives a zero row, and a zero (not infinite) derivative of its factor: at the
    boundary $w_j = 0$ of the weights' domain, the readout's derivative in $w_j$ treats
    the sample as absent (the loss's envelope derivative, from the objective, is
    exact)."""
    weights = unit_scaled(weights)
    ratio = weights / jnp.sum(weights)
    positive = ratio > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, ratio, 1)), 0)


def centred_problem(
    features: Float[Array, "N p"],
    targets: Float[Array, "N k"],
    alpha2: Scalar,
    intercept: bool,
    eliminate: bool,
    weights: Float[Array, " N"] | None = None,
) -> tuple[Stack, Stack, Callable[[Float[Array, "c k"]], Float[Array, "p k"]]]:
    r"""`(Z, T, coefficients)`: a ridge problem $\min_x \frac12\|Zx - T\|^2 +
    \frac\alpha2\|x\|^2$ with the minimiser of the ridge readout of $\hat F = [F,
    \mathbf 1]$ (the last column is the intercept's when `intercept`), and the map from
    its solution $x$ to the stacked coefficients $[W; b^\top]$.

    - `eliminate`: the centred problem (`intercept.py`), $x = W$ (for the
        normal equations, whose Gram matrix must not hold the offset).
    - otherwise the rows $[F_c/\sqrt N, 0]$ and $[\mu^\top, 1]$ with targets
        $Y_c/\sqrt N$ and $\bar y^\top$, $x = [W; b^\top]$: the same objective for
        every readout (by the split of the data term, `intercept.py`), so also the same
        minimum-norm least-squares readout with $\alpha = 0$, which eliminating the
        intercept does not preserve (it minimises $\|W\|$ alone).

    Without an intercept, $Z = \hat F/\sqrt N$ with a zero extra row.

    With `weights` $w_j \ge 0$ (total $S$), the data term is the weighted mean
    $\frac1{2S}\sum_j w_j\|\hat W\hat f_j - y_j\|^2$ and the same holds with the
    weighted means $\mu = \sum_j w_j f_j/S$, $\bar y$ and each row's $1/\sqrt N$
    replaced by $\sqrt{w_j/S}$ (`sample_scale`; a zero weight is a zero row)."""
    if weights is None:
        root_n = jnp.sqrt(jnp.asarray(features.shape[0], features.dtype))
        rows = lambda a: a / root_n  # noqa: E731
    else:
        scale = sample_scale(weights)[:, None]
        rows = lambda a: a * scale  # noqa: E731
    data = centre(features[:, :-1] if intercept else features, targets, weights, intercept)
    response_rows = rows(data.targets)
    if not intercept:
        # The means are zero: the extra rows are too.
        return (
            Stack(rows(data.features), data.mean),
            Stack(response_rows, data.target_mean),
            lambda x: x,
        )
    if not eliminate:
        zeros = jnp.zeros_like(data.features[:, :1])
        design = Stack(
            rows(jnp.concatenate([data.features, zeros], axis=1)),
            jnp.concatenate([data.mean, jnp.ones_like(data.mean[:1])]),
        )
        return design, Stack(response_rows, data.target_mean), lambda x: x
    row, target_row = eliminated_row(data.mean, data.target_mean, alpha2)
    features = features[:, :-1]
    return (
        Stack(rows(data.features), row),
        Stack(response_rows, target_row),
        lambda w: with_intercept(w, row_mean(targets - matmul(features, w), weights), alpha2),
    )


def offset_reflection(
    row: Float[Array, " m"],
) -> tuple[Callable[[Float[Array, "m ..."]], Float[Array, "m ..."]], Float[Array, " m"]]:
    r"""The Householder reflection $Q = I - 2vv^\top/v^\top v$ (symmetric, orthogonal)
    that maps `row` $e$ onto the first axis, $Qe = -s\|e\|e_1$ with $s$ the sign of
    $e_1$, as a function applying $Q$ along the first axis of an array, and $Qe$ (set
    exactly). $e = 0$ gives a reflection too. Used inside solves that are never
    differentiated (their derivatives are implicit)."""
    sign = jnp.where(row[0] >= 0, 1, -1).astype(row.dtype)
    squares = jnp.sum(row**2)
    positive = squares > 0
    norm = jnp.sqrt(jnp.where(positive, squares, 0))
    axis = jnp.zeros_like(row).at[0].set(1)
    direction = jnp.where(positive, row + sign * norm * axis, axis)
    # vᵀv = 2‖e‖(‖e‖ + |e₁|), formed without cancellation.
    length = jnp.where(positive, 2 * norm * (norm + jnp.abs(row[0])), 1)

    def reflect(a):
        return a - jnp.outer(direction, matmul(direction, a) * (2 / length)).reshape(a.shape)

    return reflect, -sign * norm * axis


class AbstractRidgeSolver(eqx.Module):
    r"""A way to compute the readout of `vploss_msereg`, `vpresidual_msereg` and
    `vpjacobian_msereg`, passed as their `solver=`: `CholeskyRidge`, `SVDRidge`,
    `DualRidge`, or `AutoRidge`, which picks one of them from the problem's shape."""

    @abc.abstractmethod
    def select(
        self, num_samples: int, num_coefficients: int, unregularised: bool
    ) -> "AbstractLstsqMethod":
        r"""The method that solves a problem with `num_samples` rows and
        `num_coefficients` unknowns per output (the bias included); `unregularised`:
        `alpha2` is concretely zero."""


class AbstractLstsqMethod(AbstractRidgeSolver):
    r"""A way to solve $\min_W \frac12\|ZW - T\|^2 + \frac\alpha2\|W\|^2$, i.e. the
    normal equations $(Z^\top Z + \alpha I)W = Z^\top T$ (with $\alpha = 0$ a
    least-squares solution)."""

    def select(
        self, num_samples: int, num_coefficients: int, unregularised: bool
    ) -> "AbstractLstsqMethod":
        del num_samples, num_coefficients, unregularised
        return self

    @abc.abstractmethod
    def lstsq(self, design: Stack, response: Stack, alpha2: Scalar) -> Float[Array, "m k"]:
        """The minimiser $W$, computed (differentiate `ridge_lstsq`, not this)."""


class AbstractNormalEquationsMethod(AbstractLstsqMethod):
    r"""A method whose minimiser `ridge_lstsq` differentiates implicitly, through the
    normal equations $(Z^\top Z + \alpha I)W = Z^\top T$ (`_ridge_lstsq`), so it also
    solves them for other right-hand sides (`solve`). (`DualRidge` differentiates its
    dual formula instead.)"""

    @abc.abstractmethod
    def solve(self, design: Stack, alpha2: Scalar, rhs: Float[Array, "m k"]) -> Float[Array, "m k"]:
        r"""$(Z^\top Z + \alpha I)^{-1}$ `rhs`, for the derivative of the minimiser: the
        solve of a `jax.lax.custom_linear_solve` (`_normal_solve`), so it is never
        differentiated itself."""


def _check_refine_steps(refine_steps: object) -> None:
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"`refine_steps` must be a Python int >= 0; got {refine_steps!r}.")


def ridge_lstsq(
    method: AbstractLstsqMethod, design: Stack, response: Stack, alpha2: Scalar
) -> Float[Array, "m k"]:
    r"""The minimiser $W$ of $\frac12\|ZW - T\|^2 + \frac\alpha2\|W\|^2$ by `method`,
    with its derivative: implicit differentiation of the normal equations, solved by the
    method's `solve`; for `DualRidge`, the derivative of the dual formula $W = Z^\top C$.
    No decomposition is differentiated."""
    if isinstance(method, DualRidge):
        return _dual_lstsq(method, design, response, alpha2)
    return _ridge_lstsq(method, design, response, alpha2)


def _diagonal_scale(matrix: Float[Array, "n n"]) -> Float[Array, " n"]:
    diagonal = jnp.diagonal(matrix)
    return jnp.sqrt(jnp.where(diagonal > 0, diagonal, 1))


def _shifted_cholesky(
    matrix: Float[Array, "n n"], alpha2: Scalar, extra: Float[Array, " n"] | None = None
) -> Callable[[Float[Array, "n k"]], Float[Array, "n k"]]:
    r"""An approximate inverse of $A + \alpha I + ee^\top$ for a positive semidefinite
    $A$ formed in working precision and an optional extra row $e$ (the eliminated
    intercept's; `None`: none): the Cholesky factor of $D^{-1/2}(A + \alpha I)D^{-1/2}
    + \delta I$ with $D = \operatorname{diag}(A)$ and $\delta = \varepsilon n$ (or
    $\sqrt\varepsilon$ where that factor breaks down).

    The diagonal scaling makes the shift relative to each column's own scale (a column
    of scale $10^{-3}$ beside one of $10^3$ is not swamped), and the shift keeps the
    factor finite when $A$ is numerically indefinite or singular. Iterative refinement
    with an exact residual then removes the shift: it multiplies the error along an
    eigenvector of the scaled matrix with eigenvalue $\lambda$ by
    $\delta/(\lambda + \delta)$.

    The row $e$ is not added to $A$ before the scaling: $\gamma\mu$ of features with a
    large offset $\mu$ would set every diagonal entry, and the data's own directions
    (relative size $\|F_c\|^2/\gamma^2\|\mu\|^2$) would fall below the shift. Instead
    the scaled row $D^{-1/2}e$ is reflected onto the first axis (`offset_reflection`),
    where it adds to one diagonal entry, and a second diagonal scaling absorbs it."""
    n = matrix.shape[0]
    eps = jnp.finfo(matrix.dtype).eps
    scale = _diagonal_scale(matrix)
    scaled = matrix / (scale[:, None] * scale[None, :]) + jnp.diag(alpha2 / scale**2)
    reflect = lambda a: a  # noqa: E731
    if extra is not None:
        reflect, reflected = offset_reflection(extra / scale)
        scaled = reflect(reflect(scaled).T) + jnp.outer(reflected, reflected)
    inner = _diagonal_scale(scaled)
    scaled = scaled / (inner[:, None] * inner[None, :])
    factor = jnp.linalg.cholesky(scaled + eps * n * jnp.eye(n, dtype=matrix.dtype))
    # A rank-deficient matrix (fewer samples than features) can still break down in
    # float32 at that shift: then the factor of a shift of sqrt(eps), which the
    # refinement removes more slowly.
    fallback = jnp.linalg.cholesky(scaled + jnp.sqrt(eps) * jnp.eye(n, dtype=matrix.dtype))
    factor = jnp.where(jnp.all(jnp.isfinite(factor)), factor, fallback)

    def solve(b):
        reflected_b = reflect(b / scale[:, None]) / inner[:, None]
        return reflect(jsl.cho_solve((factor, True), reflected_b) / inner[:, None]) / scale[:, None]

    return solve


def _refine(solve: Callable[[T], T], residual: Callable[[T], T], x: T, steps: int) -> T:
    r"""`steps` steps of iterative refinement $x \leftarrow x + M^{-1}r(x)$, as a loop:
    XLA compiles its step once, not once per step (compile time)."""
    return jax.lax.fori_loop(0, steps, lambda _, x: x + solve(residual(x)), x)


def gram_residual(
    gram: Float[Array, "m m"],
    cross: Float[Array, "m k"],
    alpha2: Scalar,
    row: tuple[Float[Array, " m"], Float[Array, " k"]] | None,
    weight: Float[Array, "m k"],
) -> Float[Array, "m k"]:
    r"""$B - (G + \alpha I)W$, or with the eliminated intercept's `row` $= (e, t) =
    (\gamma\mu, \gamma\bar y)$ (`eliminated_row`) $B + et^\top - (G + ee^\top + \alpha
    I)W$: the residual of the normal equations given by the Gram matrix $G$ and the
    cross products $B$ alone, the negative gradient of the objective in $W$."""
    out = cross - matmul(gram, weight) - alpha2 * weight
    if row is None:
        return out
    extra, target_row = row
    return out + jnp.outer(extra, target_row - matmul(extra, weight))


def gram_lstsq(
    gram: Float[Array, "m m"],
    cross: Float[Array, "m k"],
    alpha2: Scalar,
    refine_steps: int,
    row: tuple[Float[Array, " m"], Float[Array, " k"]] | None = None,
) -> Float[Array, "m k"]:
    r"""The ridge weights $W$ from the Gram matrix alone (when the tall matrix is gone,
    as in a streamed fit): $(G + \alpha I)^{-1}B$, or with the eliminated intercept's
    `row` $(e, t)$ the centred problem's $(G + ee^\top + \alpha I)^{-1}(B + et^\top)$,
    with $e$ kept out of the factor's scaling (`_shifted_cholesky`). The refinement's
    residual (`gram_residual`) comes from $G$, so it removes the factor's shift, not
    the rounding of $G$ (centre the features before forming it)."""
    solve = _shifted_cholesky(gram, alpha2, None if row is None else row[0])
    residual = lambda x: gram_residual(gram, cross, alpha2, row, x)  # noqa: E731
    # From zero, the first step is the factor's solve of the right-hand side.
    return _refine(solve, residual, jnp.zeros_like(cross), refine_steps + 1)


class CholeskyRidge(AbstractNormalEquationsMethod):
    r"""The ridge readout from the normal equations of the centred problem, refined to
    the accuracy of a QR solve. The default of `solver="auto"` when there are at least
    as many samples as coefficients and `alpha2 > 0`.

    Every ridge solver works on the exactly equivalent centred problem $\min_W
    \frac12\|ZW - T\|^2 + \frac{\alpha_2}2\|W\|^2$ (see `vploss_msereg`: the penalised
    intercept eliminated, the features centred). This one forms the `(m, m)` Gram
    matrix $Z^\top Z$, factors $D^{-1/2}(Z^\top Z + \alpha_2 I)D^{-1/2} + \delta I$
    ($D$ its diagonal, $\delta = \varepsilon m$; the eliminated intercept's row, which
    holds $\sqrt{\alpha_2}$ times the features' offset, is kept out of $D$ and
    reflected onto one axis first, `_shifted_cholesky`) by Cholesky, and takes `refine_steps`
    steps of iterative refinement $W \leftarrow W + M^{-1}(Z^\top(T - ZW) -
    \alpha_2 W)$ with the residual computed from the tall matrix $Z$: its rounding lies
    in the range of $Z^\top$, so the error is that of a QR solve ($\kappa(Z)
    \varepsilon$), not of the normal equations ($\kappa(Z)^2\varepsilon$).

    **When to use it:** tall problems ($N \ge m + 1$), and batches sharded over devices:
    its only reductions over the samples are sums (the means and one matmul), so the
    batch stays sharded. With `alpha2 = 0` and rank-deficient features it returns a
    least-squares readout whose component in the null space is set by rounding (use
    `SVDRidge` for the minimum-norm one).

    **Cost:** $O(Nm^2 + m^3)$, one small Cholesky factor; no LAPACK call on the tall
    matrix.

    **Arguments:**

    - `refine_steps`: the steps of iterative refinement (default 3; each costs two
        matmuls with the tall matrix).
    """

    refine_steps: int = eqx.field(default=3, static=True)

    def __check_init__(self):
        _check_refine_steps(self.refine_steps)

    def lstsq(self, design, response, alpha2):
        solve = _shifted_cholesky(matmul(design.rows.T, design.rows), alpha2, design.extra)
        residual = lambda w: design.rmv(response - design.mv(w)) - alpha2 * w  # noqa: E731
        return _refine(solve, residual, solve(design.rmv(response)), self.refine_steps)

    def solve(self, design: Stack, alpha2: Scalar, rhs: Float[Array, "m k"]) -> Float[Array, "m k"]:
        r"""$(Z^\top Z + \alpha I)^{-1}$ `rhs`, refined with the residual from the tall
        matrix."""
        solve = _shifted_cholesky(matmul(design.rows.T, design.rows), alpha2, design.extra)
        residual = lambda x: rhs - design.rmv(design.mv(x)) - alpha2 * x  # noqa: E731
        return _refine(solve, residual, solve(rhs), self.refine_steps)


def svd_filter(matrix: Float[Array, "R m"], alpha2: Scalar):
    r"""The thin SVD $Z = USV^\top$ of a dense design and the filter factors:
    $1/(s^2 + \alpha)$ on every direction when $\alpha > 0$ (the filter is bounded,
    cutting would discard real directions), and on the singular values above
    $\varepsilon\max(N, m)s_{\max}$ with $\alpha = 0$, zero below (the pseudo-inverse,
    as `numpy.linalg.lstsq`)."""
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    eps = jnp.finfo(matrix.dtype).eps
    cutoff = jnp.where(alpha2 > 0, 0, eps * max(matrix.shape) * s[0])
    kept = s > cutoff
    inverse = jnp.where(kept, 1 / jnp.where(kept, s**2 + alpha2, 1), 0)
    return u, s, vt, inverse


class SVDRidge(AbstractNormalEquationsMethod):
    r"""The ridge readout from the thin SVD $Z = USV^\top$ of the centred problem (see
    `CholeskyRidge`): the regularised solution $W = V\operatorname{diag}(s_i/(s_i^2 +
    \alpha_2))U^\top T$. With `alpha2 = 0` the singular values below
    $\varepsilon\max(N, m)s_{\max}$ are dropped: the minimum-norm least-squares readout
    (the pseudo-inverse, as `numpy.linalg.lstsq`). The choice of `solver="auto"` when
    `alpha2` is concretely zero.

    **When to use it:** `alpha2 = 0` with possibly rank-deficient features, or as a
    backward-stable reference. It gathers a batch sharded over devices.

    **Cost:** $O(Nm^2)$, but an SVD of the tall matrix (LAPACK), several times the
    Cholesky solver's time, and much slower with multi-threaded OpenBLAS on a busy
    machine (see the benchmark page, 'Ridge readout').
    """

    def lstsq(self, design, response, alpha2):
        u, s, vt, inverse = svd_filter(design.dense(), alpha2)
        return matmul(vt.T, (s * inverse)[:, None] * matmul(u.T, response.dense()))

    def solve(self, design: Stack, alpha2: Scalar, rhs: Float[Array, "m k"]) -> Float[Array, "m k"]:
        r"""$(Z^\top Z + \alpha I)^{-1}$ `rhs` for the readout's derivative,
        $V\operatorname{diag}(1/(s_i^2 + \alpha))V^\top$ `rhs`; with $\alpha = 0$ on the
        kept singular directions only (the derivative of the pseudo-inverse has further
        terms across the null space, not included)."""
        _, _, vt, inverse = svd_filter(design.dense(), alpha2)
        return matmul(vt.T, inverse[:, None] * matmul(vt, rhs))


class DualRidge(AbstractLstsqMethod):
    r"""The ridge readout from the dual (kernel) form of the centred problem (see
    `CholeskyRidge`): $W = Z^\top C$ with $(ZZ^\top + \alpha_2 I)C = T$, an
    `(N+1, N+1)` system. The choice of `solver="auto"` when there are fewer samples than
    coefficients ($N < m + 1$) and `alpha2` may be non-zero.

    The extra row of $Z$ (the eliminated intercept's) is removed exactly by its Schur
    complement, and the remaining `(N, N)` matrix solved through its
    eigendecomposition, with the eigenvalues below $\varepsilon N\lambda_{\max}$ (below
    what it resolves in working precision) dropped, then `refine_steps` steps of
    refinement with the residual $T - Z(Z^\top C) - \alpha_2 C$ from the wide matrix.
    Dropping them matters whenever the least-squares residual is not zero
    (rank-deficient rows, e.g. repeated inputs, or zero per-sample weights): its
    component along a null direction of the kernel would be divided by $\alpha_2$ and
    come back as rounding noise of the size of $W$. With `alpha2 = 0` it is the
    pseudo-inverse.

    Its derivative is that of the formula $W = Z^\top C$, $\mathrm dW = \mathrm
    dZ^\top C + Z^\top\mathrm dC$, with no `(m, m)` solve, and with the exact $C$
    (no direction dropped, when `alpha2 > 0`): $Z^\top$ annihilates $C$'s null
    directions, $\mathrm dZ^\top$ does not, so where the null space turns with the
    features (rank-deficient features that depend on the parameters, or a tall
    problem) the dropped part is needed for the derivative, though not for $W$.

    **When to use it:** overparameterised features ($m$ larger than the batch). It
    couples all samples, so it gathers a batch sharded over devices.

    **Cost:** $O(N^2 m + N^3)$.

    **Arguments:**

    - `refine_steps`: the steps of iterative refinement (default 3).
    """

    refine_steps: int = eqx.field(default=3, static=True)

    def __check_init__(self):
        _check_refine_steps(self.refine_steps)

    def lstsq(self, design, response, alpha2):
        return design.rmv(self.kernel_solve(design, alpha2, response))

    def kernel_solve(
        self, design: Stack, alpha2: Scalar, rhs: Stack, keep_null: bool = False
    ) -> Stack:
        r"""$C = (ZZ^\top + \alpha_2 I)^{-1}$ `rhs`, the kernel's unresolved directions
        dropped, or (`keep_null`, for the derivative) kept where `alpha2 > 0`."""
        # The extra row is eliminated by its Schur complement: it holds the offset
        # (sqrt(alpha2) times it, or itself with alpha2 = 0) and would otherwise set
        # the largest eigenvalue, and the cut-off with it, far above every data
        # direction. S = A − bbᵀ/(c + α) has entries of the data's size.
        rows, extra = design.rows, design.extra
        column = matmul(rows, extra)
        pivot = jnp.sum(extra**2) + alpha2
        inverse_pivot = jnp.where(pivot > 0, 1 / jnp.where(pivot > 0, pivot, 1), 0)
        schur = matmul(rows, rows.T) - inverse_pivot * jnp.outer(column, column)
        eigenvalues, eigenvectors = jnp.linalg.eigh(schur)
        eps = jnp.finfo(schur.dtype).eps
        kept = eigenvalues > eps * schur.shape[0] * jnp.max(eigenvalues)
        if keep_null:
            kept = kept | (alpha2 > 0)
        shifted = jnp.maximum(eigenvalues, 0) + alpha2
        inverse = jnp.where(kept, 1 / jnp.where(kept, shifted, 1), 0)

        def step(r):
            reduced = r.rows - inverse_pivot * jnp.outer(column, r.extra)
            x = matmul(eigenvectors, inverse[:, None] * matmul(eigenvectors.T, reduced))
            return Stack(x, inverse_pivot * (r.extra - matmul(column, x)))

        residual = lambda c: rhs - design.mv(design.rmv(c)) - c.scale(alpha2)  # noqa: E731
        return _refine(step, residual, step(rhs), self.refine_steps)


class AutoRidge(AbstractRidgeSolver):
    r"""Picks the ridge solver from the problem (the default, `solver="auto"`):

    - `SVDRidge` when `alpha2` is concretely zero: only the SVD tells the null space of
        rank-deficient features from rounding noise, which the minimum-norm
        (pseudo-inverse) readout needs;
    - else `DualRidge` when there are fewer samples than coefficients, $N < m + 1$
        (with the bias): the `(N+1, N+1)` kernel is the smaller system;
    - else `CholeskyRidge`.

    A traced `alpha2` (a JAX array under `jit`) counts as non-zero. The choice is made
    at trace time, from static shapes, at no run-time cost.
    """

    def select(
        self, num_samples: int, num_coefficients: int, unregularised: bool
    ) -> AbstractLstsqMethod:
        if unregularised:
            return SVDRidge()
        if num_samples < num_coefficients:
            return DualRidge()
        return CholeskyRidge()


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ridge_lstsq(method, design, response, alpha2):
    return method.lstsq(design, response, alpha2)


@_ridge_lstsq.defjvp
def _ridge_lstsq_jvp(method, primals, tangents):
    design, response, alpha2 = primals
    t_design, t_response, t_alpha2 = tangents
    w = _ridge_lstsq(method, design, response, alpha2)
    # Implicit differentiation of the normal equations Zᵀ(T − ZW) − αW = 0.
    rhs = (
        t_design.rmv(response - design.mv(w))
        + design.rmv(t_response - t_design.mv(w))
        - t_alpha2 * w
    )
    return w, _normal_solve(method, design, alpha2, rhs)


def _normal_solve(
    method: AbstractNormalEquationsMethod, design: Stack, alpha2: Scalar, rhs: Float[Array, "m k"]
) -> Float[Array, "m k"]:
    r"""$(Z^\top Z + \alpha I)^{-1}$ `rhs` by `method.solve`, as a
    `jax.lax.custom_linear_solve`: its derivative is implicit, through the
    matrix-vector product alone, and its transpose is the same (symmetric) solve, so
    no factorisation or decomposition is ever differentiated, to any order (a second
    derivative through a transposed SVD or eigendecomposition divides by
    $s_i^2 - s_j^2$: NaN at repeated singular values)."""
    return jax.lax.custom_linear_solve(
        lambda x: design.rmv(design.mv(x)) + alpha2 * x,
        rhs,
        lambda _, b: method.solve(design, alpha2, b),
        symmetric=True,
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dual_lstsq(method, design, response, alpha2):
    return method.lstsq(design, response, alpha2)


@_dual_lstsq.defjvp
def _dual_lstsq_jvp(method, primals, tangents):
    # W = ZᵀC with the exact C (`keep_null`) and its tangent (`_kernel_solve`'s rule):
    # dW = dZᵀC + Zᵀ dC.
    design, response, alpha2 = primals
    t_design, t_response, t_alpha2 = tangents
    c, t_c = jax.jvp(
        functools.partial(_kernel_solve, method),
        (design, alpha2, response),
        (t_design, t_alpha2, t_response),
    )
    return _dual_lstsq(method, design, response, alpha2), t_design.rmv(c) + design.rmv(t_c)


def _kernel_solve(method, design, alpha2, rhs):
    """The exact kernel solve of `_dual_lstsq`'s derivative (`keep_null`), as a
    `jax.lax.custom_linear_solve` (see `_normal_solve`)."""
    return jax.lax.custom_linear_solve(
        lambda c: design.mv(design.rmv(c)) + c.scale(alpha2),
        rhs,
        lambda _, b: method.kernel_solve(design, alpha2, b, keep_null=True),
        symmetric=True,
    )
