r"""The sampled limited-memory Tikhonov (slimTik) readout of the ridge loss for mini-batch
training, with its penalty chosen by sampled generalised cross-validation (slimTrain)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Scalar, Shaped

from .._core.checks import (
    as_alpha,
    as_batch,
    as_flag,
    as_targets,
    batch_size,
    check_memory,
    RuntimeChecks,
)
from .._core.features import parameter_penalty, readout_features
from .._core.numerics import matmul
from .._core.penalty import as_penalty, choose_log_penalty, gcv_quotient, is_penalty_rule
from .._core.readout import readout_from_coefficients, VPLinear
from .._ridge.gcv import GCVStats
from .base import AbstractStochasticReadout


class SlimTikState(eqx.Module):
    r"""The state of a `SlimTik` readout between mini-batches: a pytree of arrays, so it
    passes through `jax.jit`, `jax.lax.scan` and `jax.vmap`, and saves with
    `eqx.tree_serialise_leaves`.

    **Fields:**

    - `coef`: the current readout $\hat W_k^\top = [W, b]^\top$, shape `(p, k)` (`p =
        m + 1` with a bias).
    - `grams`: the memory, the mean Gram matrices $\hat F_i^\top\hat F_i/n_i$ of the
        last `memory` batches' features, shape `(memory, p, p)`, a ring buffer
        (batches not yet seen are zero). Memory: `memory·p²` numbers.
    - `penalty`: the cumulative Tikhonov weight $a_k$ (see `SlimTik`).
    - `step`: the number $k$ of batches seen.
    """

    coef: Float[Array, "p k"]
    grams: Float[Array, "r p p"]
    penalty: Float[Array, ""]
    step: Int[Array, ""]


class _RegularisationPath(eqx.Module):
    r"""The slimTik update at every total penalty $a$ (its regularisation path),
    $\hat W(a) = \hat W_{k-1} - V(\Lambda + aI)^{-1}V^\top(g + (a - a_{k-1})\hat
    W_{k-1})$, from one eigendecomposition $S = V\Lambda V^\top$ of the memory, and its
    sampled GCV on the current batch."""

    eigenvalues: Float[Array, " p"]
    projected_features: Float[Array, "n p"]  # B = F̂_k V
    gradient: Float[Array, "p k"]  # Vᵀ g
    coef: Float[Array, "p k"]  # Vᵀ Ŵ_{k-1}
    residual: Float[Array, "n k"]  # F̂_k Ŵ_{k-1} − Y_k
    # The rounding of that residual and of its change, about eps·√(‖Y_k‖² + ‖F̂_kŴ_{k-1}‖²)
    # per entry (times p for the sums over coefficients): squared, summed, over n.
    cancelled: Scalar
    previous_penalty: Scalar

    def step(self, penalty: Float[Array, "*g"]) -> Float[Array, "*g p k"]:
        r"""$V^\top$ times the step $\hat W_{k-1} - \hat W(a)$, at each `penalty` $a$."""
        a = penalty[..., None, None]
        rhs = self.gradient + (a - self.previous_penalty) * self.coef
        return rhs / (self.eigenvalues[:, None] + a)

    def sgcv(self, log_penalty: Float[Array, "*g"]) -> tuple[Float[Array, "*g"], ...]:
        r"""`(sGCV, tr T, rounding)` at $a = $ `exp(log_penalty)`, elementwise: the sampled GCV
        $\frac1n\|\hat F_k\hat W(a) - Y_k\|_F^2 / (1 - \mathrm{tr}\,T(a)/n)^2$ with the
        influence matrix $T(a) = \hat F_k(S + aI)^{-1}\hat F_k^\top/n$ of the current
        batch's targets on its fitted values, and a bound on the rounding error of sGCV:
        `p·eps` relative, and that of the squared norm of the difference of the
        residual and the step's change, each rounded by `cancelled`."""
        penalty = jnp.exp(log_penalty)
        change = jnp.einsum(
            "np,...pk->...nk",
            self.projected_features,
            self.step(penalty),
            precision=jax.lax.Precision.HIGHEST,
        )
        num_samples = self.residual.shape[0]
        rss = jnp.sum((self.residual - change) ** 2, axis=(-2, -1)) / num_samples
        leverage = jnp.sum(self.projected_features**2, axis=0) / num_samples
        trace = jnp.sum(leverage / (self.eigenvalues + penalty[..., None]), axis=-1)
        slack = 1 - trace / num_samples
        # tr T < n for every a > 0 when the memory holds more than the current batch
        # or n > p; otherwise it tends to n as a → 0 (interpolation).
        value, safe = gcv_quotient(rss, slack)
        eps = jnp.finfo(value.dtype).eps
        # ‖x + δ‖² − ‖x‖² <= 2‖x‖‖δ‖ + ‖δ‖², with ‖δ‖² = `cancelled`.
        error = 2 * jnp.sqrt(rss * self.cancelled) + self.cancelled
        rounding = self.eigenvalues.shape[0] * eps * value + error / safe
        return value, trace, rounding


