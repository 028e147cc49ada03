r"""The readout penalty chosen from the data: the rules a function accepts in place of a
number `alpha2`, the one parser of that argument, and the log-grid search that the
cross-validation rules share."""

import math
from collections.abc import Callable
from typing import Literal, TypeAlias, TypeGuard

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Scalar

from .checks import as_alpha


PenaltyRule: TypeAlias = Literal["gcv", "sgcv", "evidence", "rounding"]

#: Every rule that chooses the readout penalty, by the string that asks for it, with
#: what it does (for messages). Each function accepts the ones that fit its problem
#: (`as_penalty`'s `rules`): `vploss_msereg` "gcv", `SlimTik` "sgcv",
#: `WindowedReadout` "evidence", `least_squares` "gcv" and "rounding".
PENALTY_RULES: dict[PenaltyRule, str] = {
    "gcv": "generalised cross-validation",
    "sgcv": "sampled generalised cross-validation of the current batch",
    "evidence": "the evidence fixed point",
    "rounding": "the rounding level of the initial features' Gram matrix",
}

#: Points of the log-spaced grid over the penalty (see `choose_log_penalty`).
_GRID_POINTS = 64
#: Golden-section steps of the refinement: each shrinks the bracket by 0.618, so 40 steps
#: take the two grid cells around the best point (under 0.6 decades) to a relative
#: precision of about 1e-8 in `alpha`.
_REFINE_STEPS = 40
_INV_GOLDEN = (math.sqrt(5) - 1) / 2


def is_penalty_rule(alpha2: object) -> TypeGuard[PenaltyRule]:
    """Whether `alpha2` names a rule that chooses the penalty, rather than giving it."""
    return isinstance(alpha2, str) and alpha2 in PENALTY_RULES


def as_penalty(
    alpha2: object, rules: tuple[PenaltyRule, ...], *, positive: bool
) -> PenaltyRule | Scalar:
    """`alpha2` checked: one of `rules` (the rules this function accepts) as it is, or
    a number, `>= 0` (`> 0` where `positive`), as an array (`as_alpha`). Any other
    string is a `ValueError` that lists `rules` and what each does."""
    if isinstance(alpha2, str):
        if alpha2 in rules:
            return alpha2  # pyright: ignore[reportReturnType]
        bound = "> 0" if positive else ">= 0"
        spelled = ", ".join(f'"{rule}" ({PENALTY_RULES[rule]})' for rule in rules)
        strings = "the string" if len(rules) == 1 else "one of the strings"
        raise ValueError(
            f"`alpha2` must be a number {bound} or {strings} {spelled}; got {alpha2!r}."
        )
    return as_alpha("alpha2", alpha2, positive=positive)  # pyright: ignore[reportArgumentType]


def gcv_quotient(
    residual: Float[Array, "*g"], slack: Float[Array, "*g"]
) -> tuple[Float[Array, "*g"], Float[Array, "*g"]]:
    r"""`(residual / slack², slack²)`: a generalised cross-validation value from its
    mean squared residual and its slack $1 - \mathrm{tr}\,H/n$ (or $n - \mathrm{tr}\,H$),
    and the squared slack for its rounding bound. The slack is positive for every
    penalty $\alpha > 0$ but tends to 0 as an interpolating fit's $\alpha \to 0$, where
    GCV is 0/0: such a penalty counts as `+inf`, never as a NaN (and its squared slack
    as 1)."""
    ok = slack > 0
    safe = jnp.where(ok, slack, 1) ** 2
    return jnp.where(ok, residual / safe, jnp.inf), safe


