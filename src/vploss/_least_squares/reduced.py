r"""The reduced residual of the ridge loss and its Jacobian-vector products, from the
structure of variable projection: one linearisation of the features and one thin SVD
of the design per point, shared by every product."""

import itertools
import math
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PyTree, Scalar

from .._core.features import augment, feature_map, readout_features
from .._core.numerics import matmul
from .._ridge.gcv import gcv_penalty, GCVStats
from .._ridge.lstsq import centred_problem, svd_filter


JacobianName: TypeAlias = Literal["golub_pereyra", "kaufman"]


class Unravel(eqx.Module):
    """The inverse of flattening a pytree of arrays into one vector (as
    `jax.flatten_util.ravel_pytree`'s), defined by static, hashable data so that a
    compiled step is reused by every problem of the same structure."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtypes: tuple[Any, ...] = eqx.field(static=True)

    def __call__(self, flat: Float[Array, " P"]) -> Any:
        sizes = [math.prod(shape) for shape in self.shapes]
        pieces = jnp.split(flat, list(itertools.accumulate(sizes))[:-1])
        leaves = [
            piece.reshape(shape).astype(dtype)
            for piece, shape, dtype in zip(pieces, self.shapes, self.dtypes, strict=True)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def ravel(tree: Any) -> tuple[Float[Array, " P"], Unravel]:
    """The arrays of `tree` as one vector (in their promoted dtype) and the inverse."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # At least float32: a bfloat16 model's steps would be lost in its own rounding.
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32) if leaves else jnp.float32
    flat = (
        jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])
        if leaves
        else jnp.zeros(0)
    )
    unravel = Unravel(
        treedef, tuple(leaf.shape for leaf in leaves), tuple(leaf.dtype for leaf in leaves)
    )
    return flat, unravel


class ReducedProblem(eqx.Module):
    r"""The data of a reduced least-squares problem, fixed while the parameters move:
    the model's non-trainable part, the checked batch, the targets `(N, k)`, the
    weights (or `None`), the penalty weights (`alpha2` a number, or `"gcv"` re-chosen
    at each linearisation point) and which residual blocks exist."""

    static: Any
    inputs: PyTree[Array]
    targets: Float[Array, "N k"]
    weights: Float[Array, " N"] | None
    alpha1: Scalar
    alpha2: Scalar | None  # `None`: chosen by GCV
    unravel: Unravel
    use_bias: bool = eqx.field(static=True)
    scalar_output: bool = eqx.field(static=True)
    penalty_rows: bool = eqx.field(static=True)  # the `sqrt(alpha2) c` block
    parameter_rows: bool = eqx.field(static=True)  # the `sqrt(alpha1) theta` block

    def model(self, params: Float[Array, " P"]) -> Any:
        return eqx.combine(self.unravel(params), self.static)

    def design(
        self, params: Float[Array, " P"]
    ) -> tuple[Float[Array, "R0 p"], Float[Array, "R0 k"]]:
        r"""The centred design $Z$ and response $T$ (`N + 1` rows, see `centred_problem`)
        with $\|Zc - T\|^2$ the data term of the ridge objective for every readout
        $c = [W; b^\top]$, so that the offsets of features and targets never enter a
        normal matrix."""
        features, targets = readout_features(
            self.model(params), self.inputs, self.targets, self.use_bias
        )
        weights = None if self.weights is None else self.weights.astype(features.dtype)
        design, response, _ = centred_problem(
            features, targets, jnp.zeros((), features.dtype), self.use_bias, False, weights
        )
        return design.dense(), response.dense()

    def row_map(self, rows: Float[Array, "N k"]) -> Float[Array, "R0 k"]:
        r"""The linear map from per-sample rows $X$ (one row per sample, as the features)
        to the design's rows: $X \mapsto Z(X)$ with the ones column left out (the
        tangent of the centring, weighting and mean row that `design` applies)."""
        weights = None if self.weights is None else self.weights.astype(rows.dtype)

        def design_of(features):
            design, _, _ = centred_problem(
                augment(features, self.use_bias),
                jnp.zeros((rows.shape[0], 1), rows.dtype),
                jnp.zeros((), rows.dtype),
                self.use_bias,
                False,
                weights,
            )
            return design.dense()[:, : rows.shape[1]]

        # The map is affine in the features; its linear part is the jvp at any point.
        return jax.jvp(design_of, (rows,), (rows,))[1]

    def penalty(self, params: Float[Array, " P"]) -> tuple[Scalar, GCVStats | None]:
        """The readout penalty at `params`: the fixed one, or chosen by GCV there (held
        fixed in every derivative)."""
        if self.alpha2 is not None:
            return self.alpha2, None
        features, targets = readout_features(
            self.model(params), self.inputs, self.targets, self.use_bias
        )
        weights = None if self.weights is None else self.weights.astype(features.dtype)
        return gcv_penalty(jax.lax.stop_gradient(features), targets, self.use_bias, weights)


