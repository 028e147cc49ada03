r"""The generalised Gauss–Newton (GGN) matrix of a reduced VarPro loss as a matrix-free
operator (`vpggn`), and the Levenberg–Marquardt minimiser built on it from
optimistix's damped Newton descent and trust region (`GeneralisedGaussNewton`)."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from equinox.internal import ω
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree, Scalar, Shaped

from ._core.checks import as_batch
from ._core.features import augment, evaluate_features
from ._core.numerics import all_finite, matmul, normalised_weights
from ._core.penalty import is_penalty_rule
from ._core.readout import coefficients_from_readout, VPLinear
from ._loss_family import loss_family
from ._readout_losses.base import AbstractReadoutLoss, Curvature
from ._readout_losses.objective import curvature_product
from ._ridge.gcv import GCVStats


JacobianName = Literal["exact", "fixed_readout"]


class GaussNewtonOutputs(eqx.Module):
    r"""The outputs of a reduced loss that its generalised Gauss–Newton matrix is built
    from (`vpggn`'s auxiliary output; every field an array, so it passes through
    `optimistix.minimise` as `aux`).

    - `logits`: $Z = \hat F\hat W^{*\top}$, shape `(N, k)`; its derivative in the
        model's parameters is the $J_Z$ that `vpggn`'s `jacobian` chose.
    - `coefficients`: $\hat W^{*\top}$, shape `(p, k)` (the bias last); with the
        exact Jacobian its derivative is the readout's implicit derivative, with the
        fixed readout it carries none.
    - `curvature`: $\frac{\omega_j}{N}\,\partial_z^2\ell(z_j, y_j) =
        \operatorname{diag}(d_j) - u_j u_j^\top$ at the logits, sample by sample
        (a `vploss.Curvature`; no derivative).
    - `alpha1`, `alpha2`: the penalty weights the loss used (a penalty chosen by
        `alpha2="gcv"` included).
    - `readout`: the fitted `VPLinear`, as the loss function returns it.
    """

    logits: Float[Array, "N k"]
    coefficients: Float[Array, "p k"]
    curvature: Curvature
    alpha1: Float[Array, ""]
    alpha2: Float[Array, ""]
    readout: VPLinear

    def curvature_mv(self, v: Float[Array, "N k"]) -> Float[Array, "N k"]:
        r"""$H_\ell v$, sample by sample."""
        return curvature_product(*self.curvature, v)


def vpggn(
    loss: Callable[..., Any] | AbstractReadoutLoss,
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Shaped[ArrayLike, " _N *k"],
    *,
    jacobian: JacobianName | str = "exact",
    **loss_kwargs: Any,
) -> tuple[Float[Array, ""], GaussNewtonOutputs]:
    r"""A `vploss_*` readout loss with the outputs that its generalised Gauss–Newton
    (GGN) matrix is built from, for second-order training of the model by
    `ggn_operator` and `GeneralisedGaussNewton` (GNvpro: Newman, Ruthotto, Hart and
    van Bloemen Waanders, *Train Like a (Var)Pro*, SIAM J. Math. Data Sci. 2021; the
    GGN: Schraudolph, 2002).

    The reduced loss of every readout loss has the form

    $$L(\theta) = \ell\big(Z(\theta)\big) + \frac{\alpha_2}{2}\|\hat
    W^*(\theta)\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2, \qquad Z(\theta) = \hat
    F(\theta)\,\hat W^*(\theta)^\top \in \mathbb R^{N\times k},$$

    with $\ell(Z) = \frac1N\sum_j \omega_j\,\ell(z_j, y_j)$ the (weighted) mean of a
    loss convex in the logits ($\frac12\|z - y\|^2$ for `vploss_msereg`).
    Linearising the logits and the readout but keeping the curvature of the convex
    outer functions gives the GGN

    $$G = J_Z^\top H_\ell\, J_Z + \alpha_2\, J_W^\top J_W + \alpha_1 I, \qquad
    J_Z = \frac{\partial Z}{\partial\theta}, \quad J_W = \frac{\mathrm d\hat
    W^{*\top}}{\mathrm d\theta},$$

    with $H_\ell = \partial_Z^2\ell$ block diagonal over samples (the loss's
    `curvature`). It is positive semidefinite, and for the ridge loss it is
    $J_r^\top J_r$ with $J_r$ the Jacobian of `vpresidual_msereg`
    (`vpjacobian_msereg`). Two choices of $J_Z$:

    - `jacobian="exact"`: the full derivative $J_Z\dot\theta = \dot{\hat F}\hat
        W^{*\top} + \hat F\dot{\hat W}^{*\top}$, through the readout's implicit
        derivative (a solve with the inner Hessian, forward and reverse, per product);
    - `jacobian="fixed_readout"`: the readout held fixed (Kaufman, 1975):
        $J_Z\dot\theta = \dot{\hat F}\hat W^{*\top}$ and $J_W = 0$, so a product is one
        forward-mode and one reverse-mode pass of the model, and no solve.

    The loss itself, and its gradient (the envelope gradient), are those of the loss
    function in both modes.

    ```python
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params, args):
        x, y = args
        model = eqx.combine(params, static)
        return vploss.vpggn(
            vploss.vploss_ce, model, x, y, jacobian="fixed_readout", alpha2=1e-3,
            alpha1=1e-5, num_classes=10, throw=False,
        )

    solver = vploss.GeneralisedGaussNewton(rtol=1e-6, atol=1e-6)
    solution = optx.minimise(
        fn, solver, params, (x, y), has_aux=True, max_steps=100, throw=False
    )
    model = eqx.combine(solution.value, static)
    ```

    **Arguments:**

    - `loss`: `vploss.vploss_msereg`, the `vploss_*` function of a readout loss (the
        table `READOUT_LOSSES`, listed on the page "Losses") or a readout loss object
        (`vploss.AbstractReadoutLoss`, solved by `vploss_glm`).
    - `model`, `x`, `y`: as the loss function reads them.
    - `jacobian`: `"exact"` or `"fixed_readout"`, as above.
    - `**loss_kwargs`: the loss function's keyword arguments (`alpha2`, `alpha1`,
        `weights`, `use_bias`, `solver`, ...). With `alpha2="gcv"` the chosen penalty
        is held fixed, as in the loss's own derivative.

    **Returns:**

    `(loss, outputs)`: the reduced loss, as the loss function returns it, and the
    `GaussNewtonOutputs` (with the fitted readout).

    **Raises:**

    What the loss function raises for its inputs; `TypeError` for a `loss` that is not
    one of the above, `ValueError` for an unknown `jacobian`.
    """
    fit, outer, defaults = loss_family(loss, loss_kwargs.get("num_classes"))
    if jacobian not in ("exact", "fixed_readout"):
        raise ValueError(f'`jacobian` must be "exact" or "fixed_readout"; got {jacobian!r}.')
    value, readout = fit(model, x, y, **loss_kwargs)
    use_bias = loss_kwargs.get("use_bias", True)
    coef = coefficients_from_readout(readout, use_bias)
    if jacobian == "fixed_readout":
        coef = jax.lax.stop_gradient(coef)
    dtype = coef.dtype
    x = as_batch("x", x)
    features = augment(evaluate_features(model, x).astype(dtype), use_bias)
    logits = matmul(features, coef)
    alpha1, alpha2 = _penalty_weights(defaults, loss_kwargs, readout, dtype)
    curvature = _outer_curvature(outer, jax.lax.stop_gradient(logits), y, loss_kwargs)
    return value, GaussNewtonOutputs(logits, coef, curvature, alpha1, alpha2, readout)


def ggn_operator(
    fn: Callable[[Any, Any], tuple[Float[Array, ""], GaussNewtonOutputs]],
    y: PyTree[Array],
    args: Any,
) -> tuple[Float[Array, ""], PyTree[Array], lx.FunctionLinearOperator, GaussNewtonOutputs]:
    r"""The loss, gradient and generalised Gauss–Newton matrix of `fn` at `y`, the GGN
    as a matrix-free operator $v \mapsto J_Z^\top H_\ell J_Z v + \alpha_2 J_W^\top
    J_W v + \alpha_1 v$ (see `vpggn`).

    `fn` is linearised once (`jax.linearize`: one evaluation of the loss, its inner
    solve included); each product $Gv$ is then a forward-mode product with the stored
    linearisation and its transpose (`jax.linear_transpose`), never forming $J$.

    **Arguments:**

    - `fn`: `fn(y, args) -> (loss, GaussNewtonOutputs)`, e.g. a function that
        calls `vpggn` on `eqx.combine(y, static)`.
    - `y`: the parameters (any pytree of floating-point arrays).
    - `args`: passed to `fn`.

    **Returns:**

    `(loss, gradient, ggn, outputs)`: the loss, its gradient (a pytree like `y`), the
    GGN as a `lineax.FunctionLinearOperator` on pytrees like `y` (tagged symmetric
    and positive semidefinite), and `fn`'s `GaussNewtonOutputs`.
    """

    def linearised(y):
        value, outputs = fn(y, args)
        if not isinstance(outputs, GaussNewtonOutputs):
            raise TypeError(
                "`fn` must return `(loss, GaussNewtonOutputs)`, the output of "
                f"`vploss.vpggn`; got an auxiliary output of type {type(outputs).__name__}."
            )
        return (value, outputs.logits, outputs.coefficients), outputs

    (value, _, _), linear, outputs = jax.linearize(linearised, y, has_aux=True)
    # Transposing only the outputs a product needs: the others' paths are dropped.
    value_vjp = jax.linear_transpose(lambda v: linear(v)[0], y)
    outputs_vjp = jax.linear_transpose(lambda v: linear(v)[1:], y)
    (gradient,) = value_vjp(jnp.ones_like(value))

    def ggn_mv(v):
        _, d_logits, d_coef = linear(v)
        (out,) = outputs_vjp((outputs.curvature_mv(d_logits), outputs.alpha2 * d_coef))
        return (out**ω + outputs.alpha1 * v**ω).ω

    ggn = lx.FunctionLinearOperator(
        ggn_mv, jax.eval_shape(lambda: y), (lx.symmetric_tag, lx.positive_semidefinite_tag)
    )
    return value, gradient, ggn, outputs


def _penalty_weights(
    defaults: dict[str, float], loss_kwargs: dict[str, Any], readout: VPLinear, dtype: Any
) -> tuple[Scalar, Scalar]:
    """`alpha1` and `alpha2` as the loss function used them: the caller's, else the
    function's `defaults` (`LossFamily.defaults`); a chosen penalty (`alpha2="gcv"`)
    from the readout's stats."""

    def weight(name):
        value = loss_kwargs[name] if name in loss_kwargs else defaults[name]
        if is_penalty_rule(value):
            assert isinstance(readout.stats, GCVStats)
            return readout.stats.alpha2.astype(dtype)
        return jnp.asarray(value, dtype)

    return weight("alpha1"), weight("alpha2")


