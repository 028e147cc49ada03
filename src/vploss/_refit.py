r"""The readout fitted on a whole data set streamed in batches, in O(m²) memory."""

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._core.checks import (
    as_array,
    as_batch,
    as_flag,
    as_targets,
    as_weights,
    batch_size,
    drop_zero_weight_samples,
)
from ._core.features import readout_features
from ._core.newton import (
    armijo_accepts,
    BACKTRACK_FACTOR,
    default_gtol,
    loss_error_bound,
    MAX_BACKTRACKS,
    newton_direction,
    scaled_gradient_norm,
)
from ._core.numerics import all_finite, matmul
from ._core.penalty import as_penalty, is_penalty_rule, PenaltyRule
from ._core.readout import readout_from_coefficients, VPLinear
from ._core.stats import InnerStats, RESULTS, solve_result
from ._loss_family import loss_family
from ._readout_losses.base import AbstractReadoutLoss, Labels
from ._readout_losses.evidence import EVIDENCE_RTOL, EVIDENCE_STEPS, evidence_update
from ._readout_losses.loss import as_readout_init
from ._readout_losses.objective import (
    gradient_scale,
    hessian_operator,
    ReadoutArgs,
    ReadoutObjective,
)
from ._ridge.gcv import centred_spectrum, primal_spectrum, spectrum_penalty
from ._ridge.intercept import centre, eliminated_row, with_intercept
from ._ridge.lstsq import gram_lstsq, gram_residual


class _Moments(eqx.Module):
    r"""The count (with per-sample weights, their total), the (weighted) column means
    and the (weighted) centred sums of products of one or more batches of features and
    targets, and of the targets' squares per column (without an intercept: uncentred,
    the means zero)."""

    count: Array
    mean: Float[Array, " m"]
    target_mean: Float[Array, " k"]
    gram: Float[Array, "m m"]
    cross: Float[Array, "m k"]
    target_squares: Float[Array, " k"]

    def __add__(self, other: "_Moments") -> "_Moments":
        r"""Merged moments (Chan, Golub & LeVeque, 1983): the centred sums of the union
        are those of the parts plus the product of the parts' mean differences, times
        $n_a n_b/(n_a + n_b)$ (with weights, the parts' total weights). A part of total
        weight zero changes nothing."""
        count = self.count + other.count
        weight = other.count / jnp.where(count > 0, count, 1)
        delta, target_delta = other.mean - self.mean, other.target_mean - self.target_mean
        between = self.count * weight
        return _Moments(
            count,
            self.mean + weight * delta,
            self.target_mean + weight * target_delta,
            self.gram + other.gram + between * jnp.outer(delta, delta),
            self.cross + other.cross + between * jnp.outer(delta, target_delta),
            self.target_squares + other.target_squares + between * target_delta**2,
        )


@eqx.filter_jit
def _ridge_moments(model, x, targets, use_bias, weights=None):
    r"""The moments of one batch (features without the ones column), weighted when
    `weights` is not `None`, and whether the batch is finite."""
    features, targets = readout_features(model, x, targets, False)
    if weights is None:
        count = jnp.asarray(features.shape[0], features.dtype)
        mean_weights = None
    else:
        weights = weights.astype(features.dtype)
        count = jnp.sum(weights)
        # A batch of total weight zero adds nothing (its sums are zero and it has no
        # weight in the merge); centre it at its plain means, not at 0/0.
        mean_weights = jnp.where(count > 0, weights, 1)
    data = centre(features, targets, mean_weights, use_bias)
    weighted = data.features if weights is None else weights[:, None] * data.features
    gram = matmul(weighted.T, data.features)
    cross = matmul(weighted.T, data.targets)
    weighted_targets = data.targets if weights is None else weights[:, None] * data.targets
    target_squares = jnp.sum(weighted_targets * data.targets, axis=0)
    moments = _Moments(count, data.mean, data.target_mean, gram, cross, target_squares)
    return moments, all_finite((x, gram, cross, target_squares))


