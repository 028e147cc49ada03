from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree, Scalar

from .._core.envelope import (
    AbstractInnerSolver,
    Args,
    Check,
    dense_hessian_solve,
    envelope_minimise,
    implicit_solution_jvp,
    Objective,
    Params,
)
from .._core.newton import (
    ARMIJO_SLOPE,
    AtArgs,
    BACKTRACK_FACTOR,
    DampedNewton,
    DecrementTermination,
    FallbackNewtonDescent,
    MAX_BACKTRACKS,
    minimise_updates,
    RoundingArmijo,
)
from .._core.stats import AbstractStats, RESULTS, solve_result


class BarrierStats(AbstractStats):
    r"""Diagnostics of a `LogBarrier` solve: the fields of `vploss.InnerStats` that it
    reports, with the meanings given there, and its duality gap.

    **Fields:**

    - `num_steps`: the Newton updates over all centerings.
    - `gradient_norm`: the max-norm of the gradient of the barrier objective $J -
        \frac1t\sum_i \log w_i$ at the returned point and the final barrier weight
        $t$, unscaled.
    - `result`: the outcome, a `vploss.RESULTS`: `successful`,
        `nonlinear_max_steps_reached` (out of `max_steps`), `indefinite_hessian` (the
        same after Newton directions fell back) or `line_search_failed` (e.g. a start
        outside the domain). `stats.converged` is `result == successful`.
    - `fallback_steps`: the steps whose Newton direction was unusable and was replaced
        by a shifted Newton or a gradient direction.
    - `duality_gap`: the bound $p/t$ on $J(w) - \min J$ at the final barrier weight
        $t$, for $p$ constrained entries; the complementary slackness products
        $w_i\,\partial J/\partial w_i$ of the returned point are all $\approx 1/t$.
    """

    num_steps: Int[Array, ""]
    gradient_norm: Float[Array, ""]
    result: RESULTS
    fallback_steps: Int[Array, ""]
    duality_gap: Float[Array, ""]


