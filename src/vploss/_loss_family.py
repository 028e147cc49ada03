"""What a `loss=` argument names, for the functions that take a loss function
(`vpggn`, `refit_readout`): the ridge loss, a readout loss's `vploss_*` function (from
the registry `READOUT_LOSSES`) or a readout loss object."""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from ._readout_losses.base import AbstractReadoutLoss
from ._readout_losses.loss import vploss_glm
from ._readout_losses.registry import READOUT_LOSSES
from ._ridge.loss import DEFAULT_RIDGE_ALPHA2, vploss_msereg


class LossFamily(NamedTuple):
    """A `loss=` argument resolved.

    - `fit`: the loss function, `fit(model, x, y, **loss_kwargs) -> (loss, readout)`.
    - `readout_loss`: its loss in the logits; `None` for the squared error of
        `vploss_msereg`.
    - `defaults`: the penalty weights `fit` uses where its caller passes none, as its
        signature states them: `alpha1` is 0 for every loss, `alpha2` has a default
        only for the ridge loss (a readout loss requires it).
    """

    fit: Callable[..., Any]
    readout_loss: AbstractReadoutLoss | None
    defaults: dict[str, float]


_READOUT_DEFAULTS = {"alpha1": 0.0}
_RIDGE_DEFAULTS = {"alpha1": 0.0, "alpha2": DEFAULT_RIDGE_ALPHA2}


class UnknownLossError(TypeError, ValueError):
    # A wrong kind of `loss` raised `TypeError` in `vpggn` and `ValueError` in
    # `refit_readout`; both still catch it.
    pass


def loss_family(loss: Any, num_classes: int | None) -> LossFamily:
    """The family of `loss`; `num_classes` is the loss function's (read by `vploss_ce`).

    **Raises:** `UnknownLossError` (a `TypeError` and a `ValueError`) for anything else.
    """
    if isinstance(loss, AbstractReadoutLoss):
        return LossFamily(functools.partial(vploss_glm, loss), loss, _READOUT_DEFAULTS)
    if loss is vploss_msereg:
        return LossFamily(vploss_msereg, None, _RIDGE_DEFAULTS)
    if loss in READOUT_LOSSES:
        return LossFamily(loss, READOUT_LOSSES[loss](num_classes), _READOUT_DEFAULTS)
    functions = ", ".join(f"`vploss.{function.__name__}`" for function in READOUT_LOSSES)
    raise UnknownLossError(
        f"`loss` must be `vploss.vploss_msereg`, a readout loss's function ({functions}) "
        f"or a `vploss.AbstractReadoutLoss`; got {getattr(loss, '__name__', loss)!r}."
    )
