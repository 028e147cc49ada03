"""The inner solver of the logistic and softmax losses: optimistix minimisers that stop
on the gradient norm of the inner objective, a damped Newton method on its exact
Hessian, and a truncated Newton method with preconditioned CG on Hessian-vector
products."""

from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Real, Scalar

from ._checks import as_alpha, as_flag, RuntimeChecks
from ._diagnostics import InnerStats
from ._envelope import AbstractInnerSolver, Args, envelope_minimise, Objective
from ._features import glm_features, parameter_penalty
from ._misc import matmul
from ._readout import coefficients_from_readout, readout_from_coefficients, VPLinear


Hessian: TypeAlias = Callable[[Float[Array, "p k"], Args], lx.AbstractLinearOperator]
SolverName: TypeAlias = Literal["auto", "newton", "newton-cg", "bfgs", "lbfgs"]
_SOLVER_NAMES = ("auto", "newton", "newton-cg", "bfgs", "lbfgs")

#: `solver="auto"` uses the exact Newton method while the readout has at most this
#: many coefficients `p·k`, and Newton–CG beyond (see `select_minimiser`). Measured
#: (float32, N = 4096, jitted `value_and_grad` step, alpha2 = 1e-4 and 1e-6): exact
#: Newton is faster up to about 200 coefficients (1.5-2x at 33 and 99), even at 195,
#: and slower from 325 on (1.7x at alpha2 = 1e-4, even at 1e-6; 4-5x at 650).
MAX_EXACT_NEWTON_SIZE = 256


#: The readout's implicit derivative (`InnerMinimise.hessian_solve`) factors the exact
#: Hessian by Cholesky up to this many coefficients `p·k` (building it costs
#: `O(N (pk)^2)`, factoring it `O((pk)^3)`, about a second at 2048 on one core), and
#: solves by preconditioned CG beyond. In float32 CG cannot reach a tight residual on
#: the ill-conditioned Hessians of small `alpha2` (measured: 330 coefficients,
#: alpha2 = 1e-4: no convergence, or NaN tangents with a loose test); Cholesky's
#: error is bounded by the condition number times `eps`.
MAX_DENSE_SOLVE_SIZE = 2048


def newton_cg_max_steps(gtol: float) -> int:
    """The CG iterations per Newton–CG step at most (truncated Newton: the line search
    accepts any CG iterate, each a descent direction): 5 for tolerances like float32's
    default (3.5e-4), 20 below 1e-5 (float64's default 1.5e-8).

    Measured in float32 (K = 10, m = 64, N = 4096, after 300 Adam steps; caps 5, 7,
    10, 14): 5 gave the fastest warm-started steps (the training loop's case; 2.0x and
    2.8x a plain softmax head at alpha2 = 1e-4 and 1e-6, against 2.6x and 3.7x with
    10), for more Newton steps from a cold start (14 against 6 at 1e-4). In float64 at
    alpha2 = 1e-6 (K = 4, separable), caps 5, 10, 20 took 187, 59, 16 Newton steps."""
    return 5 if gtol >= 1e-5 else 20


class Curvature(eqx.Module):
    """The second-order information of a generalised linear model's inner objective,
    each a function of `(coef, args)` with `args = (features (N, p), labels (N, k),
    alpha2)`:

    - `hessian`: the exact Hessian as a matrix operator (`"newton"`);
    - `hessian_product`: the Hessian as Hessian-vector products, never formed
        (`"newton-cg"`);
    - `mean_curvature`: the `(k, k)` mean over samples of the per-sample curvature of
        the loss in the logits (the Kronecker preconditioner's output factor).
    """

    hessian: Hessian
    hessian_product: Hessian
    mean_curvature: Callable[[Float[Array, "p k"], Args], Float[Array, "k k"]]


def default_gtol(dtype: Any) -> float:
    """The default gradient tolerance, `sqrt(eps)` of the dtype (3.5e-4 in float32,
    1.5e-8 in float64). The Newton methods' line search allows for the rounding of
    the objective (`RoundingArmijo`), so they reach tighter tolerances too, down to
    the rounding of the gradient itself; a plain Armijo search (BFGS, L-BFGS) stalls
    once `|∇J|²/λ_max(H)` falls below the rounding of `J`. The objectives are means
    over samples, so the gradient does not grow with the batch size."""
    return float(jnp.finfo(dtype).eps) ** 0.5


#: How many roundings `eps (1 + |J|)` of the objective are taken as its rounding error
#: (`RoundingArmijo`, `loss_tolerance`).
ROUNDING = 16.0


