import functools
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, Real, Scalar

from ._checks import as_batch
from ._misc import matmul
from ._newton import (
    block_gram,
    class_grams,
    Curvature,
    fit_readout,
    glm_hessian_product,
    hessian_operator,
    SolverName,
)
from ._readout import VPLinear


SoftmaxArgs: TypeAlias = tuple[Float[Array, "N p"], Float[Array, "N K"], Scalar]


def ce_objective(coef: Float[Array, "p K"], args: SoftmaxArgs) -> Scalar:
    r"""$J(\hat W) = \frac1N\sum_j[\operatorname{logsumexp}(z_j) - \langle y_j,
    z_j\rangle] + \frac{\alpha_2}{2}\|\hat W\|^2$ with $Z = \hat F \hat W^\top$, `coef`
    $=\hat W^\top$."""
    features, labels, alpha2 = args
    logits = matmul(features, coef)
    log_partition = jax.nn.logsumexp(logits, axis=1)
    data = jnp.sum(log_partition - jnp.sum(labels * logits, axis=1)) / features.shape[0]
    return data + 0.5 * alpha2 * jnp.sum(coef**2)


def ce_hessian(coef: Float[Array, "p K"], args: SoftmaxArgs) -> lx.PyTreeLinearOperator:
    r"""The exact Hessian $\frac1N\sum_j (\operatorname{diag}(s_j) - s_j s_j^\top)
    \otimes \hat f_j \hat f_j^\top + \alpha_2 I$, $s_j = \operatorname{softmax}(z_j)$:
    its block-diagonal part and its rank-N part from one matmul over samples.

    In float32 its data part, singular on the shift direction of the logits, rounds
    to an indefinite matrix for features of large norm; `vploss_ce` solves in the
    basis `shift_basis` instead (`ce_rotated_hessian`)."""
    features, _, alpha2 = args
    num_samples, p = features.shape
    k = coef.shape[1]
    probabilities = jax.nn.softmax(matmul(features, coef), axis=1)
    weighted = (features[:, :, None] * probabilities[:, None, :]).reshape(num_samples, p * k)
    outer = matmul(weighted.T, weighted).reshape(p, k, p, k) / num_samples
    return hessian_operator(block_gram(features, probabilities) - outer, alpha2)


def ce_hessian_product(coef: Float[Array, "p K"], args: SoftmaxArgs) -> lx.FunctionLinearOperator:
    r"""The same Hessian as products $\hat F^\top(S \odot U - S \odot
    (S \odot U)\mathbf 1\mathbf 1^\top)/N + \alpha_2 V$, $U = \hat F V$."""
    features, _, alpha2 = args
    probabilities = jax.nn.softmax(matmul(features, coef), axis=1)
    curvature = jtu.Partial(_softmax_curvature, probabilities)
    return glm_hessian_product(features, alpha2, curvature, coef)


def _softmax_curvature(probabilities, directions):
    weighted = probabilities * directions
    return weighted - probabilities * jnp.sum(weighted, axis=1, keepdims=True)


def ce_mean_curvature(coef: Float[Array, "p K"], args: SoftmaxArgs) -> Float[Array, "K K"]:
    r"""$\frac1N\sum_j \operatorname{diag}(s_j) - s_j s_j^\top$."""
    features = args[0]
    probabilities = jax.nn.softmax(matmul(features, coef), axis=1)
    outer = matmul(probabilities.T, probabilities)
    return (jnp.diag(jnp.sum(probabilities, axis=0)) - outer) / features.shape[0]


