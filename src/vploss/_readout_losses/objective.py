r"""The inner objective of a readout loss (`ReadoutObjective`), derived once for every loss
from its `AbstractReadoutLoss` methods: value, gradient, Hessian (dense, or as products),
the Kronecker preconditioner, and the Gram matrices the evidence and refit use."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Real, Scalar

from .._core.numerics import column_mean, matmul, weighted_mean
from .base import AbstractReadoutLoss


class ReadoutArgs(eqx.Module):
    r"""The data of a readout loss's inner problem (the differentiable `args` of
    `envelope_minimise`).

    - `features`: $\hat F$, shape `(N, p)` (with the ones column for a bias).
    - `labels`: shape `(N, k)`.
    - `alpha2`: the readout penalty, a scalar.
    - `weights`: per-sample weights normalised to mean 1, shape `(N,)`, or `None`
        (all 1).
    - `use_bias`: whether the last column of `features` is the bias's column of ones.
    """

    features: Float[Array, "N p"]
    labels: Real[Array, "N k"]
    alpha2: Scalar
    weights: Float[Array, " N"] | None = None
    use_bias: bool = eqx.field(static=True, kw_only=True)


def _weighted_rows(rows: Float[Array, "N k"], weights: Float[Array, " N"] | None) -> Array:
    return rows if weights is None else rows * weights[:, None]


def weighted_gram(
    features: Float[Array, "N p"], weights: Float[Array, " N"] | None
) -> Float[Array, "p p"]:
    r"""$\hat F^\top\Omega\hat F/N$, the Gram matrix of the features with the sample
    weights (normalised to mean 1; `None`: all 1): one matmul over samples."""
    return matmul(_weighted_rows(features, weights).T, features) / features.shape[0]


def class_grams(
    features: Float[Array, "N p"], diagonal: Float[Array, "N k"]
) -> Float[Array, "p k p"]:
    r"""$\frac1N\sum_j d_{jc}\hat f_j\hat f_j^\top$ for each output $c$, as `(p, k, p)`:
    one matmul over samples."""
    num_samples, p = features.shape
    k = diagonal.shape[1]
    weighted = (features[:, :, None] * diagonal[:, None, :]).reshape(num_samples, p * k)
    return matmul(weighted.T, features).reshape(p, k, p) / num_samples


def _rank_one_gram(features: Float[Array, "N p"], rank_one: Float[Array, "N r"]) -> Array:
    r"""$\frac1N\sum_j (u_j\otimes\hat f_j)(u_j\otimes\hat f_j)^\top$ as `(p, r, p, r)`."""
    num_samples, p = features.shape
    r = rank_one.shape[1]
    stacked = (features[:, :, None] * rank_one[:, None, :]).reshape(num_samples, p * r)
    return matmul(stacked.T, stacked).reshape(p, r, p, r) / num_samples


def hessian_operator(matrix: Float[Array, "p k p k"], alpha2: Scalar) -> lx.PyTreeLinearOperator:
    """`matrix + alpha2 I` as a positive definite operator on `(p, k)` coefficients."""
    p, k = matrix.shape[:2]
    identity = jnp.eye(p * k, dtype=matrix.dtype).reshape(p, k, p, k)
    return lx.PyTreeLinearOperator(
        matrix + alpha2 * identity,
        jax.ShapeDtypeStruct((p, k), matrix.dtype),
        lx.positive_semidefinite_tag,
    )


class ReadoutObjective(eqx.Module):
    r"""The inner objective of a readout loss and its derivatives, in the coefficients
    `coef` $=\hat C$ of shape `(p, k)`: $\hat W^\top = \hat C$, or $\hat C_{:,<k}
    T_{:,<k}^\top$ with the loss's `basis` $T$, whose last column $t$ (along which the
    loss does not change) the readout then never has a component along. The last column
    of $\hat C$ is kept so that coefficients have the outputs' shape; it enters only
    the penalty, so its optimum is zero, and zero it stays from zero or from a warm
    start (`from_outputs`). Called as `objective(coef, args)` with `ReadoutArgs`.

    $$J(\hat C) = \frac1N\sum_j\omega_j\,\ell(z_j, y_j) + \frac{\alpha_2}{2}\|\hat
    C\|_F^2, \qquad \nabla^2 J = \frac1N\sum_j\omega_j\,(T^\top C_j T)\otimes\hat
    f_j\hat f_j^\top + \alpha_2 I,$$

    with the curvature $C_j = \operatorname{diag}(d_j) - u_j u_j^\top$ of the loss in
    the logits $z_j$ (`AbstractReadoutLoss.curvature`), restricted to the first $k - 1$
    columns of $T$ when there is a basis (the last is exactly $\alpha_2$).
    """

    loss: AbstractReadoutLoss

    def _curved(self, k: int, dtype) -> Array | None:
        """The first `k - 1` columns of the loss's basis (the directions in which it
        changes), or `None`."""
        basis = self.loss.basis(k)
        return None if basis is None else jnp.asarray(basis[:, :-1], dtype)

    def in_outputs(self, coef: Float[Array, "p k"]) -> Float[Array, "p k"]:
        r"""$\hat W^\top$: the coefficients in the outputs' own basis."""
        curved = self._curved(coef.shape[1], coef.dtype)
        return coef if curved is None else matmul(coef[:, :-1], curved.T)

    def from_outputs(self, coef: Float[Array, "p k"]) -> Float[Array, "p k"]:
        r"""The coefficients of the readout $\hat W^\top$ = `coef`, less its component
        along the basis's last column (the inverse of `in_outputs` where it has none)."""
        curved = self._curved(coef.shape[1], coef.dtype)
        return coef if curved is None else jnp.pad(matmul(coef, curved), ((0, 0), (0, 1)))

    def logits(self, coef: Float[Array, "p k"], args: ReadoutArgs) -> Float[Array, "N k"]:
        return matmul(args.features, self.in_outputs(coef))

    def __call__(self, coef: Float[Array, "p k"], args: ReadoutArgs) -> Scalar:
        data = weighted_mean(self.loss.loss(self.logits(coef, args), args.labels), args.weights)
        return data + 0.5 * args.alpha2 * jnp.sum(coef**2)

    def _curvature(self, coef: Float[Array, "p k"], args: ReadoutArgs):
        """The weighted curvature and the basis restricted to its curved columns."""
        diagonal, rank_one = self.loss.curvature(self.logits(coef, args), args.labels)
        diagonal = _weighted_rows(diagonal, args.weights)
        if rank_one is not None and args.weights is not None:
            rank_one = rank_one * jnp.sqrt(args.weights)[:, None]
        return diagonal, rank_one, self._curved(coef.shape[1], coef.dtype)

    def hessian(self, coef: Float[Array, "p k"], args: ReadoutArgs) -> lx.PyTreeLinearOperator:
        """The exact Hessian as a `(p, k, p, k)` operator: the per-output Gram matrices
        (`class_grams`, one matmul over samples) and the rank-one term (one more)."""
        diagonal, rank_one, curved = self._curvature(coef, args)
        features = args.features
        grams = class_grams(features, diagonal)
        if curved is None:
            k = diagonal.shape[1]
            data = grams[:, :, :, None] * jnp.eye(k, dtype=grams.dtype)[None, :, None, :]
        else:
            data = jnp.einsum(
                "ab,ac,paq->pbqc", curved, curved, grams, precision=jax.lax.Precision.HIGHEST
            )
        if rank_one is not None:
            data = data - _rank_one_gram(
                features, rank_one if curved is None else matmul(rank_one, curved)
            )
        if curved is not None:
            data = jnp.pad(data, ((0, 0), (0, 1), (0, 0), (0, 1)))
        return hessian_operator(data, args.alpha2)

    def hessian_product(
        self, coef: Float[Array, "p k"], args: ReadoutArgs
    ) -> lx.FunctionLinearOperator:
        r"""The same Hessian as products $V \mapsto \hat F^\top(\Omega\, C(\hat F V
        T^\top))T/N + \alpha_2 V$, never formed: two matmuls over samples, $O(Npk)$."""
        diagonal, rank_one, curved = self._curvature(coef, args)
        # Transposed once per operator, not in every product: XLA's CPU matmul over the
        # rows of a `(N, p)` array copied its transpose at each call (4-6x the matmul
        # with one output).
        apply = jtu.Partial(
            _hessian_product,
            args.features,
            transposed(args.features),
            args.alpha2,
            diagonal,
            rank_one,
            curved,
        )
        structure = jax.ShapeDtypeStruct(coef.shape, coef.dtype)
        return lx.FunctionLinearOperator(apply, structure, lx.positive_semidefinite_tag)

    def centred_jacobi(
        self, coef: Float[Array, "p k"], args: ReadoutArgs
    ) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
        r"""A factor $L$ of an approximate inverse Hessian $LL^\top$ for CG that costs one
        pass over the samples: the inverse diagonal of the Hessian in the coefficients
        of the centred features (Jacobi after centring), as `(L, Lᵀ)`.

        With a bias, the readout $z = W f + b$ is reparametrised exactly as $z = W(f -
        \mu) + b'$, $b' = b + W\mu$ ($\mu$ the weighted mean of the features), i.e.
        $\hat C = S\hat C'$ with $S$ unit triangular; the preconditioner is $S D'^{-1}
        S^\top$ with $D'$ the diagonal of $S^\top HS$:

        $$D'_{ac} = \frac1N\sum_j\omega_j(T^\top C_jT)_{cc}(\hat f_{ja} - \mu_a)^2 +
        \alpha_2(1 + \mu_a^2), \qquad L = SD'^{-1/2},$$

        ($\mu_a = 0$ and no $\alpha_2\mu_a^2$ on the bias's row, whose column stays
        ones), with $(T^\top C_jT)_{cc} = \sum_i d_{ji}T_{ic}^2 - (u_j^\top T_{:c})^2$, and
        $\alpha_2$ alone on a basis's last column. Uncentred features (an offset of
        300, pixels 0-255) put one large eigenvalue in the Hessian along the mean,
        which plain Jacobi scaling does not remove (CG stalled in float32); features of
        uneven scale are what Jacobi scaling is for. Without a bias it is plain
        Jacobi. CG runs on $L^\top HL$ (`BudgetedTruncatedNewton`), so that its
        stopping test sees the residual in these coordinates: measured in the original
        ones, the residual along the mean direction dwarfs the rest, and CG stopped
        after one iteration on features with an offset of 1e3."""
        diagonal, rank_one, curved = self._curvature(coef, args)
        if curved is not None:
            diagonal = matmul(diagonal, curved**2)
        if rank_one is not None:
            diagonal = diagonal - (rank_one if curved is None else matmul(rank_one, curved)) ** 2
        features = args.features
        p = features.shape[1]
        if args.use_bias:
            mean = column_mean(features[:, :-1], args.weights)
            mean = jnp.concatenate([mean, jnp.zeros((1,), mean.dtype)])
            features = features - mean
        else:
            mean = jnp.zeros((p,), features.dtype)
        data = matmul(transposed(features**2), diagonal) / features.shape[0]
        if curved is not None:
            data = jnp.pad(data, ((0, 0), (0, 1)))
        root = jnp.sqrt(data + args.alpha2 * (1 + mean**2)[:, None])

        def factor(vector):
            scaled = vector / root
            if not args.use_bias:
                return scaled
            # S (W', b') = (W', b' - μᵀW').
            return scaled.at[-1].add(-matmul(mean[:-1], scaled[:-1]))

        def factor_transpose(vector):
            if args.use_bias:
                # Sᵀ (u_W, u_b) = (u_W - μ u_b, u_b).
                vector = vector.at[:-1].add(-mean[:-1, None] * vector[-1])
            return vector / root

        return factor, factor_transpose

    def gradient_error_bounds(
        self, coef: Float[Array, "p k"], gradient: Float[Array, "p k"], args: ReadoutArgs
    ) -> tuple[Scalar, Scalar]:
        r"""Bounds of what an inexact readout $\tilde W$ (`coef`, with the inner gradient
        `gradient` there) changes against the exact one $\hat W^*$:

        - the readout's error, $\|\tilde W - \hat W^*\|_F \le \delta = \|\nabla
            J(\tilde W)\|_F/\alpha_2$ ($J$ is $\alpha_2$-strongly convex and $\nabla
            J(\hat W^*) = 0$);
        - the relative error of the envelope gradient in the features, $G_j = \frac
            {\omega_j}{N}W^\top\rho_j$ ($W$ the readout's weight, without the bias;
            $\rho_j = \partial_z\ell(z_j, y_j)$): with $\|\rho_j(\tilde W) -
            \rho_j(\hat W^*)\| \le \beta\|\tilde W - \hat W^*\|_2\|\hat f_j\|$ for a
            loss whose curvature is at most $\beta$ (`AbstractReadoutLoss.curvature_bound`),

            $$\|\tilde G - G^*\|_F \le \frac{\delta}{N}\big(\|\Omega\tilde R\|_F +
            \beta(\|\tilde W\|_F + \delta)\|\Omega\hat F\|_F\big),$$

            divided by $\|\tilde G\|_F$ (`inf` for a loss without a curvature bound,
            or a zero gradient with a nonzero bound; 0 at a zero inner gradient).

        One more pass over the samples (the logits' residuals $\tilde R$)."""
        readout_error = jnp.sqrt(jnp.sum(gradient**2)) / args.alpha2
        bound = self.loss.curvature_bound
        if bound is None:
            return readout_error, jnp.full((), jnp.inf, gradient.dtype)
        logits = self.logits(coef, args)
        residuals = jax.grad(lambda z: jnp.sum(self.loss.loss(z, args.labels)))(logits)
        residuals = _weighted_rows(residuals, args.weights)
        weight = self.in_outputs(coef)
        if args.use_bias:
            weight = weight[:-1]
        features_norm = jnp.sqrt(jnp.sum(_weighted_rows(args.features, args.weights) ** 2))
        error = (
            readout_error
            / args.features.shape[0]
            * (
                jnp.sqrt(jnp.sum(residuals**2))
                + bound * (jnp.sqrt(jnp.sum(weight**2)) + readout_error) * features_norm
            )
        )
        envelope = matmul(residuals, weight.T) / args.features.shape[0]
        # An exact readout has no error, even where the gradient is zero.
        relative = jnp.where(error == 0, 0, error / jnp.sqrt(jnp.sum(envelope**2)))
        return readout_error, relative

    def mean_curvature(self, coef: Float[Array, "p k"], args: ReadoutArgs) -> Float[Array, "k k"]:
        r"""$\frac1N\sum_j\omega_j T^\top C_j T$, the output factor of the Kronecker
        preconditioner (`KroneckerPreconditioner`)."""
        diagonal, rank_one, curved = self._curvature(coef, args)
        num_samples = diagonal.shape[0]
        total = jnp.sum(diagonal, axis=0)
        if curved is None:
            mean = jnp.diag(total / num_samples)
        else:
            mean = matmul(curved.T * total, curved) / num_samples
        if rank_one is not None:
            projected = rank_one if curved is None else matmul(rank_one, curved)
            mean = mean - matmul(projected.T, projected) / num_samples
        return mean if curved is None else jnp.pad(mean, ((0, 1), (0, 1)))

    def gradient_scale(self, args: ReadoutArgs) -> Float[Array, "p 1"]:
        """`gradient_scale` of the weighted mean squares of the features."""
        return gradient_scale(weighted_mean(args.features**2, args.weights), args.alpha2)


