import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Scalar


def feature_map(model: Callable[..., Array], x: PyTree[Array]) -> Callable[..., Array]:
    """`model` as a map from one sample to its feature vector, shape `(m,)` (a scalar
    output counts as `m = 1`), with its output checked at trace time on `x[0]` (the
    first sample of every array, for a pytree of inputs)."""
    if not callable(model):
        raise TypeError(
            f"`model` must be callable on one sample, `model(x[j])`; got {type(model).__name__}."
        )
    try:
        out = jax.eval_shape(model, jax.tree_util.tree_map(lambda leaf: leaf[0], x))
    except (TypeError, ValueError) as e:
        # The model's own error (often from deep inside a matmul) does not say that the
        # sample it was given has the wrong shape or dtype.
        if isinstance(x, jax.Array):
            sample = f"of shape {x.shape[1:]} and dtype {x.dtype} (`x` has shape {x.shape}"
        else:
            shapes = jax.tree_util.tree_map(lambda leaf: f"{leaf.dtype}{list(leaf.shape)}", x)
            sample = f"taken from `x` = {shapes} (every array"
        raise ValueError(f"`model(x[j])` failed on one sample {sample}, batch first): {e}") from e
    except _nnx_state_update_errors() as e:
        # Flax's own message says only that a variable was mutated "from a different
        # trace level", not why a per-sample model may not update its state, nor the fix.
        raise ValueError(
            "`model(x[j])` updated a variable of the model (a Flax NNX module with state, "
            "such as BatchNorm or Dropout in training mode). The losses evaluate "
            "`jax.vmap(model)(x)`, one sample at a time, so the model must be a pure "
            "function of its sample: call `model.eval()` first (BatchNorm then uses its "
            f"running statistics, Dropout does nothing). Flax's error: {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            f"`model(x[j])` must return one array of features; got {type(out).__name__}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"`model(x[j])` must return real floating-point features; got dtype {out.dtype}."
        )
    if out.ndim > 1:
        raise ValueError(
            "`model(x[j])` must return the features of one sample, shape (m,) or a "
            f"scalar; got shape {out.shape} per sample."
        )
    if out.size == 0:
        raise ValueError("`model(x[j])` returned no features (m = 0).")
    return lambda sample: jnp.reshape(model(sample), (-1,))


def _nnx_state_update_errors() -> tuple[type[Exception], ...]:
    """The exception Flax NNX raises for a variable updated inside a JAX transform, or
    none. Flax is looked up, never imported: if it is not loaded, it raised nothing."""
    errors = sys.modules.get("flax.errors")
    return (errors.TraceContextError,) if errors is not None else ()


def evaluate_features(model: Callable[..., Array], x: PyTree[Array]) -> Float[Array, "N m"]:
    """`F = jax.vmap(model)(x)`, checked to be one real feature vector per sample."""
    return jax.vmap(feature_map(model, x))(x)


def augment(features: Float[Array, "N m"], use_bias: bool) -> Float[Array, "N p"]:
    """`F̂ = [F, 1]` when the readout has a bias, else `F`."""
    if not use_bias:
        return features
    ones = jnp.ones((features.shape[0], 1), features.dtype)
    return jnp.concatenate([features, ones], axis=1)


def working_dtype(features: Any, labels: Any = None) -> Any:
    """The dtype every inner solve and derivative rule runs in: that of the features,
    promoted by floating-point labels or targets (integer ones, e.g. class labels or
    one-hot rows, never promote float32 features), and at least float32.

    16-bit features (bfloat16 or float16, e.g. from a mixed-precision model) are
    promoted: LAPACK has no 16-bit factorisations, and 8 or 11 mantissa bits would not
    resolve a Gram matrix or a Hessian anyway. The loss and the readout come back in
    this dtype; gradients flow back to the model in its own dtype."""
    dtype = jnp.dtype(features)
    if labels is not None and jnp.issubdtype(labels, jnp.floating):
        dtype = jnp.result_type(dtype, labels)
    return jnp.promote_types(dtype, jnp.float32)


def readout_features(
    model: Callable[..., Array], x: PyTree[Array], labels: Array, use_bias: bool
) -> tuple[Float[Array, "N p"], Float[Array, "N k"]]:
    """`F̂` of `x` and the `labels` (or targets) of a loss with a linear readout, both
    in the `working_dtype`."""
    features = evaluate_features(model, x)
    dtype = working_dtype(features.dtype, labels.dtype)
    return augment(features.astype(dtype), use_bias), labels.astype(dtype)


def parameter_penalty(model: Any, alpha1: Scalar) -> Scalar:
    """`alpha1/2 Σ‖leaf‖²` over the model's inexact-array leaves."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    if not leaves:
        return jnp.zeros((), alpha1.dtype)
    sum_squares = sum(jnp.sum(jnp.real(leaf * jnp.conj(leaf))) for leaf in leaves)
    return 0.5 * alpha1 * sum_squares