def slimtik_update(
    features: Float[Array, "n p"],
    targets: Float[Array, "n k"],
    state: SlimTikState,
    alpha2: float | None,
) -> tuple[Float[Array, "p k"], Scalar, GCVStats, Float[Array, "p p"]]:
    r"""One slimTik step on the current batch (features and targets are data, not
    differentiated): the new readout, the new cumulative penalty $a_k$ (by sampled GCV
    when `alpha2` is `None`, else $a_{k-1} + $ `alpha2`), its `GCVStats`, and the
    batch's mean Gram matrix (for the memory)."""
    num_samples = features.shape[0]
    gram = matmul(features.T, features) / num_samples
    memory = gram + jnp.sum(state.grams, axis=0)
    eigenvalues, eigenvectors = jnp.linalg.eigh(memory)
    # Rounding can leave tiny negative eigenvalues of this positive semidefinite matrix.
    eigenvalues = jnp.maximum(eigenvalues, 0)
    residual = matmul(features, state.coef) - targets
    p = features.shape[1]
    magnitude = jnp.sum(targets**2) + jnp.sum((residual + targets) ** 2)
    path = _RegularisationPath(
        eigenvalues=eigenvalues,
        projected_features=matmul(features, eigenvectors),
        gradient=matmul(eigenvectors.T, matmul(features.T, residual) / num_samples),
        coef=matmul(eigenvectors.T, state.coef),
        residual=residual,
        cancelled=(p * jnp.finfo(features.dtype).eps) ** 2 * magnitude / num_samples,
        previous_penalty=state.penalty,
    )
    if alpha2 is None:
        top = eigenvalues[-1]
        top = jnp.where(top > 0, top, 1)
        # From eps·tr S (below it the penalty is lost in the rounding of S + aI) to well
        # above both the data's scale and the previous penalty, where sGCV is flat.
        penalty = jnp.exp(
            choose_log_penalty(path.sgcv, jnp.trace(memory), 100 * top + 10 * state.penalty)
        )
    else:
        penalty = state.penalty + jnp.asarray(alpha2, features.dtype)
    value, trace, _ = path.sgcv(jnp.log(penalty))
    coef = state.coef - matmul(eigenvectors, path.step(penalty))
    return coef, penalty, GCVStats(alpha2=penalty, gcv=value, dof=trace), gram


