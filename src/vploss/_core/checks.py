"""Input validation shared by every loss (the error contract of the docs' Conventions,
`docs/index.md`, and the cases of `docs/hostile_inputs.md`).

Shapes, dtypes and concrete hyperparameters are checked at trace time and raise
`ValueError`/`TypeError`; values only known at run time are checked with `eqx.error_if`,
attached to what the value and the gradient both use (`RuntimeChecks`).
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, overload, TypeVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree, Scalar

from .numerics import all_finite
from .stats import AbstractStats, check_converged


_Batch = TypeVar("_Batch")
_Other = TypeVar("_Other")


def as_array(name: str, value: Any) -> Array:
    """`value` as a JAX array, or a `TypeError` naming `name`. NumPy arrays in a
    non-native byte order (read from a big-endian file, say) are converted to the
    native order first: JAX holds native arrays only."""
    if isinstance(value, np.ndarray) and not value.dtype.isnative:
        value = value.astype(value.dtype.newbyteorder("="))
    try:
        return jnp.asarray(value)
    except TypeError as e:
        raise TypeError(f"`{name}` must be an array; got {type(value).__name__}.") from e


def concrete_value(value: object) -> float | None:
    """The value of a real scalar argument as the user passed it, or `None` when it is
    traced. A decision taken on an argument's value (a solver, a branch) must be the
    same eagerly and under `jit`: a Python or NumPy scalar, or a JAX array that is not
    a tracer, is concrete in both, but an array made from it inside `jit` is a tracer,
    so the decision is taken on the argument itself, never on a converted copy."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(np.asarray(value))
    except (TypeError, ValueError):
        return None


def as_float_array(name: str, value: ArrayLike) -> Array:
    """`value` as a JAX array of a real floating dtype, or a `TypeError`."""
    array = as_array(name, value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a real floating-point dtype (float32 or float64); got "
            f"dtype {array.dtype}. Convert it with `.astype(jnp.float32)`."
        )
    return array


def as_float_batch(name: str, value: ArrayLike) -> Array:
    """A batch-first floating array with at least one sample (the points of a flow,
    which is differentiated in them)."""
    array = as_float_array(name, value)
    _check_batch(name, [array])
    return array


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | complex | np.number | np.bool_)


def as_batch(name: str, value: PyTree[ArrayLike]) -> PyTree[Array]:
    """The model's inputs: one array, or any pytree of arrays (a tuple of token ids and
    a mask, a dict), of any dtype the model takes (integer token ids, uint8 pixels,
    boolean masks), every leaf batch-first with the same number of samples N >= 1.
    Nested lists of numbers are one array."""
    leaves = jax.tree_util.tree_leaves(value)
    if isinstance(value, list | tuple) and leaves and all(_is_number(leaf) for leaf in leaves):
        value = as_array(name, value)
    value = jax.tree_util.tree_map(lambda leaf: as_array(name, leaf), value)
    _check_batch(name, jax.tree_util.tree_leaves(value))
    return value


def _check_batch(name: str, leaves: Sequence[Array]) -> None:
    if not leaves:
        raise ValueError(f"`{name}` holds no arrays; it must be batch-first, of shape (N, ...).")
    if any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError(f"`{name}` must be batch-first, of shape (N, ...); got a scalar.")
    sizes = sorted({leaf.shape[0] for leaf in leaves})
    if len(sizes) > 1:
        shapes = [leaf.shape for leaf in leaves]
        raise ValueError(
            f"Every array of `{name}` must have the same batch size N along axis 0; got "
            f"shapes {shapes}."
        )
    if sizes[0] == 0:
        shapes = [leaf.shape for leaf in leaves]
        raise ValueError(f"`{name}` is an empty batch (shapes {shapes}); N must be >= 1.")


def batch_size(x: PyTree[Array]) -> int:
    """N, the batch size of inputs checked by `as_batch`."""
    return jax.tree_util.tree_leaves(x)[0].shape[0]


@overload
def drop_zero_weight_samples(
    weights: Float[Array, " N"] | None, batch: _Batch, /
) -> tuple[Float[Array, " N"] | None, _Batch]: ...


@overload
def drop_zero_weight_samples(
    weights: Float[Array, " N"] | None, batch: _Batch, other: _Other, /
) -> tuple[Float[Array, " N"] | None, _Batch, _Other]: ...


