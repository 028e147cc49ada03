r"""The trained network: the feature map and the readout fitted to it, as one module
that predicts, saves and loads."""

import io
import json
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._core.readout import VPLinear


#: The first line of a file written by `save_model`, before its JSON header.
_MAGIC = "vploss.VPModel"
_FORMAT_VERSION = 1


class VPModel(eqx.Module):
    r"""A feature map and the affine readout fitted to it: $x \mapsto W f_\theta(x) +
    b$, the whole trained network, for predicting and saving.

    The readout a `vploss_*` loss returns with a training step was fitted to the
    features *before* that step's update of $\theta$, and on that step's batch only:
    predict with a readout fitted to the final features instead,

    ```python
    readout = vploss.refit_readout(features, [(x, y)], loss=vploss.vploss_msereg, alpha2=1e-4)
    model = vploss.VPModel(features, readout)
    prediction = jax.vmap(model)(x_test)
    ```

    (`refit_readout` streams batches from any iterable, so the data need not fit in
    memory at once). Like `VPLinear`, it maps ONE sample; `jax.vmap` applies it to a
    batch. It is an Equinox module, so it is a pytree that `jax.jit`, `jax.vmap` and
    `equinox.tree_serialise_leaves` accept; `save_model` and `load_model` save it with
    the readout's shape, so that loading needs only a feature map of the same
    architecture.

    The readout is kept without its `stats` (the fit's diagnostics, which do not change
    predictions): a `VPModel` has one pytree structure whatever fitted its readout
    (`vploss_msereg` with a fixed or a GCV penalty, a readout loss, `refit_readout`,
    `least_squares`).

    **Fields:**

    - `features`: the feature map $f_\theta$, a callable pytree (an Equinox module)
        mapping one sample to its features, shape `(m,)` (or a scalar, `m = 1`).
    - `readout`: the `vploss.VPLinear` fitted to those features.
    """

    features: Callable[..., Any]
    readout: VPLinear

    # Both checked in the body, with messages that name what is expected.
    def __init__(self, features: Any, readout: Any):
        """**Arguments:**

        - `features`: the trained feature map (the `model` given to the loss).
        - `readout`: a `VPLinear` fitted to it, e.g. by `vploss.refit_readout`.

        **Raises:**

        `TypeError` when `features` is not callable or `readout` is not a `VPLinear`.
        """
        if not callable(features):
            raise TypeError(
                "`features` must be the feature map, a callable mapping one sample to its "
                f"features (the `model` given to the loss); got {type(features).__name__}."
            )
        if not isinstance(readout, VPLinear):
            raise TypeError(
                "`readout` must be the `vploss.VPLinear` fitted to the features (returned "
                f"by a `vploss_*` loss or `vploss.refit_readout`); got "
                f"{type(readout).__name__}."
            )
        self.features = features
        self.readout = VPLinear(readout.weight, readout.bias, readout.scalar_output)

    def __call__(
        self, x: PyTree[Array], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " k"] | Float[Array, ""]:
        r"""**Arguments:**

        - `x`: one sample, as the feature map takes it.
        - `key`: ignored; accepted for compatibility with `equinox.nn` layers.

        **Returns:**

        The prediction $W f_\theta(x) + b$, shape `(k,)`, or a scalar when the
        targets were `(N,)` (the readout's `scalar_output`): the logits for a
        classification loss.
        """
        del key
        return self.readout(self.features(x))


def save_model(file: str | os.PathLike | io.IOBase, model: Any) -> None:  # checked in the body
    r"""Saves a `VPModel`: a header with the readout's shape (outputs, features, bias,
    scalar output, dtype), then every array of the model
    (`equinox.tree_serialise_leaves`).

    **Arguments:**

    - `file`: a path, or a file opened for binary writing (`open(path, "wb")`,
        `io.BytesIO()`).
    - `model`: the `VPModel` to save.

    **Raises:**

    `TypeError` when `model` is not a `VPModel`.
    """
    if not isinstance(model, VPModel):
        raise TypeError(
            "`save_model` saves a `vploss.VPModel` (the feature map and its readout: "
            f"`vploss.VPModel(features, readout)`); got {type(model).__name__}."
        )
    readout = model.readout
    header = {
        "version": _FORMAT_VERSION,
        "out_features": int(readout.out_features),
        "in_features": int(readout.in_features),
        "use_bias": readout.bias is not None,
        "scalar_output": bool(readout.scalar_output),
        "dtype": jnp.dtype(readout.weight.dtype).name,
        "features": _array_specs(_keys_as_data(model.features)),
    }
    if isinstance(file, str | os.PathLike):
        with open(file, "wb") as f:
            _write(f, header, model)
    else:
        _write(file, header, model)


def _array_specs(tree: Any) -> list[list[Any]]:
    """`[shape, dtype]` of every array leaf that `equinox.tree_serialise_leaves` saves,
    in its order."""
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return [[list(jnp.shape(leaf)), jnp.dtype(leaf.dtype).name] for leaf in leaves]


