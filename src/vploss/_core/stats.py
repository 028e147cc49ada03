import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree


class InnerStats(eqx.Module):
    r"""Diagnostics of an iterative inner solve, carried by the fitted readout as
    `readout.stats`.

    **Fields:**

    - `num_steps`: the number of updates the inner solver took: iterates it moved to
        (for the Newton and quasi-Newton solvers, steps their line search accepted,
        over all centerings for `LogBarrier`; the evaluation of the start and rejected
        trial steps do not count; a direct solve, like the ridge loss's in
        `refit_readout`, is one update). The solvers' `max_steps` bounds it, so
        `max_steps=1` takes one update.
    - `gradient_norm`: the max-norm of the gradient of the minimised objective at the
        returned solution, a measure of how far from optimal the readout is: for the
        readout losses and `refit_readout`, each entry divided by its coefficient's
        scale (`scaled_gradient_norm`, with `ReadoutObjective.gradient_scale`: the
        quantity their `gtol` bounds); for `LogBarrier`, unscaled, of the barrier
        objective $J - \frac1t\sum_i \log w_i$ (the constrained problem's optimality
        residual).
    - `converged`: whether the solver met its tolerance within its step budget.
    - `loss_error_bound`: an upper bound of the inner objective's excess over its
        minimum, $J(\hat W) - J^* \le \|\nabla J\|_2^2/(2\alpha_2)$ (strong
        convexity), so the returned loss is at most this above the exact reduced loss;
        `None` where the solver does not report it.
    - `fallback_steps`: how many Newton directions were unusable (not finite, or not
        a descent direction: a Hessian that is not numerically positive definite in
        the working precision) and were replaced by a shifted Newton or gradient
        direction; `None` where the solver does not report it.
    - `cg_steps`: the conjugate-gradient iterations of all Newton directions together
        (each one Hessian-vector product, two matmuls over the samples; 0 for the
        Cholesky directions of `Newton`), the main cost of `NewtonCG`; `None` where
        the solver does not report it.
    """

    num_steps: Int[Array, ""]
    gradient_norm: Float[Array, ""]
    converged: Bool[Array, ""]
    loss_error_bound: Float[Array, ""] | None = eqx.field(default=None, kw_only=True)
    fallback_steps: Int[Array, ""] | None = eqx.field(default=None, kw_only=True)
    cg_steps: Int[Array, ""] | None = eqx.field(default=None, kw_only=True)


def check_converged(
    solution: PyTree[Array], stats: InnerStats, throw: bool, what: str
) -> PyTree[Array]:
    """Returns `solution`, raising a runtime error (`eqx.error_if`) when the inner solve
    did not converge and `throw` is set; with `throw=False` the caller reads
    `stats.converged` instead. The message names the cause: Newton directions that had
    to fall back (a Hessian that is not numerically positive definite), or else the
    step budget.

    Attach it to what the gradient uses too, i.e. to the minimiser inside the solve
    (`envelope_minimise`'s `check`, through `RuntimeChecks`): attached to the returned
    loss alone, it is dead code in a gradient-only step."""
    if not throw:
        return solution
    advice = (
        "Raise `max_steps`, loosen the tolerance, increase `alpha2`, or pass `throw=False` "
        "and inspect `readout.stats`."
    )
    failed = ~jnp.all(stats.converged)
    if stats.fallback_steps is None:
        return eqx.error_if(
            solution,
            failed,
            f"The inner solve of {what} did not converge within its step budget. {advice}",
        )
    indefinite = jnp.any(stats.fallback_steps > 0)
    return eqx.branched_error_if(
        solution,
        failed,
        jnp.where(indefinite, 1, 0),
        [
            f"The inner solve of {what} did not converge within its step budget. {advice}",
            f"The inner solve of {what} did not converge: its Hessian is not numerically "
            "positive definite in this precision (Newton steps had to fall back to "
            "shifted or gradient steps; `readout.stats.fallback_steps`), typically "
            "features of large or very uneven scale. Centre and scale the features "
            "(e.g. a normalisation layer), compute in float64, or increase `alpha2`.",
        ],
    )
