"""The Poisson loss (log link) as a readout loss, for count data."""

from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from .._core.checks import as_targets
from .._core.readout import VPLinear
from .base import AbstractReadoutLoss, Curvature, Labels
from .loss import vploss_glm
from .solvers import AbstractGLMSolver, SolverName


class PoissonLogLikelihood(AbstractReadoutLoss):
    r"""The negative Poisson log-likelihood with a log link, up to terms free of $z$:
    $\ell(z, y) = \sum_c e^{z_c} - y_c z_c$ for counts (or rates) $y_c \ge 0$, the
    predicted mean $e^{z_c}$; its curvature $e^{z_c}$ is diagonal. Half the Poisson
    deviance $\sum_c y_c\log(y_c/\mu_c) - y_c + \mu_c$ minus its $\hat W$-free part.
    The loss of `vploss_poisson`."""

    name: ClassVar[str] = "the Poisson loss `vploss_poisson`"

    def labels(self, y, num_samples):
        values, scalar_output = as_targets("y", y, num_samples)
        negative = ~jnp.all(values >= 0)
        message = "`vploss_poisson`: targets `y` must be counts or rates >= 0."
        return Labels(values, scalar_output, negative, message)

    def loss(self, logits, labels):
        return jnp.sum(jnp.exp(logits) - labels * logits, axis=1)

    def curvature(self, logits, labels):
        del labels
        return Curvature(jnp.exp(logits), None)

    def basis(self, num_outputs):
        return None


def vploss_poisson(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Real[ArrayLike, " _N *k"],
    *,
    alpha1: Real[ArrayLike, ""] = 0.0,
    alpha2: Real[ArrayLike, ""],
    weights: Real[ArrayLike, " _N"] | None = None,
    use_bias: bool = True,
    solver: SolverName | AbstractGLMSolver | optx.AbstractMinimiser = "auto",
    gtol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    init: VPLinear | None = None,
) -> tuple[Float[Array, ""], VPLinear]:
    r"""Variable projection loss for Poisson regression (log link) with an affine
    readout, for counts: with features $F = $ `jax.vmap(model)(x)`, $\hat F = [F, 1]$
    and log-means $z_j = \hat W\hat f_j$,

    $$L(\theta) = \min_{\hat W}\ \frac{\sum_j w_j\sum_c\big[e^{z_{jc}} - y_{jc}
    z_{jc}\big]}{\sum_j w_j} + \frac{\alpha_2}{2}\|\hat W\|_F^2 +
    \frac{\alpha_1}{2}\|\theta\|^2,$$

    the mean negative Poisson log-likelihood up to a constant (scikit-learn's
    `PoissonRegressor` minimises half the mean deviance plus $\frac{\alpha}{2}\|w\|^2$:
    the same minimiser with `alpha` $=$ `alpha2`, when its intercept is a penalised
    ones column). Solved as `vploss_glm` solves every `AbstractReadoutLoss` (Newton's
    method by default), with the envelope gradient.

    **Arguments:** as `vploss_bce`, with `y` counts or rates $\ge 0$ of shape `(N,)` or
    `(N, k)` (k independent outputs).

    The stopping test is absolute (`gtol` on the scaled gradient, as for every readout
    loss), and the gradient's rounding grows with the counts: in float32 with counts
    of order $c \gg 1$ pass `gtol` of about $\sqrt\varepsilon\,c$, or compute in
    float64.

    **Returns:** `(loss, readout)`: `readout(model(x[j]))` is the log-mean of sample
    `j` (apply `jnp.exp` for the predicted mean), `readout.stats` a
    `vploss.InnerStats`.

    **Raises:** as `vploss_bce`; a runtime error for negative targets.
    """
    return vploss_glm(
        PoissonLogLikelihood(),
        model,
        x,
        y,
        alpha1=alpha1,
        alpha2=alpha2,
        weights=weights,
        use_bias=use_bias,
        solver=solver,
        gtol=gtol,
        max_steps=max_steps,
        throw=throw,
        init=init,
    )
