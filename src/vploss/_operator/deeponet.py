from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree, Real, Shaped

from .._core.checks import (
    as_alpha,
    as_array,
    as_batch,
    as_flag,
    as_weights,
    batch_size,
    drop_zero_weight_samples,
    RuntimeChecks,
)
from .._core.envelope import envelope_minimise
from .._core.features import evaluate_features, parameter_penalty, working_dtype
from .._core.numerics import matmul
from .kronecker import centred_features, KroneckerObjective, KroneckerRidgeSolver


#: Default readout penalty of `vploss_deeponet` (that of `vploss_msereg`).
DEFAULT_DEEPONET_ALPHA2 = 1e-6


class DeepONetReadout(eqx.Module):
    r"""The bilinear readout fitted by `vploss_deeponet`: for the branch features $b$ of
    one input function and the trunk features $t$ of one query point,

    $$G(u)(y) \approx (b - \mu_b)^\top C\,(t - \mu_t) + (b - \mu_b)^\top\beta_b +
    \beta_t^\top(t - \mu_t) + \beta_0,$$

    an affine function of $b$ for each $t$ and of $t$ for each $b$ (the DeepONet of Lu
    et al., 2021, with the bias generalised to the terms linear in one network alone).
    It is kept in the centred form the fit solves, so that predictions are not
    degraded by a common offset of the features; `coefficients()` gives the
    equivalent matrix of the raw features.

    **Fields:**

    - `weight`: $C$, shape `(p, q)`.
    - `branch_bias`: $\beta_b$, shape `(p,)`, or `None` without a bias.
    - `trunk_bias`: $\beta_t$, shape `(q,)`, or `None` without a bias.
    - `bias`: $\beta_0$, a scalar, or `None` without a bias.
    - `branch_mean`, `trunk_mean`: the (weighted) means $\mu_b$ `(p,)` and $\mu_t$
        `(q,)` of the features of the fit, or `None` without a bias.
    """

    weight: Float[Array, "p q"]
    branch_bias: Float[Array, " p"] | None
    trunk_bias: Float[Array, " q"] | None
    bias: Float[Array, ""] | None
    branch_mean: Float[Array, " p"] | None
    trunk_mean: Float[Array, " q"] | None

    def _centred(self, branch_features, trunk_features):
        if self.branch_mean is None:
            return branch_features, trunk_features
        return branch_features - self.branch_mean, trunk_features - self.trunk_mean

    def __call__(
        self,
        branch_features: Float[Array, " p"] | Float[Array, ""],
        trunk_features: Float[Array, " q"] | Float[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, ""]:
        """**Arguments:**

        - `branch_features`: `branch(u)` of one input function, shape `(p,)`.
        - `trunk_features`: `trunk(y)` of one query point, shape `(q,)`.
        - `key`: ignored; accepted for compatibility with `equinox.nn` layers.

        **Returns:**

        The prediction $G(u)(y)$, a scalar.
        """
        del key
        p, q = self.weight.shape
        b = jnp.reshape(branch_features, (-1,))
        t = jnp.reshape(trunk_features, (-1,))
        if b.shape != (p,) or t.shape != (q,) or jnp.ndim(branch_features) > 1:
            raise ValueError(
                f"DeepONetReadout expects the features of one function, shape ({p},), and "
                f"of one point, shape ({q},); got shapes {jnp.shape(branch_features)} and "
                f"{jnp.shape(trunk_features)}. Use `predict` for grids."
            )
        return self.predict(b[None], t[None])[0, 0]

    def predict(
        self, branch_features: Float[Array, "..."], trunk_features: Float[Array, "..."]
    ) -> Float[Array, "n m"]:
        """The predictions on a grid: `(n, m)` for the branch features of `n` functions
        `(n, p)` and the trunk features of `m` points `(m, q)`."""
        p, q = self.weight.shape
        if (
            jnp.ndim(branch_features) != 2
            or jnp.ndim(trunk_features) != 2
            or jnp.shape(branch_features)[1] != p
            or jnp.shape(trunk_features)[1] != q
        ):
            raise ValueError(
                f"DeepONetReadout.predict expects branch features of shape (n, {p}) and "
                f"trunk features of shape (m, {q}); got {jnp.shape(branch_features)} and "
                f"{jnp.shape(trunk_features)}."
            )
        b, t = self._centred(branch_features, trunk_features)
        out = matmul(matmul(b, self.weight), t.T)
        if self.bias is not None:
            out = out + matmul(b, self.branch_bias)[:, None]
            out = out + matmul(t, self.trunk_bias)[None, :] + self.bias
        return out

    def coefficients(self) -> Float[Array, "P Q"]:
        r"""The same readout on the raw features: $\hat C$ of shape `(p + 1, q + 1)` with
        $G(u)(y) \approx [b; 1]^\top\hat C\,[t; 1]$ (without a bias, $C$). Forming it
        cancels the offsets' digits; `predict` does not."""
        if self.bias is None:
            return self.weight
        mb, mt, c = self.branch_mean, self.trunk_mean, self.weight
        branch = self.branch_bias - matmul(c, mt)
        trunk = self.trunk_bias - matmul(mb, c)
        corner = self.bias - matmul(mb, self.branch_bias) - matmul(self.trunk_bias, mt)
        corner = corner + matmul(mb, matmul(c, mt))
        top = jnp.concatenate([c, branch[:, None]], axis=1)
        bottom = jnp.concatenate([trunk, corner[None]])[None, :]
        return jnp.concatenate([top, bottom], axis=0)


def _grid_weights(name, weights, size, axis_name, what):
    if weights is None:
        return None, []
    shape = jnp.shape(weights)
    if shape != (size,):
        raise ValueError(
            f"`{name}` of {what} must have shape ({size},), one weight per {axis_name}; got "
            f"shape {shape}."
        )
    return as_weights(weights, size, what=f"{what} (`{name}`)")


def vploss_deeponet(
    branch: Callable[..., Any],
    trunk: Callable[..., Any],
    u_sensors: PyTree[ArrayLike],
    y_points: PyTree[ArrayLike],
    targets: Shaped[ArrayLike, "..."],
    *,
    alpha1: ArrayLike = 0.0,
    alpha2: ArrayLike = DEFAULT_DEEPONET_ALPHA2,
    use_bias: bool = True,
    weights_functions: Real[ArrayLike, "..."] | None = None,
    weights_points: Real[ArrayLike, "..."] | None = None,
    refine_steps: int = 1,
) -> tuple[Float[Array, ""], DeepONetReadout]:
    r"""Variable projection loss for operator learning: a DeepONet whose bilinear readout
    between the branch and the trunk network is solved exactly.

    A DeepONet (Lu, Jin, Pang, Zhang & Karniadakis, "Learning nonlinear operators via
    DeepONet based on the universal approximation theorem of operators", Nature
    Machine Intelligence 3, 2021) predicts $G(u)(y) \approx \sum_{k,l}
    b_k(u)\,C_{kl}\,t_l(y)$ (+ bias) from a branch network $b$ of the input function
    $u$, sampled at fixed sensors, and a trunk network $t$ of the query point $y$. With
    the branch features $B$ `(n, p)` of `n` functions, the trunk features $T$ `(m, q)`
    of `m` points and the targets $U$ `(n, m)` on that grid,

    $$L(\theta) = \min_{D}\ \frac{1}{2S_fS_p}\sum_{i=1}^n\sum_{j=1}^m
    w_{f,i}\,w_{p,j}\bigl(\tilde b_i^\top D\,\tilde t_j - U_{ij}\bigr)^2 +
    \frac{\alpha_2}{2}\|D\|_F^2 + \frac{\alpha_1}{2}\|\theta\|^2,$$

    with weights $w_f$ over the functions and $w_p$ over the points (of totals $S_f$,
    $S_p$; without weights, the plain mean over the grid), $\theta$ the parameters of
    both networks, and, with a bias, $\tilde b_i = [b_i - \mu_b; 1]$, $\tilde t_j =
    [t_j - \mu_t; 1]$ the features centred by their weighted means with a constant
    appended. The data term is Kronecker-structured, so the minimiser is exact and
    cheap: with $G_b = \tilde B^\top W_f\tilde B/S_f = V_b\Lambda_bV_b^\top$ and $G_t =
    \tilde T^\top W_p\tilde T/S_p = V_t\Lambda_tV_t^\top$,

    $$D^* = V_b\bigl[(V_b^\top\tilde B^\top W_fUW_p\tilde T V_t/(S_fS_p))\oslash
    (\lambda_b\lambda_t^\top + \alpha_2)\bigr]V_t^\top,$$

    two eigendecompositions ($O(p^3 + q^3)$) and passes over the data, never the
    $pq\times pq$ system. They are computed as the SVDs of the scaled, centred feature
    matrices (`(n, p + 1)` and `(m, q + 1)`, so the targets are projected on singular
    vectors and never squared into a Gram matrix: float32 keeps the accuracy of the
    condition number, not of its square), followed by `refine_steps` of iterative
    refinement with the residual formed on the grid.

    **The bias.** $D = \begin{bmatrix}C & \beta_b\\ \beta_t^\top & \beta_0\end{bmatrix}$
    holds the interaction $C$ `(p, q)`, terms linear in the branch or the trunk
    features alone, and a constant: the prediction is $(b - \mu_b)^\top C(t - \mu_t) +
    (b - \mu_b)^\top\beta_b + \beta_t^\top(t - \mu_t) + \beta_0$, the DeepONet's scalar
    bias generalised (a function of $u$ alone and one of $y$ alone, in the span of the
    features). The whole of $D$ is penalised, the bias terms included as in
    `vploss_msereg`, but in these centred coordinates rather than on the raw
    coefficients $\hat C$ of $[b; 1]^\top\hat C[t; 1]$: only there does the penalty
    keep the Kronecker structure (the constant feature is orthogonal to the centred
    ones, so both Gram matrices are block-diagonal). As a consequence the loss, the
    fit and its predictions are unchanged when a constant is added to any branch or
    trunk feature, and no offset ever enters a Gram matrix or a decomposition. Measured
    on a small DeepONet, offsets of $\pm o$ on every feature change the predictions by
    $3\cdot10^{-14}$, $3\cdot10^{-12}$ and $2\cdot10^{-10}$ (relative) for $o = 10^2$,
    $10^4$, $10^6$ in float64; in float32 by $10^{-5}$ for $o = 10^2$ and $3\cdot10^{-3}$
    for $o = 10^4$, which is the rounding of the features themselves ($\varepsilon o$,
    before any solve). (Offsets of the targets are not
    removed: they are fitted by $\beta_0$, and their rounding enters the residual in
    float32 as in an uncentred fit.) With $\alpha_2 \to 0$ both penalties give the
    same least-squares fit.

    **Derivatives** (the shared envelope mechanism: forward and reverse mode, `jit`,
    `vmap`): the loss by the envelope theorem, one vector-Jacobian product of each
    network at the fitted $D^*$; the readout by the implicit function theorem, with the
    Hessian $G_b\otimes G_t + \alpha_2 I$ solved through the same eigendecompositions
    inside a `jax.lax.custom_linear_solve` (no decomposition is differentiated, so
    derivatives are finite at repeated singular values).

    **Not supported:** a query grid that differs between the functions, or a mask of
    missing points (either breaks the Kronecker structure; weights of zero drop a
    whole function or a whole point), and several outputs per point (fit one loss per
    output).

    **Arguments:**

    - `branch`: a callable mapping ONE input function, sampled at the sensors
        (`u_sensors[i]`), to its features, shape `(p,)` or a scalar.
    - `trunk`: a callable mapping ONE query point (`y_points[j]`) to its features, shape
        `(q,)` or a scalar.
    - `u_sensors`: the input functions at the sensors, batch-first, shape `(n, ...)`
        (an array or a pytree of arrays with one batch size).
    - `y_points`: the query points, shape `(m, ...)` (e.g. `(m, d)`), shared by every
        function.
    - `targets`: $G(u_i)(y_j)$, shape `(n, m)`.
    - `alpha1`: penalty weight on the parameters of both networks, `>= 0`.
    - `alpha2`: penalty weight on the readout $D$, `>= 0`. With `0` and rank-deficient
        features the minimum-norm least-squares readout (products of singular values
        $s_{b,k}s_{t,l}$ below $\varepsilon\max(n, m, p, q)$ times the largest are
        dropped).
    - `use_bias`: whether the readout has the bias terms above (a constant feature
        appended to both networks, after centring).
    - `weights_functions`: weights $w_f \ge 0$ of the functions, shape `(n,)`, with a
        positive total; `None` for equal weights.
    - `weights_points`: weights $w_p \ge 0$ of the points, shape `(m,)` (e.g.
        quadrature weights, so that the data term approximates an integral over $y$);
        `None` for equal weights.
    - `refine_steps`: steps of iterative refinement of the closed form (a Python int).

    **Returns:**

    `(loss, readout)`: the reduced loss (a scalar) and the fitted `DeepONetReadout`,
    so that `readout(branch(u_sensors[i]), trunk(y_points[j]))` predicts
    `targets[i, j]`, and `readout.predict(B, T)` a whole grid. In the working dtype
    (that of the features, promoted by floating targets, at least float32).

    **Raises:**

    `ValueError` at trace time when `targets` is not of shape `(n, m)` (the number of
    functions of `u_sensors` by the number of points of `y_points`), a network does not
    return one feature vector, a weight vector has the wrong shape, or a
    hyperparameter is out of range; `TypeError` for wrong types. A runtime error
    (`eqx.error_if`) when `u_sensors`, `y_points`, `targets`, the features or the loss
    are not finite, or weights are negative, not finite or sum to zero.
    """
    what = "`vploss_deeponet`"
    u_sensors = as_batch("u_sensors", u_sensors)
    y_points = as_batch("y_points", y_points)
    n, m = batch_size(u_sensors), batch_size(y_points)
    targets = as_array("targets", targets)
    if not (
        jnp.issubdtype(targets.dtype, jnp.floating) or jnp.issubdtype(targets.dtype, jnp.integer)
    ):
        raise TypeError(f"`targets` must have a real dtype; got dtype {targets.dtype}.")
    if targets.shape != (n, m):
        raise ValueError(
            f"`targets` of {what} must have shape (n, m) = ({n}, {m}): one row per input "
            f"function of `u_sensors` (n = {n}) and one column per query point of "
            f"`y_points` (m = {m}); got shape {targets.shape}."
        )
    weights_f, errors_f = _grid_weights("weights_functions", weights_functions, n, "function", what)
    weights_p, errors_p = _grid_weights("weights_points", weights_points, m, "point", what)
    use_bias = as_flag("use_bias", use_bias)
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"`refine_steps` must be a Python int >= 0; got {refine_steps!r}.")
    alpha1 = as_alpha("alpha1", alpha1, positive=False)
    alpha2 = as_alpha("alpha2", alpha2, positive=False)
    weights_f, u_sensors, targets = drop_zero_weight_samples(weights_f, u_sensors, targets)
    weights_p, y_points, targets_t = drop_zero_weight_samples(weights_p, y_points, targets.T)
    targets = targets_t.T
    branch_features = evaluate_features(branch, u_sensors)
    trunk_features = evaluate_features(trunk, y_points)
    dtype = working_dtype(jnp.result_type(branch_features, trunk_features), targets.dtype)
    branch_features = branch_features.astype(dtype)
    trunk_features = trunk_features.astype(dtype)
    targets = targets.astype(dtype)
    weights_f = None if weights_f is None else weights_f.astype(dtype)
    weights_p = None if weights_p is None else weights_p.astype(dtype)
    checks = RuntimeChecks(
        f"the operator loss {what}",
        errors=[*errors_f, *errors_p],
        finite={"u_sensors": u_sensors, "y_points": y_points, "targets": targets},
    )
    value, coef, _ = envelope_minimise(
        KroneckerObjective(use_bias),
        KroneckerRidgeSolver(refine_steps, use_bias),
        (branch_features, trunk_features, targets, alpha2.astype(dtype), weights_f, weights_p),
        check=checks,
    )
    penalty = parameter_penalty(branch, alpha1.astype(dtype))
    loss = value + penalty + parameter_penalty(trunk, alpha1.astype(dtype))
    if use_bias:
        _, branch_mean = centred_features(branch_features, weights_f, True)
        _, trunk_mean = centred_features(trunk_features, weights_p, True)
        readout = DeepONetReadout(
            coef[:-1, :-1], coef[:-1, -1], coef[-1, :-1], coef[-1, -1], branch_mean, trunk_mean
        )
    else:
        readout = DeepONetReadout(coef, None, None, None, None, None)
    return loss, readout