def gradient_scale(mean_square: Float[Array, " p"], alpha2: Scalar) -> Float[Array, "p 1"]:
    r"""$\min(1, \sqrt{\frac1N\sum_j\omega_j\hat f_{jp}^2 + \alpha_2})$ per coefficient
    row, from the (weighted) mean squares of the features: the scale the stopping test
    divides the gradient by (`_newton.scaled_gradient_norm`).

    Features scaled by $s$ (with `alpha2` scaled by $s^2$) scale the gradient by $s$, so
    with an absolute test, features of size 1e-6 stopped far from the optimum: a
    silently wrong loss. Small features therefore tighten the test in proportion.
    Large ones do not loosen it: the Gram matrix ignores the curvature, which vanishes
    on saturated samples, and a looser test lost the loss's digits there. See the
    benchmark page, 'The inner stopping test'."""
    return jnp.minimum(1, jnp.sqrt(mean_square + alpha2))[:, None]


def curvature_product(
    diagonal: Float[Array, "N k"], rank_one: Float[Array, "N k"] | None, rows: Float[Array, "N k"]
) -> Float[Array, "N k"]:
    r"""$(\operatorname{diag}(d_j) - u_j u_j^\top)\,v_j$ for every row $j$: a `Curvature`
    applied sample by sample."""
    out = diagonal * rows
    if rank_one is None:
        return out
    # The row dot products as a batched matmul: XLA's CPU compiler (jax 0.10.2)
    # miscompiles `u * jnp.sum(u * v, axis=1, keepdims=True)` in float32 under
    # `jit(vmap)` with batches of 32 or more (observed: errors of order one).
    along = jnp.einsum("nk,nk->n", rank_one, rows, precision=jax.lax.Precision.HIGHEST)
    return out - rank_one * along[:, None]