def loss_tolerance(value: Scalar) -> Scalar:
    r"""The loss error the inner solve allows: $\sqrt{\varepsilon}\,|J| + \rho\,
    \varepsilon\,(1 + |J|)$, a relative tolerance of $\sqrt\varepsilon$ of the
    objective's dtype (3.5e-4 in float32, 1.5e-8 in float64) plus the rounding of the
    computed $J$ itself (the `ROUNDING` $\rho = 16$ of `RoundingArmijo`), below which
    no solver can resolve the loss."""
    eps = jnp.finfo(value.dtype).eps
    return jnp.sqrt(eps) * jnp.abs(value) + ROUNDING * eps * (1 + jnp.abs(value))


def loss_error_bound(
    gradient: Float[Array, "p k"], alpha2: Scalar, decrement: Scalar | None = None
) -> Scalar:
    r"""$\|\nabla J\|_2^2 / (2\alpha_2) \ge J(\hat W) - J^*$: the inner objective is
    $\alpha_2$-strongly convex, so its excess over the minimum is at most this (a
    rigorous bound, at any point, for any solver). An orthogonal change of basis of
    the coefficients leaves it unchanged.

    With the `newton_decrement_bound` $\bar\lambda^2$ of the Newton methods'
    direction at the same point, the smaller of the two: $\lambda^2$ estimates $J -
    J^*$ from the local curvature, far more tightly at small `alpha2` (where the
    float32 gradient cannot reach $\sqrt{2\alpha_2 \cdot \mathrm{tol}}$)."""
    bound = jnp.sum(gradient**2) / (2 * alpha2)
    return bound if decrement is None else jnp.minimum(bound, decrement)


def inner_converged(
    value: Scalar,
    gradient: Float[Array, "p k"],
    scale: Float[Array, "p 1"],
    alpha2: Scalar,
    gtol: float,
    decrement: Scalar | None = None,
) -> Bool[Array, ""]:
    r"""The stopping test of the inner solve: the scaled gradient is at most `gtol`
    (`scaled_gradient_norm`) AND the loss is within `loss_tolerance` of its minimum
    by `loss_error_bound`. The gradient test alone left a loss error up to
    $|\nabla J|^2/(2\alpha_2)$: measured in float32 at alpha2 = 1e-4, 9% of the loss,
    so that the reduced loss depended on the warm start."""
    small_gradient = scaled_gradient_norm(gradient, scale) <= gtol
    small_loss_error = loss_error_bound(gradient, alpha2, decrement) <= loss_tolerance(value)
    return small_gradient & small_loss_error


def gradient_scale(args: Args) -> Float[Array, "p 1"]:
    r"""The scale $\min(1, \sqrt{\frac1N\sum_j \hat f_{jp}^2 + \alpha_2})$ of each
    coefficient row of the gradient, which the stopping test divides it by.

    Features scaled by $s$ (with `alpha2` scaled by $s^2$) scale the gradient by $s$, so
    with an absolute test, features of size 1e-6 stopped far from the optimum: a
    silently wrong loss (measured: 12% off in float64). Small features therefore
    tighten the test in proportion. Large ones do not loosen it: the Gram matrix
    ignores the logistic curvature, which vanishes on saturated samples, and a looser
    test lost the loss's digits there (measured)."""
    features, _, alpha2 = args
    return jnp.minimum(1, jnp.sqrt(jnp.mean(features**2, axis=0) + alpha2))[:, None]


def scaled_gradient_norm(gradient: Float[Array, "p k"], scale: Float[Array, "p 1"]) -> Scalar:
    """The max-norm of the gradient in units of `gradient_scale`, the quantity `gtol`
    bounds."""
    return optx.max_norm(gradient / scale)


