"""The logistic loss (sigmoid cross-entropy) as a readout loss."""

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, PyTree, Real

from .._core.checks import as_targets
from .._core.readout import VPLinear
from .base import AbstractReadoutLoss, Curvature, Labels
from .loss import vploss_glm
from .solvers import AbstractGLMSolver, SolverName


class SigmoidBinaryCrossEntropy(AbstractReadoutLoss):
    r"""$\ell(z, y) = \sum_c \operatorname{softplus}(z_c) - y_c z_c$ for labels $y_c
    \in [0, 1]$ (`optax.sigmoid_binary_cross_entropy`), $k$ independent binary
    outputs; curvature $\sigma(z_c)(1 - \sigma(z_c))$ (diagonal). The loss of
    `vploss_bce`."""

    name: ClassVar[str] = "the logistic loss `vploss_bce`"
    # σ(z)(1 − σ(z)) ≤ 1/4.
    curvature_bound: ClassVar[float | None] = 0.25

    def labels(self, y, num_samples):
        values, scalar_output = as_targets("y", y, num_samples)
        outside = ~jnp.all((values >= 0) & (values <= 1))
        message = (
            "`vploss_bce`: labels `y` must be in [0, 1] (hard 0/1 labels or "
            "probabilities); for ±1 labels use `(y + 1) / 2`."
        )
        return Labels(values, scalar_output, outside, message)

    def loss(self, logits, labels):
        return jnp.sum(jax.nn.softplus(logits) - labels * logits, axis=1)

    def curvature(self, logits, labels):
        del labels
        probabilities = jax.nn.sigmoid(logits)
        return Curvature(probabilities * (1 - probabilities), None)

    def basis(self, num_outputs):
        return None


