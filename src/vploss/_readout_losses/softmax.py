"""The softmax cross-entropy as a readout loss."""

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree, Real

from .._core.checks import as_array
from .._core.readout import VPLinear
from .base import AbstractReadoutLoss, Curvature, Labels
from .loss import vploss_glm
from .solvers import AbstractGLMSolver, SolverName


@functools.cache
def shift_basis(num_classes: int) -> np.ndarray:
    r"""An orthonormal basis $T$ of $\mathbb R^K$ whose last vector is the shift
    direction $\mathbf 1/\sqrt K$ of the logits: the Householder reflection $T = I -
    2vv^\top/v^\top v$, $v = e_K - \mathbf 1/\sqrt K$ (symmetric, its own inverse),
    in float64 (read-only).

    The loss does not change along the shift for label rows that sum to 1, so the
    penalised readout has no component there: its class coefficients and biases sum
    to zero over the classes. The readout is solved in the span of $Q$, the first $K -
    1$ columns of $T$ (`AbstractReadoutLoss.basis`), where that holds exactly; solved
    in all $K$ directions, the rounding of the gradient along the shift, divided by
    `alpha2`, would be the readout's shift. There the curvature is
    $Q^\top(\operatorname{diag}(s_j) - s_j s_j^\top)Q$, positive definite on the open
    simplex. Formed in the classes' basis, the data term's exact null space rounded to
    eigenvalues of either sign of size $\varepsilon\|\hat F\|^2$ (float32 pixels
    0-255: about 3e-3, against `alpha2` = 1e-4): an indefinite Hessian."""
    v = -np.full(num_classes, 1 / np.sqrt(num_classes))
    v[-1] += 1
    basis = np.eye(num_classes) - 2 * np.outer(v, v) / (v @ v)
    basis.setflags(write=False)
    return basis


def as_class_labels(
    y: ArrayLike, num_samples: int, num_classes: int | None
) -> tuple[Real[Array, "N K"], Bool[Array, ""], str]:
    """Integer labels `(N,)` (with `num_classes`) or probability rows `(N, K)` as
    rows of class probabilities (integer one-hot rows for integer labels), a flag
    that is true when a label is invalid, and the message that says how to fix it."""
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
    ):
        raise ValueError(f"`num_classes` must be a Python int >= 2; got {num_classes!r}.")
    labels = as_array("y", y)
    if labels.ndim not in (1, 2) or labels.shape[0] != num_samples:
        raise ValueError(
            f"`y` must be integer labels of shape (N,) or probabilities of shape (N, K) "
            f"with N = {num_samples} (the batch size of `x`); got shape {labels.shape}."
        )
    if labels.ndim == 1:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(
                f"`y` of shape (N,) must hold integer class labels; got dtype "
                f"{labels.dtype}. Convert it with `.astype(int)`, or pass probability "
                "rows of shape (N, K)."
            )
        if num_classes is None:
            raise ValueError(
                "`vploss_ce` with integer labels needs `num_classes` (the number of "
                "classes K; labels are in [0, K))."
            )
        invalid = ~jnp.all((labels >= 0) & (labels < num_classes))
        message = (
            f"`vploss_ce`: integer labels `y` must be in [0, num_classes) = [0, "
            f"{num_classes}); relabel the classes as 0, ..., K - 1 or raise "
            "`num_classes`."
        )
        # Integer rows take the features' dtype (float ones would promote float32).
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.int32), invalid, message
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        raise TypeError(
            f"`y` of shape (N, K) must hold class probabilities (floating point); got "
            f"dtype {labels.dtype}. For integer labels pass shape (N,)."
        )
    if labels.shape[1] < 2:
        raise ValueError(f"`y` must have K >= 2 classes; got shape {labels.shape}.")
    if num_classes is not None and num_classes != labels.shape[1]:
        raise ValueError(
            f"`num_classes` = {num_classes} does not match the {labels.shape[1]} columns "
            "of the probability labels `y`."
        )
    tolerance = jnp.sqrt(jnp.finfo(labels.dtype).eps) * labels.shape[1]
    invalid = ~(
        jnp.all((labels >= 0) & (labels <= 1))
        & jnp.all(jnp.abs(jnp.sum(labels, axis=1) - 1) <= tolerance)
    )
    message = (
        "`vploss_ce`: probability labels `y` must have entries in [0, 1] and rows that "
        "sum to 1; normalise them with `y / y.sum(axis=1, keepdims=True)`, or pass "
        "integer labels with `num_classes`."
    )
    return labels, invalid, message