class RoundingArmijo(optx.AbstractSearch):
    r"""Optimistix's backtracking Armijo search, allowing for the rounding of the
    objective: a step $d$ from $y$ is accepted when

    $$J(y + d) - J(y) \le c\,\nabla J(y)^\top d + \tau, \qquad \nabla J(y)^\top d
    \le 0, \qquad \tau = \rho\,\varepsilon\,(1 + |J(y)|),$$

    with the slope $c$ of `armijo` (0.1), the machine epsilon $\varepsilon$ of the
    objective's dtype and `rounding` $\rho$ (16). With $\tau = 0$ this is `armijo`'s
    own test, which runs first and whose step sizes are kept.

    Why: the objectives are means of per-sample terms computed with cancellation
    ($\operatorname{softplus}(z) - yz$), so the rounding error of the computed $J$
    is a few $\varepsilon|J|$ for $J$ of order 1 but many $\varepsilon|J|$ for a
    small $J$, still below $\varepsilon$ (measured in float64, the spread of $J$
    over perturbations of 1e-13 at the minimum: 7 $\varepsilon|J|$ at $J = 0.1$,
    260 $\varepsilon|J| = 0.01\varepsilon$ at $J = 5\cdot 10^{-5}$); $\tau$ bounds
    both. The Newton step $d = -H^{-1}g$ predicts
    the change $\nabla J^\top d = -\lambda^2$, $\lambda^2 = g^\top H^{-1}g \ge
    |g|^2/\lambda_{\max}(H)$. Once $\lambda^2$ is below the rounding, $J(y + d) -
    J(y)$ is rounding noise: the plain test ($\tau = 0$) rejects the step and every
    shorter one, and the solve stalls for good at $|g| \approx
    \sqrt{\varepsilon\lambda_{\max}(H)}$, above the default `gtol` of float64 for
    features of size 5-10 (measured: $|g| = 2.4\cdot 10^{-8}$, $\lambda^2 = 4\cdot
    10^{-16}$, $J(y + d) - J(y) = +1$ ulp; the step, taken, gives $|g| = 2\cdot
    10^{-16}$), and far above for features of size 1e6.

    The tolerance is safe:

    - it changes nothing while the predicted decrease is well above the rounding
        ($\lambda^2 \gg \tau$): a true decrease of about $c\lambda^2$ is still
        required;
    - an accepted step raises the objective by at most $\tau$, i.e. not
        measurably;
    - a step is accepted for it only when the whole remaining decrease, $J(y) - J^*
        \approx \lambda^2/2$ for Newton's method, is within a few roundings: deep in
        the region where the full Newton step converges quadratically ($\lambda$
        small against $\sqrt{\alpha_2}/\max_j|\hat f_j|$, the scale of the
        regularised logistic loss's generalised self-concordance), so the next
        gradient is of order $|g|^2$;
    - convergence is certified by the gradient alone (`GradientNormTermination`),
        never by this test, so a step accepted in vain cannot stop a solve early.

    It costs one dot product per trial step, no evaluation of the objective.
    """

    armijo: optx.BacktrackingArmijo = optx.BacktrackingArmijo()
    rounding: float = ROUNDING

    def init(self, y, f_info_struct):
        return self.armijo.init(y, f_info_struct)

    def step(self, first_step, y, y_eval, f_info, f_eval_info, state):
        step_size, accept, result, state = self.armijo.step(
            first_step, y, y_eval, f_info, f_eval_info, state
        )
        f = f_info.as_min()
        predicted = f_info.compute_grad_dot(jtu.tree_map(jnp.subtract, y_eval, y))
        tolerance = self.rounding * jnp.finfo(f.dtype).eps * (1 + jnp.abs(f))
        within_rounding = (predicted <= 0) & (
            f_eval_info.as_min() - f <= self.armijo.slope * predicted + tolerance
        )
        # After an accepted step the next search starts from the full step again.
        step_size = jnp.where(within_rounding, self.armijo.step_init, step_size)
        state = eqx.tree_at(lambda s: s.step_size, state, step_size)
        return step_size, accept | within_rounding, result, state


class DampedNewton(optx.AbstractQuasiNewton):
    """Newton's method on the exact Hessian with a backtracking Armijo line search
    that allows for the objective's rounding (`RoundingArmijo`).

    A quasi-Newton minimiser whose "Hessian update" evaluates the true Hessian at each
    accepted iterate, so the optimistix machinery (line search, descent, linear
    solver) is reused as it is. Stop it with `GradientNormTermination`: its own
    Cauchy criterion is switched off (`rtol = atol = 0`).
    """

    hessian: Callable[[PyTree[Array]], lx.AbstractLinearOperator]
    descent: optx.AbstractDescent
    search: optx.AbstractSearch = RoundingArmijo()
    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    use_inverse: bool = False
    verbose: Callable[..., None] = lambda **kwargs: None

    def init_hessian(self, y, f, grad):
        # A placeholder of the right structure; the first accepted step replaces it.
        operator = eqx.filter_eval_shape(self.hessian, y)
        operator = jtu.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype) if _is_struct(s) else s,
            operator,
            is_leaf=_is_struct,
        )
        return optx.FunctionInfo.EvalGradHessian(f, grad, operator), None

    def update_hessian(self, y, y_eval, f_info, f_eval_info, hessian_update_state):
        operator = self.hessian(y_eval)
        # An operator built from a function carries a jaxpr; keep the first one so the
        # loop state has a fixed structure (as optimistix's L-BFGS does).
        static = eqx.filter(f_info.hessian, eqx.is_array, inverse=True)
        operator = eqx.combine(static, eqx.filter(operator, eqx.is_array))
        return optx.FunctionInfo.EvalGradHessian(f_eval_info.f, f_eval_info.grad, operator), None