class LogBarrier(eqx.Module):
    r"""A log-barrier interior-point method (Boyd and Vandenberghe, *Convex
    Optimization*, section 11.3) for

    $$\min_w J(w) \quad\text{subject to}\quad w_i > 0 \text{ for the constrained
    entries } i \in C,$$

    where $J$ is convex and twice differentiable on its (open) domain. For an increasing
    barrier weight $t$ it minimises

    $$\varphi_t(w) = t\,J(w) - \sum_{i \in C} \log w_i$$

    by the damped Newton method of every Newton solver here (`DampedNewton` with the
    line search `RoundingArmijo`, run by optimistix). The Newton direction $\Delta w =
    -H^{-1}\nabla\varphi_t$ is `newton_direction`'s: a Cholesky factorisation (lineax)
    of the Hessian $H$ of $\varphi_t$, and where $H$ is not numerically positive
    definite (rounding in float32, or an objective that is not convex far from its
    minimum) a shifted Newton or a gradient direction instead, counted in
    `BarrierStats.fallback_steps`. The line search starts at the largest step keeping
    every constrained entry positive (shortened by 1%) and halves it while
    $\varphi_t$ is not finite or does not decrease enough (`armijo_accepts`: by the
    fraction `armijo` of the predicted decrease, up to the rounding of $\varphi_t$),
    so every iterate stays strictly feasible. An objective with a domain of its own
    (e.g. $\log\det$ of a matrix that must stay positive definite) expresses it by
    returning `+inf` (or NaN) outside it: such steps are rejected like infeasible
    ones. When the Newton decrement $\lambda^2/2 = -\tfrac12 \nabla\varphi_t^\top
    \Delta w$ falls below `decrement_tol` (`DecrementTermination`; a fallback
    direction never counts as centred), the point is centred; then, if the duality gap
    $|C|/t$ is below `gap_tol` the solve ends, else $t \leftarrow \min(\mu t,
    |C|/$`gap_tol`$)$ (the last weight just meets the tolerance rather than
    overshooting it by up to $\mu$). The returned point $w_t$ satisfies $J(w_t) -
    \min J \le |C|/t$ (up to the centering accuracy).

    Everything runs in `lax.while_loop`s, so the solve is jittable and vmappable.
    The Hessian of $\varphi_t$ is formed by forward-over-reverse autodiff of the
    flattened objective: it suits readouts of up to a few hundred entries.

    **Fields** (all static floats and ints):

    - `gap_tol`: the duality gap $|C|/t$ at which to stop; default $\sqrt{\varepsilon}$
        of the dtype (1.5e-8 in float64, 3.5e-4 in float32).
    - `decrement_tol`: centering stops when $\lambda^2/2 \le$ `decrement_tol`
        (an estimate of $\varphi_t(w) - \min \varphi_t$); default $\sqrt\varepsilon$.
    - `initial_weight`: the first barrier weight $t_0$ (default 1, right when $J$ is
        of order one; the centering at $t_0$ then pulls the start well inside).
    - `weight_factor`: $\mu > 1$ (default 20: few centerings, each a few Newton
        steps).
    - `max_centering_steps`: Newton updates allowed per centering (default 50); a
        centering that runs out moves on to the next $t$ anyway.
    - `max_steps`: Newton updates allowed in total (default 500): steps that the line
        search accepted, so `max_steps=k` moves the iterate $k$ times (unless the
        solve ends first); `BarrierStats.num_steps` counts them.
    - `max_backtracks`: rejected trial steps (halvings) in a row after which a line
        search has failed (default `MAX_BACKTRACKS` = 60).
    - `armijo`: the sufficient-decrease fraction of the line search (default
        `ARMIJO_SLOPE` = 0.1, that of every Newton solver here).

    With the defaults the solve takes about $\log(|C|/(t_0\,\text{gap\_tol}))/\log\mu$
    centerings (7 for 33 constraints in float64). Not reaching the tolerances within
    `max_steps`, or a line search that finds no acceptable step (e.g. a starting point
    outside the domain or NaN data), is reported by the `BarrierStats`' `result`
    (and `converged=False`).
    """

    gap_tol: float | None = None
    decrement_tol: float | None = None
    initial_weight: float = 1.0
    weight_factor: float = 20.0
    max_centering_steps: int = 50
    max_steps: int = 500
    max_backtracks: int = MAX_BACKTRACKS
    armijo: float = ARMIJO_SLOPE

    def __check_init__(self):
        if not self.weight_factor > 1:
            raise ValueError(f"LogBarrier needs weight_factor > 1; got {self.weight_factor}.")
        if not self.initial_weight > 0:
            raise ValueError(f"LogBarrier needs initial_weight > 0; got {self.initial_weight}.")
        if not 0 < self.armijo < 0.5:
            raise ValueError(f"LogBarrier needs 0 < armijo < 0.5; got {self.armijo}.")

    def solve(
        self,
        objective: Objective,
        constrained: tuple[bool, ...],
        args: Args,
        init: Params,
    ) -> tuple[Params, BarrierStats]:
        """Minimises `objective(w, args)` from the strictly feasible `init`.

        `constrained` has one bool per leaf of `init` (in `jax.tree_util` order): the
        entries of a leaf marked `True` are kept positive. Use `barrier_minimise` for a
        pytree mask and the envelope derivative.
        """
        flat_init, unravel = jfu.ravel_pytree(init)
        barrier = _Barrier(objective, args, unravel, _constraint_mask(init, constrained))
        weight = jnp.asarray(self.initial_weight, flat_init.dtype)
        zero = jnp.zeros((), jnp.int32)
        state = _BarrierState(
            point=flat_init,
            weight=weight,
            num_steps=zero,
            fallback_steps=zero,
            # A start outside the domain ends the solve unmoved: from an infinite
            # value the line search would accept any finite trial.
            done=~jnp.isfinite(barrier(flat_init, weight)),
            converged=jnp.array(False),
        )
        # Without constraints the gap is 0, and the first centering is the whole solve.
        state = lax.while_loop(
            lambda state: ~state.done & (state.num_steps < self.max_steps),
            lambda state: self._centre(barrier, state),
            state,
        )
        gradient = jax.grad(barrier)(state.point, state.weight) / state.weight
        stats = BarrierStats(
            num_steps=state.num_steps,
            gradient_norm=optx.max_norm(gradient),
            # A solve that ended unconverged found no step.
            result=solve_result(
                state.converged,
                state.fallback_steps,
                RESULTS.where(
                    state.done, RESULTS.line_search_failed, RESULTS.nonlinear_max_steps_reached
                ),
            ),
            fallback_steps=state.fallback_steps,
            duality_gap=barrier.duality_gap(state.weight),
        )
        return unravel(state.point), stats

    def _tolerances(self, dtype: Any) -> tuple[float, float]:
        """`(gap_tol, decrement_tol)`, their defaults `sqrt(eps)` of `dtype`."""
        root_eps = float(np.sqrt(jnp.finfo(dtype).eps))
        gap_tol = root_eps if self.gap_tol is None else self.gap_tol
        decrement_tol = root_eps if self.decrement_tol is None else self.decrement_tol
        return gap_tol, decrement_tol

    def _centre(self, barrier: "_Barrier", state: "_BarrierState") -> "_BarrierState":
        r"""One centering: damped Newton on $\varphi_t$ (`minimise_updates`) until the
        point is centred or the centering's updates (at most `max_centering_steps`,
        and what is left of `max_steps`) are spent. A centred point ends the solve when
        the duality gap is below `gap_tol`, else moves on to the next barrier weight
        (as does a centering out of updates); a line search that finds no step ends the
        solve unconverged."""
        gap_tol, decrement_tol = self._tolerances(state.point.dtype)
        newton = DampedNewton(
            hessian=AtArgs(barrier.hessian, state.weight),
            descent=_FeasibleNewtonDescent(barrier.mask),
            search=RoundingArmijo(
                optx.BacktrackingArmijo(decrease_factor=BACKTRACK_FACTOR, slope=self.armijo)
            ),
        )
        budget = jnp.minimum(self.max_centering_steps, self.max_steps - state.num_steps)
        solution = minimise_updates(
            barrier,
            # pyright counts the abstract `rtol`, `atol`, `norm` as constructor arguments.
            DecrementTermination(newton, decrement_tol),  # pyright: ignore[reportCallIssue]
            state.point,
            state.weight,
            max_updates=budget,
            max_backtracks=self.max_backtracks,
            throw=False,
        )
        updates = solution.state.updates
        centred = solution.result == optx.RESULTS.successful
        # A centering that ended short of its budget, uncentred, found no step.
        finished = centred & (barrier.duality_gap(state.weight) <= gap_tol)
        done = finished | (~centred & (updates < budget))
        num_steps = state.num_steps + updates
        # The last weight is the one that just meets `gap_tol`: overshooting it by up to
        # the factor μ only makes the last centering harder (in float32, t·J then
        # rounds so coarsely that Newton's method stalls short of the centre).
        last = barrier.duality_gap(jnp.ones_like(state.weight)) / (gap_tol * (1 - 1e-3))
        increased = self.weight_factor * state.weight
        increased = jnp.where(state.weight < last, jnp.minimum(increased, last), increased)
        # The stats report the weight the returned point was centred for.
        advance = ~done & (num_steps < self.max_steps)
        return _BarrierState(
            point=solution.value,
            weight=jnp.where(advance, increased, state.weight),
            num_steps=num_steps,
            fallback_steps=state.fallback_steps + solution.state.inner.descent_state.fallbacks,
            done=done,
            converged=finished,
        )


