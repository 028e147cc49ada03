import equinox as eqx
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree


class RESULTS(optx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """The outcome of a solve, `stats.result`: `optimistix.RESULTS` extended by the
    failures of the solvers here. `stats.converged` is `stats.result ==
    vploss.RESULTS.successful`, and `vploss.RESULTS[stats.result]` its message (for the
    results inherited from optimistix, optimistix's generic text; the error of
    `throw=True` names the cause for the solve at hand). The solvers report:

    - `successful`: the solver met its tolerance within its step budget.
    - `nonlinear_max_steps_reached`: it ran out of steps (`max_steps`, or
        `refit_readout`'s `max_passes`).
    - `indefinite_hessian`: it ran out of steps after some Newton directions fell back
        to shifted Newton or gradient directions (`stats.fallback_steps`).
    - `line_search_failed`: a line search found no acceptable step (`LogBarrier`).
    - `tolerance_not_met`: the minimiser of an `OptimistixMinimiser` stopped by its own
        criterion short of `gtol`.
    - `budget_spent`: a fixed-budget solver (`BudgetedNewtonCG`) took all its steps
        (or rounding ended its progress) short of `gtol`: the inexact readout it
        promises, never an error (`throw=True` does not raise for it), though
        `stats.converged` is false.
    - `nonfinite`: the result is not finite (not finite data).

    A user's optimistix minimiser may report any other of `optimistix.RESULTS`.
    """

    # The inherited results the solvers here report, declared again (with their
    # messages) so that type checkers know them as this class's.
    successful = ""
    nonlinear_max_steps_reached = optx.RESULTS[optx.RESULTS.nonlinear_max_steps_reached]
    nonfinite = optx.RESULTS[optx.RESULTS.nonfinite]
    indefinite_hessian = (
        "The Hessian was not numerically positive definite in the working precision: "
        "Newton directions fell back to shifted Newton or gradient directions "
        "(`stats.fallback_steps`)."
    )
    line_search_failed = (
        "A line search found no acceptable step: a start outside the objective's domain, "
        "or data that are not finite."
    )
    tolerance_not_met = (
        "The minimiser stopped by its own criterion before the scaled gradient met `gtol`."
    )
    budget_spent = (
        "A fixed-budget solver (`vploss.BudgetedNewtonCG`) took all its steps, or stopped "
        "where rounding ended its progress, before the tolerance was met: an inexact "
        "readout, by design, within the bounds in `stats.loss_error_bound`, "
        "`stats.readout_error_bound` and `stats.gradient_error_bound`; not an error."
    )


def solve_result(
    converged: Bool[Array, ""], fallback_steps: Int[Array, ""], failure: RESULTS
) -> RESULTS:
    """The outcome of a Newton solve: `successful` when it `converged`, else `failure`
    (the solver's own reason: the step budget, a failed line search, ...), except that
    a step budget spent after Newton directions fell back is `indefinite_hessian`, its
    likely cause."""
    fell_back = (failure == RESULTS.nonlinear_max_steps_reached) & (fallback_steps > 0)
    failure = RESULTS.where(fell_back, RESULTS.indefinite_hessian, failure)
    return RESULTS.where(converged, RESULTS.successful, failure)


class AbstractStats(eqx.Module):
    """The diagnostics a solve leaves in `readout.stats`: `InnerStats`, `BarrierStats`
    or `GCVStats`.

    **Fields:**

    - `result`: the outcome, a `vploss.RESULTS`.
    """

    result: eqx.AbstractVar[RESULTS]

    @property
    def converged(self) -> Bool[Array, "..."]:
        """Whether the solve succeeded: `result == RESULTS.successful`."""
        return self.result == RESULTS.successful


class InnerStats(AbstractStats):
    r"""Diagnostics of an iterative inner solve, carried by the fitted readout as
    `readout.stats`. Every solver of the readout losses and `refit_readout` fill every
    field, so readouts of one loss have one pytree structure whatever fitted them (to
    save a readout with `equinox.tree_serialise_leaves`, or carry it through
    `jax.lax.scan`).

    **Fields:**

    - `num_steps`: the number of updates the inner solver took: iterates it moved to
        (for the Newton and quasi-Newton solvers, steps their line search accepted,
        over all centerings for `LogBarrier`; the evaluation of the start and rejected
        trial steps do not count). The solvers' `max_steps` bounds it, so
        `max_steps=1` takes one update.
    - `gradient_norm`: the max-norm of the gradient of the minimised objective at the
        returned solution, a measure of how far from optimal the readout is: for the
        readout losses and `refit_readout`, each entry divided by its coefficient's
        scale (`scaled_gradient_norm`, with `ReadoutObjective.gradient_scale`: the
        quantity their `gtol` bounds); for `LogBarrier`, unscaled, of the barrier
        objective $J - \frac1t\sum_i \log w_i$ (the constrained problem's optimality
        residual).
    - `result`: the outcome, a `vploss.RESULTS`: `successful` when the solver met its
        tolerance within its step budget, else why not (`nonlinear_max_steps_reached`,
        `indefinite_hessian`, ...). `stats.converged` is `result == successful`.
    - `alpha2`: the readout penalty $\alpha_2$ the readout was fitted with (given, or
        chosen by a rule such as `refit_readout(..., alpha2="evidence")`).
    - `loss_error_bound`: an upper bound of the inner objective's excess over its
        minimum, $J(\hat W) - J^* \le \|\nabla J\|_2^2/(2\alpha_2)$ (strong
        convexity), so the returned loss is at most this above the exact reduced loss.
    - `fallback_steps`: how many Newton directions were unusable (not finite, or not
        a descent direction: a Hessian that is not numerically positive definite in
        the working precision) and were replaced by a shifted Newton or gradient
        direction (0 for solvers without Newton directions).
    - `cg_steps`: the conjugate-gradient iterations of all Newton directions together
        (each one Hessian-vector product, two matmuls over the samples; 0 for the
        Cholesky directions of `Newton`, the quasi-Newton solvers and `refit_readout`),
        the main cost of `NewtonCG`.
    - `readout_error_bound`: an upper bound of the readout's distance from the exact
        minimiser, $\|\hat W - \hat W^*\|_F \le \|\nabla J\|_F/\alpha_2$ (strong
        convexity).
    - `gradient_error_bound`: an upper bound of the relative error of the envelope
        gradient in the features against the exact minimiser's, $\|\tilde G -
        G^*\|_F/\|\tilde G\|_F$ (`ReadoutObjective.gradient_error_bounds`; the
        parameters' gradient is this times the features' Jacobian), `inf` for a loss
        without a curvature bound (and where the envelope gradient is zero, e.g. all
        features zero, and from `refit_readout`, which differentiates nothing). Both
        are rigorous, and loose at small `alpha2` (they divide by it): about 1e3 and 1e6-1e7 in a
        float32 training loop at `alpha2` = 1e-3, and the gradient bound is about 0.4
        even at the exact float32 readout there.
    """

    num_steps: Int[Array, ""]
    gradient_norm: Float[Array, ""]
    result: RESULTS
    alpha2: Float[Array, ""] = eqx.field(kw_only=True)
    loss_error_bound: Float[Array, ""] = eqx.field(kw_only=True)
    fallback_steps: Int[Array, ""] = eqx.field(kw_only=True)
    cg_steps: Int[Array, ""] = eqx.field(kw_only=True)
    readout_error_bound: Float[Array, ""] = eqx.field(kw_only=True)
    gradient_error_bound: Float[Array, ""] = eqx.field(kw_only=True)


def check_converged(
    solution: PyTree[Array], stats: AbstractStats, throw: bool, what: str
) -> PyTree[Array]:
    """Returns `solution`, raising a runtime error (`eqx.error_if`) when the inner solve
    did not converge and `throw` is set; with `throw=False` the caller reads
    `stats.converged` instead. The message names the cause, `stats.result`: Newton
    directions that had to fall back (a Hessian that is not numerically positive
    definite), a failed line search, or else the step budget.

    Attach it to what the gradient uses too, i.e. to the minimiser inside the solve
    (`envelope_minimise`'s `check`, through `RuntimeChecks`): attached to the returned
    loss alone, it is dead code in a gradient-only step."""
    if not throw:
        return solution
    advice = (
        "Raise `max_steps`, loosen the tolerance, increase `alpha2`, or pass `throw=False` "
        "and inspect `readout.stats`."
    )
    failed = f"The inner solve of {what} did not converge"
    causes = [
        (RESULTS.nonlinear_max_steps_reached, f"{failed} within its step budget. {advice}"),
        (
            RESULTS.indefinite_hessian,
            f"{failed}. {RESULTS[RESULTS.indefinite_hessian]} Typically features of large "
            "or very uneven scale: centre and scale them (e.g. a normalisation layer), "
            "compute in float64, or increase `alpha2`.",
        ),
        (RESULTS.line_search_failed, f"{failed}. {RESULTS[RESULTS.line_search_failed]}"),
        (RESULTS.tolerance_not_met, f"{failed}. {RESULTS[RESULTS.tolerance_not_met]} {advice}"),
    ]
    # Index 0, the plain message, is for every other result (a user's optimistix
    # minimiser may report any).
    index = sum((i + 1) * (stats.result == result) for i, (result, _) in enumerate(causes))
    # A fixed-budget solve that spent its budget returned what it promises.
    return eqx.branched_error_if(
        solution,
        ~stats.converged & (stats.result != RESULTS.budget_spent),
        index,
        [f"{failed}. {advice}"] + [message for _, message in causes],
    )
