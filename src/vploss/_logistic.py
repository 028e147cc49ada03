from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, Real, Scalar

from ._checks import as_batch, as_targets
from ._misc import matmul
from ._newton import (
    block_gram,
    Curvature,
    fit_readout,
    glm_hessian_product,
    hessian_operator,
    SolverName,
)
from ._readout import VPLinear


LogisticArgs: TypeAlias = tuple[Float[Array, "N p"], Float[Array, "N k"], Scalar]


def bce_objective(coef: Float[Array, "p k"], args: LogisticArgs) -> Scalar:
    r"""$J(\hat W) = \frac1N\sum_{j,c}[\operatorname{softplus}(z_{jc}) - y_{jc} z_{jc}]
    + \frac{\alpha_2}{2}\|\hat W\|^2$ with $Z = \hat F \hat W^\top$, `coef` $=\hat
    W^\top$."""
    features, labels, alpha2 = args
    logits = matmul(features, coef)
    data = jnp.sum(jax.nn.softplus(logits) - labels * logits) / features.shape[0]
    return data + 0.5 * alpha2 * jnp.sum(coef**2)


def bce_hessian(coef: Float[Array, "p k"], args: LogisticArgs) -> lx.PyTreeLinearOperator:
    r"""The exact Hessian $\hat F^\top D_c \hat F/N + \alpha_2 I$ for each output $c$
    (block diagonal over outputs), $D_c = \operatorname{diag}(\sigma(z_c)(1 -
    \sigma(z_c)))$."""
    features, _, alpha2 = args
    gram = block_gram(features, _sigmoid_curvature(coef, features))
    return hessian_operator(gram, alpha2)


def _sigmoid_curvature(coef, features):
    probabilities = jax.nn.sigmoid(matmul(features, coef))
    return probabilities * (1 - probabilities)


def bce_hessian_product(coef: Float[Array, "p k"], args: LogisticArgs) -> lx.FunctionLinearOperator:
    r"""The same Hessian as products $\hat F^\top(D \odot \hat F V)/N + \alpha_2
    V$, $D_{jc} = \sigma(z_{jc})(1 - \sigma(z_{jc}))$."""
    features, _, alpha2 = args
    curvature = jtu.Partial(jnp.multiply, _sigmoid_curvature(coef, features))
    return glm_hessian_product(features, alpha2, curvature, coef)


def bce_mean_curvature(coef: Float[Array, "p k"], args: LogisticArgs) -> Float[Array, "k k"]:
    r"""$\operatorname{diag}(\frac1N\sum_j D_j)$ (the outputs are independent)."""
    return jnp.diag(jnp.mean(_sigmoid_curvature(coef, args[0]), axis=0))


_BCE_CURVATURE = Curvature(bce_hessian, bce_hessian_product, bce_mean_curvature)


def as_binary_labels(y: ArrayLike, num_samples: int) -> tuple[Array, bool, Scalar]:
    """Labels of shape `(N,)` or `(N, k)` as an `(N, k)` matrix, whether they were
    `(N,)`, and a flag that is true when a label lies outside [0, 1]."""
    labels, scalar_output = as_targets("y", y, num_samples)
    outside = ~jnp.all((labels >= 0) & (labels <= 1))
    return labels, scalar_output, outside


def vploss_bce(
    model: Callable[..., Any],
    x: Real[ArrayLike, "N ..."],
    y: Real[ArrayLike, " _N *k"],
    *,
    alpha1: Real[ArrayLike, ""] = 0.0,
    alpha2: Real[ArrayLike, ""],
    use_bias: bool = True,
    solver: SolverName | optx.AbstractMinimiser = "auto",
    gtol: float | None = None,
    max_steps: int = 100,
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

    **Solvers** (`solver=`), all optimistix minimisers stopped when
    $\max|\nabla J| \le$ `gtol`:

    - `"newton"`: Newton's method with a backtracking Armijo line search on the exact
        Hessian $\hat F^\top D_c \hat F/N + \alpha_2 I$ (one matmul per accepted
        step), solved by `lineax.Cholesky`. The search tolerates changes of the
        objective within its rounding, so a last step whose decrease is below it is
        taken, not refused. Quadratic convergence: about 5-12 steps from a cold
        start, 1-3 from a warm start.
    - `"newton-cg"`: truncated Newton: the same line search with the Newton step from
        `lineax.CG` on closed-form Hessian-vector products (two matmuls over samples,
        $O(N(m+1)k)$ each; the Hessian is never formed): at most
        5 CG iterations per step (20 for `gtol < 1e-5`), stopped at the relative
        residual `min(0.5, max(sqrt(|g|), gtol/(2|g|)))`, preconditioned by
        $(\bar A \otimes \hat F^\top\hat F/N + \alpha_2 I)^{-1}$ with $\bar A$
        the mean curvature in the logits (one Gram matrix per call). Converges in
        float32 down to `alpha2 = 1e-6`, in more steps than `"newton"`, each cheaper.
    - `"bfgs"`, `"lbfgs"`: `optimistix.BFGS` / `optimistix.LBFGS`. Their Armijo line
        search cannot resolve the objective's last digits, so they often stall above
        the default `gtol`: pass a larger `gtol`.
    - an `optimistix.AbstractMinimiser` instance (e.g. `optx.BFGS(rtol, atol)`): used
        as it is, with its own stopping rule; it counts as converged when it reports
        success and the gradient is below `gtol`.
    - `"auto"` (default): `"newton"` while the readout has at most
        `MAX_EXACT_NEWTON_SIZE = 256` coefficients $(m+1)k$, else `"newton-cg"`.

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`, floating point.
    - `y`: labels in [0, 1], shape `(N,)` or `(N, k)` (hard 0/1 labels or
        probabilities; for ±1 labels pass `(y + 1) / 2`).
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout (bias included), `> 0`.
    - `use_bias`: whether the readout has a bias $b$.
    - `solver`: as above.
    - `gtol`: tolerance on the max-norm of the gradient of the inner objective, each
        coefficient row divided by $\min(1, \sqrt{\frac1N\sum_j \hat f_{jp}^2 +
        \alpha_2})$ (so that features of size 1e-6 are solved as accurately as
        features of size 1; larger features are held to the plain max-norm);
        default `sqrt(eps)` of the dtype (3.5e-4 in float32, 1.5e-8 in float64;
        Newton's last step usually lands far below it). `readout.stats.gradient_norm`
        is measured the same way. The solve also stops only once the loss is within
        $\sqrt{\varepsilon}\,|J| + 16\varepsilon(1 + |J|)$ of its minimum, by the
        bound `readout.stats.loss_error_bound` (the smaller of $|\nabla J|_2^2 /
        (2\alpha_2)$ and the Newton decrement's), so the loss does not depend on the
        warm start beyond that.
    - `max_steps`: the step budget of the inner solver.
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
    x = as_batch("x", x)
    labels, scalar_output, outside = as_binary_labels(y, x.shape[0])
    return fit_readout(
        "the logistic loss `vploss_bce`",
        bce_objective,
        _BCE_CURVATURE,
        model,
        x,
        labels,
        label_error=(
            outside,
            "`vploss_bce`: labels `y` must be in [0, 1] (hard 0/1 labels or "
            "probabilities); for ±1 labels use `(y + 1) / 2`.",
        ),
        scalar_output=scalar_output,
        alpha1=alpha1,
        alpha2=alpha2,
        use_bias=use_bias,
        solver=solver,
        gtol=gtol,
        max_steps=max_steps,
        throw=throw,
        init=init,
    )