def _is_struct(leaf):
    return isinstance(leaf, jax.ShapeDtypeStruct)


class GradientNormTermination(optx.AbstractMinimiser):
    """Runs a quasi-Newton `minimiser` (any `optx.AbstractQuasiNewton`: `DampedNewton`,
    `optx.BFGS`, `optx.LBFGS`, ...) until `inner_converged` holds at the accepted
    iterate: the max-norm of the gradient, divided row-wise by `scale`
    (`gradient_scale`), is at most `gtol`, and the loss is within `loss_tolerance` of
    its minimum. It replaces the minimiser's own Cauchy criterion (which stops on
    small steps, not on optimality)."""

    minimiser: optx.AbstractQuasiNewton
    gtol: float
    scale: Float[Array, "p 1"]
    alpha2: Scalar

    # The abstract `rtol`, `atol`, `norm` are properties here, not fields; pyright
    # counts them as constructor arguments, hence the ignores where this is built.
    @property
    def rtol(self):
        return self.minimiser.rtol

    @property
    def atol(self):
        return self.minimiser.atol

    @property
    def norm(self):
        return self.minimiser.norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self.minimiser.init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self.minimiser.step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        # Before the first step `f_info` holds placeholders, not the gradient at `y`.
        converged = inner_converged(
            state.f_info.f,
            state.f_info.grad,
            self.scale,
            self.alpha2,
            self.gtol,
            _descent_loss_error(state),
        )
        return ~state.first_step & converged, state.result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.minimiser.postprocess(fn, y, aux, args, options, state, tags, result)


class _AtData(eqx.Module):
    """`hessian(coef, args)` as a function of `coef` alone."""

    hessian: Hessian
    args: Args

    def __call__(self, coef):
        return self.hessian(coef, self.args)


def class_grams(
    features: Float[Array, "N p"], weights: Float[Array, "N k"]
) -> Float[Array, "p k p"]:
    r"""The weighted Gram matrices $D_{c} = \sum_j w_{jc}\hat f_j\hat f_j^\top/N$ of
    each output $c$, as `(p, k, p)`: one matmul over samples."""
    num_samples, p = features.shape
    k = weights.shape[1]
    weighted = (features[:, :, None] * weights[:, None, :]).reshape(num_samples, p * k)
    return matmul(weighted.T, features).reshape(p, k, p) / num_samples


def block_gram(
    features: Float[Array, "N p"], weights: Float[Array, "N k"]
) -> Float[Array, "p k p k"]:
    r"""The block-diagonal Hessian term $H_{(p,c),(q,e)} = \delta_{ce}\sum_j w_{jc}
    \hat f_{jp}\hat f_{jq}/N$ of a generalised linear model (`class_grams` on the
    diagonal blocks)."""
    blocks = class_grams(features, weights)
    k = weights.shape[1]
    return blocks[:, :, :, None] * jnp.eye(k, dtype=features.dtype)[None, :, None, :]


def hessian_operator(matrix: Float[Array, "p k p k"], alpha2: Scalar) -> lx.PyTreeLinearOperator:
    """`matrix + alpha2 I` as a positive definite operator on `(p, k)` coefficients."""
    p, k = matrix.shape[:2]
    identity = jnp.eye(p * k, dtype=matrix.dtype).reshape(p, k, p, k)
    return lx.PyTreeLinearOperator(
        matrix + alpha2 * identity,
        jax.ShapeDtypeStruct((p, k), matrix.dtype),
        lx.positive_semidefinite_tag,
    )


def glm_hessian_product(
    features: Float[Array, "N p"],
    alpha2: Scalar,
    logit_curvature: Callable[[Float[Array, "N k"]], Float[Array, "N k"]],
    coef: Float[Array, "p k"],
) -> lx.FunctionLinearOperator:
    r"""The Hessian $V \mapsto \hat F^\top C(\hat F V)/N + \alpha_2 V$ of a
    generalised linear model at `coef`, as a product that is never formed:
    `logit_curvature` $C$ applies each sample's curvature in the logits (at `coef`)
    to the rows of an `(N, k)` matrix. Two matmuls over samples, $O(Npk)$."""
    apply = jtu.Partial(_glm_hessian_product, features, alpha2, logit_curvature)
    structure = jax.ShapeDtypeStruct(coef.shape, coef.dtype)
    return lx.FunctionLinearOperator(apply, structure, lx.positive_semidefinite_tag)


def _glm_hessian_product(features, alpha2, logit_curvature, vector):
    curved = logit_curvature(matmul(features, vector))
    return matmul(features.T, curved) / features.shape[0] + alpha2 * vector