def _readout_loss_sums(objective, model, x, labels, weights, coef, use_bias):
    r"""The sums over one batch of the (weighted) data term of a readout loss's inner
    objective, its gradient and its Hessian (as a `(pk, pk)` matrix) at `coef`, the
    (weighted) sums of squares of the features and the sum of the weights (the
    count without weights), and whether they are all finite."""
    features, labels = readout_features(model, x, labels, use_bias)
    dtype = features.dtype
    weights = None if weights is None else weights.astype(dtype)
    args = ReadoutArgs(features, labels, jnp.zeros((), dtype), weights, use_bias=use_bias)
    value, gradient = jax.value_and_grad(objective)(coef, args)
    curvature = objective.hessian(coef, args).as_matrix()
    n = features.shape[0]
    squares = features**2 if weights is None else features**2 * weights[:, None]
    total = jnp.asarray(n, dtype) if weights is None else jnp.sum(weights)
    sums = (n * value, n * gradient, n * curvature, jnp.sum(squares, axis=0), total)
    return sums, all_finite((x, sums))


@eqx.filter_jit
def _add_readout_loss_sums(sums, objective, model, x, labels, weights, coef, use_bias):
    """`sums` plus those of one batch (`_readout_loss_sums`), and whether the batch's
    are finite: one compiled function per batch shape, which every pass reuses (each
    eager operation between passes would compile its own kernel)."""
    batch, finite = _readout_loss_sums(objective, model, x, labels, weights, coef, use_bias)
    return jax.tree.map(jnp.add, sums, batch), finite


def _check_concrete(tree, what):
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
        raise TypeError(
            "`refit_readout` loops over the batches in Python (its passes are compiled "
            "functions), so it is called outside `jax.jit`, `jax.grad` and `jax.vmap`; "
            f"{what} is traced here. Call it on concrete arrays, e.g. after the training "
            "step returns."
        )


def _ridge_labels(y, num_samples):
    targets, scalar_output = as_targets("y", y, num_samples)
    return Labels(targets, scalar_output, jnp.array(False), "")


def _batches(batches, what, labels):
    r"""Checks and converts each `(x, y)` pair or `(x, y, w)` triple (all batches of
    one kind); yields `(index, x, labels, weights)`, `labels` a `Labels` and the
    weights `None` for pairs. Negative or non-finite weights are an error naming the
    batch; a batch's weights may sum to zero (the total over all batches is the
    caller's to check)."""
    count = 0
    size = None
    for index, batch in enumerate(batches):
        if not (isinstance(batch, tuple | list) and len(batch) in (2, 3)):
            raise TypeError(
                "`batches` must yield `(x, y)` pairs or `(x, y, w)` triples with per-sample "
                f"weights `w`; batch {index} is a {type(batch).__name__}"
                + (f" of length {len(batch)}." if isinstance(batch, tuple | list) else ".")
            )
        size = len(batch) if size is None else size
        if len(batch) != size:
            kinds = {2: "an `(x, y)` pair", 3: "an `(x, y, w)` triple"}
            raise ValueError(
                f"{what}: batch {index} is {kinds[len(batch)]}, but batch 0 was "
                f"{kinds[size]}: all batches must be of the same kind."
            )
        _check_concrete(batch, f"batch {index}")
        x = as_batch("x", batch[0])
        num_samples = batch_size(x)
        y = batch[1]
        weights = None
        count += 1
        if size == 3:
            weights, errors = as_weights(batch[2], num_samples, what=what, total=False)
            for flag, message in errors:
                if bool(flag):
                    raise ValueError(f"{what}: batch {index}: {message}")
            if weights is not None and not bool(jnp.any(weights > 0)):
                continue  # it adds nothing; its samples are never read
            # As in the losses: a sample of weight zero is never read.
            weights, x, y = drop_zero_weight_samples(weights, x, as_array("y", y))
        parsed = labels(y, num_samples)
        if bool(parsed.invalid):
            raise ValueError(f"`refit_readout`: batch {index}: {parsed.message}")
        yield index, x, parsed, weights
    if count == 0:
        raise ValueError("`batches` is empty: it must yield at least one `(x, y)` pair.")


def _check_shapes(index, y, scalar_output, first):
    if (y.shape[1], scalar_output) != first:
        raise ValueError(
            f"Batch {index} has targets with {y.shape[1]} column(s) (scalar: "
            f"{scalar_output}); the first batch had {first[0]} (scalar: {first[1]}). All "
            "batches must have targets of the same shape per sample."
        )