@functools.cache
def shift_basis(num_classes: int) -> np.ndarray:
    r"""An orthonormal basis $T$ of $\mathbb R^K$ whose last vector is the shift
    direction $\mathbf 1/\sqrt K$ of the logits: the Householder reflection $T = I -
    2vv^\top/v^\top v$, $v = e_K - \mathbf 1/\sqrt K$ (symmetric, its own inverse),
    in float64 (read-only).

    In this basis the softmax loss's Hessian is block diagonal: the data term does
    not change along the shift (each $\operatorname{diag}(s_j) - s_j s_j^\top$
    annihilates $\mathbf 1$, and with rows $y_j$ that do not sum to 1 it is linear
    there), so the shift block is exactly $\alpha_2 I$, and the other $K - 1$ blocks
    hold the curvature $Q^\top(\operatorname{diag}(s_j) - s_j s_j^\top)Q$ with $Q$
    the first $K - 1$ columns of $T$, positive definite on the open simplex. Formed
    in the classes' basis, the data term's exact null space rounded to eigenvalues
    of either sign of size $\varepsilon\|\hat F\|^2$ (float32 pixels 0-255:
    about 3e-3, against `alpha2` = 1e-4): an indefinite Hessian."""
    v = -np.full(num_classes, 1 / np.sqrt(num_classes))
    v[-1] += 1
    basis = np.eye(num_classes) - 2 * np.outer(v, v) / (v @ v)
    basis.setflags(write=False)
    return basis


def _in_classes(coef: Float[Array, "p K"]) -> Float[Array, "p K"]:
    """Coefficients in the basis `shift_basis` as coefficients of the classes."""
    return matmul(coef, jnp.asarray(shift_basis(coef.shape[1]), coef.dtype))


def ce_rotated_objective(coef: Float[Array, "p K"], args: SoftmaxArgs) -> Scalar:
    """`ce_objective` of the coefficients in the basis `shift_basis`."""
    return ce_objective(_in_classes(coef), args)


def ce_rotated_hessian(coef: Float[Array, "p K"], args: SoftmaxArgs) -> lx.PyTreeLinearOperator:
    r"""The exact Hessian of `ce_rotated_objective`: $\frac1N\sum_j C_j \otimes \hat
    f_j \hat f_j^\top + \alpha_2 I$ with $C_j = Q^\top(\operatorname{diag}(s_j) - s_j
    s_j^\top)Q$ in the first $K - 1$ outputs and zero in the last (the shift; see
    `shift_basis`). Its block-diagonal part from the per-class Gram matrices
    (`class_grams`, one matmul over samples), its rank-N part from one more."""
    features, _, alpha2 = args
    num_samples, p = features.shape
    k = coef.shape[1]
    basis = jnp.asarray(shift_basis(k)[:, :-1], features.dtype)
    probabilities = jax.nn.softmax(matmul(features, _in_classes(coef)), axis=1)
    grams = class_grams(features, probabilities)
    diagonal = jnp.einsum(
        "ab,ac,paq->pbqc", basis, basis, grams, precision=jax.lax.Precision.HIGHEST
    )
    projected = matmul(probabilities, basis)
    weighted = (features[:, :, None] * projected[:, None, :]).reshape(num_samples, -1)
    outer = matmul(weighted.T, weighted).reshape(p, k - 1, p, k - 1) / num_samples
    data = jnp.pad(diagonal - outer, ((0, 0), (0, 1), (0, 0), (0, 1)))
    return hessian_operator(data, alpha2)


def ce_rotated_hessian_product(
    coef: Float[Array, "p K"], args: SoftmaxArgs
) -> lx.FunctionLinearOperator:
    r"""The same Hessian as products (`ce_hessian_product` in the first $K - 1$
    outputs of the basis, $\alpha_2 V$ in the last)."""
    features, _, alpha2 = args
    k = coef.shape[1]
    basis = jnp.asarray(shift_basis(k)[:, :-1], features.dtype)
    probabilities = jax.nn.softmax(matmul(features, _in_classes(coef)), axis=1)
    apply = jtu.Partial(_rotated_product, features, alpha2, probabilities, basis)
    structure = jax.ShapeDtypeStruct(coef.shape, coef.dtype)
    return lx.FunctionLinearOperator(apply, structure, lx.positive_semidefinite_tag)


def _rotated_product(features, alpha2, probabilities, basis, vector):
    directions = matmul(features, matmul(vector[:, :-1], basis.T))
    curved = _softmax_curvature(probabilities, directions)
    data = matmul(matmul(features.T, curved), basis) / features.shape[0]
    return jnp.pad(data, ((0, 0), (0, 1))) + alpha2 * vector


