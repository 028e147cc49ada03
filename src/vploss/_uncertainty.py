r"""Predictive uncertainty from the fitted readout: the Gaussian posterior over the
readout given the features (Bayesian linear regression for the ridge loss, the Laplace
approximation for a readout loss), and its predictive distribution."""

import functools
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real, Scalar

from ._core.checks import (
    as_array,
    as_batch,
    as_flag,
    as_targets,
    as_weights,
    batch_size,
    concrete_value,
    drop_zero_weight_samples,
)
from ._core.features import readout_features
from ._core.numerics import column_mean, matmul, normalised_weights
from ._core.readout import coefficients_from_readout, VPLinear
from ._loss_family import loss_family
from ._readout_losses.base import AbstractReadoutLoss
from ._readout_losses.evidence import (
    data_hessian_eigenvalues,
    evidence_penalty,
    EVIDENCE_RTOL,
    EVIDENCE_STEPS,
)
from ._readout_losses.logistic import SigmoidBinaryCrossEntropy
from ._readout_losses.loss import vploss_glm
from ._readout_losses.objective import ReadoutArgs, ReadoutObjective
from ._readout_losses.poisson import PoissonLogLikelihood
from ._readout_losses.softmax import SoftmaxCrossEntropy
from ._ridge.intercept import centre
from ._ridge.lstsq import centred_problem


Link: TypeAlias = Literal["identity", "sigmoid", "softmax", "exp", "none"]
PredictiveMethod: TypeAlias = Literal["auto", "probit", "bridge", "mc"]


_HIGHEST = jax.lax.Precision.HIGHEST


