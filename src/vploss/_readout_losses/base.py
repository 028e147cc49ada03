r"""The interface of a readout loss, the one thing a loss author writes: a convex per-sample
loss $\ell(z, y)$ of the logits $z = \hat W \hat f$ of a linear readout, its curvature in
the logits and its label parsing. Everything else (the inner objective, its gradient,
Hessian products, the Kronecker preconditioner, the refit's sums) is derived from these
in `objective.py`."""

import abc
from typing import ClassVar, NamedTuple

import equinox as eqx
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Real


class Labels(NamedTuple):
    """Labels as a readout loss reads them (`AbstractReadoutLoss.labels`).

    - `values`: the labels as an `(N, k)` array, one column per output (logit).
    - `scalar_output`: whether `y` was `(N,)` with one output, so that the readout
        predicts a scalar.
    - `invalid`: a boolean array, true when a label is outside the loss's domain (a
        runtime error, since it depends on values).
    - `message`: what the runtime error says: the expected labels and the fix.
    """

    values: Real[Array, "N k"]
    scalar_output: bool
    invalid: Bool[Array, ""]
    message: str


class Curvature(NamedTuple):
    r"""The per-sample Hessian of a loss in its logits, $\partial_z^2\ell(z_j, y_j) =
    \operatorname{diag}(d_j) - u_j u_j^\top$: a diagonal `d` of shape `(N, k)` and
    an optional rank-one term `u` (`None`: diagonal). Every Hessian of the inner
    objective is built from these two."""

    diagonal: Float[Array, "N k"]
    rank_one: Float[Array, "N k"] | None


class AbstractReadoutLoss(eqx.Module):
    r"""A readout loss: a per-sample loss $\ell(z, y)$, convex in the logits $z \in
    \mathbb R^k$ of a linear readout $z_j = \hat W\hat f_j$, with its curvature in the
    logits and its label parsing. `vploss_glm` turns one into a VarPro loss: the inner
    objective is the (weighted) mean of $\ell$ plus the ridge penalty,

    $$J(\hat W) = \frac1N\sum_{j=1}^N \omega_j\,\ell(\hat W\hat f_j, y_j) +
    \frac{\alpha_2}{2}\|\hat W\|_F^2,$$

    and its gradient, Hessian (dense, or as products), the Kronecker preconditioner and
    the streaming refit's sums are all derived from `loss` and `curvature`
    (`ReadoutObjective`).

    Subclasses implement the four abstract methods and set `name`; see the docs page
    "Adding a loss" (`vploss_poisson` is a complete example in a few dozen lines).
    """

    #: How error messages name the loss, e.g. "the logistic loss `vploss_bce`".
    name: eqx.AbstractClassVar[str]

    #: An upper bound $\beta$ of the curvature's largest eigenvalue at every logit,
    #: $\partial_z^2\ell \preceq \beta I$ (the Lipschitz constant of $\partial_z\ell$),
    #: or `None` where there is none (the Poisson loss's $e^z$). It gives the bound of
    #: the envelope gradient's error of an inexact solve (`InnerStats.gradient_error_bound`).
    curvature_bound: ClassVar[float | None] = None

    @abc.abstractmethod
    def labels(self, y: ArrayLike, num_samples: int) -> Labels:
        """Checks `y` at trace time (shape, dtype: `TypeError`/`ValueError` naming what
        was expected) and returns it as `Labels`, with the flag of the value checks."""

    @abc.abstractmethod
    def loss(self, logits: Float[Array, "N k"], labels: Real[Array, "N k"]) -> Float[Array, " N"]:
        r"""$\ell(z_j, y_j)$ of each sample, summed over its outputs."""

    @abc.abstractmethod
    def curvature(self, logits: Float[Array, "N k"], labels: Real[Array, "N k"]) -> Curvature:
        r"""$\partial_z^2\ell(z_j, y_j) = \operatorname{diag}(d_j) - u_j u_j^\top$,
        positive semidefinite."""

    @abc.abstractmethod
    def basis(self, num_outputs: int) -> np.ndarray | None:
        r"""`None`, or an orthogonal `(k, k)` NumPy matrix $T$ whose LAST column spans a
        direction $t$ along which $\ell$ does not change for valid labels
        ($\partial_z\ell\cdot t = 0$, as the softmax's shift of all logits for label
        rows that sum to 1). The penalised optimum then has no component along $t$,
        and the inner problem is solved on that subspace: in coefficients $\hat C$
        with $\hat W^\top = \hat C_{:,<k} T_{:,<k}^\top$ (`ReadoutObjective`), so
        that the readout has none either, exactly. Solved in all $k$ directions, the
        rounding of the data term's gradient along $t$, divided by $\alpha_2$, would
        be the readout's component there; and the Hessian is exactly $\alpha_2$ in
        the last column, where the computed curvature would be rounding of either
        sign (an indefinite Hessian in float32)."""
