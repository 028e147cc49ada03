r"""The inner solvers of the readout losses (the `vploss_*` function of each loss in
`READOUT_LOSSES`, and `vploss_glm` with any `AbstractReadoutLoss`): solver objects
that carry their tolerances, and the `AbstractInnerSolver` that runs them for
`envelope_minimise`."""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeAlias

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Float

from .._core.envelope import AbstractInnerSolver, dense_hessian_solve, implicit_solution_jvp
from .._core.newton import (
    AtArgs,
    BudgetedTruncatedNewton,
    DampedNewton,
    default_gtol,
    descent_loss_error,
    FallbackNewtonDescent,
    GradientNormTermination,
    inner_converged,
    loss_error_bound,
    minimise_updates,
    newton_cg_max_steps,
    scaled_gradient_norm,
    TruncatedNewtonDescent,
)
from .._core.stats import InnerStats, RESULTS, solve_result
from .kernel_newton import kernel_hessian_solve, KernelNewtonDescent, RowSpace
from .objective import KroneckerPreconditioner, ReadoutArgs, ReadoutObjective


SolverName: TypeAlias = Literal[
    "auto", "newton", "newton-cg", "kernel-newton", "budgeted-newton-cg", "bfgs", "lbfgs"
]

#: `AutoNewton` uses the exact Newton method while one of its Hessians costs at most
#: this many Hessian-vector products (`exact_newton_cost`), and Newton–CG beyond.
#: Below this cost exact Newton is the faster of the two on warm-started training
#: steps: Newton–CG's float32 steps near the solution need many CG iterations (the
#: loss test's residual), which exact Newton's Cholesky direction does not. From a
#: cold start (no `init`) Newton–CG is faster near the threshold, but warm starts are
#: the training loop's case. The timings behind the value are on the benchmark page,
#: 'Solver choice: exact Newton or Newton–CG'.
MAX_EXACT_NEWTON_COST = 220

#: The readout's implicit derivative (`InnerMinimise.hessian_solve`) factors the exact
#: Hessian by Cholesky up to this many coefficients `p·k` (building it costs
#: `O(N (pk)^2)`, factoring it `O((pk)^3)`), and solves by preconditioned CG beyond.
#: In float32 CG cannot reach a tight residual on the ill-conditioned Hessians of
#: small `alpha2` (it did not converge, or gave NaN tangents with a loose test; see
#: the benchmark page, 'The readout's implicit derivative: Cholesky or CG');
#: Cholesky's error is bounded by the condition number times `eps`.
MAX_DENSE_SOLVE_SIZE = 2048

#: The Newton steps of a solve from zero, the low end of `Newton`'s 5-12: how many
#: `KernelNewton` steps `NewtonCG`'s one-off preconditioner cost is shared by in
#: `AutoNewton`'s choice.
COLD_NEWTON_STEPS = 5

_DEFAULT_MAX_STEPS = 100


def _check_options(gtol: float | None, max_steps: int) -> None:
    if gtol is not None and (
        isinstance(gtol, bool) or not isinstance(gtol, int | float) or not gtol > 0
    ):
        raise ValueError(f"`gtol` must be a positive Python float or None; got {gtol!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive Python int; got {max_steps!r}.")


class AbstractGLMSolver(eqx.Module):
    r"""An inner solver of a readout loss: it minimises the inner objective $J$
    (`ReadoutObjective`) over the readout's coefficients until the scaled gradient
    $\max_{p,c}|\partial J/\partial\hat W_{cp}| / s_p \le$ `gtol` ($s_p$ the scale of
    feature $p$, `ReadoutObjective.gradient_scale`) and the loss is within its tolerance
    of the minimum, in at most `max_steps` updates: iterates it moves to (steps that
    leave the iterate in place, like a rejected line-search trial, do not count;
    `UpdateBudget`), so `max_steps=1` takes one update.

    Subclasses set the fields `gtol` (`None`: $\sqrt\varepsilon$ of the dtype) and
    `max_steps`, and implement `optimistix_minimiser`."""

    gtol: eqx.AbstractVar[float | None]
    max_steps: eqx.AbstractVar[int]

    #: Whether the solver stops at a fixed budget by design (`BudgetedNewtonCG`): a
    #: spent budget is then `RESULTS.budget_spent`, not an error.
    fixed_budget: ClassVar[bool] = False

    def __check_init__(self):
        _check_options(self.gtol, self.max_steps)

    @abc.abstractmethod
    def optimistix_minimiser(
        self, objective: ReadoutObjective, args: ReadoutArgs, gtol: float, num_coefficients: int
    ) -> optx.AbstractMinimiser:
        """The optimistix minimiser for this problem (its data may shape it)."""