def _array_paths(tree: Any) -> list[str]:
    """The path of every array leaf of `tree` (as `_array_specs` orders them)."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_array))
    return [jax.tree_util.keystr(path) for path, _ in leaves]


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _keys_as_data(tree: Any) -> Any:
    """`tree` with every typed PRNG key array (a Flax NNX `Rngs`, a key held by a
    dropout layer) replaced by its raw `uint32` data, which Equinox's serialisation
    stores (it has no format for key arrays)."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _keys_from_data(tree: Any, template: Any) -> Any:
    """The inverse of `_keys_as_data`: the key data in `tree` wrapped again as keys of
    the implementation of `template`'s keys."""
    return jax.tree.map(
        lambda leaf, like: (
            jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
            if _is_key(like)
            else leaf
        ),
        tree,
        template,
    )


def _write(f: Any, header: dict[str, Any], model: VPModel) -> None:
    f.write(f"{_MAGIC} {json.dumps(header)}\n".encode())
    eqx.tree_serialise_leaves(f, _keys_as_data(model))


def load_model(file: str | os.PathLike | io.IOBase, features: Callable[..., Any]) -> VPModel:
    r"""Loads a `VPModel` saved by `save_model`.

    **Arguments:**

    - `file`: a path, or a file opened for binary reading.
    - `features`: a feature map of the same architecture as the saved one (e.g. built
        by the same code with any key, and the same `jax_enable_x64` setting, which
        decides the default dtype): a template whose arrays are replaced by the saved
        ones (`equinox.tree_deserialise_leaves`). Only arrays are saved: what is not an
        array (an activation function, a static size) is the template's. The
        readout's template is built from the file's header, so its shape, bias, scalar
        output and dtype are those saved.

    **Returns:**

    The saved `VPModel`.

    **Raises:**

    `TypeError` when `features` is a `VPModel` (pass its feature map); `ValueError` when
    the file was not written by `save_model`, is truncated or has data after the
    model, or when its arrays do not fit the template `features` (the header lists the
    saved feature map's arrays: the first whose shape or dtype differs is named, or
    the counts when they differ).
    """
    if isinstance(features, VPModel):
        raise TypeError(
            "`features` is the template of the feature map alone; got a `VPModel`: pass "
            "its `features` (the readout's template comes from the file)."
        )
    if isinstance(file, str | os.PathLike):
        with open(file, "rb") as f:
            return _read(f, features)
    return _read(file, features)


def _read(f: Any, features: Callable[..., Any]) -> VPModel:
    line = f.readline()
    magic, _, header = line.decode(errors="replace").partition(" ")
    if magic != _MAGIC:
        raise ValueError(
            "`load_model` reads files written by `vploss.save_model`; this one does not "
            f"start with {_MAGIC!r} (a file of `equinox.tree_serialise_leaves` alone "
            "loads with `equinox.tree_deserialise_leaves` and a template)."
        )
    try:
        header = json.loads(header)
    except json.JSONDecodeError as error:
        raise ValueError(f"The file's header is truncated or corrupt: {error}") from error
    if header.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"This file is of format version {header.get('version')!r}; this vploss reads "
            f"version {_FORMAT_VERSION}."
        )
    _check_template(
        header["features"], _array_specs(_keys_as_data(features)), _array_paths(features)
    )
    dtype = jnp.dtype(header["dtype"])
    k, m = header["out_features"], header["in_features"]
    readout = VPLinear(
        jnp.zeros((k, m), dtype),
        jnp.zeros((k,), dtype) if header["use_bias"] else None,
        header["scalar_output"],
    )
    template = VPModel(features, readout)
    try:
        model = eqx.tree_deserialise_leaves(f, _keys_as_data(template))
    except (RuntimeError, ValueError, EOFError) as error:
        raise ValueError(f"The file is truncated or corrupt: {error}") from error
    if f.read(1):
        raise ValueError("The file has data after the saved model: it is corrupt.")
    return _keys_from_data(model, template)


def _check_template(saved: list[list[Any]], template: list[list[Any]], paths: list[str]) -> None:
    advice = (
        "build the feature map with the same architecture as the saved one (the same "
        "code, and the same `jax_enable_x64` setting)."
    )
    for index, (was, now) in enumerate(zip(saved, template, strict=False)):
        if was != now:
            raise ValueError(
                f"The saved model does not fit the template `features`: its array {index} "
                f"(`features{paths[index]}` in the template) has shape {tuple(was[0])} and "
                f"dtype {was[1]} in the file, shape {tuple(now[0])} and dtype {now[1]} in "
                f"the template: {advice}"
            )
    if len(saved) != len(template):
        raise ValueError(
            f"The saved model does not fit the template `features`: the file has "
            f"{len(saved)} arrays of the feature map, the template {len(template)}: {advice}"
        )
