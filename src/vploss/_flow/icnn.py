from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._core.numerics import matmul


def _inverse_softplus(y: Array) -> Array:
    return y + jnp.log(-jnp.expm1(-y))


class ICNN(eqx.Module):
    r"""An input-convex neural network (Amos, Xu and Kolter, 2017): a feature map
    $u_\theta: \mathbb{R}^n \to \mathbb{R}^m$ whose every output is convex in $x$.

    With $z_0 = 0$ and layers $k = 0, \dots, d - 1$,

    $$z_{k+1} = \sigma\big(L_k^+ z_k + K_k x + b_k\big), \qquad u_\theta(x) = z_d,$$

    where the weights on the previous layer are nonnegative,
    $L_k^+ = \operatorname{softplus}(\tilde L_k)$ entrywise (the raw $\tilde L_k$ are the
    trained parameters, $L_0^+$ is absent), and $\sigma$ is convex and nondecreasing. A
    nonnegative combination of convex functions is convex, and a convex nondecreasing
    function of a convex function is convex, so by induction every $z_k$, hence every
    feature, is convex in $x$. With softplus, every feature is also smooth with a
    nonzero Hessian, so that $\nabla^2 \Phi$ of a potential built on the features is
    positive definite for a nonzero readout.

    It maps ONE sample of shape `(n,)` to its features of shape `(m,)`, as the models
    of every `vploss_*` loss do.

    **Fields:**

    - `input_layers`: the affine maps $x \mapsto K_k x + b_k$, one `eqx.nn.Linear` per
        layer.
    - `raw_hidden_weights`: the unconstrained $\tilde L_k$ for $k = 1, \dots, d-1$.
    - `activation`: $\sigma$ (static).
    """

    input_layers: tuple[eqx.nn.Linear, ...]
    raw_hidden_weights: tuple[Float[Array, "_ _"], ...]
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        out_size: int,
        width: int,
        depth: int,
        *,
        activation: Callable[[Array], Array] = jax.nn.softplus,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        r"""**Arguments:**

        - `in_size`: the input dimension $n$.
        - `out_size`: the number of features $m$ (the width of the last layer).
        - `width`: the width of the other layers.
        - `depth`: the number of layers $d \ge 1$, the last one included: `depth=4`
            with `width=32` and `out_size=32` is a network of 4 hidden layers of 32
            units whose last layer are the features.
        - `activation`: $\sigma$, which must be convex and nondecreasing (softplus,
            the default, or e.g. `jax.nn.relu`, whose Hessians vanish almost
            everywhere and so are useless for a flow). Not checked.
        - `dtype`: the parameters' dtype; the default float dtype if `None`.
        - `key`: a `jax.random.PRNGKey` for the initialisation.

        The raw hidden weights start so that the $L_k^+$ are uniform on
        $(0, 2/\mathrm{width})$: each layer averages its predecessor, which keeps the
        activations of order one however deep the network.
        """
        if depth < 1:
            raise ValueError(f"An ICNN needs depth >= 1; got depth={depth}.")
        for name, size in (("in_size", in_size), ("out_size", out_size), ("width", width)):
            if size < 1:
                raise ValueError(f"`{name}` must be >= 1; got {size}.")
        dtype = jnp.result_type(float) if dtype is None else dtype
        sizes = [width] * (depth - 1) + [out_size]
        input_keys, hidden_keys = jax.random.split(key)
        self.input_layers = tuple(
            eqx.nn.Linear(in_size, size, dtype=dtype, key=k)
            for size, k in zip(sizes, jax.random.split(input_keys, depth), strict=True)
        )
        positive = [
            jax.random.uniform(k, (size, prev), dtype, minval=1e-3, maxval=2.0) / prev
            for size, prev, k in zip(
                sizes[1:], sizes[:-1], jax.random.split(hidden_keys, depth - 1), strict=True
            )
        ]
        self.raw_hidden_weights = tuple(_inverse_softplus(w) for w in positive)
        self.activation = activation

    @property
    def hidden_weights(self) -> tuple[Float[Array, "_ _"], ...]:
        r"""The nonnegative weights $L_k^+ = \operatorname{softplus}(\tilde L_k)$."""
        return tuple(jax.nn.softplus(w) for w in self.raw_hidden_weights)

    def __call__(
        self, x: Float[Array, " n"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " m"]:
        r"""**Arguments:**

        - `x`: one sample, shape `(n,)`.
        - `key`: ignored; accepted for compatibility with `equinox.nn` layers.

        **Returns:**

        The features $u_\theta(x)$, shape `(m,)`, each convex in `x`.
        """
        del key
        first, *rest = self.input_layers
        z = self.activation(first(x))
        for layer, weight in zip(rest, self.hidden_weights, strict=True):
            z = self.activation(matmul(weight, z) + layer(x))
        return z