def _terminated(minimiser: optx.AbstractQuasiNewton, objective, args, gtol):
    # The abstract `rtol`, `atol`, `norm` of `GradientNormTermination` are properties;
    # pyright counts them as constructor arguments.
    return GradientNormTermination(minimiser, gtol, objective.gradient_scale(args), args.alpha2)  # pyright: ignore[reportCallIssue]


class Newton(AbstractGLMSolver):
    r"""Newton's method on the exact Hessian $\frac1N\sum_j\omega_j C_j\otimes\hat f_j
    \hat f_j^\top + \alpha_2 I$ ($C_j$ the loss's curvature in the logits, $\omega_j =
    N w_j/\sum_i w_i$ the normalised sample weights, 1 without weights), solved by
    Cholesky (`lineax.Cholesky`, with a shifted and a gradient fallback where it is not
    numerically positive definite), with a backtracking Armijo line search that
    allows for the objective's rounding. Quadratic convergence: about 5-12 steps from
    a cold start, 1-3 from a warm one. Forming the Hessian costs $O(N(pk)^2)$ per step
    for $p = m + 1$ coefficients per output and $k$ outputs: the choice for up to a few
    hundred coefficients.

    **Arguments:**

    - `gtol`: the tolerance on the scaled gradient; `None` (default): $\sqrt
        \varepsilon$ of the dtype (3.5e-4 in float32, 1.5e-8 in float64).
    - `max_steps`: the most Newton updates (steps its line search accepted; rejected
        trial step sizes do not count), default 100.
    """

    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del num_coefficients
        descent = FallbackNewtonDescent(args.alpha2)
        newton = DampedNewton(hessian=AtArgs(objective.hessian, args), descent=descent)
        return _terminated(newton, objective, args, gtol)


class NewtonCG(AbstractGLMSolver):
    r"""Truncated Newton: the line search of `Newton` with the Newton step from
    preconditioned CG (`lineax.CG`) on Hessian-vector products $\hat F^\top\Omega
    C(\hat F V)/N + \alpha_2 V$ (two matmuls over samples, $O(Npk)$ each; the Hessian
    is never formed), stopped at the relative residual $\min(0.5, \max(\sqrt{|g|},
    \mathrm{gtol}/(2|g|)))$ or after `max_cg_steps` iterations, preconditioned by
    $(\bar A\otimes\hat F^\top\Omega\hat F/N + \alpha_2 I)^{-1}$ with $\bar A$ the mean
    curvature in the logits (`KroneckerPreconditioner`). Converges in float32 down to
    `alpha2 = 1e-6`, in more steps than `Newton`, each cheaper: the choice beyond a
    few hundred coefficients.

    **Arguments:**

    - `gtol`, `max_steps`: as for `Newton`.
    - `max_cg_steps`: CG iterations per Newton step; `None` (default): 5 for
        tolerances like float32's, 20 below 1e-5 (`newton_cg_max_steps`).
    """

    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS
    max_cg_steps: int | None = None

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del num_coefficients
        max_cg_steps = newton_cg_max_steps(gtol) if self.max_cg_steps is None else self.max_cg_steps
        descent = TruncatedNewtonDescent(
            KroneckerPreconditioner(objective, args),
            gtol,
            objective.gradient_scale(args),
            args.alpha2,
            max_cg_steps,
        )
        newton = DampedNewton(hessian=AtArgs(objective.hessian_product, args), descent=descent)
        return _terminated(newton, objective, args, gtol)