class InnerMinimise(AbstractInnerSolver):
    """The inner solver handed to `envelope_minimise`: minimises `objective(coef, args)`
    over the readout coefficients `coef` of shape `(p, k)`, where `args = (features
    (N, p), targets (N, k), alpha2)`, from `init` or from zero, with an optimistix
    minimiser, and reports `InnerStats`.

    The readout's (implicit) derivative solves with the exact Hessian: by Cholesky up
    to `MAX_DENSE_SOLVE_SIZE` coefficients, beyond by CG on Hessian-vector products
    with the Kronecker preconditioner, to a relative residual of `eps**0.75`, raising
    an error where CG cannot reach it (never a silently wrong tangent)."""

    objective: Objective
    minimiser: Callable[[Args], optx.AbstractMinimiser]
    curvature: Curvature
    gtol: float
    max_steps: int

    def __call__(self, args: Args, init: Float[Array, "p k"] | None):
        features, targets, alpha2 = args
        if init is None:
            init = jnp.zeros((features.shape[1], targets.shape[1]), features.dtype)
        solution = optx.minimise(
            self.objective,
            self.minimiser(args),
            init,
            args,
            max_steps=self.max_steps,
            throw=False,
            # The solve is never differentiated (the envelope rule replaces it).
            adjoint=optx.RecursiveCheckpointAdjoint(),
        )
        coef = solution.value
        value, gradient = jax.value_and_grad(self.objective)(coef, args)
        scale = gradient_scale(args)
        # The descent's state holds its direction at the last accepted iterate, the
        # returned one.
        decrement = _descent_loss_error(solution.state)
        converged = (solution.result == optx.RESULTS.successful) & inner_converged(
            value, gradient, scale, alpha2, self.gtol, decrement
        )
        fallbacks = getattr(getattr(solution.state, "descent_state", None), "fallbacks", None)
        return coef, InnerStats(
            solution.stats["num_steps"],
            scaled_gradient_norm(gradient, scale),
            converged,
            loss_error_bound=loss_error_bound(gradient, alpha2, decrement),
            fallback_steps=jnp.zeros((), jnp.int32) if fallbacks is None else fallbacks,
        )

    def hessian_solve(
        self, objective: Objective, solution: Float[Array, "p k"], stats: Any, args: Args
    ) -> Callable[[Float[Array, "p k"]], Float[Array, "p k"]]:
        del objective, stats
        if solution.size <= MAX_DENSE_SOLVE_SIZE:
            operator = self.curvature.hessian(solution, args)
            return lambda rhs: lx.linear_solve(operator, rhs, lx.Cholesky(), throw=False).value
        operator = self.curvature.hessian_product(solution, args)
        tol = float(jnp.finfo(solution.dtype).eps) ** 0.75
        linear_solver = lx.CG(rtol=tol, atol=0.0, max_steps=10 * solution.size)
        # A preconditioner does not change the solution, so its data need no
        # derivative; lineax cannot differentiate traced `options` (a second
        # derivative raised "Unexpected tangent").
        preconditioner = KroneckerPreconditioner(
            self.curvature.mean_curvature, jax.lax.stop_gradient(args)
        )
        options = {"preconditioner": preconditioner(jax.lax.stop_gradient(solution))}
        # `throw=True`: a CG solve that does not reach its tolerance raises, rather
        # than return an inaccurate tangent.
        return lambda rhs: lx.linear_solve(operator, rhs, linear_solver, options=options).value


class _NewtonState(eqx.Module):
    newton: Float[Array, "p k"]
    fallbacks: Int[Array, ""]
    # `newton_decrement_bound` of `newton` (inf for a fallback direction).
    decrement: Float[Array, ""]


def newton_decrement_bound(
    gradient: Float[Array, "p k"],
    hessian: lx.AbstractLinearOperator,
    direction: Float[Array, "p k"],
    alpha2: Scalar,
) -> Scalar:
    r"""An upper bound of the squared Newton decrement $\lambda^2 = g^\top H^{-1} g$
    from an approximate Newton direction $d$ (Cholesky, or CG stopped early): with
    the residual $r = g - Hd$,

    $$\lambda^2 = g^\top d + d^\top r + r^\top H^{-1} r \le g^\top d + |d^\top r| +
    |r|^2/\alpha_2,$$

    as $H \succeq \alpha_2 I$. Near the minimum $J - J^* \approx \lambda^2/2$ (exact
    for a quadratic), and $J - J^* \le \lambda^2$ for a self-concordant $J$ with
    $\lambda \le 0.68$ (Boyd and Vandenberghe, 9.6.3), far tighter than the
    strong-convexity bound $|g|^2/(2\alpha_2)$ at small `alpha2`. One more product
    with the Hessian."""
    residual = gradient - hessian.mv(direction)
    return (
        jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST)
        + jnp.abs(jnp.vdot(direction, residual, precision=jax.lax.Precision.HIGHEST))
        + jnp.sum(residual**2) / alpha2
    )