class _FeasibleNewtonDescent(optx.AbstractDescent):
    """`FallbackNewtonDescent`'s direction, shortened to the largest step that keeps
    the constrained entries positive (`_boundary_step`): the line search's first
    trial. The state's decrement is that of the whole Newton direction."""

    mask: Bool[ArrayLike, " n"]
    newton: FallbackNewtonDescent = FallbackNewtonDescent()

    def init(self, y, f_info_struct):
        return self.newton.init(y, f_info_struct)

    def query(self, y, f_info, state):
        state = self.newton.query(y, f_info, state)
        size = _boundary_step(self.mask, y, -state.newton)
        return eqx.tree_at(lambda s: s.newton, state, size * state.newton)

    def step(self, step_size, state):
        return self.newton.step(step_size, state)


class _BarrierState(eqx.Module):
    """The loop state of `LogBarrier.solve`, between centerings."""

    # The flattened iterate $w$ and the barrier weight $t$.
    point: Float[Array, " n"]
    weight: Float[Array, ""]
    num_steps: Int[Array, ""]
    fallback_steps: Int[Array, ""]
    done: Bool[Array, ""]
    converged: Bool[Array, ""]


class _Barrier(eqx.Module):
    r"""The barrier objective $\varphi_t(w) = t\,J(w) - \sum_{i \in C} \log w_i$ of
    the flattened parameters $w$ (`+inf` outside the domain: a constrained entry
    $\le 0$, or $J$ not finite), and its derivatives."""

    objective: Objective
    args: Args
    unravel: Callable[[Float[Array, " n"]], Params]
    # One bool per entry of `w`: whether it is constrained.
    mask: np.ndarray

    def __call__(self, point: Float[Array, " n"], weight: Scalar) -> Scalar:
        value = weight * self.objective(self.unravel(point), self.args) - self.log_sum(point)
        inside = jnp.all(jnp.where(self.mask, point > 0, True)) & jnp.isfinite(value)
        return jnp.where(inside, value, jnp.inf)

    def log_sum(self, point: Float[Array, " n"]) -> Scalar:
        r"""$\sum_{i \in C} \log w_i$ (NaN where a constrained entry is negative)."""
        return jnp.sum(jnp.where(self.mask, jnp.log(jnp.where(self.mask, point, 1)), 0))

    def hessian(self, point: Float[Array, " n"], weight: Scalar) -> lx.MatrixLinearOperator:
        """The (symmetrised) Hessian at `point`, by forward-over-reverse autodiff."""
        hessian = jax.hessian(self)(point, weight)
        return lx.MatrixLinearOperator(0.5 * (hessian + hessian.T), lx.positive_semidefinite_tag)

    def duality_gap(self, weight: Scalar) -> Scalar:
        """$|C|/t$."""
        return jnp.asarray(self.mask.sum(), weight.dtype) / weight