class SlimTik(AbstractStochasticReadout[SlimTikState]):
    r"""The ridge readout of mini-batch VarPro with memory: the sampled limited-memory
    Tikhonov (slimTik) update of slimTrain (Newman, Chung, Chung & Ruthotto, "slimTrain
    — a stochastic approximation method for training separable deep neural networks",
    SIAM J. Sci. Comput. 44(4), 2022; Chung, Chung, Slagel & Tenorio, 2020), with the
    penalty chosen at every step by sampled generalised cross-validation (sGCV).

    A per-batch VarPro readout (`vploss_msereg` on each batch) is the best readout for
    that batch alone: noisy when the batch is not much larger than the number of
    features, undetermined when it is smaller. slimTik instead updates the readout with
    the current batch while remembering the curvature of the last $r$ = `memory`
    batches. With the augmented features $\hat F_k$ (`(n, p)`) and targets $Y_k$ of
    batch $k$, the mean Gram matrices $G_i = \hat F_i^\top\hat F_i/n_i$, the memory $S_k
    = G_k + \sum_{i=k-r}^{k-1}G_i$ and the cumulative penalty $a_k = a_{k-1} +
    \lambda_k$,

    $$\hat W_k = \hat W_{k-1} - (S_k + a_kI)^{-1}\Big(\tfrac1{n_k}\hat F_k^\top(\hat
    F_k\hat W_{k-1} - Y_k) + \lambda_k\hat W_{k-1}\Big),$$

    (readouts stored as $\hat W^\top$, `(p, k)`), the minimiser of the windowed problem

    $$\frac{1}{2n_k}\|\hat F_k\hat W - Y_k\|_F^2 + \frac12\sum_{i=k-r}^{k-1}\|\hat
    F_i(\hat W - \hat W_{k-1})\|_F^2/n_i + \frac{a_{k-1}}2\|\hat W - \hat W_{k-1}\|_F^2
    + \frac{\lambda_k}2\|\hat W\|_F^2:$$

    fit the current batch, and move little from the previous readout in the directions
    the remembered batches determined. Each batch counts once, whatever its size. With a
    memory covering every batch seen and $\lambda_k$ fixed at $\alpha_2$, $\hat W_k$ is
    exactly the ridge readout of all $k$ batches (with the features they had when
    seen) at penalty $\alpha_2$, the `vploss_msereg` of the union for equal batch sizes
    (recursive least squares); with a finite memory it is an approximation of it that
    forgets old features, which a training network changes.

    **Sampled GCV** (`alpha2="sgcv"`, default) chooses $a_k > 0$ (so $\lambda_k = a_k -
    a_{k-1}$ may be negative) at every step to minimise the generalised
    cross-validation estimate of the current batch's prediction error,

    $$\mathrm{sGCV}(a) = \frac{\frac1{n_k}\|\hat F_k\hat W_k(a) - Y_k\|_F^2}{(1 -
    \mathrm{tr}\,T(a)/n_k)^2},\qquad T(a) = \hat F_k(S_k + aI)^{-1}\hat F_k^\top/n_k,$$

    over a grid of $\log a$ from $\varepsilon\,\mathrm{tr}\,S_k$ (the smallest penalty
    the working precision resolves in $S_k + aI$) to $100\lambda_{\max}(S_k) +
    10a_{k-1}$, refined by golden-section search; one eigendecomposition of $S_k$ serves
    every $a$. Where sGCV is flat to within its rounding error (a batch the features
    fit exactly), the largest penalty on that flat part is taken, the best-conditioned
    update sGCV cannot tell from the best. So the readout needs neither a
    learning rate nor a penalty. On the first batch from a zero readout with `memory=0`
    it is ordinary GCV. A number `alpha2` fixes $\lambda_k = \alpha_2$ instead; then
    $a_k = k\alpha_2$ grows with the step, and with a finite memory the readout moves
    less and less (a decreasing step, as in the sampled Tikhonov methods, which converge
    to the Tikhonov solution of fixed data), which suits fixed features. For features
    that change, sGCV can lower $a_k$. Note that `readout.stats.alpha2` is the total
    $a_k$, not $\lambda_k$.

    **The gradient** for the network's parameters $\theta$ is that of the current
    batch's loss at the updated readout, held fixed (slimTrain):
    $\nabla_\theta\big[\frac1{2n_k}\|\hat F_k(\theta)\hat W_k - Y_k\|_F^2\big]$, one
    vector-Jacobian product of the model; the update itself is not differentiated.

    **Cost and memory.** Per step, one `(p, p)` eigendecomposition, two matmuls over
    the batch (the Gram matrix and the projected features) and the grid search
    ($O(n p k)$ per point). The state holds `memory` Gram matrices, `memory·p²` numbers
    ($r = 8$ and $m = 64$: 34,000), whatever the batch size.

    Like `vploss_msereg(solver="cholesky")` without its refinement, the update works
    with the Gram matrix: features with a large common offset (far from zero mean
    against their spread) lose accuracy in float32. The features of a network with a
    bounded activation, as in slimTrain, are fine.

    **Usage:**

    ```python
    readout = vploss.SlimTik(memory=8)
    state = readout.init(model, x[:batch], y[:batch])

    @eqx.filter_jit
    def step(model, opt_state, state, xb, yb):
        (loss, (fitted, state)), grads = eqx.filter_value_and_grad(
            readout.update, has_aux=True
        )(model, xb, yb, state)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, state, loss, fitted
    ```

    **Fields:**

    - `memory`: $r \ge 0$, the number of previous batches remembered (slimTrain used
        up to 10).
    - `alpha2`: `"sgcv"`, or a number $> 0$: $\lambda_k$ at every step.
    - `use_bias`: whether the readout has a bias $b$ (penalised like $W$).
    """

    memory: int = eqx.field(static=True, default=5)
    alpha2: float | str = eqx.field(static=True, default="sgcv")
    use_bias: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        check_memory(self.memory)
        as_penalty(self.alpha2, ("sgcv",), positive=True)
        as_flag("use_bias", self.use_bias)

    def init(
        self,
        model: Callable[..., Any],
        x: PyTree[ArrayLike],
        y: Shaped[ArrayLike, " _N *k"],
    ) -> SlimTikState:
        """The state before the first batch: a zero readout, an empty memory, $a_0 = 0$.

        **Arguments:**

        - `model`, `x`, `y`: the feature map and a batch, batch-first like the training
            batches (`x[:1]`, `y[:1]` will do: the batch size may differ), from which
            the shapes and the working dtype are read (the model is not run:
            `jax.eval_shape`).

        **Returns:**

        A `SlimTikState`.
        """
        x = as_batch("x", x)
        targets, _ = as_targets("y", y, batch_size(x))
        shape = jax.eval_shape(lambda: readout_features(model, x, targets, self.use_bias))
        (_, p), (_, k) = shape[0].shape, shape[1].shape
        dtype = shape[0].dtype
        return SlimTikState(
            coef=jnp.zeros((p, k), dtype),
            grams=jnp.zeros((self.memory, p, p), dtype),
            penalty=jnp.zeros((), dtype),
            step=jnp.zeros((), jnp.int32),
        )

    def update(
        self,
        model: Callable[..., Any],
        x: PyTree[ArrayLike],
        y: Shaped[ArrayLike, " _N *k"],
        state: SlimTikState,
        *,
        alpha1: ArrayLike = 0.0,
    ) -> tuple[Float[Array, ""], tuple[VPLinear, SlimTikState]]:
        r"""The slimTik step on the batch `(x, y)`: updates the readout, and returns the
        batch's loss at it for the gradient in the model's parameters.

        **Arguments:**

        - `model`: a callable (e.g. an `eqx.Module`) mapping ONE sample `x[j]` to its
            features, shape `(m,)` or a scalar.
        - `x`: the batch's inputs, batch-first, shape `(n, ...)`: an array or a pytree
            of arrays the model takes.
        - `y`: its targets, shape `(n,)` or `(n, k)`.
        - `state`: the `SlimTikState` from `init` or the previous `update`.
        - `alpha1`: penalty weight on the model's parameters, `>= 0`.

        **Returns:**

        `(loss, (readout, state))`, for `eqx.filter_value_and_grad(..., has_aux=True)`:
        the loss $\frac1{2n}\|\hat F\hat W_k - Y\|_F^2 + \frac{\alpha_1}2\|\theta\|^2$
        (its gradient in the model is that at the fixed updated readout), the updated
        `VPLinear` (its `stats` a `vploss.GCVStats`: $a_k$ as `alpha2`, the sGCV value
        and $\mathrm{tr}\,T(a_k)$) and the new state. The loss and the readout are in
        the working dtype (as `vploss_msereg`).

        **Raises:**

        `TypeError`/`ValueError` at trace time for wrong shapes or a state of another
        problem; a runtime error (`eqx.error_if`) when `x`, `y`, the features or the
        readout are not finite.
        """
        x = as_batch("x", x)
        targets, scalar_output = as_targets("y", y, batch_size(x))
        alpha1 = as_alpha("alpha1", alpha1, positive=False)
        if not isinstance(state, SlimTikState):
            raise TypeError(
                f"`state` must be the `SlimTikState` of `SlimTik.init`; got {type(state).__name__}."
            )
        features, targets = readout_features(model, x, targets, self.use_bias)
        expected = (features.shape[1], targets.shape[1])
        if state.coef.shape != expected or state.grams.shape != (
            self.memory,
            expected[0],
            expected[0],
        ):
            raise ValueError(
                f"`state` is for {state.coef.shape[0]} coefficients and "
                f"{state.coef.shape[1]} output(s) with a memory of "
                f"{state.grams.shape[0]} batches; this batch has {expected[0]} and "
                f"{expected[1]}, and this `SlimTik` a memory of {self.memory}. Make it "
                "with `init` from the same model and targets."
            )
        dtype = features.dtype
        state = jax.tree_util.tree_map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state
        )
        data = jax.lax.stop_gradient(features)
        fixed_alpha2 = None if is_penalty_rule(self.alpha2) else float(self.alpha2)
        coef, penalty, stats, gram = slimtik_update(
            data, jax.lax.stop_gradient(targets), state, fixed_alpha2
        )
        checks = RuntimeChecks(
            "the slimTik readout `SlimTik.update`", finite={"x": x, "y": targets}
        )
        # Attached to the readout the gradient reads, so the checks fire in a
        # gradient-only step too.
        _, coef = checks(stats.gcv, coef, None)
        residual = matmul(features, coef) - targets
        loss = 0.5 * jnp.mean(jnp.sum(residual**2, axis=1)) + parameter_penalty(
            model, alpha1.astype(dtype)
        )
        grams = state.grams
        if self.memory > 0:
            grams = grams.at[state.step % self.memory].set(gram)
        new_state = SlimTikState(coef=coef, grams=grams, penalty=penalty, step=state.step + 1)
        readout = readout_from_coefficients(coef, self.use_bias, scalar_output, stats)
        return loss, (readout, new_state)
