import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree


class InnerStats(eqx.Module):
    """Diagnostics of an iterative inner solve, carried by the fitted readout as
    `readout.stats`.

    **Fields:**

    - `num_steps`: the number of iterations the inner solver took.
    - `gradient_norm`: the norm of the gradient of the inner objective in the readout
        at the returned solution (for a constrained problem: the norm of its
        optimality residual), a measure of how far from optimal the readout is.
    - `converged`: whether the solver met its tolerance within its step budget.
    """

    num_steps: Int[Array, ""]
    gradient_norm: Float[Array, ""]
    converged: Bool[Array, ""]


def check_converged(
    solution: PyTree[Array], stats: InnerStats, throw: bool, what: str
) -> PyTree[Array]:
    """Returns `solution`, raising a runtime error (`eqx.error_if`) when the inner solve
    did not converge and `throw` is set; with `throw=False` the caller reads
    `stats.converged` instead.

    Attach it to what the gradient uses too, i.e. to the minimiser inside the solve
    (`envelope_minimise`'s `check`, through `RuntimeChecks`): attached to the returned
    loss alone, it is dead code in a gradient-only step."""
    if not throw:
        return solution
    return eqx.error_if(
        solution,
        ~jnp.all(stats.converged),
        f"The inner solve of {what} did not converge within its step budget. Raise "
        "`max_steps`, loosen the tolerance, increase `alpha2`, or pass `throw=False` "
        "and inspect `readout.stats`.",
    )