class Projection(eqx.Module):
    r"""The thin SVD $Z = USV^\top$ of the design at one point and the filter factors
    $\phi_i = 1/(s_i^2 + \alpha)$, so that $H^{-1} = V\operatorname{diag}(\phi)V^\top$
    with $H = Z^\top Z + \alpha I$."""

    u: Float[Array, "R0 q"]
    s: Float[Array, " q"]
    vt: Float[Array, "q p"]
    filter: Float[Array, " q"]

    def coefficients(self, response: Float[Array, "R0 k"]) -> Float[Array, "p k"]:
        r"""The ridge readout $c = H^{-1}Z^\top T$."""
        return matmul(self.vt.T, (self.s * self.filter)[:, None] * matmul(self.u.T, response))

    def design_times(self, c: Float[Array, "p k"]) -> Float[Array, "R0 k"]:
        return matmul(self.u, self.s[:, None] * matmul(self.vt, c))

    def inverse_normal(self, g: Float[Array, "p k"]) -> Float[Array, "p k"]:
        return matmul(self.vt.T, self.filter[:, None] * matmul(self.vt, g))


def projection(design: Float[Array, "R0 p"], alpha2: Scalar) -> Projection:
    u, s, vt, filter_ = svd_filter(design, alpha2)
    return Projection(u, s, vt, filter_)


