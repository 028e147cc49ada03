r"""The interface of the stochastic readouts: a readout with memory, fitted batch by
batch through a state that the caller threads through the training loop."""

import abc
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import equinox as eqx
from jaxtyping import Array, ArrayLike, Float, PyTree, Shaped

from .._core.readout import VPLinear


_State = TypeVar("_State")


class AbstractStochasticReadout(eqx.Module, Generic[_State]):
    r"""A readout for mini-batch training with memory of past batches (`SlimTik`,
    `WindowedReadout`): `init` makes the state before the first batch, and each
    `update` fits the readout on a batch and the memory, and returns the batch's loss
    at it, for the gradient in the model's parameters, with the next state.

    ```python
    state = readout.init(model, x[:batch], y[:batch])
    (loss, (fitted, state)), grads = eqx.filter_value_and_grad(
        readout.update, has_aux=True
    )(model, xb, yb, state)
    ```

    The state is a pytree of arrays, so the step can be jitted, scanned and vmapped,
    and the state saved with `eqx.tree_serialise_leaves`.

    **Fields:**

    - `memory`: $r \ge 0$, the number of previous batches remembered.
    - `use_bias`: whether the readout has a bias $b$.
    """

    memory: eqx.AbstractVar[int]
    use_bias: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def init(
        self,
        model: Callable[..., Any],
        x: PyTree[ArrayLike],
        y: Shaped[ArrayLike, " _N *k"],
    ) -> _State:
        """The state before the first batch.

        **Arguments:**

        - `model`, `x`, `y`: the feature map and a batch of the training batches'
            shape, from which the shapes and the working dtype are read (the model is
            not run: `jax.eval_shape`).

        **Returns:**

        The state, a pytree of arrays.
        """

    @abc.abstractmethod
    def update(
        self,
        model: Callable[..., Any],
        x: PyTree[ArrayLike],
        y: Shaped[ArrayLike, " _N *k"],
        state: _State,
        *,
        alpha1: ArrayLike = 0.0,
    ) -> tuple[Float[Array, ""], tuple[VPLinear, _State]]:
        r"""Fits the readout on the batch `(x, y)` and the memory in `state`.

        **Arguments:**

        - `model`: a callable mapping ONE sample `x[j]` to its features.
        - `x`: the batch's inputs, batch-first.
        - `y`: its targets or labels.
        - `state`: the state from `init` or the previous `update`.
        - `alpha1`: penalty weight on the model's parameters, `>= 0`.

        **Returns:**

        `(loss, (readout, state))`, for `eqx.filter_value_and_grad(..., has_aux=True)`:
        the batch's loss at the fitted readout plus $\frac{\alpha_1}2\|\theta\|^2$
        (its gradient in the model is that at the readout held fixed), the fitted
        `VPLinear` and the next state.
        """
