import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jaxtyping import Array, Float, PyTree, Scalar

from ._diagnostics import InnerStats
from ._envelope import (
    AbstractInnerSolver,
    Args,
    Check,
    dense_hessian_solve,
    envelope_minimise,
    Objective,
    Params,
)


class BarrierStats(InnerStats):
    r"""Diagnostics of a `LogBarrier` solve: the fields of `vploss.InnerStats`
    (`num_steps` counts Newton steps over all centerings, `gradient_norm` is the norm
    of the gradient of the barrier objective $J - \frac1t\sum_i \log w_i$ at the
    returned point), and

    - `duality_gap`: the bound $p/t$ on $J(w) - \min J$ at the final barrier weight
        $t$, for $p$ constrained entries; the complementary slackness products
        $w_i\,\partial J/\partial w_i$ of the returned point are all $\approx 1/t$.
    """

    duality_gap: Float[Array, ""]


class LogBarrier(eqx.Module):
    r"""A log-barrier interior-point method (Boyd and Vandenberghe, *Convex
    Optimization*, section 11.3) for

    $$\min_w J(w) \quad\text{subject to}\quad w_i > 0 \text{ for the constrained
    entries } i \in C,$$

    where $J$ is convex and twice differentiable on its (open) domain. For an increasing
    barrier weight $t$ it minimises

    $$\varphi_t(w) = t\,J(w) - \sum_{i \in C} \log w_i$$

    by damped Newton steps, the Newton system solved by a Cholesky factorisation
    (lineax) of the Hessian of $\varphi_t$. A step is accepted by a backtracking
    (Armijo) line search that starts at the largest step keeping every constrained
    entry positive and halves it while $\varphi_t$ is not finite or does not decrease
    enough, so every iterate stays strictly feasible. An objective with a domain of
    its own (e.g. $\log\det$ of a matrix that must stay positive definite) expresses it
    by returning `+inf` (or NaN) outside it: such steps are rejected like infeasible
    ones. When the Newton decrement $\lambda^2/2 = -\tfrac12 \nabla\varphi_t^\top
    \Delta w$ falls below `decrement_tol`, the point is centred; then, if the duality
    gap $|C|/t$ is below `gap_tol` the solve ends, else $t \leftarrow \mu t$. The
    returned point $w_t$ satisfies $J(w_t) - \min J \le |C|/t$ (up to the centering
    accuracy).

    Everything runs in one `lax.while_loop`, so the solve is jittable and vmappable.
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
    - `max_centering_steps`: Newton steps allowed per centering (default 50); a
        centering that runs out moves on to the next $t$ anyway.
    - `max_steps`: Newton steps allowed in total (default 500).
    - `max_backtracks`: step halvings allowed per line search (default 60).
    - `armijo`: the sufficient-decrease fraction of the line search (default 0.25).

    With the defaults the solve takes about $\log(|C|/(t_0\,\text{gap\_tol}))/\log\mu$
    centerings (7 for 33 constraints in float64). Not reaching the tolerances within
    `max_steps`, or a line search that finds no acceptable step (e.g. a starting point
    outside the domain or NaN data), is reported by `converged=False` in the
    `BarrierStats`.
    """

    gap_tol: float | None = None
    decrement_tol: float | None = None
    initial_weight: float = 1.0
    weight_factor: float = 20.0
    max_centering_steps: int = 50
    max_steps: int = 500
    max_backtracks: int = 60
    armijo: float = 0.25

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
        dtype = flat_init.dtype
        mask = _constraint_mask(init, constrained)
        num_constraints = int(mask.sum())
        eps = float(jnp.finfo(dtype).eps)
        gap_tol = np.sqrt(eps) if self.gap_tol is None else self.gap_tol
        decrement_tol = np.sqrt(eps) if self.decrement_tol is None else self.decrement_tol

        def barrier(w, t):
            safe = jnp.where(mask, w, 1)
            logs = jnp.sum(jnp.where(mask, jnp.log(safe), 0))
            value = t * objective(unravel(w), args) - logs
            feasible = jnp.all(jnp.where(mask, w > 0, True)) & jnp.isfinite(value)
            return jnp.where(feasible, value, jnp.inf)

        def derivatives(w, t):
            def gradient(v):
                value, grad = jax.value_and_grad(barrier)(v, t)
                return grad, (grad, value)

            hessian, (grad, value) = jax.jacfwd(gradient, has_aux=True)(w)
            return value, grad, 0.5 * (hessian + hessian.T)

        def line_search(w, t, value, gradient, step):
            slope = jnp.dot(gradient, step, precision=lax.Precision.HIGHEST)
            # The largest step keeping the constrained entries positive, shortened so
            # that none lands on the boundary.
            ratios = jnp.where(mask & (step < 0), -w / jnp.where(step < 0, step, -1), jnp.inf)
            first = jnp.minimum(1, 0.99 * jnp.min(ratios, initial=jnp.inf))
            # Rounding slack: near the centre the decrease is below the resolution of
            # φ_t, and a correct Newton step must not be refused for it.
            slack = 16 * eps * (1 + jnp.abs(value))

            def cond(carry):
                _, tries, accepted = carry
                return ~accepted & (tries <= self.max_backtracks)

            def body(carry):
                size, tries, _ = carry
                size = size / 2
                trial = barrier(w + size * step, t)
                accepted = trial <= value + self.armijo * size * slope + slack
                return size, tries + 1, accepted

            size, _, accepted = lax.while_loop(cond, body, (2 * first, 0, jnp.array(False)))
            return size, accepted & jnp.isfinite(value) & jnp.isfinite(slope) & (slope <= 0)

        def cond(state):
            _, _, steps, _, done, _ = state
            return ~done & (steps < self.max_steps)

        def body(state):
            w, t, steps, centring_steps, _, _ = state
            value, gradient, hessian = derivatives(w, t)
            operator = lx.MatrixLinearOperator(hessian, lx.positive_semidefinite_tag)
            step = lx.linear_solve(operator, -gradient, lx.Cholesky(), throw=False).value
            decrement = -jnp.dot(gradient, step, precision=lax.Precision.HIGHEST) / 2
            size, ok = line_search(w, t, value, gradient, step)
            w = jnp.where(ok, w + size * step, w)
            centred = decrement <= decrement_tol
            next_weight = centred | (centring_steps + 1 >= self.max_centering_steps)
            finished = centred & (num_constraints / t <= gap_tol)
            converged = finished & ok
            done = finished | ~ok
            t = jnp.where(next_weight & ~done, self.weight_factor * t, t)
            centring_steps = jnp.where(next_weight, 0, centring_steps + 1)
            return w, t, steps + 1, centring_steps, done, converged

        # Without constraints the gap is 0, and the first centering is the whole solve.
        t0 = jnp.asarray(self.initial_weight, dtype)
        state = (flat_init, t0, 0, 0, jnp.array(False), jnp.array(False))
        w, t, steps, _, _, converged = lax.while_loop(cond, body, state)
        gradient = jax.grad(barrier)(w, t) / t
        stats = BarrierStats(
            num_steps=jnp.asarray(steps),
            gradient_norm=jnp.linalg.norm(gradient),
            converged=converged,
            duality_gap=jnp.asarray(num_constraints, dtype) / t,
        )
        return unravel(w), stats


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

    def hessian_solve(self, objective, solution, stats, args):
        flat, unravel = jfu.ravel_pytree(solution)
        mask = _constraint_mask(solution, self.constrained)
        inverse_weight = stats.duality_gap / max(int(mask.sum()), 1)
        hessian = jax.hessian(lambda v: objective(unravel(v), args))(flat)
        barrier_curvature = jnp.where(mask, inverse_weight / jnp.where(mask, flat, 1) ** 2, 0)
        return dense_hessian_solve(hessian + jnp.diag(barrier_curvature), unravel)


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