class Linearisation(eqx.Module):
    r"""The reduced residual at one point and the products with its Jacobian.

    With the design $Z(\theta)$, response $T$, penalty $\alpha$, readout $c(\theta) =
    H^{-1}Z^\top T$ and data residual $\rho = Zc - T$, the residual is $r = [\rho;
    \sqrt\alpha\,c; \sqrt{\alpha_1}\,\theta]$. For a direction $v$ with $\dot Z =
    \mathrm dZ[v]$, $a = \dot Zc$ and $b = \dot Z^\top\rho$,

    $$\dot c = -H^{-1}(Z^\top a + b), \qquad J v = [a + Z\dot c;\ \sqrt\alpha\,\dot c;
    \sqrt{\alpha_1}\,v]$$

    (Golub and Pereyra, 1973); Kaufman's (1975) Jacobian drops $b$, the term
    proportional to the residual. The transpose, for $u = [u_\rho; u_c; u_\theta]$: with
    $g = H^{-1}(Z^\top u_\rho + \sqrt\alpha\,u_c)$, $J^\top u = \mathrm dZ^\top[(u_\rho -
    Zg)c^\top - \rho g^\top] + \sqrt{\alpha_1}\,u_\theta$ (without $\rho g^\top$ for
    Kaufman's)."""

    params: Float[Array, " P"]
    residual: Float[Array, " R"]
    coef: Float[Array, "p k"]
    data_residual: Float[Array, "R0 k"]
    alpha2: Scalar
    alpha1: Scalar
    projection: Projection
    design_jvp: Callable[[Array], Array]
    design_vjp: Callable[[Array], Array]
    golub_pereyra: bool = eqx.field(static=True)
    penalty_rows: bool = eqx.field(static=True)
    parameter_rows: bool = eqx.field(static=True)

    def _blocks(self, u: Float[Array, " R"]) -> tuple[Array, Array | None, Array | None]:
        data_size = self.data_residual.size
        u_data = u[:data_size].reshape(self.data_residual.shape)
        rest = u[data_size:]
        u_coef = u_param = None
        if self.penalty_rows:
            u_coef, rest = rest[: self.coef.size].reshape(self.coef.shape), rest[self.coef.size :]
        if self.parameter_rows:
            u_param = rest
        return u_data, u_coef, u_param

    def mv(self, v: Float[Array, " P"]) -> Float[Array, " R"]:
        """$Jv$."""
        d_design = self.design_jvp(v)
        a = matmul(d_design, self.coef)
        p = self.projection
        # Vᵀ H⁻¹(Zᵀa + b) = φ ⊙ (s ⊙ Uᵀa + Vᵀb): the readout's derivative is -V q.
        projected = p.s[:, None] * matmul(p.u.T, a)
        if self.golub_pereyra:
            projected = projected + matmul(p.vt, matmul(d_design.T, self.data_residual))
        q = p.filter[:, None] * projected
        blocks = [(a - matmul(p.u, p.s[:, None] * q)).ravel()]
        if self.penalty_rows:
            blocks.append(-jnp.sqrt(self.alpha2) * matmul(p.vt.T, q).ravel())
        if self.parameter_rows:
            blocks.append(jnp.sqrt(self.alpha1) * v)
        return jnp.concatenate(blocks)

    def rmv(self, u: Float[Array, " R"]) -> Float[Array, " P"]:
        r"""$J^\top u$."""
        u_data, u_coef, u_param = self._blocks(u)
        p = self.projection
        w = matmul(p.vt.T, p.s[:, None] * matmul(p.u.T, u_data))
        if u_coef is not None:
            w = w + jnp.sqrt(self.alpha2) * u_coef
        g = p.inverse_normal(w)
        cotangent = matmul(u_data - p.design_times(g), self.coef.T)
        if self.golub_pereyra:
            cotangent = cotangent - matmul(self.data_residual, g.T)
        out = self.design_vjp(cotangent)
        if u_param is not None:
            out = out + jnp.sqrt(self.alpha1) * u_param
        return out


def _stacked(
    problem: ReducedProblem, params: Array, design: Array, response: Array, alpha2: Scalar
) -> tuple[Projection, Float[Array, "p k"], Float[Array, "R0 k"], Float[Array, " R"]]:
    """The projection, readout, data residual and stacked residual at one point."""
    proj = projection(design, alpha2)
    coef = proj.coefficients(response)
    data_residual = matmul(design, coef) - response
    blocks = [data_residual.ravel()]
    if problem.penalty_rows:
        blocks.append(jnp.sqrt(alpha2) * coef.ravel())
    if problem.parameter_rows:
        blocks.append(jnp.sqrt(problem.alpha1).astype(design.dtype) * params.astype(design.dtype))
    return proj, coef, data_residual, jnp.concatenate(blocks)


def reduced_residual(
    problem: ReducedProblem, params: Float[Array, " P"], alpha2: Scalar
) -> tuple[Float[Array, " R"], Float[Array, "p k"]]:
    """The reduced residual and the readout at `params` for the penalty `alpha2`."""
    design, response = problem.design(params)
    _, coef, _, residual = _stacked(problem, params, design, response, alpha2.astype(design.dtype))
    return residual, coef