def _boundary_step(
    mask: Bool[ArrayLike, " n"], point: Float[Array, " n"], step: Float[Array, " n"]
) -> Scalar:
    """The largest step size, at most 1, keeping the constrained entries of `point +
    size * step` positive, shortened by 1% so that none lands on the boundary."""
    decreasing = step < 0
    ratios = jnp.where(mask & decreasing, -point / jnp.where(decreasing, step, -1), jnp.inf)
    return jnp.minimum(1, 0.99 * jnp.min(ratios, initial=jnp.inf))


def _constraint_mask(params: Params, constrained: tuple[bool, ...]) -> np.ndarray:
    """One bool per entry of `ravel_pytree(params)`: whether it is constrained."""
    return np.concatenate(
        [
            np.full(np.size(leaf), flag, bool)
            for leaf, flag in zip(jtu.tree_leaves(params), constrained, strict=True)
        ]
    )


class _BarrierInnerSolver(AbstractInnerSolver):
    r"""Adapts `LogBarrier` to `envelope_minimise`. The minimiser's derivative is that
    of the barrier solution $w_t$: the Hessian is that of $J - \frac1t \sum_{i \in C}
    \log w_i$, with $1/t$ recovered from the duality gap $|C|/t$."""

    barrier: LogBarrier
    constrained: tuple[bool, ...]

    def __call__(
        self, objective: Objective, args: Args, init: Params
    ) -> tuple[Params, BarrierStats]:
        return self.barrier.solve(objective, self.constrained, args, init)

    def solution_jvp(self, objective, solution, stats, args, t_args):
        solve = self.hessian_solve(objective, solution, stats, args)
        return implicit_solution_jvp(solve, objective, solution, args, t_args)

    def hessian_solve(self, objective, solution, stats, args):
        flat, unravel = jfu.ravel_pytree(solution)
        barrier = _Barrier(objective, args, unravel, _constraint_mask(solution, self.constrained))
        inverse_weight = stats.duality_gap / max(int(barrier.mask.sum()), 1)

        def scaled_barrier(v):
            return objective(unravel(v), args) - inverse_weight * barrier.log_sum(v)

        return dense_hessian_solve(jax.hessian(scaled_barrier)(flat), unravel)