class BudgetedNewtonCG(AbstractGLMSolver):
    r"""The inexact mode for mini-batch training loops: a fixed budget of at most
    `max_steps` Newton–CG updates of `max_cg_steps` CG iterations each
    (`BudgetedTruncatedNewton`: CG on Hessian-vector products preconditioned by
    `ReadoutObjective.centred_jacobi` (one pass over the samples), a
    backtracking line search, no Gram matrix or eigendecomposition), from the warm
    start `init`. It stops earlier where the tolerance of `Newton` is met; otherwise
    the readout is inexact, by design, and the solve reports `RESULTS.budget_spent`,
    which is not an error (`throw=True` raises only for real failures).

    The returned loss and gradient are then those of the inner objective at the
    returned readout $\tilde W$: the loss $J(\theta, \tilde W) \ge L(\theta)$ and its
    gradient $\partial_\theta J(\theta, \tilde W)$, exact for that fixed readout (so a
    step of the network and a few Newton steps of the readout alternate, as in block
    coordinate descent). `readout.stats` bounds the gap to the exact reduced loss:
    `loss_error_bound` ($\|\nabla J\|^2/(2\alpha_2)$), `readout_error_bound` and
    `gradient_error_bound` (the envelope gradient's relative error in the features).
    The bounds are rigorous and loose at small `alpha2`. The readout's implicit
    derivative is that of the exact minimiser evaluated at $\tilde W$.

    Pass the previous step's readout as `init` every step: the budget then refines a
    readout that has followed the training, rather than solving each batch anew.
    Where the docs promise exactness (the default solvers), nothing changes.

    **Arguments:**

    - `max_steps`: Newton updates per call at most, default 1.
    - `max_cg_steps`: CG iterations per update at most, default 10.
    - `gtol`: the tolerance of `Newton` at which it stops early; `None` (default):
        $\sqrt\varepsilon$ of the dtype.
    """

    max_steps: int = 1
    max_cg_steps: int = 10
    gtol: float | None = None
    fixed_budget: ClassVar[bool] = True

    def __check_init__(self):
        if (
            isinstance(self.max_cg_steps, bool)
            or not isinstance(self.max_cg_steps, int)
            or self.max_cg_steps < 1
        ):
            raise ValueError(
                f"`max_cg_steps` must be a positive Python int; got {self.max_cg_steps!r}."
            )

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del num_coefficients
        return BudgetedTruncatedNewton(
            hessian=AtArgs(objective.hessian_product, args),
            preconditioner=AtArgs(objective.centred_jacobi, args),
            gtol=gtol,
            scale=objective.gradient_scale(args),
            alpha2=args.alpha2,
            max_cg_steps=self.max_cg_steps,
        )


def exact_newton_cost(objective: ReadoutObjective, args: ReadoutArgs) -> float:
    r"""The cost of one exact Newton step's Hessian in Hessian-vector products (the
    unit of Newton–CG's cost), from the shapes alone: forming it costs $2Np^2(k +
    r^2)$ flops (`ReadoutObjective.hessian`: the per-output Gram matrices and the
    rank-one term's, $r$ its columns: $k - 1$ with a `basis`, else $k$; 0 without one)
    and factoring it $(pk)^3/3$, for $N$ samples, $p$ coefficients per output and $k$
    outputs; a product costs $4Np\max(k, 4)$: it reads the $N \times p$ features
    twice, which costs about as much as a product with four columns (memory-bound)."""
    num_samples, p = args.features.shape
    k = args.labels.shape[1]
    logits = jax.ShapeDtypeStruct((num_samples, k), args.features.dtype)
    curvature = jax.eval_shape(objective.loss.curvature, logits, args.labels)
    if curvature.rank_one is None:
        rank_one = 0
    else:
        rank_one = k if objective.loss.basis(k) is None else k - 1
    hessian = 2 * num_samples * p**2 * (k + rank_one**2) + (p * k) ** 3 / 3
    return hessian / (4 * num_samples * p * max(k, 4))