class ReadoutPosterior(eqx.Module):
    r"""A Gaussian posterior over the affine readout $\hat W = [W, b]$ of a trained
    feature map, built by `vploss.readout_posterior`, and its predictive distribution
    for new features.

    The posterior is kept in the *centred* coefficients: with a bias, the readout is
    written $z = W^\top(f - c) + b'$, $b' = b + W^\top c$, for a fixed centre $c$ (the
    features' mean, or for the ridge loss $\mu/(1 + \alpha_2)$, where $W$ and $b'$ are
    a posteriori independent), so a large common offset of the features never enters
    the covariance. Its covariance is stored as a factor $R$ of shape `(p, k, r)`,
    $\operatorname{Cov}(\hat C_{pa}, \hat C_{qb}) = \sum_s R_{pas}R_{qbs}$, so that the
    output $z = \hat W\hat f$ of the readout at features $f$ has

    $$\mathbb E[z] = \hat W^*\hat f, \qquad \operatorname{Cov}(z) = BB^\top,\quad
    B_{as} = \sum_p d_p R_{pas},\quad d = [f - c, 1]$$

    (without a bias, $d = f$ and $c = 0$): one `(k, r)` product per sample.

    Like `VPLinear`, its methods map the features of ONE sample; apply them to a batch
    with `jax.vmap` (e.g. `jax.vmap(posterior.predict)(jax.vmap(model)(x))`).

    **Fields:**

    - `readout`: the posterior mean, the fitted `VPLinear` (the one the loss returns).
    - `centre`: $c$, shape `(m,)` (zeros without a bias).
    - `factor`: $R$, shape `(p, k, r)`, $p = m + 1$ with a bias.
    - `noise`: for the ridge loss, the noise variance $\sigma_a^2$ of each output,
        shape `(k,)`; `None` for a readout loss.
    - `alpha2`: the readout penalty the mean was fitted with (the evidence or GCV
        choice when one was asked for).
    - `prior_alpha2`: the prior precision per sample the covariance is built with
        (`alpha2` unless `readout_posterior` was given another).
    - `count`: $S$, the number of samples (the total weight with `weights`).
    - `link`: how the outputs map to predictions (static): `"identity"` (the ridge
        loss), `"sigmoid"` (`vploss_bce`), `"softmax"` (`vploss_ce`), `"exp"`
        (`vploss_poisson`), or `"none"` (another readout loss: only `latent`).
    """

    readout: VPLinear
    centre: Float[Array, " m"]
    factor: Float[Array, "p k r"]
    noise: Float[Array, " k"] | None
    alpha2: Scalar
    prior_alpha2: Scalar
    count: Scalar
    link: Link = eqx.field(static=True)

    def _design(self, features: Array) -> Array:
        m = self.readout.in_features
        if jnp.ndim(features) > 1 or jnp.size(features) != m:
            raise ValueError(
                f"`ReadoutPosterior` expects the features of one sample, shape ({m},); got "
                f"shape {jnp.shape(features)}. Apply it with `jax.vmap` to a batch."
            )
        if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
            raise TypeError(
                f"the features must be floating point; got dtype {jnp.result_type(features)}."
            )
        dtype = self.factor.dtype
        features = jnp.reshape(jnp.asarray(features), (-1,)).astype(dtype)
        if self.readout.bias is None:
            return features
        return jnp.concatenate([features - self.centre, jnp.ones((1,), dtype)])

    def latent(self, features: ArrayLike) -> tuple[Float[Array, " k"], Float[Array, "k k"]]:
        r"""The posterior of the readout's output $z = \hat W\hat f$ (the logits of a
        classifier, the noise-free regression function) at the features of one sample.

        **Arguments:**

        - `features`: $f$ = `model(x_j)`, shape `(m,)`.

        **Returns:**

        `(mean, covariance)`: $\hat W^*\hat f$ of shape `(k,)` and $\operatorname
        {Cov}(z)$ of shape `(k, k)` (always vectors: also for a scalar output).

        **Raises:**

        `ValueError` for features of another shape, `TypeError` for a non-float dtype.
        """
        design = self._design(features)
        readout = self.readout
        raw = jnp.reshape(jnp.asarray(features), (-1,)).astype(design.dtype)
        mean = matmul(readout.weight, raw)
        if readout.bias is not None:
            mean = mean + readout.bias
        spread = jnp.einsum("p,pkr->kr", design, self.factor, precision=_HIGHEST)
        return mean, matmul(spread, spread.T)

    def predict(
        self,
        features: ArrayLike,
        *,
        method: PredictiveMethod = "auto",
        key: PRNGKeyArray | None = None,
        num_samples: int = 1000,
    ) -> Any:
        r"""The predictive distribution at the features of one sample: the readout's
        output $z \sim \mathcal N(\mu, \Sigma)$ (`latent`) pushed through the link.

        - `"identity"` (ridge): `(mean, variance)`, $\mu$ and $\operatorname{diag}
            \Sigma + \sigma^2$ (the observation noise included): a central interval
            is $\mu \pm z_{q}\sqrt{\rm variance}$.
        - `"sigmoid"`: the probabilities $\mathbb E[\sigma(z_c)]$ by the probit
            approximation (MacKay, 1992; Spiegelhalter & Lauritzen, 1990),
            $\sigma\big(\mu_c/\sqrt{1 + \pi\Sigma_{cc}/8}\big)$, off by at most about
            0.02 in absolute value.
        - `"softmax"`: $\mathbb E[\operatorname{softmax}(z)]$ by the multi-class
            probit approximation $\operatorname{softmax}\big(\mu_a/\sqrt{1 +
            \pi\Sigma_{aa}/8}\big)$ (Gibbs, 1997; Lu, Ie & Sha, 2020; the default of
            Daxberger et al., "Laplace Redux", NeurIPS 2021), or with
            `method="bridge"` the mean of the Laplace bridge's Dirichlet (Hobbhahn,
            Kristiadi & Hennig, 2022), $\alpha_a = (1 - 2/K + e^{\mu_a}\sum_b
            e^{-\mu_b}/K^2)/\Sigma_{aa}$, normalised (the posterior has no variance
            along the logits' common shift, so $\mu$ and $\Sigma$ are already in the
            bridge's zero-sum form).
        - `"exp"` (Poisson): the expected rate $\mathbb E[e^{z}] = e^{\mu +
            \Sigma_{cc}/2}$ (exact).

        `method="mc"` is the Monte Carlo reference for every link: `num_samples`
        draws of $z$ (and for `"identity"` the sample mean and variance plus
        $\sigma^2$), with `key`.

        **Arguments:**

        - `features`: $f$ = `model(x_j)`, shape `(m,)`.
        - `method`: `"auto"` (the closed form, or the probit approximation),
            `"probit"`, `"bridge"` (softmax only) or `"mc"`.
        - `key`: a `jax.random` key, for `method="mc"`.
        - `num_samples`: the draws of `method="mc"`.

        **Returns:**

        For `"identity"` a pair `(mean, variance)`, otherwise the predictive
        probabilities (or rates), each shaped like the readout's output (a scalar
        for a scalar output, else `(k,)`).

        **Raises:**

        `ValueError` for a method the link does not have, `"mc"` without a key, or
        features of the wrong shape; `TypeError` for the link `"none"` (a custom
        readout loss: use `latent`).
        """
        methods = {
            "identity": ("auto", "mc"),
            "sigmoid": ("auto", "probit", "mc"),
            "softmax": ("auto", "probit", "bridge", "mc"),
            "exp": ("auto", "mc"),
        }
        if self.link == "none":
            raise TypeError(
                "`predict` knows the links of the ridge, logistic, softmax and Poisson "
                "losses; for another readout loss take `latent(features)` (the Gaussian "
                "of its logits) and push it through the loss's own link."
            )
        if method not in methods[self.link]:
            raise ValueError(
                f"`method` must be one of {methods[self.link]} for the link "
                f"{self.link!r}; got {method!r}."
            )
        if method == "mc":
            if key is None:
                raise ValueError("`method='mc'` needs a `key` (a `jax.random` key).")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
                raise ValueError(f"`num_samples` must be a Python int >= 2; got {num_samples!r}.")
        mean, covariance = self.latent(features)
        variance = jnp.diagonal(covariance)
        if method == "mc":
            draws = jax.random.normal(key, (num_samples, self.factor.shape[-1]), mean.dtype)
            spread = jnp.einsum(
                "p,pkr->kr", self._design(features), self.factor, precision=_HIGHEST
            )
            z = mean + matmul(draws, spread.T)
            if self.link == "identity":
                out = (jnp.mean(z, axis=0), jnp.var(z, axis=0, ddof=1) + self.noise)
            elif self.link == "sigmoid":
                out = jnp.mean(jax.nn.sigmoid(z), axis=0)
            elif self.link == "softmax":
                out = jnp.mean(jax.nn.softmax(z, axis=-1), axis=0)
            else:
                out = jnp.mean(jnp.exp(z), axis=0)
        elif self.link == "identity":
            out = (mean, variance + self.noise)
        elif self.link == "exp":
            out = jnp.exp(mean + variance / 2)
        elif self.link == "sigmoid":
            out = jax.nn.sigmoid(probit_scaled(mean, variance))
        elif method == "bridge":
            k = mean.shape[0]
            alpha = (1 - 2 / k + jnp.exp(mean) * jnp.sum(jnp.exp(-mean)) / k**2) / variance
            out = alpha / jnp.sum(alpha)
        else:
            out = jax.nn.softmax(probit_scaled(mean, variance))
        if self.readout.scalar_output:
            return jax.tree.map(lambda a: a[0], out)
        return out