class SoftmaxCrossEntropy(AbstractReadoutLoss):
    r"""$\ell(z, y) = \operatorname{logsumexp}(z) - \langle y, z\rangle$ for $K$
    classes (`optax.softmax_cross_entropy`), with curvature $\operatorname{diag}(s) -
    ss^\top$, $s = \operatorname{softmax}(z)$ (diagonal plus rank one), unchanged by
    a shift of all logits (`shift_basis`). The loss of `vploss_ce`.

    **Arguments:**

    - `num_classes`: K; required with integer labels `(N,)`.
    """

    num_classes: int | None = eqx.field(default=None, static=True)
    name: ClassVar[str] = "the softmax loss `vploss_ce`"
    # vᵀ(diag(s) − ssᵀ)v is the variance of v under s, at most (max v − min v)²/4 ≤ 1/2
    # for a unit v.
    curvature_bound: ClassVar[float | None] = 0.5

    def labels(self, y, num_samples):
        values, invalid, message = as_class_labels(y, num_samples, self.num_classes)
        return Labels(values, False, invalid, message)

    def loss(self, logits, labels):
        return jax.nn.logsumexp(logits, axis=1) - jnp.sum(labels * logits, axis=1)

    def curvature(self, logits, labels):
        del labels
        probabilities = jax.nn.softmax(logits, axis=1)
        return Curvature(probabilities, probabilities)

    def basis(self, num_outputs):
        return shift_basis(num_outputs)


def vploss_ce(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Real[ArrayLike, " _N *K"],
    *,
    alpha1: Real[ArrayLike, ""] = 0.0,
    alpha2: Real[ArrayLike, ""],
    num_classes: int | None = None,
    weights: Real[ArrayLike, " _N"] | None = None,
    use_bias: bool = True,
    solver: SolverName | AbstractGLMSolver | optx.AbstractMinimiser = "auto",
    gtol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    init: VPLinear | None = None,
) -> tuple[Float[Array, ""], VPLinear]:
    r"""Variable projection loss for multinomial logistic regression (softmax
    cross-entropy) with an affine readout, K classes.

    With features $F = $ `jax.vmap(model)(x)` of shape `(N, m)`, $\hat F = [F, 1]$,
    logits $z_j = \hat W \hat f_j \in \mathbb R^K$ and label rows $y_j$ (one-hot or
    probabilities),

    $$L(\theta) = \min_{\hat W}\ \frac1N\sum_{j=1}^N
    \big[\operatorname{logsumexp}(z_j) - \langle y_j, z_j\rangle\big]
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    the mean of `optax.softmax_cross_entropy` plus penalties. `alpha2 > 0` is required
    (strict convexity). Adding one vector to every class's row of $\hat W$ leaves the
    loss unchanged and raises the penalty, so the optimum's rows sum to zero over the
    classes; the readout is solved on that subspace (`shift_basis`), so its rows do, to
    rounding, at any `alpha2`. The inner problem is solved to `gtol` and checked, and
    the gradient is the envelope gradient, exactly as in `vploss_bce`.

    **Solvers** (`solver=`): as in `vploss_bce`. The exact Hessian
    $\frac1N\sum_j(\operatorname{diag}(s_j) - s_j s_j^\top)\otimes\hat f_j\hat
    f_j^\top + \alpha_2 I$ has $(K(m+1))^2$ entries and costs $O(N K^2 m^2)$ per
    step, so `"auto"` uses `"newton"` while that costs at most `MAX_EXACT_NEWTON_COST
    = 220` Hessian-vector products (`vploss.AutoNewton`; K = 10: up to about m = 45)
    and `"newton-cg"` beyond: Hessian-vector products $\hat F^\top(S \odot U -
    S \odot (S \odot U)\mathbf 1\mathbf 1^\top)/N + \alpha_2 V$, $U = \hat F V$
    ($O(N K m)$ each), preconditioned by the Kronecker factors of the mean curvature
    $\frac1N\sum_j(\operatorname{diag}(s_j) - s_j s_j^\top)$ and the Gram matrix.
    Pass `init`: warm starts save most of the work (a warm-started step costs a
    small multiple of a plain softmax head's, a cold one many times more; see the
    loss's page, 'Measured').

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`: an array or any pytree of arrays
        the model takes (of any dtype: token ids, pixels, masks), with one batch size N.
    - `y`: integer class labels of shape `(N,)` in `[0, num_classes)`, or class
        probabilities of shape `(N, K)` whose rows sum to 1.
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout (bias included), `> 0`.
    - `num_classes`: K; required with integer labels.
    - `weights`: per-sample weights, shape `(N,)`, or `None`: as in `vploss_bce`.
    - `use_bias`: whether the readout has a bias $b$.
    - `solver`, `gtol`, `max_steps`, `throw`, `init`: as in `vploss_bce`.

    **Returns:**

    `(loss, readout)`: the reduced loss and the fitted `VPLinear` (weight `(K, m)`),
    whose `readout(model(x[j]))` are the K logits of sample `j`, with
    `readout.stats` a `vploss.InnerStats`. The loss carries its envelope gradient, the
    readout its implicit derivative (a solve with the inner Hessian; free when unused).

    The loss and the readout are in the working dtype: the features' dtype, promoted
    by floating-point labels and to at least float32 (a bfloat16 or float16 model is
    solved in float32); gradients come back in the dtype of each parameter.

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes, label kinds or
    hyperparameters (e.g. integer labels without `num_classes`); a runtime error
    (`eqx.error_if`) for labels outside `[0, K)`, probability rows that are not
    distributions, non-finite features, or (with `throw=True`) a solve that did not
    converge.
    """
    return vploss_glm(
        SoftmaxCrossEntropy(num_classes),
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