def kernel_newton_cost(objective: ReadoutObjective, args: ReadoutArgs) -> float:
    r"""The cost of one `KernelNewton` step in Hessian-vector products (the unit of
    `exact_newton_cost`), from the shapes alone: the QR factorisation of the `(p, N)`
    features $\hat F^\top$ with its basis formed, about $4pN^2$ flops (once per solve,
    counted whole), and the Hessian of $N$ features, `exact_newton_cost` at $p = N$,
    over a product's $4Np\max(k, 4)$."""
    num_samples, p = args.features.shape
    k = args.labels.shape[1]
    reduced = eqx.tree_at(
        lambda a: a.features,
        args,
        jax.ShapeDtypeStruct((num_samples, num_samples), args.features.dtype),
    )
    unit = 4 * num_samples * max(k, 4)
    hessian = exact_newton_cost(objective, reduced) * unit * num_samples
    return (4 * p * num_samples**2 + hessian) / (unit * p)


class KernelNewton(AbstractGLMSolver):
    r"""Newton's method for fewer samples than coefficients ($N < p$): the line search
    and stopping test of `Newton`, with the exact Newton direction from the span of
    the features' rows (a kernel, or dual, form). With the Householder QR
    factorisation $\hat F^\top = QR$ (`(p, N)` and `(N, N)`, once per solve) and the
    coefficients $V = Qc + V_\perp$,

    $$H^{-1}g = Q\tilde H^{-1}Q^\top g + V_\perp,$$

    where $\tilde H$ is the Hessian of the same loss with the $N$ features $\tilde F =
    R^\top$ (`(Nk, Nk)`, formed and factored as `Newton` does, with its fallbacks),
    and on $V_\perp$, orthogonal to every sample's features, the Hessian is $\alpha_2
    I$ and the gradient $\alpha_2 V_\perp$. This holds because the penalty is on every
    coefficient (the bias included) and the data term sees the readout only through
    the logits $\hat F\hat W^\top$. Per-sample weights, `use_bias=False`, several
    outputs and the softmax's basis are those of the Hessian of $\tilde F$. A step
    costs $O(N^3k^2 + (Nk)^3 + Npk)$ instead of $O(N(pk)^2 + (pk)^3)$, and no `(p,
    p)` array is formed. The iterates are `Newton`'s up to rounding, including a warm
    start outside the features' span (a readout fitted on another batch). The choice
    of `AutoNewton` for wide features.

    **Arguments:** `gtol`, `max_steps` as for `Newton`.
    """

    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del num_coefficients
        descent = KernelNewtonDescent(objective, args, RowSpace(args.features))
        # The line search's Hessian is only multiplied (the Newton decrement bound).
        newton = DampedNewton(hessian=AtArgs(objective.hessian_product, args), descent=descent)
        return _terminated(newton, objective, args, gtol)


def kronecker_preconditioner_cost(objective: ReadoutObjective, args: ReadoutArgs) -> float:
    r"""The one-off cost of `NewtonCG`'s preconditioner (`KroneckerPreconditioner`) in
    Hessian-vector products (`exact_newton_cost`'s unit): the `(p, p)` Gram matrix,
    $2Np^2$ flops, and its eigendecomposition, about $9p^3$ (Golub and Van Loan's count
    for the symmetric QR algorithm with eigenvectors). Small beside a solve's products
    when $N \gg p$; with wide features it exceeds the kernel method's whole step."""
    del objective
    num_samples, p = args.features.shape
    k = args.labels.shape[1]
    return (2 * num_samples * p**2 + 9 * p**3) / (4 * num_samples * p * max(k, 4))