def transposed(a: Float[Array, "N p"]) -> Float[Array, "p N"]:
    """`a.T` as an array of its own (a copy), which XLA cannot fold back into the
    matmuls that use it."""
    return jax.lax.optimization_barrier(a.T)


def _hessian_product(features, features_t, alpha2, diagonal, rank_one, curved, vector):
    in_outputs = vector if curved is None else matmul(vector[:, :-1], curved.T)
    directions = matmul(features, in_outputs)
    # The rank-one rows carry √ω each, so ω u uᵀ appears once.
    curved_directions = curvature_product(diagonal, rank_one, directions)
    data = matmul(features_t, curved_directions) / features.shape[0]
    if curved is not None:
        data = jnp.pad(matmul(data, curved), ((0, 0), (0, 1)))
    return data + alpha2 * vector


class KroneckerPreconditioner(eqx.Module):
    r"""$(\bar A \otimes G + \alpha_2 I)^{-1}$, an approximate inverse Hessian of a
    readout loss's inner objective, with the weighted Gram matrix $G = \hat F^\top
    \Omega\hat F/N$ (one matmul and one `(p, p)` eigendecomposition per solve) and the
    `(k, k)` mean curvature $\bar A$ in the logits at the current iterate (a `(k, k)`
    eigendecomposition per step). Exact when all samples share one curvature (e.g. at a
    zero readout), and exact on a basis's linear direction, where $\bar A$ has a zero
    eigenvalue like the Hessian. Applying it costs four small matmuls, none over
    samples."""

    objective: ReadoutObjective
    args: ReadoutArgs
    gram_eigenvalues: Float[Array, " p"]
    gram_eigenvectors: Float[Array, "p p"]

    def __init__(self, objective: ReadoutObjective, args: ReadoutArgs):
        gram = weighted_gram(args.features, args.weights)
        eigenvalues, self.gram_eigenvectors = jnp.linalg.eigh(gram)
        # Rounding may leave tiny negative eigenvalues of these positive semidefinite
        # matrices; the preconditioner must stay positive definite.
        self.gram_eigenvalues = jnp.maximum(eigenvalues, 0)
        self.objective = objective
        self.args = args

    def __call__(self, coef: Float[Array, "p k"]) -> lx.FunctionLinearOperator:
        mean = self.objective.mean_curvature(coef, self.args)
        eigenvalues, eigenvectors = jnp.linalg.eigh(mean)
        scale = 1 / (
            self.gram_eigenvalues[:, None] * jnp.maximum(eigenvalues, 0)[None, :] + self.args.alpha2
        )
        apply = jtu.Partial(_kronecker_solve, self.gram_eigenvectors, eigenvectors, scale)
        structure = jax.ShapeDtypeStruct(coef.shape, coef.dtype)
        return lx.FunctionLinearOperator(apply, structure, lx.positive_semidefinite_tag)


def _kronecker_solve(left, right, scale, vector):
    return matmul(matmul(left, scale * matmul(matmul(left.T, vector), right)), right.T)
