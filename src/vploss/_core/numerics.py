import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree


def matmul(a: Float[Array, "..."], b: Float[Array, "..."]) -> Float[Array, "..."]:
    """`a @ b` at full precision.

    On GPUs, float32 matmuls may otherwise run in TF32 (about 10 mantissa bits), which
    ruins a Gram matrix or a Hessian built from them.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def all_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether every floating-point array in `tree` holds no NaN or inf (integer arrays
    always do, and so does a tree with no floating-point array)."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree) if eqx.is_inexact_array(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def unit_scaled(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""`weights / max(weights)`, the maximum held constant under differentiation.

    For a function of the weights that does not change with their overall scale (a
    weighted mean, $w_j/\sum_i w_i$) this gives the same value and the same
    derivative (a function homogeneous of degree 0 has a gradient of degree $-1$), but
    with sums of order one: the derivative of $w/\sum w$ holds $w/(\sum w)^2$, which
    overflowed for float32 weights of 1e20 and underflowed for 1e-30, and the sum
    itself overflowed at 1e37."""
    top = jax.lax.stop_gradient(jnp.max(weights))
    return weights / jnp.where(top > 0, top, 1)


def row_mean(a: Float[Array, "N ..."], weights: Float[Array, " N"] | None = None) -> Array:
    r"""The mean over the rows (axis 0) in one pass: `jnp.mean`, or with `weights`
    $w_j \ge 0$ the weighted mean $\sum_j w_j a_j / \sum_j w_j$ (a matmul: a sum over
    the rows, so a sharded batch stays sharded)."""
    if weights is None:
        return jnp.mean(a, axis=0)
    weights = unit_scaled(weights)
    return matmul(weights, a) / jnp.sum(weights)


def column_mean(
    a: Float[Array, "N c"], weights: Float[Array, " N"] | None = None
) -> Float[Array, " c"]:
    r"""The mean over the rows, corrected by a second pass: `m + mean(a − m)`; with
    `weights` $w_j \ge 0$ the weighted mean $\sum_j w_j a_j/\sum_j w_j$, corrected the
    same way (both passes weighted, `row_mean`).

    A plain float32 mean of values around 1e6 is off by about eps·log2(N)·1e6 (a
    whole unit for a few hundred rows), so the "centred" columns would not sum to zero,
    which the exact elimination of the intercept relies on; the second pass sums the
    small deviations instead (Chan, Golub and LeVeque's corrected two-pass algorithm).
    Sums over the rows only, so a sharded batch stays sharded."""
    first = row_mean(a, weights)
    return first + row_mean(a - first, weights)


def normalised_weights(weights: Float[Array, " N"]) -> Float[Array, " N"]:
    r"""$\omega_j = N w_j / \sum_i w_i$: weights of mean 1, so that every objective is a
    weighted mean $\sum_j w_j\ell_j / \sum_j w_j = \frac1N\sum_j\omega_j\ell_j$
    (integer weights are repeated samples, zero weights dropped ones)."""
    weights = unit_scaled(weights)
    return weights * (weights.shape[0] / jnp.sum(weights))


def weighted_mean(values: Float[Array, "N ..."], weights: Float[Array, " N"] | None) -> Array:
    """The mean over the first axis with weights of mean 1 (`None`: the plain mean)."""
    if weights is not None:
        values = values * weights.reshape(-1, *([1] * (values.ndim - 1)))
    return jnp.mean(values, axis=0)