class AutoNewton(AbstractGLMSolver):
    r"""An exact Newton method while one of its steps is cheap against `NewtonCG`,
    else `NewtonCG`, by the flop counts of the shapes (each in Hessian-vector
    products, `NewtonCG`'s unit of cost):

    - `KernelNewton` when a step costs less than `Newton`'s (`kernel_newton_cost`
        against `exact_newton_cost`: fewer samples than coefficients per output, $N
        \lesssim p = m + 1$) and at most `MAX_EXACT_NEWTON_COST = 220` plus
        `NewtonCG`'s one-off cost (`kronecker_preconditioner_cost`: the `(p, p)` Gram
        matrix and its eigendecomposition, which the kernel method never forms) shared
        by `COLD_NEWTON_STEPS = 5` steps. With one output (logistic, Poisson) that is
        from about $m = 2N$ on, at any width (a step's $O(N^3)$ does not grow with $m$);
        with K = 10 classes, whose reduced Hessian is `(NK, NK)`, from about m = 1,100
        at N = 200 and m = 2,400 at N = 400.
    - else `Newton` while its step costs at most `MAX_EXACT_NEWTON_COST`: the logistic
        and Poisson losses up to about 1,400-1,700 features at N ≥ 1000 (about 600 at N
        = 50: the factorisation's share grows), the softmax loss with K = 10 classes up
        to about 45 (its Hessian has the rank-one term of $K - 1$ columns:
        $O(NK^2m^2)$ flops).
    - else `NewtonCG`.

    The default. `choose` tells which solver a problem gets.

    **Arguments:** `gtol`, `max_steps` as for `Newton`.
    """

    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS

    def choose(self, objective: ReadoutObjective, args: ReadoutArgs) -> AbstractGLMSolver:
        """The solver this problem gets, from the shapes of `args` alone."""
        kernel = kernel_newton_cost(objective, args)
        exact = exact_newton_cost(objective, args)
        # `NewtonCG`'s one-off cost, shared by the steps of a cold exact Newton solve.
        one_off = kronecker_preconditioner_cost(objective, args) / COLD_NEWTON_STEPS
        allowance = MAX_EXACT_NEWTON_COST + one_off
        if kernel < exact and kernel <= allowance:
            solver = KernelNewton
        elif exact <= MAX_EXACT_NEWTON_COST:
            solver = Newton
        else:
            solver = NewtonCG
        return solver(gtol=self.gtol, max_steps=self.max_steps)

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        return self.choose(objective, args).optimistix_minimiser(
            objective, args, gtol, num_coefficients
        )


class QuasiNewton(AbstractGLMSolver):
    """An optimistix quasi-Newton minimiser (`optx.BFGS`, `optx.LBFGS`, ...) stopped
    by the same test as `Newton` (its own Cauchy criterion is replaced). Its Armijo
    line search cannot resolve the objective's last digits, so it often stalls above
    the default `gtol`: pass a larger one.

    **Arguments:**

    - `minimiser`: the quasi-Newton minimiser, e.g. `optx.BFGS(rtol=0.0, atol=0.0)`.
    - `gtol`, `max_steps`: as for `Newton`: `max_steps` counts the quasi-Newton
        updates (steps its line search accepted). A line search that rejects more than
        `MAX_BACKTRACKS = 60` trial steps in a row, as a stalled one does, ends the
        solve.
    """

    minimiser: optx.AbstractQuasiNewton
    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS

    def __check_init__(self):
        if not isinstance(self.minimiser, optx.AbstractQuasiNewton):
            raise TypeError(
                "`QuasiNewton` needs an `optimistix.AbstractQuasiNewton` (e.g. "
                f"`optx.BFGS(rtol=0.0, atol=0.0)`); got {self.minimiser!r}."
            )

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del num_coefficients
        return _terminated(self.minimiser, objective, args, gtol)


class OptimistixMinimiser(AbstractGLMSolver):
    """Any optimistix minimiser, used as it is with its own stopping rule; the solve
    counts as converged when it reports success and the scaled gradient is below
    `gtol`.

    **Arguments:**

    - `minimiser`: an `optx.AbstractMinimiser`.
    - `gtol`, `max_steps`: as for `Newton`: `max_steps` counts the minimiser's
        optimistix steps that move the iterate (for a quasi-Newton minimiser, its
        accepted steps), not those that leave it in place (its evaluation of the start,
        rejected trials), of which more than `MAX_BACKTRACKS = 60` in a row end the
        solve.
    """

    minimiser: optx.AbstractMinimiser
    gtol: float | None = None
    max_steps: int = _DEFAULT_MAX_STEPS

    def __check_init__(self):
        if not isinstance(self.minimiser, optx.AbstractMinimiser):
            raise TypeError(
                f"`OptimistixMinimiser` needs an `optimistix.AbstractMinimiser`; got "
                f"{self.minimiser!r}."
            )

    def optimistix_minimiser(self, objective, args, gtol, num_coefficients):
        del objective, args, gtol, num_coefficients
        return self.minimiser


