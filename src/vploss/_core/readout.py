import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .numerics import matmul
from .stats import AbstractStats


class VPLinear(eqx.Module):
    r"""The affine readout fitted by a `vploss_*` function: $f \mapsto W f + b$.

    It maps the features of ONE sample to its prediction, so the fitted network is
    `lambda x: readout(model(x))`, and `jax.vmap` applies it to a batch.

    **Fields:**

    - `weight`: the matrix $W$, shape `(k, m)`.
    - `bias`: the offset $b$, shape `(k,)`, or `None` when fitted with `use_bias=False`.
    - `scalar_output`: whether the targets were `(N,)`, so that a prediction is a
        scalar rather than a `(1,)` vector (static).
    - `stats`: the diagnostics of the fit (a `vploss.AbstractStats`): those of the
        inner solve (`vploss.InnerStats`) for losses
        with an iterative inner solver, the chosen penalty (`vploss.GCVStats`) for
        `vploss_msereg(..., alpha2="gcv")`, else `None`. They do not affect predictions.
    """

    weight: Float[Array, "k m"]
    bias: Float[Array, " k"] | None
    scalar_output: bool = eqx.field(static=True, default=False)
    stats: AbstractStats | None = None

    def __check_init__(self):
        if jnp.ndim(self.weight) != 2:
            raise ValueError(
                f"VPLinear.weight must have shape (k, m); got shape {jnp.shape(self.weight)}."
            )
        k = jnp.shape(self.weight)[0]
        if self.bias is not None and jnp.shape(self.bias) != (k,):
            raise ValueError(
                f"VPLinear.bias must have shape (k,) = ({k},) to match weight of shape "
                f"{jnp.shape(self.weight)}; got shape {jnp.shape(self.bias)}."
            )
        if self.scalar_output and k != 1:
            raise ValueError(
                f"VPLinear with scalar_output=True needs weight of shape (1, m); got "
                f"shape {jnp.shape(self.weight)}."
            )

    @property
    def in_features(self) -> int:
        """The number of features `m` the readout expects."""
        return jnp.shape(self.weight)[1]

    @property
    def out_features(self) -> int:
        """The number of outputs `k` (1 for a scalar output)."""
        return jnp.shape(self.weight)[0]

    def __call__(
        self,
        features: Float[Array, " m"] | Float[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " k"] | Float[Array, ""]:
        """**Arguments:**

        - `features`: the features of one sample, shape `(m,)` (a scalar counts as
            `m = 1`).
        - `key`: ignored; accepted for compatibility with `equinox.nn` layers.

        **Returns:**

        The prediction, shape `(k,)`, or a scalar when `scalar_output` is set.
        """
        del key
        # A batch must not be flattened into one sample of the same total size.
        if jnp.ndim(features) > 1 or jnp.size(features) != self.in_features:
            raise ValueError(
                f"VPLinear expects the features of one sample, shape "
                f"({self.in_features},); got shape {jnp.shape(features)}. Apply it with "
                "`jax.vmap` to a batch."
            )
        features = jnp.reshape(features, (-1,))
        out = matmul(self.weight, features)
        if self.bias is not None:
            out = out + self.bias
        return out[0] if self.scalar_output else out


def readout_from_coefficients(
    coef: Float[Array, "p k"],
    use_bias: bool,
    scalar_output: bool,
    stats: AbstractStats | None = None,
) -> VPLinear:
    """Splits the stacked coefficients `[W, b]ᵀ` (rows: features, then the bias) of the
    augmented features `[F, 1]` into a `VPLinear`."""
    if use_bias:
        return VPLinear(coef[:-1].T, coef[-1], scalar_output, stats)
    return VPLinear(coef.T, None, scalar_output, stats)


def coefficients_from_readout(readout: VPLinear, use_bias: bool) -> Float[Array, "p k"]:
    """The inverse of `readout_from_coefficients`: `[W, b]ᵀ`, e.g. for a warm start."""
    if use_bias != (readout.bias is not None):
        raise ValueError(
            f"The readout passed as a warm start has bias={readout.bias is not None}, "
            f"but the loss was called with use_bias={use_bias}."
        )
    if readout.bias is not None:
        return jnp.concatenate([readout.weight.T, readout.bias[None, :]], axis=0)
    return readout.weight.T
