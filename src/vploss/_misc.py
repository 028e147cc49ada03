import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def matmul(a: Float[Array, "..."], b: Float[Array, "..."]) -> Float[Array, "..."]:
    """`a @ b` at full precision.

    On GPUs, float32 matmuls may otherwise run in TF32 (about 10 mantissa bits), which
    ruins a Gram matrix or a Hessian built from them.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def column_mean(a: Float[Array, "N c"]) -> Float[Array, " c"]:
    """The mean over the rows, corrected by a second pass: `m + mean(a − m)`.

    A plain float32 mean of values around 1e6 is off by about eps·log2(N)·1e6 (a
    whole unit for a few hundred rows), so the "centred" columns would not sum to zero,
    which the exact elimination of the intercept relies on; the second pass sums the
    small deviations instead (Chan, Golub and LeVeque's corrected two-pass algorithm).
    Sums over the rows only, so a sharded batch stays sharded."""
    first = jnp.mean(a, axis=0)
    return first + jnp.mean(a - first, axis=0)