def _not_finite(index):
    return ValueError(
        f"Batch {index}: `x`, the features `model(x)` or the targets contain NaN or inf; "
        "clean or mask the data."
    )


def _refit_ridge(model, batches, penalty, use_bias):
    moments = first = None
    what = "`vploss_msereg`"
    for index, x, parsed, weights in _batches(batches, what, _ridge_labels):
        y, scalar_output = parsed.values, parsed.scalar_output
        first = first or (y.shape[1], scalar_output)
        _check_shapes(index, y, scalar_output, first)
        batch, finite = _ridge_moments(model, x, y, use_bias, weights)
        if not bool(finite):
            raise _not_finite(index)
        moments = batch if moments is None else _merge_moments(moments, batch)
    # `_batches` raised on an empty iterable; it skips batches of total weight zero.
    if moments is None or first is None or not float(moments.count) > 0:
        raise ValueError(
            f"`weights` of {what} sum to zero over all batches: at least one sample needs "
            "a positive weight."
        )
    if is_penalty_rule(penalty):
        alpha2, stats = _moments_gcv(moments, use_bias)
    else:
        alpha2, stats = np.asarray(penalty, moments.gram.dtype), None
    coef, norm = _moments_readout(moments, alpha2, use_bias)
    if not math.isfinite(float(norm)):
        raise ValueError(
            f"`refit_readout` for {what}: the readout is not finite (scaled gradient norm "
            f"{float(norm)}): the features' sums overflow their dtype, or `alpha2` = 0 "
            "leaves them singular. Scale the features, compute in float64, or increase "
            "`alpha2`."
        )
    return readout_from_coefficients(coef, use_bias, first[1], stats)


_merge_moments = jax.jit(_Moments.__add__)


@functools.partial(jax.jit, static_argnums=1)
def _moments_gcv(moments, use_bias):
    r"""The GCV penalty of the data the moments summarise and its `GCVStats`: the same
    curve as `vploss_msereg(..., alpha2="gcv")` on the concatenated batches, from the
    centred mean sums (`centred_spectrum`; without a bias, the uncentred ones)."""
    n = moments.count
    sums = (moments.gram / n, moments.cross / n, jnp.sum(moments.target_squares) / n)
    if use_bias:
        spectrum = centred_spectrum(*sums, moments.mean, moments.target_mean, n)
    else:
        spectrum = primal_spectrum(*sums, n)
    return spectrum_penalty(spectrum)


@functools.partial(jax.jit, static_argnums=2)
def _moments_readout(moments, alpha2, use_bias):
    r"""The readout from the merged moments, through the centred problem (`intercept.py`;
    with an intercept, its Gram matrix is the centred one plus the eliminated
    intercept's rank-one term, `gram_lstsq`), and the scaled norm of its gradient."""
    n = moments.count
    gram, cross = moments.gram / n, moments.cross / n
    row = eliminated_row(moments.mean, moments.target_mean, alpha2) if use_bias else None
    weight = gram_lstsq(gram, cross, alpha2, refine_steps=2, row=row)
    gradient = -gram_residual(gram, cross, alpha2, row, weight)
    mean_square = jnp.diag(moments.gram) / n + moments.mean**2
    if use_bias:
        residual_mean = moments.target_mean - matmul(moments.mean, weight)
        weight = with_intercept(weight, residual_mean, alpha2)
        # The intercept is exactly optimal given the weights: its gradient is zero.
        gradient = jnp.concatenate([gradient, jnp.zeros_like(gradient[:1])])
        mean_square = jnp.concatenate([mean_square, jnp.ones_like(mean_square[:1])])
    return weight, scaled_gradient_norm(gradient, gradient_scale(mean_square, alpha2))


class _Evaluation(eqx.Module):
    r"""One pass over the data at `coef`: the mean data term, its gradient and its
    Hessian as a `(p, k, p, k)` matrix (the penalty not included), and the scale of
    each coefficient's gradient at penalty 0 (`gradient_scale` adds the penalty)."""

    value: Array
    gradient: Array
    curvature: Array
    squares: Array
    total: Array

    def objective(self, coef, alpha2):
        """The penalised objective, its gradient, its Hessian and the scaled norm of
        the gradient (the quantity `gtol` bounds)."""
        gradient = self.gradient + alpha2 * coef
        return (
            self.value + 0.5 * alpha2 * jnp.sum(coef**2),
            gradient,
            hessian_operator(self.curvature, alpha2),
            scaled_gradient_norm(gradient, gradient_scale(self.squares, alpha2)),
        )