def choose_log_penalty(
    fn: Callable[[Float[Array, "*g"]], tuple[Float[Array, "*g"], ...]],
    trace: Scalar,
    top: Scalar,
) -> Scalar:
    r"""The logarithm of the penalty $\alpha$ minimising a criterion (GCV, or the
    stochastic readout's sampled GCV) over $[\varepsilon\,\mathrm{tr}\,G, \alpha_{\rm
    top}]$, for the Gram matrix $G$ of trace `trace` of the penalised solve $(G + \alpha
    I)^{-1}$ and `top` $= \alpha_{\rm top}$.

    The bottom is the smallest penalty the working precision resolves: forming and
    factoring $G$ rounds it by about $\varepsilon\,\mathrm{tr}\,G$ (at least
    $\varepsilon\lambda_{\max}$, at most $p\,\varepsilon\lambda_{\max}$), so below that the
    rounding, not the penalty, decides how the small directions are solved, and two
    evaluations of the same problem (samples permuted, eager or jitted) disagree.

    `fn` maps $\log\alpha$ (elementwise) to `(value, ..., rounding)`, the criterion
    and a bound on its rounding error. It is evaluated on `_GRID_POINTS` points of
    $\log\alpha$ spaced evenly over the interval, and the best refined by golden-section
    search between its two neighbours (`_REFINE_STEPS` steps; a multimodal cell never
    makes it worse). A point may be the minimiser if its value less its rounding bound
    is at most the least value plus rounding bound of all points. The result is the
    largest grid point that may be, or the refined point of least value plus bound
    where no grid point may be: where the criterion is flat to within rounding (an
    exact or interpolating fit) the largest penalty it cannot tell from the best, so
    the best-conditioned solve, and a grid point, a function of `trace` and `top`
    alone, rather than wherever rounding put the minimum; at a sharper minimum the
    minimiser itself. All `jax.lax`: jittable and vmappable."""
    dtype = jnp.result_type(trace)
    eps = jnp.finfo(dtype).eps
    grid = jnp.linspace(
        jnp.log(eps * jnp.where(trace > 0, trace, 1)),  # all-zero features: any scale
        jnp.log(top),
        _GRID_POINTS,
        dtype=dtype,
    )
    value = lambda t: fn(t)[0]  # noqa: E731
    values, *_, rounding = fn(grid)
    best = jnp.argmin(values)
    last = grid.shape[0] - 1
    lo = grid[jnp.maximum(best - 1, 0)]
    hi = grid[jnp.minimum(best + 1, last)]

    def golden_step(_, state):
        lo, hi, c, fc, d, fd = state
        # Keep the better interior point and place a new one in the larger part.
        left = fc < fd
        new_lo = jnp.where(left, lo, c)
        new_hi = jnp.where(left, d, hi)
        new = jnp.where(
            left,
            new_hi - _INV_GOLDEN * (new_hi - new_lo),
            new_lo + _INV_GOLDEN * (new_hi - new_lo),
        )
        f_new = value(new)
        # Left: the old c becomes d and the new point c; right: the old d becomes c.
        c, fc, d, fd = (
            jnp.where(left, new, d),
            jnp.where(left, f_new, fd),
            jnp.where(left, c, new),
            jnp.where(left, fc, f_new),
        )
        return new_lo, new_hi, c, fc, d, fd

    c = hi - _INV_GOLDEN * (hi - lo)
    d = lo + _INV_GOLDEN * (hi - lo)
    state = (lo, hi, c, value(c), d, value(d))
    _, _, c, fc, d, fd = jax.lax.fori_loop(0, _REFINE_STEPS, golden_step, state)
    refined = jnp.stack([c, d])
    refined_values, *_, refined_rounding = fn(refined)
    upper = jnp.minimum(jnp.min(values + rounding), jnp.min(refined_values + refined_rounding))
    tied = values - rounding <= upper
    # The grid depends on the data only through `trace` and `top`: a tied grid point
    # is reproducible where a refined point is wherever rounding put the minimum.
    return jnp.where(
        jnp.any(tied),
        jnp.max(jnp.where(tied, grid, -jnp.inf)),
        refined[jnp.argmin(refined_values + refined_rounding)],
    )