def _outer_curvature(
    outer: AbstractReadoutLoss | None, logits: Array, y: Any, loss_kwargs: dict[str, Any]
) -> Curvature:
    r"""$\frac{\omega_j}{N}\partial_z^2\ell(z_j, y_j)$ of every sample at the `(N, k)`
    logits: the identity for the squared error, else the loss's `curvature`."""
    num_samples, dtype = logits.shape[0], logits.dtype
    weights = loss_kwargs.get("weights")
    scale = jnp.full((num_samples,), 1 / num_samples, dtype)
    if weights is not None:
        scale = normalised_weights(jnp.asarray(weights, dtype)) / num_samples
    if outer is None:
        return Curvature(jnp.broadcast_to(scale[:, None], logits.shape), None)
    labels = outer.labels(y, num_samples).values.astype(dtype)
    diagonal, rank_one = outer.curvature(logits, labels)
    if rank_one is not None:
        rank_one = rank_one * jnp.sqrt(scale)[:, None]
    return Curvature(diagonal * scale[:, None], rank_one)


def _zeros(struct: PyTree[Any]) -> PyTree[Any]:
    """Zeros in place of the `jax.ShapeDtypeStruct` leaves of `struct`; other leaves
    (the static parts of a closure-converted operator) kept."""
    return jtu.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype) if isinstance(s, jax.ShapeDtypeStruct) else s,
        struct,
    )