class _NewtonResult(eqx.Module):
    coef: Array
    evaluation: _Evaluation
    passes: int = eqx.field(static=True)
    updates: int = eqx.field(static=True)
    fallbacks: int = eqx.field(static=True)
    found: bool = eqx.field(static=True)


def _refit_readout_loss(model, batches, loss, alpha2, use_bias, gtol, max_passes, init, throw):
    what = loss.name
    if iter(batches) is batches:
        raise TypeError(
            f"`refit_readout` for {what} makes several passes over the data, so `batches` "
            "must be re-iterable (a list, or an object whose `__iter__` starts a new pass "
            "each time, like most data loaders); got a one-shot iterator "
            f"({type(batches).__name__})."
        )

    # The shapes and dtype of the problem, from the first batch of positive weight.
    first_batch = next(_batches(batches, what, loss.labels), None)
    if first_batch is None:
        raise ValueError(
            f"`weights` of {what} sum to zero over all batches: at least one sample "
            "needs a positive weight."
        )
    _, x, parsed, _ = first_batch
    y = parsed.values
    features = jax.eval_shape(lambda x, y: readout_features(model, x, y, use_bias)[0], x, y)
    dtype = features.dtype
    first = (y.shape[1], parsed.scalar_output)
    shape = (features.shape[1], y.shape[1])
    objective = ReadoutObjective(loss)

    zero_sums = None

    def evaluate(coef):
        """One pass: the data term and its derivatives at `coef` (`_Evaluation`)."""
        nonlocal zero_sums
        sums = zero_sums
        for index, x, parsed, weights in _batches(batches, what, loss.labels):
            _check_shapes(index, parsed.values, parsed.scalar_output, first)
            args = (objective, model, x, parsed.values, weights, coef, use_bias)
            if zero_sums is None:
                shapes, _ = eqx.filter_eval_shape(_readout_loss_sums, *args)
                zero_sums = sums = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
            sums, finite = _add_readout_loss_sums(sums, *args)
            if not bool(finite):
                raise _not_finite(index)
        if sums is None or not float(sums[-1]) > 0:
            raise ValueError(
                f"`weights` of {what} sum to zero over all batches: at least one sample "
                "needs a positive weight."
            )
        return _evaluation(sums, shape)

    def newton(coef, evaluation, alpha2, passes):
        r"""The damped Newton method of the one-shot losses (`newton.py`: its
        direction, line-search test and constants), its loop in Python as the batches
        stream from an iterable: every evaluation, trial points included, is one pass
        over the data. `passes` counts those made so far, against `max_passes`."""
        value, gradient, hessian, norm = _objective(evaluation, coef, alpha2)
        updates = fallbacks = 0
        found = True
        while found and passes < max_passes and float(norm) > gtol:
            direction, is_newton, predicted = _newton_update(hessian, gradient)
            fallbacks += int(not bool(is_newton))
            found = False
            for backtracks in range(min(MAX_BACKTRACKS + 1, max_passes - passes)):
                size = BACKTRACK_FACTOR**backtracks
                trial = _trial_point(coef, direction, size)
                trial_evaluation = evaluate(trial)
                passes += 1
                trial_objective = _objective(trial_evaluation, trial, alpha2)
                if bool(_armijo_accepts(value, trial_objective[0], size * predicted)):
                    coef, evaluation = trial, trial_evaluation
                    value, gradient, hessian, norm = trial_objective
                    updates += 1
                    found = True
                    break
        return _NewtonResult(coef, evaluation, passes, updates, fallbacks, found)

    gtol = default_gtol(dtype) if gtol is None else gtol
    coef = as_readout_init(init, objective, use_bias, shape, dtype)
    coef = jnp.zeros(shape, dtype) if coef is None else coef
    evaluation = evaluate(coef)
    evidence = is_penalty_rule(alpha2)
    if evidence:
        # MacKay's fixed point from a penalty 1% of the data Hessian's mean eigenvalue,
        # each solve warm-started at the last; every solve gets `max_passes`.
        size = shape[0] * shape[1]
        curvature = np.asarray(evaluation.curvature).reshape(size, size)
        penalty = max(0.01 * float(np.trace(curvature)) / size, float(jnp.finfo(dtype).tiny))
        penalty = np.asarray(penalty, dtype)
        for _ in range(EVIDENCE_STEPS):
            solve = newton(coef, evaluation, penalty, 1)
            coef, evaluation = solve.coef, solve.evaluation
            new_penalty, _ = _evidence_update(evaluation.curvature, coef, penalty, evaluation.total)
            settled = abs(float(new_penalty) / float(penalty) - 1) <= EVIDENCE_RTOL
            penalty = new_penalty
            if settled:
                break
        else:
            if throw:
                raise RuntimeError(
                    f"`refit_readout` for {what}: the evidence fixed point did not settle "
                    f"within {EVIDENCE_STEPS} updates (last penalty {float(penalty):.3e}). "
                    "Pass a number `alpha2`, or `throw=False` and inspect `readout.stats`."
                )
            settled = False
        solve = newton(coef, evaluation, penalty, 1)
        alpha2 = penalty
    else:
        alpha2 = np.asarray(alpha2, dtype)
        solve = newton(coef, evaluation, alpha2, 1)
        settled = True
    coef, evaluation = solve.coef, solve.evaluation
    _, gradient, _, norm = _objective(evaluation, coef, alpha2)
    converged = float(norm) <= gtol
    if throw and not converged:
        cause = (
            f"within {max_passes} passes" if solve.passes >= max_passes else "(no line-search step)"
        )
        raise RuntimeError(
            f"`refit_readout` for {what} did not converge {cause} (scaled gradient norm "
            f"{float(norm):.2e} > gtol = {gtol:.2e}). Raise `max_passes`, increase "
            "`alpha2`, or pass `throw=False` and inspect `readout.stats`."
        )
    spent = solve.found or solve.passes >= max_passes
    failure = RESULTS.nonlinear_max_steps_reached if spent else RESULTS.line_search_failed
    stats = _readout_loss_stats(
        gradient,
        norm,
        alpha2,
        converged and settled,
        failure,
        np.asarray(solve.updates, np.int32),
        np.asarray(solve.fallbacks, np.int32),
    )
    coef = _in_outputs(objective, coef)
    return readout_from_coefficients(coef, use_bias, first[1], stats)