def _descent_loss_error(state) -> Scalar | None:
    """The Newton decrement bound an optimistix state's descent holds, if any."""
    decrement = getattr(getattr(state, "descent_state", None), "decrement", None)
    return decrement


def _is_descent(gradient, direction):
    """Whether `-direction` is a finite descent direction for `gradient`."""
    return jnp.all(jnp.isfinite(direction)) & (
        jnp.vdot(gradient, direction, precision=jax.lax.Precision.HIGHEST) > 0
    )


class FallbackNewtonDescent(optx.AbstractDescent):
    r"""The Newton direction $H^{-1}g$ by Cholesky (`lx.Cholesky`) on the exact Hessian
    operator, with fallbacks for a Hessian that is not numerically positive definite
    (rounding of large or uneven features in float32): where the Newton direction is
    not finite or not a descent direction ($g^\top d \le 0$), the shifted Newton
    direction $(H + \delta I)^{-1}g$ with $\delta = pk\,\varepsilon \max_i H_{ii}$
    (above the rounding of the computed Hessian's eigenvalues), and where that fails
    too, the gradient step $g/\operatorname{tr} H$ (a step no longer than $1/L$).
    The state counts the fallbacks (`InnerStats.fallback_steps`) and holds the
    `newton_decrement_bound` of the Newton direction."""

    alpha2: Scalar

    def init(self, y, f_info_struct):
        del f_info_struct
        return _NewtonState(y, jnp.zeros((), jnp.int32), jnp.full((), jnp.inf, y.dtype))

    def query(self, y, f_info, state):
        gradient = f_info.grad
        hessian = f_info.hessian
        newton = lx.linear_solve(hessian, gradient, lx.Cholesky(), throw=False).value
        ok = _is_descent(gradient, newton)

        def fallback(_):
            matrix = hessian.as_matrix()
            diagonal = jnp.diag(matrix)
            shift = matrix.shape[0] * jnp.finfo(matrix.dtype).eps * jnp.max(jnp.abs(diagonal))
            shifted = lx.MatrixLinearOperator(
                matrix + shift * jnp.eye(matrix.shape[0], dtype=matrix.dtype),
                lx.positive_semidefinite_tag,
            )
            flat = lx.linear_solve(shifted, gradient.reshape(-1), lx.Cholesky(), throw=False)
            direction = flat.value.reshape(gradient.shape)
            steepest = gradient / jnp.sum(jnp.abs(diagonal))
            return jnp.where(_is_descent(gradient, direction), direction, steepest)

        decrement = newton_decrement_bound(gradient, hessian, newton, self.alpha2)
        decrement = jnp.where(ok, decrement, jnp.inf)
        newton = jax.lax.cond(ok, lambda _: newton, fallback, None)
        return _NewtonState(newton, state.fallbacks + (~ok).astype(jnp.int32), decrement)

    def step(self, step_size, state):
        return -step_size * state.newton, optx.RESULTS.successful