def _select(pred: Bool[Array, ""], on_true: Any, on_false: Any) -> Any:
    """`on_true` where `pred`, else `on_false`, leaf by leaf: two pytrees of the same
    structure whose non-array leaves are equal."""
    dynamic_true, static = eqx.partition(on_true, eqx.is_array)
    dynamic_false = eqx.filter(on_false, eqx.is_array)
    chosen = jtu.tree_map(lambda a, b: jnp.where(pred, a, b), dynamic_true, dynamic_false)
    return eqx.combine(chosen, static)


def _damped_gradient_step(f_info: Any, step_size: Scalar) -> Any:
    r"""$-\frac{g^\top g}{g^\top (G + \lambda I) g}\,g$, $\lambda = 1/$`step_size`: the
    minimiser of the damped quadratic model along the gradient (`f_info` an
    `optimistix.FunctionInfo.EvalGradHessian`)."""
    gradient = f_info.grad
    leaves = jtu.tree_leaves(gradient)
    squared = sum(jnp.vdot(g, g) for g in leaves)
    products = jtu.tree_leaves(f_info.hessian.mv(gradient))
    curved = sum(jnp.vdot(g, h) for g, h in zip(leaves, products, strict=True))
    length = squared / (curved + squared / step_size)
    return (-length * gradient**ω).ω


