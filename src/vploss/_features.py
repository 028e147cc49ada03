from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar


def evaluate_features(model: Callable[[Array], Array], x: Array) -> Float[Array, "N m"]:
    """`F = jax.vmap(model)(x)`, checked to be one real feature vector per sample."""
    try:
        features = jax.vmap(model)(x)
    except TypeError as e:
        # Report a model that is not callable on one sample in terms of the convention.
        if not callable(model):
            raise TypeError(
                f"`model` must be callable on one sample, `model(x[j])`; got "
                f"{type(model).__name__}."
            ) from e
        raise
    if not isinstance(features, jax.Array):
        raise TypeError(
            f"`model(x[j])` must return one array of features; got {type(features).__name__}."
        )
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise TypeError(
            f"`model(x[j])` must return real floating-point features; got dtype {features.dtype}."
        )
    if features.ndim == 1:
        features = features[:, None]
    elif features.ndim != 2:
        raise ValueError(
            "`model(x[j])` must return the features of one sample, shape (m,) or a "
            f"scalar; got shape {features.shape[1:]} per sample."
        )
    if features.shape[1] == 0:
        raise ValueError("`model(x[j])` returned no features (m = 0).")
    return features


def augment(features: Float[Array, "N m"], use_bias: bool) -> Float[Array, "N p"]:
    """`F̂ = [F, 1]` when the readout has a bias, else `F`."""
    if not use_bias:
        return features
    ones = jnp.ones((features.shape[0], 1), features.dtype)
    return jnp.concatenate([features, ones], axis=1)


def parameter_penalty(model: Any, alpha1: Scalar) -> Scalar:
    """`alpha1/2 Σ‖leaf‖²` over the model's inexact-array leaves."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    if not leaves:
        return jnp.zeros((), alpha1.dtype)
    sum_squares = sum(jnp.sum(jnp.real(leaf * jnp.conj(leaf))) for leaf in leaves)
    return 0.5 * alpha1 * sum_squares
