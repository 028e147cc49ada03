"""The readout losses of the package, in one table: a new loss is its module and one
line here (the docs page "Adding a loss")."""

from collections.abc import Callable
from typing import Any

from .base import AbstractReadoutLoss
from .logistic import SigmoidBinaryCrossEntropy, vploss_bce
from .poisson import PoissonLogLikelihood, vploss_poisson
from .softmax import SoftmaxCrossEntropy, vploss_ce


#: The `vploss_*` function of each readout loss, mapped to its loss as a function of
#: the function's `num_classes` (ignored where the loss has no classes). Every list of
#: the readout losses in an error message is built from it, and `vpggn(loss=...)` and
#: `refit_readout(loss=...)` find the loss of a function here.
READOUT_LOSSES: dict[Callable[..., Any], Callable[[int | None], AbstractReadoutLoss]] = {
    vploss_bce: lambda num_classes: SigmoidBinaryCrossEntropy(),
    vploss_ce: lambda num_classes: SoftmaxCrossEntropy(num_classes),
    vploss_poisson: lambda num_classes: PoissonLogLikelihood(),
}