def ce_rotated_mean_curvature(coef: Float[Array, "p K"], args: SoftmaxArgs) -> Float[Array, "K K"]:
    r"""$\frac1N\sum_j C_j$ in the basis `shift_basis` (zero in the shift)."""
    features = args[0]
    k = coef.shape[1]
    basis = jnp.asarray(shift_basis(k)[:, :-1], features.dtype)
    probabilities = jax.nn.softmax(matmul(features, _in_classes(coef)), axis=1)
    projected = matmul(probabilities, basis)
    diagonal = matmul(basis.T * jnp.sum(probabilities, axis=0), basis)
    mean = (diagonal - matmul(projected.T, projected)) / features.shape[0]
    return jnp.pad(mean, ((0, 1), (0, 1)))


_CE_CURVATURE = Curvature(ce_rotated_hessian, ce_rotated_hessian_product, ce_rotated_mean_curvature)


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
    try:
        labels = jnp.asarray(y)
    except TypeError as e:
        raise TypeError(f"`y` must be an array; got {type(y).__name__}.") from e
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


def vploss_ce(
    model: Callable[..., Any],
    x: Real[ArrayLike, "N ..."],
    y: Real[ArrayLike, " _N *K"],
    *,
    alpha1: Real[ArrayLike, ""] = 0.0,
    alpha2: Real[ArrayLike, ""],
    num_classes: int | None = None,
    use_bias: bool = True,
    solver: SolverName | optx.AbstractMinimiser = "auto",
    gtol: float | None = None,
    max_steps: int = 100,
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
    (strict convexity; it also fixes the shift invariance of the logits). The inner
    problem is solved to `gtol` and checked, and the gradient is the envelope
    gradient, exactly as in `vploss_bce`.

    **Solvers** (`solver=`): as in `vploss_bce`. The exact Hessian
    $\frac1N\sum_j(\operatorname{diag}(s_j) - s_j s_j^\top)\otimes\hat f_j\hat
    f_j^\top + \alpha_2 I$ has $(K(m+1))^2$ entries and costs $O(N K^2 m^2)$ per
    step, so `"auto"` uses `"newton"` while $K(m+1) \le$ `MAX_EXACT_NEWTON_SIZE =
    256` and `"newton-cg"` beyond: Hessian-vector products $\hat F^\top(S \odot U -
    S \odot (S \odot U)\mathbf 1\mathbf 1^\top)/N + \alpha_2 V$, $U = \hat F V$
    ($O(N K m)$ each), preconditioned by the Kronecker factors of the mean curvature
    $\frac1N\sum_j(\operatorname{diag}(s_j) - s_j s_j^\top)$ and the Gram matrix.
    Measured in float32 at K = 10, m = 64, N = 4096, converged at `alpha2` = 1e-4
    and 1e-6: a warm-started step (`init`, after 300 training steps) costs 2.2x a
    plain softmax head (exact Newton 13x), a cold one 7-20x. Pass `init`: warm
    starts save most of the work.

    **Arguments:**

    - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
        features, shape `(m,)` or a scalar.
    - `x`: the inputs, batch-first, shape `(N, ...)`, floating point.
    - `y`: integer class labels of shape `(N,)` in `[0, num_classes)`, or class
        probabilities of shape `(N, K)` whose rows sum to 1.
    - `alpha1`: penalty weight on the model's parameters, `>= 0`.
    - `alpha2`: penalty weight on the readout (bias included), `> 0`.
    - `num_classes`: K; required with integer labels.
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
    x = as_batch("x", x)
    labels, invalid, message = as_class_labels(y, x.shape[0], num_classes)
    return fit_readout(
        "the softmax loss `vploss_ce`",
        ce_rotated_objective,
        _CE_CURVATURE,
        model,
        x,
        labels,
        label_error=(invalid, message),
        scalar_output=False,
        alpha1=alpha1,
        alpha2=alpha2,
        use_bias=use_bias,
        solver=solver,
        gtol=gtol,
        max_steps=max_steps,
        throw=throw,
        init=init,
        basis=shift_basis,
    )
