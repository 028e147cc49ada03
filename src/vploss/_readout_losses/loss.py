r"""The VarPro loss of any readout loss (`AbstractReadoutLoss`): features, inner solve
through `envelope_minimise`, runtime checks, readout."""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from .._core.checks import (
    as_alpha,
    as_array,
    as_batch,
    as_flag,
    as_weights,
    batch_size,
    drop_zero_weight_samples,
    RuntimeChecks,
)
from .._core.envelope import envelope_minimise
from .._core.features import parameter_penalty, readout_features
from .._core.numerics import normalised_weights
from .._core.readout import coefficients_from_readout, readout_from_coefficients, VPLinear
from .base import AbstractReadoutLoss, Curvature
from .objective import ReadoutArgs, ReadoutObjective
from .solvers import AbstractGLMSolver, as_readout_solver, InnerMinimise, SolverName


def check_readout_loss(loss: AbstractReadoutLoss, labels: Array, dtype: Any) -> None:
    """Checks at trace time that a readout loss's methods return what the interface
    says, so that a custom loss gets an error naming the method rather than one from
    deep inside the solver."""
    name = type(loss).__name__
    num_samples, k = labels.shape
    logits = jax.ShapeDtypeStruct(labels.shape, dtype)
    per_sample = jax.eval_shape(loss.loss, logits, labels)
    if getattr(per_sample, "shape", None) != (num_samples,):
        raise ValueError(
            f"`{name}.loss(logits, labels)` must return one value per sample, shape (N,) "
            f"= ({num_samples},), summed over the {k} output(s); got "
            f"{getattr(per_sample, 'shape', per_sample)}."
        )
    curvature = jax.eval_shape(loss.curvature, logits, labels)
    shapes = [getattr(part, "shape", part) for part in curvature]
    if not (
        isinstance(curvature, Curvature)
        and shapes[0] == labels.shape
        and (curvature.rank_one is None or shapes[1] == labels.shape)
    ):
        raise ValueError(
            f"`{name}.curvature(logits, labels)` must return a `vploss.Curvature(d, u)` "
            f"with `d` of shape (N, k) = {labels.shape} and `u` of that shape or None; "
            f"got {curvature!r}."
        )
    basis = loss.basis(k)
    if basis is not None and not (
        np.shape(basis) == (k, k) and np.allclose(np.transpose(basis) @ basis, np.eye(k))
    ):
        raise ValueError(
            f"`{name}.basis({k})` must return None or an orthogonal ({k}, {k}) NumPy "
            f"matrix; got {basis!r}."
        )


def as_readout_init(
    init: Any, objective: ReadoutObjective, use_bias: bool, shape: tuple[int, int], dtype: Any
) -> Array | None:
    """A warm start (a `VPLinear` from a previous call, or `None`) as coefficients of the
    inner problem, checked against its `shape`."""
    if init is None:
        return None
    if not isinstance(init, VPLinear):
        raise TypeError(
            "`init` must be the `VPLinear` readout returned by a previous call (or None); "
            f"got {type(init).__name__}."
        )
    coef = coefficients_from_readout(init, use_bias)
    if coef.shape != shape:
        raise ValueError(
            f"`init` has {coef.shape[1]} output(s) and {coef.shape[0]} coefficients per "
            f"output; this problem has {shape[1]} and {shape[0]}."
        )
    return objective.from_outputs(coef.astype(dtype))


