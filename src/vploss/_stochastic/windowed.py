r"""The stochastic readout of a readout loss (any `AbstractReadoutLoss`, the package's
or your own) for mini-batch training: the exact readout of a sliding window of
batches, with its penalty chosen by the evidence."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Real

from .._core.checks import (
    as_alpha,
    as_batch,
    as_flag,
    batch_size,
    check_memory,
    RuntimeChecks,
)
from .._core.envelope import envelope_minimise
from .._core.features import parameter_penalty, readout_features
from .._core.numerics import matmul, normalised_weights, weighted_mean
from .._core.penalty import as_penalty, is_penalty_rule
from .._core.readout import readout_from_coefficients, VPLinear
from .._readout_losses.base import AbstractReadoutLoss
from .._readout_losses.evidence import evidence_penalty
from .._readout_losses.loss import check_readout_loss
from .._readout_losses.objective import ReadoutArgs, ReadoutObjective
from .._readout_losses.solvers import AbstractGLMSolver, as_readout_solver, InnerMinimise
from .base import AbstractStochasticReadout


#: The evidence update moves the penalty by at most this factor per step: one step's
#: fixed-point update from a readout fitted at the previous penalty, damped so that a
#: batch that happens to be separable (a large readout, a small update) cannot throw
#: the penalty far from where the previous batches put it.
_MAX_PENALTY_FACTOR = 10.0


class WindowedState(eqx.Module):
    r"""The state of a `WindowedReadout` between mini-batches: a pytree of arrays (for
    `jax.jit`, `jax.lax.scan`, `jax.vmap`, `eqx.tree_serialise_leaves`).

    **Fields:**

    - `coef`: the current readout's coefficients $\hat W^\top$ in the loss's basis
        (`ReadoutObjective`), shape `(p, k)`; the warm start of the next solve.
    - `features`: the memory, the last `memory` batches' augmented features as they
        were when seen, shape `(memory, n, p)`, a ring buffer.
    - `labels`: their labels as the loss reads them, shape `(memory, n, k)`.
    - `filled`: which slots of the ring buffer hold a batch, shape `(memory,)`.
    - `alpha2`: the readout penalty of the next solve.
    - `step`: the number of batches seen.

    Memory: `memory·n·(p + k)` numbers for batches of `n` samples.
    """

    coef: Float[Array, "p k"]
    features: Float[Array, "r n p"]
    labels: Real[Array, "r n k"]
    filled: Bool[Array, " r"]
    alpha2: Float[Array, ""]
    step: Int[Array, ""]


class WindowedReadout(AbstractStochasticReadout[WindowedState]):
    r"""The readout of a readout loss (any `AbstractReadoutLoss`: one of the package's,
    listed on the page "Readout losses" of the API reference, e.g.
    `vploss.SoftmaxCrossEntropy(num_classes=K)`, or your own) for mini-batch training,
    with memory and an automatic penalty: the stochastic analogue for these losses of the
    ridge loss's `SlimTik`.

    **The rule.** At batch $k$ the readout is the exact minimiser of the loss over a
    sliding window, the current batch and the last $r$ = `memory` batches with the
    features they had when seen (the memory; the network has moved since),

    $$\hat W_k = \operatorname*{argmin}_{\hat W}\ \frac{1}{|\mathcal W_k|}\sum_{j\in
    \mathcal W_k}\ell(\hat W\hat f_j, y_j) + \frac{\alpha_k}{2}\|\hat W\|_F^2,$$

    solved by Newton's method (`solver`, warm-started from $\hat W_{k-1}$: usually 1-3
    steps). A per-batch readout (`vploss_bce` on each batch) fits $n$ samples with $pk$
    unknowns; the window fits $(r+1)n$, so its readout jumps less between batches and
    is determined even when the batch is smaller than the number of features. Like
    `SlimTik`'s memory, it is Newton's method on the current batch plus the curvature
    of the last $r$ batches: where `SlimTik` keeps the ridge loss's exact curvature (the
    Gram matrices) and anchors at the previous readout, this keeps the features and
    labels themselves, since the curvature of these losses moves with the readout.

    **The penalty** (`alpha2="evidence"`, default) follows MacKay's evidence fixed
    point (`evidence_penalty`): after the solve at $\alpha_k$,

    $$\alpha_{k+1} = \frac{\gamma_k}{|\mathcal W_k|\,\|\hat W_k\|_F^2}, \qquad
    \gamma_k = \sum_i\frac{\mu_i}{\mu_i + \alpha_k},$$

    with $\mu_i$ the eigenvalues of the data term's Hessian over the window (exact for
    the logistic and Poisson losses, a Kronecker factorisation for softmax), moved by
    at most a factor `10` per step and kept within $[\varepsilon s, 100 s]$, $s$ the
    mean squared norm of the features (a bound of the Gram matrix's largest
    eigenvalue). Its fixed point is a stationary point of the Laplace
    approximation of the evidence of the window's labels, so the penalty needs no
    tuning; it starts from `alpha2_init`. A number `alpha2` fixes it instead.

    **The gradient** for the network's parameters $\theta$ is that of the current
    batch's mean loss at the window's readout, held fixed: $\nabla_\theta\frac1n
    \sum_{j\in B_k}\ell(\hat W_k\hat f_j(\theta), y_j)$. It is the envelope gradient of
    the window's reduced loss in the current batch's features (up to the factor
    $|\mathcal W_k|/n$); the stored features are data.

    **Cost and memory.** The inner solve runs over $(r+1)n$ samples (about $r + 1$
    times a per-batch readout's; a Hessian costs $O((r+1)n(pk)^2)$ with exact Newton),
    and the evidence one `(p, p)` eigendecomposition per output (softmax: one `(p,
    p)` and one `(k, k)`). The state holds `memory·n·(p + k)` numbers, so every batch
    must have the size of the batch `init` saw (drop the last, short batch of an epoch).

    **Usage:**

    ```python
    readout = vploss.WindowedReadout(vploss.SoftmaxCrossEntropy(num_classes=10), memory=4)
    state = readout.init(model, x[:batch], y[:batch])
    (loss, (fitted, state)), grads = eqx.filter_value_and_grad(
        readout.update, has_aux=True
    )(model, xb, yb, state)
    ```

    **Fields:**

    - `loss`: the readout loss.
    - `memory`: $r \ge 0$, the number of previous batches in the window.
    - `alpha2`: `"evidence"` or a number $> 0$, the penalty.
    - `alpha2_init`: with `"evidence"`, the penalty of the first solve (default 1e-3).
    - `use_bias`: whether the readout has a bias $b$ (penalised like $W$).
    - `solver`: the inner solver, as `vploss_glm`'s `solver` (default `"auto"`); a
        solver object carries its tolerance and step budget (e.g.
        `vploss.Newton(gtol=1e-6, max_steps=50)`).
    - `throw`: whether an inner solve that did not converge is a runtime error (else
        read `readout.stats.converged`).
    """

    loss: AbstractReadoutLoss
    memory: int = eqx.field(static=True, default=4)
    alpha2: float | str = eqx.field(static=True, default="evidence")
    alpha2_init: float = eqx.field(static=True, default=1e-3)
    use_bias: bool = eqx.field(static=True, default=True)
    solver: AbstractGLMSolver = eqx.field(
        default="auto", converter=lambda s: as_readout_solver(s, None, None)
    )
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.loss, AbstractReadoutLoss):
            raise TypeError(f"`loss` must be a `vploss.AbstractReadoutLoss`; got {self.loss!r}.")
        check_memory(self.memory)
        as_penalty(self.alpha2, ("evidence",), positive=True)
        as_alpha("alpha2_init", self.alpha2_init, positive=True)
        as_flag("use_bias", self.use_bias)
        as_flag("throw", self.throw)

    def _problem(self, model, x, y):
        x = as_batch("x", x)
        labels = self.loss.labels(y, batch_size(x))
        features, values = readout_features(model, x, labels.values, self.use_bias)
        return x, labels, features, values

    def init(
        self, model: Callable[..., Any], x: PyTree[ArrayLike], y: Real[ArrayLike, " _N *k"]
    ) -> WindowedState:
        """The state before the first batch: a zero readout, an empty memory, the
        penalty `alpha2_init` (or `alpha2`).

        **Arguments:**

        - `model`, `x`, `y`: the feature map and a training batch (of the size every
            batch will have), from which the shapes and the working dtype are read (the
            model is not run: `jax.eval_shape`).

        **Returns:**

        A `WindowedState`.
        """
        features, values = jax.eval_shape(lambda: self._problem(model, x, y)[2:])
        (n, p), (_, k) = features.shape, values.shape
        dtype = features.dtype
        alpha2 = self.alpha2_init if is_penalty_rule(self.alpha2) else self.alpha2
        return WindowedState(
            coef=jnp.zeros((p, k), dtype),
            features=jnp.zeros((self.memory, n, p), dtype),
            labels=jnp.zeros((self.memory, n, k), values.dtype),
            filled=jnp.zeros(self.memory, bool),
            alpha2=jnp.asarray(alpha2, dtype),
            step=jnp.zeros((), jnp.int32),
        )

    def update(
        self,
        model: Callable[..., Any],
        x: PyTree[ArrayLike],
        y: Real[ArrayLike, " _N *k"],
        state: WindowedState,
        *,
        alpha1: Real[ArrayLike, ""] = 0.0,
    ) -> tuple[Float[Array, ""], tuple[VPLinear, WindowedState]]:
        r"""Fits the readout on the window of the batch `(x, y)` and the memory, and
        returns the batch's loss at it for the gradient in the model's parameters.

        **Arguments:**

        - `model`: a callable mapping ONE sample `x[j]` to its features.
        - `x`: the batch's inputs, batch-first, shape `(n, ...)`, of the size `init`
            saw.
        - `y`: its labels, as the loss reads them.
        - `state`: the `WindowedState` from `init` or the previous `update`.
        - `alpha1`: penalty weight on the model's parameters, `>= 0`.

        **Returns:**

        `(loss, (readout, state))`, for `eqx.filter_value_and_grad(..., has_aux=True)`:
        the batch's mean loss at the window's readout plus
        $\frac{\alpha_1}2\|\theta\|^2$, the `VPLinear` (its `stats` a
        `vploss.InnerStats` of the window's solve, at the penalty of the state passed in)
        and the new state (its `alpha2` the next step's penalty, so record the state's
        `alpha2` before the call for the penalty this step used).

        **Raises:**

        `TypeError`/`ValueError` at trace time for wrong shapes or a state of another
        problem; a runtime error (`eqx.error_if`) for invalid labels, non-finite inputs
        or features, or (with `throw`) a solve that did not converge.
        """
        if not isinstance(state, WindowedState):
            raise TypeError(
                "`state` must be the `WindowedState` of `WindowedReadout.init`; got "
                f"{type(state).__name__}."
            )
        alpha1 = as_alpha("alpha1", alpha1, positive=False)
        x, labels, features, values = self._problem(model, x, y)
        (n, p), k = features.shape, values.shape[1]
        if state.coef.shape != (p, k) or state.features.shape != (self.memory, n, p):
            raise ValueError(
                f"`state` is for batches of {state.features.shape[1]} samples with "
                f"{state.coef.shape[0]} coefficients and {state.coef.shape[1]} output(s) "
                f"and a memory of {state.features.shape[0]}; this batch has {n}, {p} and "
                f"{k}, and this `WindowedReadout` a memory of {self.memory}. Make the "
                "state with `init` from a batch of the training batches' size (drop a "
                "short last batch)."
            )
        dtype = features.dtype
        check_readout_loss(self.loss, values, dtype)
        data = jax.lax.stop_gradient(features)
        window_features = jnp.concatenate([state.features.astype(dtype).reshape(-1, p), data])
        window_labels = jnp.concatenate([state.labels.astype(dtype).reshape(-1, k), values])
        weights = None
        if self.memory > 0:
            stored = jnp.repeat(state.filled, n).astype(dtype)
            weights = normalised_weights(jnp.concatenate([stored, jnp.ones(n, dtype)]))
        alpha2 = state.alpha2.astype(dtype)
        args = ReadoutArgs(window_features, window_labels, alpha2, weights, use_bias=self.use_bias)
        objective = ReadoutObjective(self.loss)
        _, coef, stats = envelope_minimise(
            objective,
            InnerMinimise(self.solver),
            args,
            state.coef.astype(dtype),
            check=RuntimeChecks(
                f"the windowed readout of {self.loss.name}",
                errors=[(labels.invalid, f"In `WindowedReadout.update`: {labels.message}")],
                finite={"x": x},
                throw=self.throw,
            ),
        )
        in_outputs = objective.in_outputs(coef)
        per_sample = self.loss.loss(matmul(features, in_outputs), values)
        loss = jnp.mean(per_sample) + parameter_penalty(model, alpha1.astype(dtype))
        if is_penalty_rule(self.alpha2):
            alpha2 = self._evidence_update(objective, coef, args, n)
        memory = (state.features, state.labels, state.filled)
        if self.memory > 0:
            slot = state.step % self.memory
            memory = (
                state.features.at[slot].set(data),
                state.labels.at[slot].set(values.astype(state.labels.dtype)),
                state.filled.at[slot].set(True),
            )
        new_state = WindowedState(coef, *memory, alpha2=alpha2, step=state.step + 1)
        readout = readout_from_coefficients(in_outputs, self.use_bias, labels.scalar_output, stats)
        return loss, (readout, new_state)

    def _evidence_update(self, objective, coef, args, batch_size):
        """The next penalty by the damped and bounded evidence fixed point."""
        count = batch_size if args.weights is None else jnp.sum(args.weights > 0)
        proposal, _ = evidence_penalty(objective, coef, args, count)
        alpha2 = args.alpha2
        # The weighted mean squared norm of the features, an upper bound of the
        # largest eigenvalue of their Gram matrix.
        scale = jnp.sum(weighted_mean(args.features**2, args.weights))
        scale = jnp.where(scale > 0, scale, 1)
        eps = jnp.finfo(alpha2.dtype).eps
        proposal = jnp.where(jnp.isfinite(proposal), proposal, _MAX_PENALTY_FACTOR * alpha2)
        proposal = jnp.clip(proposal, alpha2 / _MAX_PENALTY_FACTOR, alpha2 * _MAX_PENALTY_FACTOR)
        return jnp.clip(proposal, eps * scale, 100 * scale)