def dense_jacobian(problem: ReducedProblem, lin: Linearisation) -> Float[Array, "R P"]:
    r"""The Jacobian $J$ of `lin` as a dense matrix, from per-sample reverse passes:
    $A = \mathrm dZ[\cdot]c$ from the gradients of the outputs $\hat f_j^\top c$ of
    each sample (through the design's row map), and, for the exact Jacobian, $K =
    \mathrm dZ[\cdot]^\top\rho$ by one reverse pass over the batch per readout
    coefficient. Cost: $Nk + [\text{golub\_pereyra}]\,pk$ reverse passes (of one sample,
    and of the batch), against $P$ forward passes of the batch for the columns."""
    params, coef, p = lin.params, lin.coef, lin.projection
    weight = coef[:-1] if problem.use_bias else coef
    model = problem.model
    one_sample = lambda q, sample: feature_map(model(q), problem.inputs)(sample)  # noqa: E731

    def sample_rows(sample):
        outputs = lambda q: matmul(one_sample(q, sample).astype(coef.dtype), weight)  # noqa: E731
        return jax.jacrev(outputs)(params)  # (k, P)

    per_sample = jax.vmap(sample_rows)(problem.inputs)  # (N, k, P)
    num_params = params.size
    # The design's row map acts on the sample axis: one (N, k) matrix per parameter.
    frozen = jax.vmap(problem.row_map, in_axes=2, out_axes=2)(
        per_sample.astype(coef.dtype)
    )  # (R0, k, P)
    projected = p.s[:, None, None] * jnp.einsum("rq,rkP->qkP", p.u, frozen, precision=_HIGHEST)
    if lin.golub_pereyra:
        # K[l, c] = dZ[·]ᵀρ: the reverse pass with cotangent ρ[:, c] e_lᵀ.
        num_coef, k = coef.shape
        cotangents = jnp.einsum(
            "rc,lm->lcrm", lin.data_residual, jnp.eye(num_coef, dtype=coef.dtype)
        ).reshape(num_coef * k, *lin.data_residual.shape[:1], num_coef)
        residual_term = jax.vmap(lin.design_vjp)(cotangents).reshape(num_coef, k, num_params)
        projected = projected + jnp.einsum("qp,pkP->qkP", p.vt, residual_term, precision=_HIGHEST)
    q = p.filter[:, None, None] * projected
    data = frozen - jnp.einsum("rq,qkP->rkP", p.u, p.s[:, None, None] * q, precision=_HIGHEST)
    blocks = [data.reshape(-1, num_params)]
    if lin.penalty_rows:
        blocks.append(
            -jnp.sqrt(lin.alpha2)
            * jnp.einsum("qp,qkP->pkP", p.vt, q, precision=_HIGHEST).reshape(-1, num_params)
        )
    if lin.parameter_rows:
        blocks.append(jnp.sqrt(lin.alpha1) * jnp.eye(num_params, dtype=coef.dtype))
    return jnp.concatenate(blocks)


_HIGHEST = jax.lax.Precision.HIGHEST


def linearise(
    problem: ReducedProblem, params: Float[Array, " P"], jacobian: JacobianName | str
) -> tuple[Linearisation, GCVStats | None]:
    """The reduced residual at `params` with its Jacobian's products (the penalty chosen
    there first, with `alpha2="gcv"`)."""
    alpha2, gcv_stats = problem.penalty(params)
    # The response does not depend on the parameters: it rides along as the aux.
    design, linear, response = jax.linearize(problem.design, params, has_aux=True)
    transpose = jax.linear_transpose(linear, params)
    alpha2 = jnp.asarray(alpha2, design.dtype)
    proj, coef, data_residual, residual = _stacked(problem, params, design, response, alpha2)
    lin = Linearisation(
        params,
        residual,
        coef,
        data_residual,
        alpha2,
        jnp.asarray(problem.alpha1, design.dtype),
        proj,
        linear,
        lambda cotangent: transpose(cotangent)[0],
        jacobian == "golub_pereyra",
        problem.penalty_rows,
        problem.parameter_rows,
    )
    return lin, gcv_stats