def drop_zero_weight_samples(
    weights: Float[Array, " N"] | None, *batches: PyTree[Array]
) -> tuple[Any, ...]:
    r"""`(weights, *batches)`, with every sample of weight zero in the `batches`
    (batch-first pytrees: the inputs, the targets) replaced by the first sample of
    positive weight, so that a removed sample never reaches the arithmetic: huge,
    infinite or NaN values there neither raise nor overflow (0·inf is NaN), in the
    loss or in any derivative (the model is never evaluated on them). Its weight stays
    zero, so the loss and the readout are those of the data set without it, and every
    derivative treats it as absent: the derivative in its weight is zero (the
    boundary of the weights' domain). Without `weights`, everything unchanged."""
    if weights is None:
        return (None, *batches)
    keep = weights > 0
    first = jnp.argmax(keep)

    def substitute(leaf):
        mask = jnp.reshape(keep, (-1,) + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, leaf, leaf[first])

    weights = jnp.where(keep, weights, jax.lax.stop_gradient(weights))
    return (weights, *(jax.tree_util.tree_map(substitute, batch) for batch in batches))


def as_targets(name: str, value: ArrayLike, num_samples: int) -> tuple[Array, bool]:
    """Real-valued targets of shape `(N,)` or `(N, k)` as an `(N, k)` matrix, and whether
    they were `(N,)`."""
    array = as_array(name, value)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(
            f"`{name}` must have a real dtype (floating or integer); got dtype {array.dtype}."
        )
    if array.ndim not in (1, 2):
        raise ValueError(
            f"`{name}` must have shape (N,) or (N, k), batch first; got shape {array.shape}."
        )
    if array.shape[0] != num_samples:
        raise ValueError(
            f"`x` and `{name}` must have the same batch size N along axis 0; got "
            f"N = {num_samples} from `x` and {array.shape[0]} from `{name}` (shape "
            f"{array.shape})."
        )
    if array.ndim == 1:
        return array[:, None], True
    if array.shape[1] == 0:
        raise ValueError(f"`{name}` has shape {array.shape}: k must be >= 1.")
    return array, False