@jax.jit
def _readout_loss_stats(gradient, norm, alpha2, converged, failure, updates, fallbacks):
    """The `InnerStats` of a streamed Newton solve (jitted: one compiled function where
    each eager operation would compile its own kernel)."""
    return InnerStats(
        num_steps=updates,
        gradient_norm=norm,
        result=solve_result(converged, fallbacks, failure),
        alpha2=alpha2,
        loss_error_bound=loss_error_bound(gradient, alpha2),
        fallback_steps=fallbacks,
        cg_steps=jnp.zeros((), jnp.int32),
        readout_error_bound=jnp.sqrt(jnp.sum(gradient**2)) / alpha2,
        # Nothing is differentiated, so no envelope gradient is bounded.
        gradient_error_bound=jnp.full((), jnp.inf, gradient.dtype),
    )


# The steps of the streamed Newton method between passes, each compiled once (eager
# operations would compile a kernel each: about 70 of them, seconds on a first call).
@functools.partial(jax.jit, static_argnums=1)
def _evaluation(sums, shape):
    """The means of one pass's sums (`_add_readout_loss_sums`) as an `_Evaluation`."""
    *sums, total = sums
    value, gradient, curvature, squares = (s / total for s in sums)
    return _Evaluation(value, gradient, curvature.reshape(*shape, *shape), squares, total)


_objective = jax.jit(_Evaluation.objective)
_in_outputs = eqx.filter_jit(ReadoutObjective.in_outputs)
_armijo_accepts = jax.jit(armijo_accepts)


@jax.jit
def _trial_point(coef, direction, size):
    return coef - size * direction


@jax.jit
def _newton_update(hessian, gradient):
    r"""The Newton direction (`newton_direction`), whether it is the plain one, and the
    decrease it predicts, $g^\top d$."""
    direction, is_newton = newton_direction(hessian, gradient)
    predicted = -jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST)
    return direction, is_newton, predicted