#: The shorthands `solver="..."` for the solver objects (the keys are `SolverName`'s):
#: a name stands for its object, with the loss's `gtol` and `max_steps` set on it.
_SOLVERS: dict[str, AbstractGLMSolver] = {
    "auto": AutoNewton(),
    "newton": Newton(),
    "newton-cg": NewtonCG(),
    "kernel-newton": KernelNewton(),
    "budgeted-newton-cg": BudgetedNewtonCG(),
    # Cauchy criteria off: the gradient test stops them.
    "bfgs": QuasiNewton(minimiser=optx.BFGS(rtol=0.0, atol=0.0)),
    "lbfgs": QuasiNewton(minimiser=optx.LBFGS(rtol=0.0, atol=0.0)),
}


def as_readout_solver(solver: Any, gtol: float | None, max_steps: int | None) -> AbstractGLMSolver:
    """The solver object of a loss's `solver=`, `gtol=` and `max_steps=` arguments: a
    solver object as it is (its own `gtol` and `max_steps`, so those arguments must be
    left unset), a name (a shorthand for the object with those arguments), or an
    optimistix minimiser (`OptimistixMinimiser`)."""
    if isinstance(solver, AbstractGLMSolver):
        if gtol is not None or max_steps is not None:
            raise ValueError(
                "`gtol` and `max_steps` belong to the solver object when `solver` is one "
                f"(e.g. `vploss.Newton(gtol=..., max_steps=...)`); got solver={solver!r}, "
                f"gtol={gtol!r}, max_steps={max_steps!r}."
            )
        return solver
    if isinstance(solver, optx.AbstractMinimiser):
        max_steps = _DEFAULT_MAX_STEPS if max_steps is None else max_steps
        _check_options(gtol, max_steps)
        return OptimistixMinimiser(minimiser=solver, gtol=gtol, max_steps=max_steps)
    if isinstance(solver, str) and solver in _SOLVERS:
        default = _SOLVERS[solver]
        max_steps = default.max_steps if max_steps is None else max_steps
        _check_options(gtol, max_steps)
        return dataclasses.replace(default, gtol=gtol, max_steps=max_steps)
    raise ValueError(
        f"`solver` must be one of {tuple(_SOLVERS)}, a vploss solver object (e.g. "
        "`vploss.Newton()`) or an `optimistix.AbstractMinimiser`; got "
        f"{solver!r}."
    )