class TruncatedNewtonDescent(optx.AbstractDescent):
    """The Newton direction from preconditioned CG (`lx.CG`) on the Hessian operator,
    stopped early (inexact Newton): at the relative residual
    `eta = min(0.5, max(sqrt(|g|), 0.5 gtol/|g|))`, superlinear far from `gtol` and no
    tighter than the last step needs (and a residual small enough for the loss test of
    `inner_converged`), or after `max_cg_steps` iterations. Any CG
    iterate is a descent direction, so the line search accepts a truncated one.

    `preconditioner(y)` gives a positive definite approximation of the inverse
    Hessian at `y`. Without one, float32 CG breaks down at small `alpha2` (the
    Hessian's condition number exceeds lineax's breakdown test); where it still
    does (a direction that is not finite or not a descent direction), the
    preconditioned gradient is used, and counted (`InnerStats.fallback_steps`)."""

    preconditioner: Callable[[Float[Array, "p k"]], lx.AbstractLinearOperator]
    gtol: float
    scale: Float[Array, "p 1"]
    alpha2: Scalar
    max_cg_steps: int

    def init(self, y, f_info_struct):
        del f_info_struct
        return _NewtonState(y, jnp.zeros((), jnp.int32), jnp.full((), jnp.inf, y.dtype))

    def query(self, y, f_info, state):
        gradient = f_info.grad
        # `|g|` is measured as the stopping test measures it (`gradient_scale`).
        gradient_norm = scaled_gradient_norm(gradient, self.scale)
        preconditioner = self.preconditioner(y)
        forcing = jnp.minimum(
            0.5, jnp.maximum(jnp.sqrt(gradient_norm), 0.5 * self.gtol / gradient_norm)
        )
        # `atol` makes lineax's elementwise test a max-norm one (no division by tiny
        # gradient entries); it is also small enough that the residual's share
        # `|r|^2/alpha2` of `newton_decrement_bound` meets `loss_tolerance`.
        loss_atol = jnp.sqrt(self.alpha2 * loss_tolerance(f_info.f) / gradient.size)
        atol = jnp.minimum(forcing * optx.max_norm(gradient), 0.5 * loss_atol)
        options = {"preconditioner": preconditioner}

        def solve(max_steps):
            # lineax annotates the tolerances as floats; traced scalars work the same.
            cg = lx.CG(rtol=forcing, atol=atol, max_steps=max_steps)  # pyright: ignore[reportArgumentType]
            # A truncated solve is a valid step here, so CG's `max_steps_reached` is
            # not an error.
            return lx.linear_solve(f_info.hessian, gradient, cg, options=options, throw=False).value

        # Once the gradient test holds and only the loss test is left, the residual
        # must be small against `alpha2`: allow ten times the CG iterations.
        polish = gradient_norm <= self.gtol
        newton = jax.lax.cond(
            polish,
            lambda: solve(10 * self.max_cg_steps),
            lambda: solve(self.max_cg_steps),
        )
        ok = _is_descent(gradient, newton)
        newton = jnp.where(ok, newton, preconditioner.mv(gradient))
        decrement = newton_decrement_bound(gradient, f_info.hessian, newton, self.alpha2)
        decrement = jnp.where(ok, decrement, jnp.inf)
        return _NewtonState(newton, state.fallbacks + (~ok).astype(jnp.int32), decrement)

    def step(self, step_size, state):
        return -step_size * state.newton, optx.RESULTS.successful


class KroneckerPreconditioner(eqx.Module):
    r"""$(\bar A \otimes G + \alpha_2 I)^{-1}$, an approximate inverse Hessian of a
    generalised linear model, with the Gram matrix $G = \hat F^\top\hat F/N$ (one
    matmul and one `(p, p)` eigendecomposition per solve) and the `(k, k)` mean
    curvature $\bar A$ in the logits at the current iterate (a `(k, k)`
    eigendecomposition per step). Exact when all samples share one curvature (e.g.
    at a zero readout), and exact on the softmax's shift direction, where
    $\bar A$ has a zero eigenvalue like the Hessian. Applying it costs four small
    matmuls, none over samples."""

    mean_curvature: Callable[[Float[Array, "p k"], Args], Float[Array, "k k"]]
    args: Args
    gram_eigenvalues: Float[Array, " p"]
    gram_eigenvectors: Float[Array, "p p"]

    def __init__(self, mean_curvature, args):
        features, _, _ = args
        gram = matmul(features.T, features) / features.shape[0]
        eigenvalues, self.gram_eigenvectors = jnp.linalg.eigh(gram)
        # Rounding may leave tiny negative eigenvalues of these positive semidefinite
        # matrices; the preconditioner must stay positive definite.
        self.gram_eigenvalues = jnp.maximum(eigenvalues, 0)
        self.mean_curvature = mean_curvature
        self.args = args

    def __call__(self, coef: Float[Array, "p k"]) -> lx.FunctionLinearOperator:
        eigenvalues, eigenvectors = jnp.linalg.eigh(self.mean_curvature(coef, self.args))
        scale = 1 / (
            self.gram_eigenvalues[:, None] * jnp.maximum(eigenvalues, 0)[None, :] + self.args[2]
        )
        apply = jtu.Partial(_kronecker_solve, self.gram_eigenvectors, eigenvectors, scale)
        structure = jax.ShapeDtypeStruct(coef.shape, coef.dtype)
        return lx.FunctionLinearOperator(apply, structure, lx.positive_semidefinite_tag)


def _kronecker_solve(left, right, scale, vector):
    return matmul(matmul(left, scale * matmul(matmul(left.T, vector), right)), right.T)


def _terminated(minimiser: optx.AbstractQuasiNewton, gtol: float, args: Args):
    return GradientNormTermination(minimiser, gtol, gradient_scale(args), args[2])  # pyright: ignore[reportCallIssue]


class _Newton(eqx.Module):
    hessian: Hessian
    gtol: float

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        descent = FallbackNewtonDescent(args[2])
        newton = DampedNewton(hessian=_AtData(self.hessian, args), descent=descent)
        return _terminated(newton, self.gtol, args)