@jax.jit
def _evidence_update(curvature, coef, alpha2, count):
    r"""MacKay's update $\alpha \leftarrow \gamma/(S\|\hat W\|_F^2)$ (`evidence_penalty`)
    with the exact eigenvalues of the full data Hessian (streamed, so a `(pk, pk)`
    matrix is at hand): `(alpha_new, gamma)`."""
    size = coef.size
    eigenvalues = jnp.maximum(jnp.linalg.eigvalsh(curvature.reshape(size, size)), 0)
    return evidence_update(eigenvalues, coef, alpha2, count)


def refit_readout(
    model: Callable[..., Any],
    # Pairs or triples as tuples or lists (as data loaders yield them), checked in the body.
    batches: Iterable[Any],
    *,
    loss: Callable[..., Any] | AbstractReadoutLoss,
    alpha2: ArrayLike | PenaltyRule,
    num_classes: int | None = None,
    use_bias: bool = True,
    gtol: float | None = None,
    max_passes: int = 20,
    init: VPLinear | None = None,
    throw: bool = True,
) -> VPLinear:
    r"""Fits the readout of a trained feature map on a whole data set, streamed in
    batches, in memory independent of the number of samples.

    Mini-batch training returns with each step the readout fitted on that step's batch
    only, which is noisy. This solves the same inner problem as `loss` on all $N$
    samples at once, $\min_{\hat W} \frac1N\sum_j \ell(\hat W\hat f_j, y_j) +
    \frac{\alpha_2}{2}\|\hat W\|_F^2$, with $\hat f_j = [$`model(x_j)`$, 1]$, from
    sums over batches. The batches may carry per-sample
    weights $w_j \ge 0$ (`(x, y, w)` triples): then the data term is the weighted
    mean $\frac1S\sum_j w_j\ell(\hat W\hat f_j, y_j)$, $S = \sum_j w_j$ over all
    batches, the readout of `loss(..., weights=w)` on the concatenated data:

    - `loss=vploss_msereg`: one pass accumulates the column means and the centred
        sums $F_c^\top F_c$, $F_c^\top Y_c$ (with weights: the total weight, the
        weighted means and $F_c^\top DF_c$, $F_c^\top DY_c$, $D = \operatorname{diag}(w)$;
        merged across batches by Chan, Golub & LeVeque's update, so a large common
        offset of the features never enters a sum); the readout solves the centred
        normal equations of `vploss_msereg` (a scaled, shifted Cholesky factor with
        two steps of refinement) and sets
        the penalised intercept exactly. One pass; `batches` may be a one-shot
        iterator.
    - a readout loss (the `vploss_*` function of one in `READOUT_LOSSES`, or an
        `AbstractReadoutLoss`): damped Newton on the full objective. Each pass
        accumulates its value, gradient and Hessian (the same functions as the
        one-shot losses' `"newton"` solver); the Newton step solves the Hessian by
        Cholesky, and a backtracking (Armijo) line search checks each trial point
        with another pass. From zero, about 5-12 passes; from `init` (e.g. the last
        training step's readout), a few. Stops when the gradient meets the one-shot
        losses' test (`gtol`). `batches` must be re-iterable: a list, or an object
        whose `__iter__` starts a new pass each time (most data loaders); a one-shot
        iterator (a generator) is refused.

    Memory: one batch plus $O((m+1)^2)$ for the ridge loss, $O(((m+1)k)^2)$ for the
    Hessian of a readout loss ($k$ outputs or classes). Each batch's sums are
    computed by a jitted function (compiled once per batch shape); the loop over
    batches runs in Python, so this function is called outside `jax.jit`, `jax.grad`
    and `jax.vmap` (a traced argument is a `TypeError` saying so). The sums are
    accumulated in the working dtype (the features' dtype, promoted by floating-point
    targets and to at least float32, so a bfloat16 or float16 model is solved in
    float32, and so is its readout): use float64 for very large data sets in float32
    if the digits matter.

    **Arguments:**

    - `model`: the trained feature map, mapping ONE sample to its features.
    - `batches`: an iterable of `(x, y)` pairs, `x` batch-first and `y` as `loss`
        takes it; batches may differ in size. Or `(x, y, w)` triples with per-sample
        weights `w >= 0` of shape `(len(x),)` (every batch a triple; a batch's weights
        may sum to zero, not all of them): the data term is then the weighted mean.
    - `loss`: `vploss.vploss_msereg`, the `vploss_*` function of a readout loss (the
        table `READOUT_LOSSES`, listed on the page "Losses") or any readout loss object
        (`vploss.AbstractReadoutLoss`, e.g. `vploss.SoftmaxCrossEntropy(10)`): the
        inner problem to solve.
    - `alpha2`: the readout penalty (the one used in training), or the rule that
        chose it in training, applied to the whole data set:
        - for `vploss_msereg`, a number `>= 0`, or `"gcv"` (as
            `vploss_msereg(..., alpha2="gcv")`: generalised cross-validation, from the
            same centred sums, so the curve is that of the concatenated batches) or
            `"sgcv"` (`SlimTik`'s sampled GCV estimates this curve from batches; on
            the whole data set it is computed exactly, as `"gcv"`);
        - for a readout loss, a number `> 0`, or `"evidence"` (as `WindowedReadout`'s
            default): MacKay's fixed point of the Laplace evidence,
            $\alpha \leftarrow \gamma/(S\|\hat W_\alpha\|_F^2)$, $\gamma =
            \sum_i\mu_i/(\mu_i + \alpha)$, with the exact eigenvalues $\mu_i$ of the
            full data Hessian that each pass accumulates; from 1% of their mean, each
            Newton solve warm-started at the last, until one update changes
            $\alpha$ by under 0.1% (at most 50 updates).
    - `num_classes`: K, for `vploss_ce` with integer labels.
    - `use_bias`: whether the readout has a bias.
    - `gtol`: a readout loss's tolerance on the scaled gradient norm (as in
        `vploss_bce`); default `sqrt(eps)` of the dtype.
    - `max_passes`: the budget of passes over the data (readout losses): the first
        evaluates the start and each further one a trial step, so `max_passes=k`
        allows at most `k - 1` Newton updates.
    - `init`: a readout to start Newton from, e.g. the last training step's.
    - `throw`: whether a Newton solve that did not converge raises `RuntimeError`;
        with `False` read `readout.stats.converged`.

    **Returns:**

    The fitted `VPLinear`, predicting like the one `loss` returns and of the same
    pytree structure (its `stats` of the same kind). For the ridge loss, `stats` is
    `None`, or with `alpha2="gcv"` the `vploss.GCVStats` of the chosen penalty. For a
    readout loss, `vploss.InnerStats`: `num_steps` counts the Newton updates (accepted
    steps; of the last solve for `"evidence"`), with the penalty used (`alpha2`, the
    fixed point for `"evidence"`), the scaled gradient norm of the full objective at
    the returned readout, and whether it met `gtol` (and the fixed point settled).

    **Raises:**

    `TypeError`/`ValueError` for bad arguments, batches that are not `(x, y)` pairs or
    `(x, y, w)` triples (or a mix), targets whose shape changes between batches,
    invalid labels, weights of the wrong shape or dtype, negative or not finite, or
    summing to zero over all batches, or non-finite data or features (naming the
    batch), or a ridge readout that is not finite; `RuntimeError` as described for
    `throw`, and for an evidence fixed point that does not settle.
    """
    _check_concrete((model, alpha2), "the model or `alpha2`")
    use_bias = as_flag("use_bias", use_bias)
    throw = as_flag("throw", throw)
    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ValueError(f"`max_passes` must be a positive Python int; got {max_passes!r}.")
    if gtol is not None and (isinstance(gtol, bool) or not isinstance(gtol, int | float)):
        raise ValueError(f"`gtol` must be a positive Python float or None; got {gtol!r}.")
    if gtol is not None and not gtol > 0:
        raise ValueError(f"`gtol` must be a positive Python float or None; got {gtol!r}.")
    readout_loss = loss_family(loss, num_classes).readout_loss
    if readout_loss is None:
        penalty = as_penalty(alpha2, ("gcv", "sgcv"), positive=False)
        return _refit_ridge(model, batches, penalty, use_bias)
    alpha2 = as_penalty(alpha2, ("evidence",), positive=True)
    return _refit_readout_loss(
        model, batches, readout_loss, alpha2, use_bias, gtol, max_passes, init, throw
    )