def vploss_bce(
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
    r"""Variable projection loss for logistic regression (sigmoid cross-entropy) with
    an affine readout, for one or several independent binary outputs.

    With features $F = $ `jax.vmap(model)(x)` of shape `(N, m)`, $\hat F = [F, 1]$,
    logits $z_j = \hat W \hat f_j$ and labels $y_{jc} \in [0, 1]$ (hard or soft),

    $$L(\theta) = \min_{\hat W}\ \frac1N\sum_{j=1}^N\sum_{c=1}^k
    \big[\operatorname{softplus}(z_{jc}) - y_{jc} z_{jc}\big]
    + \frac{\alpha_2}{2}\|\hat W\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    the mean of `optax.sigmoid_binary_cross_entropy` plus penalties. The inner problem
    is strictly convex for `alpha2 > 0` (required: with separable features the
    unpenalised minimiser is at infinity). It is solved to the tolerance `gtol` on
    $\max|\nabla_{\hat W} J|$, the solve is checked, and the gradient is the
    envelope gradient $\nabla L = \partial_\theta J(\theta, \hat W^*)$ (a custom JVP
    rule, forward and reverse mode): the solver is never differentiated.

    **Solvers** (`solver=`: an object, or its name as a shorthand), all optimistix
    minimisers stopped when $\max|\nabla J| \le$ `gtol`:

    - `vploss.Newton()` or `"newton"`: Newton's method with a backtracking Armijo
        line search on the exact Hessian $\hat F^\top D_c \hat F/N + \alpha_2 I$
        (one matmul per accepted step), solved by `lineax.Cholesky`. The search
        tolerates changes of the objective within its rounding, so a last step whose
        decrease is below it is taken, not refused. Quadratic convergence: about 5-12 steps from a
        cold start, 1-3 from a warm start.
    - `vploss.NewtonCG()` or `"newton-cg"`: truncated Newton: the same line search
        with the Newton step from `lineax.CG` on closed-form Hessian-vector products
        (two matmuls over samples, $O(N(m+1)k)$ each; the Hessian is never formed): at most
        5 CG iterations per step (20 for `gtol < 1e-5`), stopped at the relative
        residual `min(0.5, max(sqrt(|g|), gtol/(2|g|)))`, preconditioned by
        $(\bar A \otimes \hat F^\top\hat F/N + \alpha_2 I)^{-1}$ with $\bar A$
        the mean curvature in the logits (one Gram matrix per call). Converges in
        float32 down to `alpha2 = 1e-6`, in more steps than `"newton"`, each cheaper.
    - `vploss.KernelNewton()` or `"kernel-newton"`: the Newton step of `"newton"`
        in the span of the features' rows (fewer samples than coefficients, $N <
        m + 1$): an `(Nk, Nk)` Hessian, never the `(m+1, m+1)` Gram matrix.
    - `vploss.BudgetedNewtonCG()` or `"budgeted-newton-cg"`: the inexact mode for
        mini-batch training loops: one Newton–CG update (`max_steps`, default 1) of at
        most 10 CG iterations from `init`, with rigorous error bounds of the loss,
        readout and gradient in `readout.stats`; a spent budget is
        `RESULTS.budget_spent`, not an error.
    - `vploss.QuasiNewton(optx.BFGS(rtol=0.0, atol=0.0))`, or `"bfgs"`, `"lbfgs"`:
        `optimistix.BFGS` / `optimistix.LBFGS`. Their Armijo line
        search cannot resolve the objective's last digits, so they often stall above
        the default `gtol`: pass a larger `gtol`.
    - an `optimistix.AbstractMinimiser` instance (e.g. `optx.BFGS(rtol, atol)`): used
        as it is, with its own stopping rule; it counts as converged when it reports
        success and the gradient is below `gtol`.
    - `vploss.AutoNewton()` or `"auto"` (default): `"newton"` while one exact
        Hessian costs at most `MAX_EXACT_NEWTON_COST = 220` Hessian-vector products
        (see `vploss.AutoNewton`: one output up to about m = 1500), else
        `"newton-cg"`; `"kernel-newton"` where its step is cheaper (wide features,
        from about m = 2N).

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`: an array or any pytree of arrays
        the model takes (of any dtype: token ids, pixels, masks), with one batch size N.
    - `y`: labels in [0, 1], shape `(N,)` or `(N, k)` (hard 0/1 labels or
        probabilities; for ±1 labels pass `(y + 1) / 2`).
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout (bias included), `> 0`.
    - `weights`: per-sample weights $w_j \ge 0$, shape `(N,)`, or `None`: the data
        term becomes the weighted mean $\sum_j w_j\ell_j / \sum_j w_j$ (integer
        weights equal repeated samples, zero weights dropped ones).
    - `use_bias`: whether the readout has a bias $b$.
    - `solver`: as above.
    - `gtol`: with a solver name, the tolerance on the max-norm of the gradient of
        the inner objective, each coefficient row divided by $\min(1,
        \sqrt{\frac1N\sum_j \hat f_{jp}^2 + \alpha_2})$ (so that features of size
        1e-6 are solved as accurately as features of size 1; larger features are held to the plain
        max-norm); default `sqrt(eps)` of the dtype (3.5e-4 in float32, 1.5e-8 in float64;
        Newton's last step usually lands far below it). `readout.stats.gradient_norm`
        is scaled the same way. The solve also stops only once the loss is within
        $\sqrt{\varepsilon}\,|J| + 16\varepsilon(1 + |J|)$ of its minimum, by the
        bound `readout.stats.loss_error_bound` (the smaller of $|\nabla J|_2^2 /
        (2\alpha_2)$ and the Newton decrement's), so the loss does not depend on the
        warm start beyond that.
    - `max_steps`: with a solver name, the step budget of the inner solver (default
        100; 1 for `"budgeted-newton-cg"`). A solver object carries its own `gtol` and
        `max_steps`.
    - `throw`: if `True`, an inner solve that did not converge raises a runtime error
        (`eqx.error_if`); if `False`, read `readout.stats.converged`.
    - `init`: a warm start: the readout returned by a previous call (e.g. the last
        training step's), or `None` to start from zero.

    **Returns:**

    `(loss, readout)`: the reduced loss (a scalar) and the fitted `VPLinear`, whose
    `readout(model(x[j]))` are the logits of `y[j]` (apply `jax.nn.sigmoid` for
    probabilities), and whose `readout.stats` is a `vploss.InnerStats` (`num_steps`,
    `gradient_norm`, `converged`, `loss_error_bound`, `fallback_steps`). The loss
    carries its envelope gradient, the readout its implicit derivative (a solve with
    the inner Hessian; free when unused).

    The loss and the readout are in the working dtype: the features' dtype, promoted
    by floating-point labels and to at least float32 (a bfloat16 or float16 model is
    solved in float32); gradients come back in the dtype of each parameter.

    **Raises:**

    `TypeError`/`ValueError` at trace time for wrong shapes, dtypes or
    hyperparameters; a runtime error (`eqx.error_if`) for labels outside [0, 1],
    non-finite features, or (with `throw=True`) a solve that did not converge.
    """
    return vploss_glm(
        SigmoidBinaryCrossEntropy(),
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