class _NewtonCG(eqx.Module):
    curvature: Curvature
    gtol: float

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        preconditioner = KroneckerPreconditioner(self.curvature.mean_curvature, args)
        descent = TruncatedNewtonDescent(
            preconditioner,
            self.gtol,
            gradient_scale(args),
            args[2],
            newton_cg_max_steps(self.gtol),
        )
        newton = DampedNewton(
            hessian=_AtData(self.curvature.hessian_product, args), descent=descent
        )
        return _terminated(newton, self.gtol, args)


class _QuasiNewton(eqx.Module):
    minimiser: optx.AbstractQuasiNewton
    gtol: float

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        return _terminated(self.minimiser, self.gtol, args)


class _Given(eqx.Module):
    minimiser: optx.AbstractMinimiser

    def __call__(self, args: Args) -> optx.AbstractMinimiser:
        del args
        return self.minimiser


def select_minimiser(
    solver: SolverName | optx.AbstractMinimiser,
    curvature: Curvature,
    gtol: float,
    num_coefficients: int,
) -> Callable[[Args], optx.AbstractMinimiser]:
    """The minimiser for `InnerMinimise`, as a function of the data (the exact Newton
    method evaluates its Hessian from them)."""
    if isinstance(solver, optx.AbstractMinimiser):
        return _Given(solver)
    if solver == "auto":
        solver = "newton" if num_coefficients <= MAX_EXACT_NEWTON_SIZE else "newton-cg"
    if solver == "newton":
        return _Newton(curvature.hessian, gtol)
    if solver == "newton-cg":
        return _NewtonCG(curvature, gtol)
    # Cauchy criteria off: `GradientNormTermination` stops them.
    if solver == "bfgs":
        return _QuasiNewton(optx.BFGS(rtol=0.0, atol=0.0), gtol)
    if solver == "lbfgs":
        return _QuasiNewton(optx.LBFGS(rtol=0.0, atol=0.0), gtol)
    raise ValueError(
        f"`solver` must be one of {_SOLVER_NAMES} or an `optimistix.AbstractMinimiser`; "
        f"got {solver!r}."
    )


def fit_readout(
    what: str,
    objective: Objective,
    curvature: Curvature,
    model: Callable[..., Any],
    x: Array,
    labels: Real[Array, "N k"],
    *,
    label_error: tuple[Bool[Array, ""], str],
    scalar_output: bool,
    alpha1: Any,
    alpha2: Any,
    use_bias: Any,
    solver: Any,
    gtol: Any,
    max_steps: Any,
    throw: Any,
    init: Any,
    basis: Callable[[int], np.ndarray] | None = None,
) -> tuple[Scalar, VPLinear]:
    """The body shared by `vploss_bce` and `vploss_ce` once their labels are checked:
    features, inner solve through `envelope_minimise`, runtime checks, readout.

    With `basis`, `objective` and `curvature` act on the coefficients in the basis of
    the outputs given by the symmetric orthogonal matrix `basis(k)` (its own inverse):
    the full coefficients are `coef @ basis(k)`."""
    use_bias = as_flag("use_bias", use_bias)
    throw = as_flag("throw", throw)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive Python int; got {max_steps!r}.")
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=True)
    features, labels = glm_features(model, x, labels, use_bias)
    dtype = features.dtype
    shape = (features.shape[1], labels.shape[1])
    if gtol is None:
        gtol = default_gtol(dtype)
    elif isinstance(gtol, bool) or not isinstance(gtol, (int, float)) or not gtol > 0:
        raise ValueError(f"`gtol` must be a positive Python float or None; got {gtol!r}.")
    if init is not None:
        if not isinstance(init, VPLinear):
            raise TypeError(
                "`init` must be the `VPLinear` readout returned by a previous call (or "
                f"None); got {type(init).__name__}."
            )
        init = coefficients_from_readout(init, use_bias)
        if init.shape != shape:
            raise ValueError(
                f"`init` has {init.shape[1]} output(s) and {init.shape[0]} coefficients "
                f"per output; this problem has {shape[1]} and {shape[0]}."
            )
        init = init.astype(dtype)
        if basis is not None:
            init = matmul(init, jnp.asarray(basis(shape[1]), dtype))
    minimiser = select_minimiser(solver, curvature, float(gtol), shape[0] * shape[1])
    value, coef, stats = envelope_minimise(
        objective,
        InnerMinimise(objective, minimiser, curvature, float(gtol), max_steps),
        (features, labels, alpha2.astype(dtype)),
        init,
        check=RuntimeChecks(what, errors=[label_error], finite={"x": x}, throw=throw),
    )
    if basis is not None:
        coef = matmul(coef, jnp.asarray(basis(shape[1]), dtype))
    loss = value + parameter_penalty(model, alpha1.astype(dtype))
    return loss, readout_from_coefficients(coef, use_bias, scalar_output, stats)