class InnerMinimise(AbstractInnerSolver):
    r"""The `AbstractInnerSolver` of a readout loss: runs `solver`'s optimistix
    minimiser on the `ReadoutObjective` from `init` or from zero, and reports
    `InnerStats`.

    The readout's (implicit) derivative solves with the exact Hessian: in kernel form
    (`kernel_hessian_solve`, a Cholesky factorisation of its `(Nk, Nk)` part in the
    span of the features' rows) where that costs less than the Hessian
    (`kernel_newton_cost` against `exact_newton_cost`) and $Nk \le$
    `MAX_DENSE_SOLVE_SIZE`, else by Cholesky
    (`dense_hessian_solve`) up to `MAX_DENSE_SOLVE_SIZE` coefficients, beyond by CG on
    Hessian-vector products with the Kronecker preconditioner, to a relative residual
    of `eps**0.75`, raising an error where CG cannot reach it (never a silently wrong
    tangent)."""

    solver: AbstractGLMSolver

    def __call__(self, objective: ReadoutObjective, args: ReadoutArgs, init: Array | None):
        shape = (args.features.shape[1], args.labels.shape[1])
        dtype = args.features.dtype
        gtol = default_gtol(dtype) if self.solver.gtol is None else float(self.solver.gtol)
        if init is None:
            init = jnp.zeros(shape, dtype)
        minimiser = self.solver.optimistix_minimiser(objective, args, gtol, shape[0] * shape[1])
        solution = minimise_updates(
            objective,
            minimiser,
            init,
            args,
            max_updates=self.solver.max_steps,
            throw=False,
            # The solve is never differentiated (the envelope rule replaces it).
            adjoint=optx.RecursiveCheckpointAdjoint(),
        )
        coef = solution.value
        state = solution.state.inner
        if self.solver.fixed_budget:
            # `BudgetedTruncatedNewton` holds them at the returned iterate.
            value, gradient = state.value, state.gradient
        elif hasattr(getattr(state, "f_info", None), "grad"):
            # A quasi-Newton state (`DampedNewton`'s, BFGS's) holds them at the last
            # accepted iterate, the returned one: no second copy of the objective and
            # its gradient to compile.
            value, gradient = state.f_info.f, state.f_info.grad
        else:
            value, gradient = jax.value_and_grad(objective)(coef, args)
        scale = objective.gradient_scale(args)
        # The descent's state holds its direction at the last accepted iterate, the
        # returned one.
        decrement = descent_loss_error(state)
        stopped = solution.result == optx.RESULTS.successful
        converged = stopped & inner_converged(value, gradient, scale, args.alpha2, gtol, decrement)
        # `BudgetedTruncatedNewton` keeps its counts in its own state.
        counts = getattr(state, "descent_state", state)
        fallback_steps = getattr(counts, "fallbacks", jnp.zeros((), jnp.int32))
        # A minimiser that stopped by its own criterion (`OptimistixMinimiser`) may
        # stop short of the gradient test.
        failure = RESULTS.where(
            stopped, RESULTS.tolerance_not_met, RESULTS.promote(solution.result)
        )
        result = solve_result(converged, fallback_steps, failure)
        if self.solver.fixed_budget:
            # A spent budget, or progress stopped by rounding, is the inexact readout
            # this solver promises; a line search that found no finite value is not.
            spent = solution.result == optx.RESULTS.nonlinear_max_steps_reached
            spent = spent | (state.stuck & jnp.isfinite(value))
            result = RESULTS.where(converged | ~spent, result, RESULTS.budget_spent)
            failed = state.stuck & ~jnp.isfinite(value)
            result = RESULTS.where(failed & ~converged, RESULTS.line_search_failed, result)
        readout_error, gradient_error = objective.gradient_error_bounds(coef, gradient, args)
        return coef, InnerStats(
            num_steps=solution.state.updates,
            gradient_norm=scaled_gradient_norm(gradient, scale),
            result=result,
            alpha2=args.alpha2,
            loss_error_bound=loss_error_bound(gradient, args.alpha2, decrement),
            fallback_steps=fallback_steps,
            cg_steps=getattr(counts, "cg_steps", jnp.zeros((), jnp.int32)),
            readout_error_bound=readout_error,
            gradient_error_bound=gradient_error,
        )

    def solution_jvp(
        self,
        objective: ReadoutObjective,
        solution: Float[Array, "p k"],
        stats: Any,
        args: ReadoutArgs,
        t_args: Any,
    ) -> Float[Array, "p k"]:
        solve = self.hessian_solve(objective, solution, stats, args)
        return implicit_solution_jvp(solve, objective, solution, args, t_args)

    def hessian_solve(
        self,
        objective: ReadoutObjective,
        solution: Float[Array, "p k"],
        stats: Any,
        args: ReadoutArgs,
    ) -> Callable[[Float[Array, "p k"]], Float[Array, "p k"]]:
        del stats
        num_samples, k = args.labels.shape
        cheaper = kernel_newton_cost(objective, args) < exact_newton_cost(objective, args)
        if cheaper and num_samples * k <= MAX_DENSE_SOLVE_SIZE:
            return kernel_hessian_solve(objective, solution, args)
        if solution.size <= MAX_DENSE_SOLVE_SIZE:
            _, unravel = jfu.ravel_pytree(solution)
            return dense_hessian_solve(objective.hessian(solution, args).as_matrix(), unravel)
        operator = objective.hessian_product(solution, args)
        tol = float(jnp.finfo(solution.dtype).eps) ** 0.75
        linear_solver = lx.CG(rtol=tol, atol=0.0, max_steps=10 * solution.size)
        # A preconditioner does not change the solution, so its data need no
        # derivative; lineax cannot differentiate traced `options` (a second
        # derivative raised "Unexpected tangent").
        preconditioner = KroneckerPreconditioner(objective, jax.lax.stop_gradient(args))
        options = {"preconditioner": preconditioner(jax.lax.stop_gradient(solution))}
        # `throw=True`: a CG solve that does not reach its tolerance raises, rather
        # than return an inaccurate tangent.
        return lambda rhs: lx.linear_solve(operator, rhs, linear_solver, options=options).value