def as_weights(
    weights: ArrayLike | None,
    num_samples: int,
    *,
    what: str = "the loss",
    total: bool = True,
) -> tuple[Array | None, list[tuple[Bool[Array, ""], str]]]:
    r"""Per-sample weights $w_j \ge 0$ of shape `(N,)`, and their runtime checks.

    Shape and dtype are checked now (`ValueError`/`TypeError`): a real dtype (floating
    or integer; bool and complex are refused), one weight per sample of `x`. Integer
    weights are converted to the default floating dtype; the caller casts the result to
    its working dtype. The values are checked at run time: the returned `(flag,
    message)` pairs (negative weights, non-finite weights and, with `total`, weights
    summing to zero) go to `RuntimeChecks(errors=...)`, which attaches them where the
    gradient alone uses them too. `None` (no weights) gives `(None, [])`.

    **Arguments:**

    - `weights`: the weights, or `None`.
    - `num_samples`: N, the batch size of `x`.
    - `what`: the function, as the messages name it (e.g. "`vploss_msereg`").
    - `total`: whether a zero total is an error (not for one of several streamed
        batches, whose total over all batches counts).
    """
    if weights is None:
        return None, []
    if isinstance(weights, bool):
        raise TypeError(f"`weights` of {what} must be an array of shape (N,); got a bool.")
    try:
        array = as_array("weights", weights)
    except TypeError as e:
        raise TypeError(
            f"`weights` of {what} must be an array of shape (N,); got {type(weights).__name__}."
        ) from e
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(
            f"`weights` of {what} must have a real dtype (floating or integer); got dtype "
            f"{array.dtype}. Convert them with `.astype(jnp.float32)` (a boolean mask "
            "becomes 0/1 weights)."
        )
    if array.shape != (num_samples,):
        raise ValueError(
            f"`weights` of {what} must have shape (N,) = ({num_samples},), one weight per "
            f"sample of `x`; got shape {array.shape}."
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        array = array.astype(jnp.result_type(float))
    errors = [
        (
            ~jnp.all(jnp.isfinite(array)),
            f"`weights` of {what} are not finite: they contain NaN or inf; clean them, or "
            "give the samples to drop a weight of 0.",
        ),
        (
            jnp.any(array < 0),
            f"`weights` of {what} must be >= 0; got a negative weight. Drop such samples "
            "or give them a weight of 0.",
        ),
    ]
    if total:
        errors.append(
            (
                ~(jnp.sum(array) > 0),
                f"`weights` of {what} sum to zero: at least one sample needs a positive weight.",
            )
        )
    return array, errors


def as_alpha(name: str, value: ArrayLike, *, positive: bool) -> Scalar:
    """A regularisation weight: a real scalar, `>= 0` (or `> 0` where `positive`).

    Concrete values are checked now; traced values at run time through `eqx.error_if`.
    """
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a real number; got a bool.")
    array = as_array(name, value)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a real number; got dtype {array.dtype}.")
    if array.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {array.shape}.")
    expected = "> 0" if positive else ">= 0"
    # Decided on the argument itself (`concrete_value`): a Python float is checked now,
    # eagerly and under `jit` alike; only a traced value is checked at run time.
    concrete = concrete_value(value)
    if concrete is None:
        array = array.astype(jnp.result_type(float))
        bad = ~(array > 0) if positive else ~(array >= 0)
        bad = bad | ~jnp.isfinite(array)
        return eqx.error_if(array, bad, f"`{name}` must be finite and {expected}.")
    if not (concrete > 0 if positive else concrete >= 0) or not math.isfinite(concrete):
        hint = (
            " The inner problem needs a strictly positive readout penalty to be strictly "
            "convex (with separable data its unpenalised minimiser is at infinity)."
            if positive
            else ""
        )
        raise ValueError(f"`{name}` must be finite and {expected}; got {concrete!r}.{hint}")
    return jnp.asarray(concrete, jnp.result_type(float))


def check_memory(memory: object) -> None:
    """The memory of a stochastic readout (`SlimTik`, `WindowedReadout`): a Python
    integer `>= 0`, the number of batches it remembers (it sets the state's shape)."""
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
        raise ValueError(f"`memory` must be an integer >= 0; got {memory!r}.")


def as_flag(name: str, value: object) -> bool:
    """A static Python bool (it changes shapes, so it cannot be traced)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a Python bool; got {value!r}.")
    return value


class RuntimeChecks(eqx.Module):
    r"""The value-dependent checks of one loss (`docs/index.md`, Conventions), handed to
    `envelope_minimise` as its `check`, which runs them on the optimal value and the
    minimiser inside the solve.

    `eqx.error_if` raises only when its output is used. A compiled step that returns
    the gradient alone uses neither the loss nor the readout a loss returns: its
    backward pass reads the minimiser inside the envelope rule (and the data). Checks
    attached to the returned loss are therefore dead code there; attached to that
    minimiser, they fire under `grad`, `value_and_grad`, `jvp`, `vmap` and `jit`
    alike. Each check is reduced to one scalar flag before it is attached, and the
    minimiser is small, so a batch sharded over devices stays sharded.

    The checks, in the order they are reported: each of `errors` (e.g. labels out of
    range), each input of `finite` not finite (by name), the value or the minimiser
    not finite, and (with `throw`) an iterative solve that did not converge
    (`check_converged`).
    """

    flags: tuple[Bool[Array, ""], ...]
    messages: tuple[str, ...] = eqx.field(static=True)
    what: str = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        what: str,
        *,
        errors: Sequence[tuple[Bool[ArrayLike, ""], str]] = (),
        finite: Mapping[str, PyTree[Array]] | None = None,
        throw: bool = True,
    ):
        """**Arguments:**

        - `what`: the loss, as messages name it (e.g. "the logistic loss `vploss_bce`").
        - `errors`: `(flag, message)` pairs: a runtime error with `message` where
            `flag` is true.
        - `finite`: named inputs (`x=..., y=...`, arrays or pytrees of them) whose
            floating-point arrays must hold no NaN or inf. A saturating model (e.g.
            `tanh`) can map an infinite input to finite features, so the features
            alone would let such data through silently. (Samples of weight zero are
            replaced before, `drop_zero_weight_samples`, so they are not checked.)
        - `throw`: whether an inner solve that did not converge is an error.
        """
        flags = [jnp.asarray(flag) for flag, _ in errors]
        messages = [message for _, message in errors]
        for name, tree in (finite or {}).items():
            flags.append(~all_finite(tree))
            messages.append(
                f"`{name}` is not finite: it contains NaN or inf; clean or mask the data."
            )
        self.flags = tuple(flags)
        self.messages = tuple(messages)
        self.what = what
        self.throw = throw

    def __call__(
        self, value: Scalar, solution: PyTree[Array], stats: Any
    ) -> tuple[Scalar, PyTree[Array]]:
        """`(value, solution)`, unchanged, carrying the checks."""
        out = (value, solution)
        for flag, message in zip(self.flags, self.messages, strict=True):
            out = eqx.error_if(out, flag, message)
        out = eqx.error_if(
            out,
            ~all_finite((value, solution)),
            f"The loss or the readout of {self.what} is not finite: the features "
            "`model(x)` or the targets contain NaN or inf (check the data and the "
            "model's parameters).",
        )
        if isinstance(stats, AbstractStats):
            out = check_converged(out, stats, self.throw, self.what)
        return out
