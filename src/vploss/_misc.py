import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def matmul(a: Float[Array, "..."], b: Float[Array, "..."]) -> Float[Array, "..."]:
    """`a @ b` at full precision.

    On GPUs, float32 matmuls may otherwise run in TF32 (about 10 mantissa bits), which
    ruins a Gram matrix or a Hessian built from them.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