def probit_scaled(mean: Array, variance: Array) -> Array:
    r"""$\mu/\sqrt{1 + \pi v/8}$: the logit whose sigmoid approximates
    $\mathbb E[\sigma(z)]$, $z \sim \mathcal N(\mu, v)$ (the probit approximation)."""
    return mean / jnp.sqrt(1 + jnp.pi / 8 * variance)


def _factor_from_precision(precision: Float[Array, "q q"]) -> Float[Array, "q q"]:
    r"""A factor $R$ with $RR^\top = P^{-1}$ for a symmetric positive definite
    precision $P$: $V\Lambda^{-1/2}$ from its eigendecomposition (eigenvalues clipped
    at the smallest normal number, so rounding never gives a NaN)."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(precision)
    tiny = jnp.finfo(precision.dtype).tiny
    return eigenvectors / jnp.sqrt(jnp.maximum(eigenvalues, tiny))


def _ridge_posterior(features, targets, readout, alpha2, weights, use_bias, noise):
    r"""The Bayesian linear regression posterior at the ridge readout (see
    `readout_posterior`), from the SVD of the centred problem stacked on
    $\sqrt{\alpha_2}I$ (`centred_problem`: the intercept eliminated, the features
    centred, the rows weighted)."""
    dtype = features.dtype
    count = jnp.asarray(features.shape[0], dtype) if weights is None else jnp.sum(weights)
    design, _, _ = centred_problem(features, targets, alpha2, use_bias, True, weights)
    z = design.dense()
    m = z.shape[1]
    stacked = jnp.concatenate([z, jnp.sqrt(alpha2) * jnp.eye(m, dtype=dtype)])
    _, singular, vt = jnp.linalg.svd(stacked, full_matrices=False)
    # A⁻¹ = V diag(1/σ²) Vᵀ, A = ZᵀZ + αI (σ² = s² + α, exact for the stacked matrix).
    inverse_root = vt.T / singular
    if use_bias:
        mean = centre(features[:, :-1], targets, weights).mean
        shift = mean / (1 + alpha2)
        # W and b'' = b + Wᵀc are independent; Var b'' ∝ 1/(1 + α).
        root = jnp.zeros((m + 1, m + 1), dtype)
        root = root.at[:m, :m].set(inverse_root).at[m, m].set(1 / jnp.sqrt(1 + alpha2))
        inverse_diagonal = jnp.sum(inverse_root**2, axis=1)
        projected = matmul(shift, inverse_root)
        trace = jnp.sum(inverse_diagonal) + jnp.sum(projected**2) + 1 / (1 + alpha2)
    else:
        shift = jnp.zeros((m,), dtype)
        root = inverse_root
        trace = jnp.sum(inverse_root**2)
    p = root.shape[0]
    # γ = tr(Ĝ(Ĝ + αI)⁻¹) = p − α tr((Ĝ + αI)⁻¹), the trace in the original coefficients.
    dof = p - alpha2 * trace
    predictions = jax.vmap(readout)(features[:, :-1] if use_bias else features)
    residuals = targets - jnp.reshape(predictions, targets.shape)
    squares = residuals**2 if weights is None else residuals**2 * weights[:, None]
    total = jnp.sum(squares, axis=0)
    if isinstance(noise, str):
        variance = total / (count - dof) if noise == "evidence" else total / count
    else:
        variance = jnp.broadcast_to(noise.astype(dtype), total.shape)
    k = targets.shape[1]
    # R[p, a, (q, b)] = root[p, q] δ_ab σ_a / √S.
    scale = jnp.sqrt(variance / count)
    factor = jnp.einsum("pq,ab->paqb", root, jnp.diag(scale)).reshape(p, k, p * k)
    return shift, factor, variance, count


def _laplace_factor(objective, coef, args, count):
    r"""The factor of the Laplace covariance $(S\nabla^2J)^{-1}$ at `coef` (the inner
    objective's coefficients), in the centred coefficients (`ReadoutPosterior`) and
    the outputs' basis, and the centre $c$."""
    features = args.features
    p, k = coef.shape
    dtype = coef.dtype
    if args.use_bias:
        mean = column_mean(features[:, :-1], args.weights)
        centred = features.at[:, :-1].add(-mean)
        # (W, b') with b' = b + Wᵀc: the same logits from the centred features.
        centred_coef = coef.at[-1].add(matmul(mean, coef[:-1]))
        # ‖Ŵ‖² = ‖W‖² + ‖b' − Wᵀc‖²: the penalty's Hessian MᵀM per output.
        lower = jnp.eye(p, dtype=dtype).at[-1, :-1].set(-mean)
        penalty = matmul(lower.T, lower)
    else:
        mean = jnp.zeros((p,), dtype)
        centred, centred_coef = features, coef
        penalty = jnp.eye(p, dtype=dtype)
    centred_args = ReadoutArgs(
        centred, args.labels, jnp.zeros((), dtype), args.weights, use_bias=args.use_bias
    )
    data = objective.hessian(centred_coef, centred_args).as_matrix().reshape(p, k, p, k)
    curved = objective._curved(k, dtype)
    size = k if curved is None else k - 1
    data = data[:, :size, :, :size]
    identity = jnp.eye(size, dtype=dtype)
    hessian = data + args.alpha2 * penalty[:, None, :, None] * identity[None, :, None, :]
    root = _factor_from_precision(count * hessian.reshape(p * size, p * size))
    root = root.reshape(p, size, p * size)
    if curved is not None:
        root = jnp.einsum("ac,pcr->par", curved, root, precision=_HIGHEST)
    return mean, root


def _link(readout_loss: AbstractReadoutLoss | None) -> Link:
    if readout_loss is None:
        return "identity"
    if isinstance(readout_loss, SigmoidBinaryCrossEntropy):
        return "sigmoid"
    if isinstance(readout_loss, SoftmaxCrossEntropy):
        return "softmax"
    if isinstance(readout_loss, PoissonLogLikelihood):
        return "exp"
    return "none"


def _evidence_fit(fit, objective, model, x, y, args, weights, use_bias, count):
    r"""MacKay's evidence fixed point of a readout loss's penalty (`evidence_penalty`),
    each solve warm-started at the last, from 1% of the data Hessian's mean eigenvalue
    at zero (as `refit_readout(..., alpha2="evidence")`), in a `lax.while_loop`."""
    dtype = args.features.dtype
    zero = jnp.zeros((args.features.shape[1], args.labels.shape[1]), dtype)
    eigenvalues = data_hessian_eigenvalues(objective, zero, args)
    start = jnp.maximum(0.01 * jnp.mean(eigenvalues), jnp.finfo(dtype).tiny)

    def solve(alpha2, init):
        return fit(model, x, y, alpha2=alpha2, weights=weights, use_bias=use_bias, init=init)[1]

    def update(readout, alpha2):
        coef = objective.from_outputs(coefficients_from_readout(readout, use_bias).astype(dtype))
        new, _ = evidence_penalty(
            objective, coef, eqx.tree_at(lambda a: a.alpha2, args, alpha2), count
        )
        return new

    readout = solve(start, None)
    first = update(readout, start)

    def cond(state):
        step, alpha2, previous, _ = state
        return (step < EVIDENCE_STEPS) & (jnp.abs(alpha2 / previous - 1) > EVIDENCE_RTOL)

    def body(state):
        step, alpha2, _, readout = state
        readout = solve(alpha2, readout)
        return step + 1, update(readout, alpha2), alpha2, readout

    _, alpha2, _, readout = jax.lax.while_loop(cond, body, (jnp.asarray(1), first, start, readout))
    return alpha2, readout


def readout_posterior(
    model: Callable[..., Any],
    x: PyTree[ArrayLike],
    y: Real[ArrayLike, " _N *k"],
    *,
    loss: Callable[..., Any] | AbstractReadoutLoss,
    alpha2: Real[ArrayLike, ""] | str,
    weights: Real[ArrayLike, " _N"] | None = None,
    use_bias: bool = True,
    num_classes: int | None = None,
    noise: str | Real[ArrayLike, "..."] = "evidence",
    prior_alpha2: Real[ArrayLike, ""] | None = None,
) -> ReadoutPosterior:
    r"""The Gaussian posterior over the readout of a trained feature map: the readout
    is fitted by `loss` exactly as in training (its inner solver, its checks), and its
    covariance comes from the curvature of the same inner objective at the fitted
    readout.

    With the features $\hat f_j = [f_j, 1]$, weights $w_j$ (1 by default) of total $S$,
    and the inner objective $J(\hat W) = \frac1S\sum_j w_j\ell(\hat W\hat f_j, y_j) +
    \frac{\alpha_2}2\|\hat W\|_F^2$ that every `vploss_*` loss minimises, read
    $e^{-SJ}$ as likelihood times prior: the prior is $\hat W \sim \mathcal N(0,
    (S\alpha_2)^{-1}I)$ on every coefficient, the bias included (the library's
    penalised-bias convention), and integer weights count as repeated samples.

    - **`loss=vploss_msereg`: Bayesian linear regression**, exact. With Gaussian noise
        $\sigma_a^2$ on output $a$ and the prior precision $S\alpha_2/\sigma_a^2$,
        the posterior mean is the ridge readout and
        $$\operatorname{Cov}(\hat w_a) = \frac{\sigma_a^2}{S}\big(\hat G +
        \alpha_2 I\big)^{-1},\qquad \hat G = \frac1S\sum_j w_j\hat f_j\hat f_j^\top,$$
        so the predictive variance at $\hat f$ is $\sigma_a^2\big(1 + \hat
        f^\top(\hat G + \alpha_2 I)^{-1}\hat f/S\big)$. The noise is MacKay's
        evidence estimate given $\alpha_2$ (`noise="evidence"`, default),
        $\sigma_a^2 = \sum_j w_j r_{ja}^2/(S - \gamma)$ with the effective number
        of parameters $\gamma = \operatorname{tr}\hat G(\hat G + \alpha_2I)^{-1}$,
        or the plain mean square residual (`"residual"`), or given. Computed from
        the centred problem of `vploss_msereg` (the intercept eliminated, $W$ and
        $b + W^\top\mu/(1+\alpha_2)$ a posteriori independent): the thin SVD of
        the centred rows stacked on $\sqrt{\alpha_2}I$, so a common offset of the
        features costs no digits and float32 keeps about $\sqrt{\kappa}\,
        \varepsilon$ relative accuracy.
    - **A readout loss** (`vploss_bce`, `vploss_ce`, `vploss_poisson`, any
        `AbstractReadoutLoss`): **the Laplace approximation** at the fitted readout
        $\hat W^*$ (last-layer Laplace; MacKay, 1992; Daxberger et al., "Laplace
        Redux - Effortless Bayesian Deep Learning", NeurIPS 2021),
        $$\hat W \sim \mathcal N\big(\hat W^*, (S\,\nabla^2J(\hat W^*))^{-1}\big),
        \qquad \nabla^2J = \frac1S\sum_jw_j\,C_j\otimes\hat f_j\hat f_j^\top +
        \alpha_2I,$$
        with the loss's curvature $C_j$ in the logits (`AbstractReadoutLoss
        .curvature`), formed by the inner solver's own Hessian
        (`ReadoutObjective.hessian`) on the centred features $[f_j - \mu, 1]$ in the
        coefficients $(W, b + W^\top\mu)$, where the penalty is
        $\alpha_2\|W\|^2 + \alpha_2\|b' - W^\top\mu\|^2$. For the softmax the
        posterior lives on the logits' zero-sum subspace, as the readout does (the
        loss is blind to their common shift). One eigendecomposition of the
        `(p(k-1), p(k-1))` precision, $O(p^3k^3)$: meant for readouts of up to a few
        thousand coefficients.

    **`alpha2`**: the penalty of training (the posterior is that of the readout the
    loss fits with it), or `"gcv"` (ridge: `vploss_msereg`'s GCV choice), or
    `"evidence"` (readout losses: MacKay's fixed point $\alpha \leftarrow
    \gamma/(S\|\hat W_\alpha\|_F^2)$ with the data Hessian's eigenvalues (for the
    softmax those of its Kronecker factorisation, as `WindowedReadout`; exact ones in
    `refit_readout(..., alpha2="evidence")`), each solve warm-started at the last, in
    a `lax.while_loop`, until one update moves it by under 0.1%, at most 50). The
    penalty used is `posterior.alpha2`.

    Pure and traceable: `jax.jit`, `jax.vmap` over independent problems, float32 and
    float64 (the posterior in the working dtype of the loss).

    **Arguments:**

    - `model`: the feature map, mapping ONE sample `x[j]` to its features `(m,)`.
    - `x`: the inputs, batch-first `(N, ...)`, as `loss` takes them.
    - `y`: the targets or labels, as `loss` takes them.
    - `loss`: `vploss.vploss_msereg`, a readout loss's `vploss_*` function, or an
        `AbstractReadoutLoss`.
    - `alpha2`: the readout penalty, `> 0`, or `"gcv"` (ridge) or `"evidence"`
        (readout losses).
    - `weights`: per-sample weights $w_j \ge 0$ `(N,)` or `None`; integer weights are
        repeated samples.
    - `use_bias`: whether the readout has a bias.
    - `num_classes`: K, for `vploss_ce` with integer labels.
    - `noise`: ridge only: `"evidence"`, `"residual"`, or the noise variance (a
        scalar, or one per output).
    - `prior_alpha2`: the prior precision (per sample, `> 0`) of the covariance,
        $(S\nabla^2_{\rm data}J + S\alpha_{\rm prior}I)^{-1}$ (ridge: $\hat G +
        \alpha_{\rm prior}I$, and $\gamma$ at it), with the mean still the readout
        fitted with `alpha2`; default `alpha2` (the Bayesian reading of the loss).
        This is the post-hoc prior precision of "Laplace Redux", to be tuned on a
        validation split (or the evidence) when the training penalty's posterior is
        under- or overconfident.

    **Returns:**

    A `vploss.ReadoutPosterior`; its `predict` and `latent` give the predictive
    distribution at new features.

    **Raises:**

    `TypeError`/`ValueError` as the loss raises them, for a `loss` that is not one of
    the above, for `alpha2 = 0` (an improper prior: no posterior), a rule the loss
    has no use for, or a `noise` of the wrong kind or shape; the loss's runtime errors
    (`eqx.error_if`) for invalid labels, weights or non-finite features.
    """
    family = loss_family(loss, num_classes)
    readout_loss = family.readout_loss
    use_bias = as_flag("use_bias", use_bias)
    rules = ("gcv",) if readout_loss is None else ("evidence",)
    if isinstance(alpha2, str):
        if alpha2 not in rules:
            raise ValueError(
                f"`alpha2` must be a number > 0 or {rules[0]!r} for this loss; got {alpha2!r}."
            )
    else:
        value = concrete_value(alpha2)
        if value is not None and not value > 0:
            raise ValueError(
                "`alpha2` must be > 0: the posterior's prior has precision proportional "
                f"to it, and with 0 it is improper; got {alpha2!r}."
            )
    if prior_alpha2 is not None:
        value = None if isinstance(prior_alpha2, str) else concrete_value(prior_alpha2)
        if isinstance(prior_alpha2, str) or (value is not None and not value > 0):
            raise ValueError(
                f"`prior_alpha2` must be a number > 0 (or None: `alpha2`); got {prior_alpha2!r}."
            )
    if readout_loss is not None and not (isinstance(noise, str) and noise == "evidence"):
        raise ValueError(
            "`noise` is the ridge loss's observation noise; a readout loss has none "
            f"(leave it at its default). Got {noise!r}."
        )
    x = as_batch("x", x)
    num_samples = batch_size(x)
    what = "`readout_posterior`"
    checked_weights, _ = as_weights(weights, num_samples, what=what)
    if isinstance(alpha2, str) and alpha2 == "gcv":
        fit_alpha2: Any = "gcv"
    else:
        fit_alpha2 = alpha2
    if readout_loss is None:
        targets, _ = as_targets("y", y, num_samples)
        if isinstance(noise, str):
            if noise not in ("evidence", "residual"):
                raise ValueError(
                    f"`noise` must be 'evidence', 'residual' or a variance; got {noise!r}."
                )
            noise_value: Any = noise
        else:
            noise_value = as_array("noise", noise)
            if noise_value.shape not in ((), (targets.shape[1],)):
                raise ValueError(
                    f"`noise` must be a scalar or one variance per output, shape "
                    f"({targets.shape[1]},); got shape {noise_value.shape}."
                )
        _, readout = family.fit(model, x, y, alpha2=fit_alpha2, weights=weights, use_bias=use_bias)
        penalty = readout.stats.alpha2 if fit_alpha2 == "gcv" else jnp.asarray(alpha2)
        weights_, x_, targets = drop_zero_weight_samples(checked_weights, x, targets)
        features, targets = readout_features(model, x_, targets, use_bias)
        dtype = features.dtype
        penalty = penalty.astype(dtype)
        weights_ = None if weights_ is None else weights_.astype(dtype)
        prior = penalty if prior_alpha2 is None else jnp.asarray(prior_alpha2).astype(dtype)
        shift, factor, variance, count = _ridge_posterior(
            features, targets, readout, prior, weights_, use_bias, noise_value
        )
        return ReadoutPosterior(readout, shift, factor, variance, penalty, prior, count, "identity")

    objective = ReadoutObjective(readout_loss)
    fit = functools.partial(vploss_glm, readout_loss)
    weights_, x_, y_ = drop_zero_weight_samples(checked_weights, x, as_array("y", y))
    labels = readout_loss.labels(y_, num_samples)
    features, values = readout_features(model, x_, labels.values, use_bias)
    dtype = features.dtype
    if weights_ is None:
        count = jnp.asarray(num_samples, dtype)
        omega = None
    else:
        count = jnp.sum(weights_.astype(dtype))
        omega = normalised_weights(weights_.astype(dtype))
    args = ReadoutArgs(features, values, jnp.zeros((), dtype), omega, use_bias=use_bias)
    init = None
    if isinstance(alpha2, str):
        penalty, init = _evidence_fit(fit, objective, model, x, y, args, weights, use_bias, count)
    else:
        penalty = jnp.asarray(alpha2).astype(dtype)
    _, readout = fit(model, x, y, alpha2=penalty, weights=weights, use_bias=use_bias, init=init)
    coef = objective.from_outputs(coefficients_from_readout(readout, use_bias).astype(dtype))
    prior = penalty if prior_alpha2 is None else jnp.asarray(prior_alpha2).astype(dtype)
    args = eqx.tree_at(lambda a: a.alpha2, args, prior)
    shift, factor = _laplace_factor(objective, coef, args, count)
    return ReadoutPosterior(
        readout, shift, factor, None, penalty, prior, count, _link(readout_loss)
    )