def _cauchy_converged(rtol, atol, norm, y, y_diff, f, f_diff) -> Bool[Array, ""]:
    """Both the step and the change of the loss within `atol + rtol·|·|` (the
    stopping rule of optimistix's minimisers)."""
    y_scale = (atol + rtol * ω(y).call(jnp.abs)).ω
    small_step = norm((ω(y_diff).call(jnp.abs) / y_scale**ω).ω) < 1
    return small_step & (jnp.abs(f_diff) < atol + rtol * jnp.abs(f))


class _GaussNewtonState(eqx.Module):
    first_step: Bool[Array, ""]
    y_eval: PyTree[Array]
    search_state: Any
    f_info: Any  # optimistix.FunctionInfo.EvalGradHessian
    aux: GaussNewtonOutputs
    descent_state: Any
    terminate: Bool[Array, ""]
    result: optx.RESULTS


class GeneralisedGaussNewton(optx.AbstractMinimiser):
    r"""Levenberg–Marquardt on the generalised Gauss–Newton matrix of a reduced VarPro
    loss: an `optimistix` minimiser for functions that return `vpggn`'s output.

    Each step solves $(G + \lambda I)\,d = -\nabla L$ with the matrix-free GGN $G$ of
    `ggn_operator` by conjugate gradients (truncated at the linear solver's step
    budget, which still gives a descent direction), and a classical trust region
    adapts $\lambda$ from the ratio of the actual to the predicted decrease
    (optimistix's `DampedNewtonDescent` and `ClassicalTrustRegion`, the pair that makes
    `optimistix.LevenbergMarquardt`). It stops when both the step and the change of
    the loss are within `rtol`/`atol` (optimistix's Cauchy criterion), or at
    `max_steps`.

    `fn(y, args)` must return `(loss, GaussNewtonOutputs)`, as `vpggn` does; pass
    `has_aux=True` to `optimistix.minimise`. The solution's `aux` is the
    `GaussNewtonOutputs` at the solution (`aux.readout` is the fitted readout). Pass
    `throw=False` to the loss (through `vpggn`), so that a trial point where the inner
    solve fails is rejected by the trust region rather than raising; with the exact
    Jacobian in float32 such a point can still raise from the readout's derivative, so
    prefer `jacobian="fixed_readout"` there (it is also cheaper per step, for about the
    same progress per step; see the page 'Second-order VarPro on classification').

    **Arguments:**

    - `rtol`, `atol`: the relative and absolute tolerances of the stopping rule.
    - `norm`: the norm of the stopping rule (default `optimistix.max_norm`).
    - `linear_solver`: solves the damped GGN system; by default lineax's CG to a
        residual of 1e-2 of the gradient (max norm) within 50 iterations (an inexact
        Newton step). Where CG breaks down (lineax's breakdown test is not scaled by the
        operator, and in float32 the GGN of a mean loss fails it), the minimiser of the
        damped model along the gradient is used instead. Any lineax solver for positive
        definite operators may be given (`lineax.Cholesky()` materialises $G$ with one
        product per parameter: for small models).
    - `search`: the trust region (`optimistix.ClassicalTrustRegion()`).
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    linear_solver: lx.AbstractLinearSolver | None = None
    search: optx.AbstractSearch = optx.ClassicalTrustRegion()

    @property
    def descent(self) -> optx.DampedNewtonDescent:
        """The descent as optimistix builds and queries it (the solver is chosen per step)."""
        return optx.DampedNewtonDescent()

    def _linear_solver(self, gradient: PyTree[Array]) -> lx.AbstractLinearSolver:
        if self.linear_solver is not None:
            return self.linear_solver
        # lineax's test is elementwise: an absolute tolerance of the same relative size
        # makes it a max-norm test (no division by tiny gradient entries).
        atol = 1e-2 * optx.max_norm(gradient)
        return lx.CG(rtol=1e-2, atol=atol, max_steps=50)  # pyright: ignore[reportArgumentType]

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        # The model at `y0` itself, not zeros: the trust region's first prediction
        # evaluates it, and a zero inner Hessian (the exact Jacobian) is singular.
        value, gradient, ggn, _ = ggn_operator(fn, y, args)
        f_info = optx.FunctionInfo.EvalGradHessian(value, gradient, ggn)
        f_info_struct = eqx.filter_eval_shape(lambda: f_info)
        return _GaussNewtonState(
            first_step=jnp.array(True),
            y_eval=y,
            search_state=self.search.init(y, f_info_struct),
            f_info=f_info,
            aux=_zeros(aux_struct),
            descent_state=self.descent.init(y, f_info_struct),
            terminate=jnp.array(False),
            result=optx.RESULTS.successful,
        )

    def step(self, fn, y, args, options, state, tags):
        f_eval, gradient, ggn, aux = ggn_operator(fn, state.y_eval, args)
        # The operator's traced program is a static leaf: keep the one the loop's state
        # was built with (the same program), so that both have one structure.
        ggn = eqx.combine(
            eqx.filter(ggn, eqx.is_array),
            eqx.filter(state.f_info.hessian, eqx.is_array, inverse=True),
        )
        f_eval_info = optx.FunctionInfo.EvalGradHessian(f_eval, gradient, ggn)
        step_size, accept, search_result, search_state = self.search.step(
            state.first_step, y, state.y_eval, state.f_info, f_eval_info, state.search_state
        )
        # Both outcomes are cheap to form (the descent only stores the new model), so the
        # accepted one is selected leaf by leaf.
        y_diff = (state.y_eval**ω - y**ω).ω
        converged = _cauchy_converged(
            self.rtol, self.atol, self.norm, state.y_eval, y_diff, f_eval, f_eval - state.f_info.f
        )
        descent_state = self.descent.query(state.y_eval, f_eval_info, state.descent_state)
        y, f_info, aux, descent_state, terminate = _select(
            accept,
            (state.y_eval, f_eval_info, aux, descent_state, converged & ~state.first_step),
            (y, state.f_info, state.aux, state.descent_state, jnp.array(False)),
        )
        descent = optx.DampedNewtonDescent(linear_solver=self._linear_solver(f_info.grad))
        y_descent, descent_result = descent.step(step_size, descent_state)
        # A truncated conjugate-gradient solve is still a descent direction.
        truncated = descent_result == optx.RESULTS.promote(lx.RESULTS.max_steps_reached)
        descent_result = optx.RESULTS.where(truncated, optx.RESULTS.successful, descent_result)
        # lineax's CG declares a breakdown (NaN) where pᵀ(G + λI)p < 100·P·ε·rᵀr, a test
        # not scaled by the operator: the GGN of a mean loss has most eigenvalues below
        # it in float32 (observed on MNIST-1D and the circle). Then the minimiser of the
        # damped model along the gradient is used instead, a descent direction.
        finite = all_finite(y_descent)
        # A `cond`, so that the fallback's GGN product is paid only where CG broke down.
        y_descent = jax.lax.cond(
            finite, lambda: y_descent, lambda: _damped_gradient_step(f_info, step_size)
        )
        descent_result = optx.RESULTS.where(finite, descent_result, optx.RESULTS.successful)
        result = optx.RESULTS.where(
            search_result == optx.RESULTS.successful, descent_result, search_result
        )
        state = _GaussNewtonState(
            first_step=jnp.array(False),
            y_eval=(y**ω + y_descent**ω).ω,
            search_state=search_state,
            f_info=f_info,
            aux=aux,
            descent_state=descent_state,
            terminate=terminate,
            result=result,
        )
        return y, state, aux

    def terminate(self, fn, y, args, options, state, tags):
        return state.terminate, state.result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}