def barrier_minimise(
    objective: Objective,
    args: Args,
    init: Params,
    *,
    constrained: PyTree[bool],
    solver: LogBarrier | None = None,
    check: Check | None = None,
) -> tuple[Scalar, Params, BarrierStats]:
    r"""$L(a) = \min_w \{J(w; a) : w_i \ge 0,\ i \in C\}$ by a log-barrier method, with
    the envelope derivative in the data $a$.

    This is how to use `LogBarrier` on a convex problem of your own: write
    $J$ as `objective(w, args)`, mark the constrained leaves of `w`, give a strictly
    feasible start. The solve returns the barrier minimiser $w_t$, where
    $\partial_w J(w_t) = \frac1t \operatorname{diag}(w_t)^{-1} 1_C$; the value is
    $J(w_t; a)$, within the duality gap $|C|/t$ of the constrained minimum, and its
    derivative in $a$ is the partial derivative $\partial_a J(w_t; a)$ (the envelope
    theorem for $J - \frac1t\sum_{i\in C}\log w_i$, whose barrier term does not depend
    on $a$). It differs from the derivative of the exact constrained minimum by
    $O(|C|/t)$.

    For example, nonnegative least squares $\min_{w \ge 0} \|Aw - b\|^2/2$:

    ```python
    def objective(w, args):
        a, b = args
        return 0.5 * jnp.sum((a @ w - b) ** 2)

    value, w, stats = barrier_minimise(
        objective, (a, b), jnp.ones(a.shape[1]), constrained=True
    )
    ```

    **Arguments:**

    - `objective`: `objective(w, args) -> scalar`, convex in `w`, returning `+inf`
        (or NaN) outside its domain. Hashable: a module-level function or an
        `eqx.Module`.
    - `args`: the data, a pytree; its floating-point leaves are differentiable.
    - `init`: a strictly feasible start (constrained entries `> 0`, objective finite).
        Its structure and dtype are those of the solution.
    - `constrained`: a pytree of Python bools, a prefix of `init`'s structure: the
        entries under a `True` are constrained to be nonnegative (`True` alone
        constrains everything).
    - `solver`: the `LogBarrier` and its tolerances; `LogBarrier()` if `None`.
    - `check`: optional runtime checks on the value and the solution, run inside the
        solve so that they fire under every derivative (see `envelope_minimise`):
        `check(value, solution, stats) -> (value, solution)`.

    **Returns:**

    `(value, solution, stats)`: $J(w_t; a)$ (carrying the envelope derivative), $w_t$
    (with the implicit derivative of $w_t$) and the `BarrierStats`. Check
    `stats.converged`.
    """
    flags = jtu.tree_map(lambda flag, sub: jtu.tree_map(lambda _: flag, sub), constrained, init)
    flags = tuple(jtu.tree_leaves(flags))
    if not all(isinstance(flag, bool) for flag in flags):
        raise TypeError(
            "`constrained` must be a pytree of Python bools (a prefix of the structure "
            f"of `init`); got {constrained!r}."
        )
    inner = _BarrierInnerSolver(LogBarrier() if solver is None else solver, flags)
    return envelope_minimise(objective, inner, args, init, check=check)
