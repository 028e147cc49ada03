r"""The readout losses' Newton step for fewer samples than coefficients: the inner
Hessian restricted to the span of the features' rows, an `(Nk, Nk)` matrix, never the
`(pk, pk)` Hessian."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float

from .._core.envelope import dense_hessian_solve
from .._core.newton import _initial_state, _NewtonState, newton_decrement_bound, newton_direction
from .._core.numerics import matmul
from .objective import ReadoutArgs, ReadoutObjective


class RowSpace(eqx.Module):
    r"""An orthonormal basis $Q$ (`(p, N)`) of the span of the features' rows, from the
    Householder QR factorisation $\hat F^\top = QR$, and the features in it, $\tilde F
    = \hat FQ = R^\top$ (`(N, N)`): $\hat F = \tilde FQ^\top$.

    The data term sees the readout only through the logits $\hat F\hat W^\top$, and
    the penalty is on every coefficient (the bias included), so in the coefficients $V
    = Qc + V_\perp$ the inner Hessian splits into the Hessian of the same loss with the
    features $\tilde F$ (in $c$) and $\alpha_2 I$ (in $V_\perp$). Its Newton direction
    is therefore

    $$H^{-1}g = Q\tilde H^{-1}Q^\top g + V_\perp,$$

    as $g_\perp = \alpha_2 V_\perp$ (the data gradient $\hat F^\top\rho$ lies in the
    span): the step removes $V_\perp$ exactly. Computing it from $V$, not as $g_\perp
    /\alpha_2$, avoids dividing rounding of the size of $g$ by `alpha2`; and
    $\tilde H$ is formed and factored like any Hessian of the loss
    (`ReadoutObjective.hessian`, `newton_direction`), with the same accuracy and
    fallbacks, on $N$ features. Householder QR keeps the condition number of $\hat F$
    (the kernel $\hat F\hat F^\top$ would square it).

    **Arguments:**

    - `features`: $\hat F$, shape `(N, p)` with $N \le p$.
    """

    basis: Float[Array, "p N"]
    features: Float[Array, "N N"]

    def __init__(self, features: Float[Array, "N p"]):
        self.basis, upper = jnp.linalg.qr(features.T)
        self.features = upper.T

    def reduce(self, coef: Float[Array, "p k"]) -> Float[Array, "N k"]:
        r"""$Q^\top V$."""
        return matmul(self.basis.T, coef)

    def expand(self, coef: Float[Array, "N k"]) -> Float[Array, "p k"]:
        """$Qc$."""
        return matmul(self.basis, coef)

    def reduced_args(self, args: ReadoutArgs) -> ReadoutArgs:
        r"""`args` with the features $\tilde F$."""
        return eqx.tree_at(lambda a: a.features, args, self.features)


def kernel_hessian_solve(
    objective: ReadoutObjective, solution: Float[Array, "p k"], args: ReadoutArgs
) -> Callable[[Float[Array, "p k"]], Float[Array, "p k"]]:
    r"""`rhs ↦ H⁻¹ rhs` for the inner Hessian $H$ at `solution`, as $Q\tilde
    H^{-1}Q^\top r + (r - QQ^\top r)/\alpha_2$ (`RowSpace`), with $\tilde H$ factored
    by Cholesky (`dense_hessian_solve`; NaN tangents where it is not numerically
    positive definite, as for the full Hessian). It is a `jax.lax.custom_linear_solve`
    of the Hessian-vector product, so its derivative (a second derivative of the
    loss) is implicit, and the QR factorisation is never differentiated (whose
    derivative needs features of full row rank)."""
    space = RowSpace(args.features)
    reduced = space.reduce(solution)
    _, unravel = jfu.ravel_pytree(reduced)
    hessian = objective.hessian(reduced, space.reduced_args(args)).as_matrix()
    reduced_solve = dense_hessian_solve(hessian, unravel)

    def formula(rhs):
        inside = space.reduce(rhs)
        outside = rhs - space.expand(inside)
        return space.expand(reduced_solve(inside)) + outside / args.alpha2

    operator = objective.hessian_product(solution, args)
    return lambda rhs: jax.lax.custom_linear_solve(
        operator.mv, rhs, lambda _, b: formula(b), symmetric=True
    )


class KernelNewtonDescent(optx.AbstractDescent):
    r"""The Newton direction in the span of the features' rows (`RowSpace`, factored once
    per solve) at each iterate, with `newton_direction`'s fallbacks on the reduced
    Hessian. The state is that of `FallbackNewtonDescent`: the fallbacks
    (`InnerStats.fallback_steps`) and the `newton_decrement_bound` of the direction,
    from one product with the Hessian operator of the line search (`hessian_product`)."""

    objective: ReadoutObjective
    args: ReadoutArgs
    space: RowSpace

    def init(self, y, f_info_struct):
        del f_info_struct
        return _initial_state(y)

    def query(self, y, f_info, state):
        gradient = f_info.grad
        reduced = self.space.reduce(y)
        hessian = self.objective.hessian(reduced, self.space.reduced_args(self.args))
        inside, ok = newton_direction(hessian, self.space.reduce(gradient))
        newton = self.space.expand(inside) + (y - self.space.expand(reduced))
        alpha2 = self.args.alpha2
        decrement = newton_decrement_bound(gradient, f_info.hessian, newton, alpha2)
        decrement = jnp.where(ok, decrement, jnp.inf)
        fallbacks = state.fallbacks + (~ok).astype(jnp.int32)
        return _NewtonState(newton, fallbacks, decrement, state.cg_steps)

    def step(self, step_size, state):
        return -step_size * state.newton, optx.RESULTS.successful