def vploss_glm(
    loss: AbstractReadoutLoss,
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
    r"""The variable projection loss of a readout loss $\ell$ (an
    `AbstractReadoutLoss`): with features $F = $ `jax.vmap(model)(x)` of shape `(N,
    m)`, $\hat F = [F, 1]$, logits $z_j = \hat W\hat f_j \in \mathbb R^k$ and weights
    $w_j \ge 0$ (all 1 by default),

    $$L(\theta) = \min_{\hat W}\ \frac{\sum_j w_j\,\ell(z_j, y_j)}{\sum_j w_j}
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2.$$

    The inner problem is strictly convex for `alpha2 > 0` (required). It is solved by
    `solver` to its tolerance and checked, and the gradient is the envelope gradient
    $\nabla L = \partial_\theta J(\theta, \hat W^*)$ (a custom JVP rule, forward and
    reverse mode): the solver is never differentiated. The `vploss_*` function of each
    readout loss (the table `READOUT_LOSSES`, listed on the page "Losses" of the API
    reference) is this function with its loss.

    **Arguments:**

    - `loss`: the readout loss, e.g. `vploss.SigmoidBinaryCrossEntropy()`.
    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`: an array or any pytree of arrays
        the model takes (of any dtype: token ids, pixels, masks), with one batch size N.
    - `y`: the labels, as `loss` reads them (`AbstractReadoutLoss.labels`).
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout (bias included), `> 0`.
    - `weights`: per-sample weights $w_j \ge 0$, shape `(N,)`, not all zero, or
        `None`. The data term is their weighted MEAN, so integer weights equal
        repeated samples and zero weights dropped ones (scikit-learn's
        `sample_weight`, normalised).
    - `use_bias`: whether the readout has a bias $b$.
    - `solver`: a solver object (`vploss.AutoNewton()` by default, `vploss.Newton`,
        `vploss.NewtonCG`, `vploss.KernelNewton`, `vploss.BudgetedNewtonCG` (the
        inexact mode for training loops), `vploss.QuasiNewton`), a name as a
        shorthand (`"auto"`, `"newton"`, `"newton-cg"`, `"kernel-newton"`,
        `"budgeted-newton-cg"`, `"bfgs"`, `"lbfgs"`), or any
        `optimistix.AbstractMinimiser` (used as it is, with its own stopping rule).
    - `gtol`, `max_steps`: with a name or an optimistix minimiser, the solver's
        tolerance on the scaled gradient (default $\sqrt\varepsilon$ of the dtype)
        and its step budget (default 100; 1 for `"budgeted-newton-cg"`); a solver
        object carries its own.
    - `throw`: if `True`, an inner solve that did not converge raises a runtime error
        (`eqx.error_if`); if `False`, read `readout.stats.converged`.
    - `init`: a warm start: the readout returned by a previous call (e.g. the last
        training step's), or `None` to start from zero.

    **Returns:**

    `(loss, readout)`: the reduced loss (a scalar) and the fitted `VPLinear`, whose
    `readout(model(x[j]))` are the logits of sample `j`, with `readout.stats` a
    `vploss.InnerStats`. The loss carries its envelope gradient, the readout its
    implicit derivative (a solve with the inner Hessian; free when unused). Both are in
    the working dtype: the features' dtype, promoted by floating-point labels and to at
    least float32 (a bfloat16 model is solved in float32).

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes or
    hyperparameters; a runtime error (`eqx.error_if`) for invalid labels or weights,
    non-finite inputs or features, or (with `throw=True`) a solve that did not
    converge.
    """
    if not isinstance(loss, AbstractReadoutLoss):
        raise TypeError(f"`loss` must be a `vploss.AbstractReadoutLoss`; got {loss!r}.")
    x = as_batch("x", x)
    num_samples = batch_size(x)
    weights, weight_errors = as_weights(weights, num_samples, what=loss.name)
    # Before the labels are parsed: a removed sample's label is never read.
    weights, x, y = drop_zero_weight_samples(weights, x, as_array("y", y))
    labels = loss.labels(y, num_samples)
    use_bias = as_flag("use_bias", use_bias)
    throw = as_flag("throw", throw)
    inner_solver = as_readout_solver(solver, gtol, max_steps)
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=True)
    features, values = readout_features(model, x, labels.values, use_bias)
    dtype = features.dtype
    check_readout_loss(loss, values, dtype)
    objective = ReadoutObjective(loss)
    shape = (features.shape[1], values.shape[1])
    if weights is not None:
        weights = normalised_weights(weights.astype(dtype))
    value, coef, stats = envelope_minimise(
        objective,
        InnerMinimise(inner_solver),
        ReadoutArgs(features, values, alpha2.astype(dtype), weights, use_bias=use_bias),
        as_readout_init(init, objective, use_bias, shape, dtype),
        check=RuntimeChecks(
            loss.name,
            errors=[(labels.invalid, labels.message), *weight_errors],
            finite={"x": x},
            throw=throw,
        ),
    )
    total = value + parameter_penalty(model, alpha1.astype(dtype))
    readout = readout_from_coefficients(
        objective.in_outputs(coef), use_bias, labels.scalar_output, stats
    )
    return total, readout
