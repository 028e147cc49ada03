r"""The readout penalty of a readout loss by the Laplace approximation of the evidence
(MacKay's fixed point), for the stochastic readout `WindowedReadout` and `refit_readout`."""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Scalar

from .objective import class_grams, ReadoutArgs, ReadoutObjective, weighted_gram


#: MacKay's fixed point of the penalty (`refit_readout` and `readout_posterior` with
#: `alpha2="evidence"`) stops once one update changes the penalty by less than this
#: relative amount, or after `EVIDENCE_STEPS` updates.
EVIDENCE_RTOL = 1e-3
EVIDENCE_STEPS = 50


def data_hessian_eigenvalues(
    objective: ReadoutObjective, coef: Float[Array, "p k"], args: ReadoutArgs
) -> Float[Array, " q"]:
    r"""The eigenvalues $\mu_i$ of the data term's Hessian $\frac1N\sum_j\omega_j
    C_j\otimes\hat f_j\hat f_j^\top$ at `coef`: exact for a loss with a diagonal
    curvature (`Curvature.rank_one is None`: logistic, Poisson), whose Hessian is
    block-diagonal, one `(p, p)` weighted Gram matrix per output; for the others
    (softmax) those of its Kronecker factorisation $\bar A\otimes\hat F^\top\Omega\hat
    F/N$ (`KroneckerPreconditioner`'s), $\mu = \bar a_c g_i$, which costs one `(p, p)`
    and one `(k, k)` eigendecomposition instead of one of size $pk$."""
    diagonal, rank_one, curved = objective._curvature(coef, args)
    features = args.features
    if rank_one is None and curved is None:
        grams = jnp.moveaxis(class_grams(features, diagonal), 1, 0)
        return jnp.maximum(jnp.linalg.eigvalsh(grams), 0).reshape(-1)
    gram_eigenvalues = jnp.maximum(jnp.linalg.eigvalsh(weighted_gram(features, args.weights)), 0)
    curvature_eigenvalues = jnp.maximum(
        jnp.linalg.eigvalsh(objective.mean_curvature(coef, args)), 0
    )
    return jnp.outer(gram_eigenvalues, curvature_eigenvalues).reshape(-1)


def evidence_update(
    eigenvalues: Float[Array, " q"], coef: Float[Array, "p k"], alpha2: Scalar, count: ArrayLike
) -> tuple[Scalar, Scalar]:
    r"""MacKay's fixed-point update of the readout penalty (MacKay, "Bayesian
    interpolation", Neural Comput. 4(3), 1992; "The evidence framework applied to
    classification networks", 1992), in the mean-scaled form of the inner objective
    $J(\hat W) = \frac1N\sum_j\omega_j\ell(\hat W\hat f_j, y_j) +
    \frac{\alpha}2\|\hat W\|_F^2$ with its minimiser $\hat W_\alpha$ = `coef`:

    $$\alpha_{\rm new} = \frac{\gamma}{N\|\hat W_\alpha\|_F^2},\qquad \gamma =
    \sum_i\frac{\mu_i}{\mu_i + \alpha},$$

    with $\mu_i$ = `eigenvalues` those of the data term's Hessian at $\hat W_\alpha$
    and $\gamma$ the effective number of parameters the data determine. A fixed point
    $\alpha = \alpha_{\rm new}$ is a stationary point of the Laplace approximation of
    the evidence (the marginal likelihood of the labels under the likelihood
    $e^{-\sum_j\omega_j\ell_j}$ and the prior $\hat W \sim \mathcal N(0,
    (N\alpha)^{-1}I)$),

    $$\log Z(\alpha) = -N J(\hat W_\alpha) + \frac{pk}2\log\alpha - \frac12\sum_i
    \log(\mu_i + \alpha) + \mathrm{const},$$

    when the curvature's dependence on $\alpha$ is neglected (MacKay's approximation).
    `count` is $N$, the (weighted) number of samples.

    **Returns:**

    `(alpha_new, gamma)`.
    """
    gamma = jnp.sum(eigenvalues / (eigenvalues + alpha2))
    return gamma / (count * jnp.sum(coef**2)), gamma


def evidence_penalty(
    objective: ReadoutObjective, coef: Float[Array, "p k"], args: ReadoutArgs, count: ArrayLike
) -> tuple[Scalar, Scalar]:
    """`evidence_update` at the penalty `args.alpha2`, with the eigenvalues of
    `data_hessian_eigenvalues`: `(alpha_new, gamma)`."""
    eigenvalues = data_hessian_eigenvalues(objective, coef, args)
    return evidence_update(eigenvalues, coef, args.alpha2, count)
