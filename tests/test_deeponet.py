"""`vploss_deeponet`: the Kronecker ridge readout against a dense NumPy solve of the
`pq × pq` normal equations (weights, bias, offsets, alpha2 = 0), the loss, the envelope
gradient in both networks (finite differences, a Taylor test, `jax.grad` through a
dense differentiable solve), the readout's implicit derivative, float32 within the
perturbation bound of the stacked problem, jit and vmap, and the errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vploss

from .helpers import cast, random_direction, tree_dot


N_FUNCTIONS, N_POINTS, SENSORS = 7, 6, 5


def networks(dtype=jnp.float64, p=4, q=3):
    kb, kt = jax.random.split(jax.random.PRNGKey(0))
    branch = eqx.nn.MLP(SENSORS, p, 8, 1, activation=jnp.tanh, key=kb)
    trunk = eqx.nn.MLP(1, q, 8, 1, activation=jnp.tanh, key=kt)
    return cast(branch, dtype), cast(trunk, dtype)


def data(dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(N_FUNCTIONS, SENSORS))
    y = rng.uniform(size=(N_POINTS, 1))
    targets = rng.normal(size=(N_FUNCTIONS, N_POINTS)) + np.sin(3 * y[:, 0])[None, :]
    wf = rng.uniform(0.5, 2.0, size=N_FUNCTIONS)
    wp = rng.uniform(0.5, 2.0, size=N_POINTS)
    return tuple(jnp.asarray(a, dtype) for a in (u, y, targets, wf, wp))


class Shifted(eqx.Module):
    """A network with a constant added to its features."""

    net: eqx.Module
    offset: float = eqx.field(static=True)

    def __call__(self, x):
        return self.net(x) + self.offset


def dense_system(branch_f, trunk_f, targets, alpha2, wf=None, wp=None, bias=True, xp=np):
    r"""The dense problem in the raw coefficients $\hat C$ `(P, Q)` of $[b; 1]^\top\hat
    C[t; 1]$: the design `(n m, P Q)` of the Kronecker rows, the weights of the grid
    cells normalised to sum to one, and the penalty matrix $M^\top M$, $M = L_b\otimes
    L_t$, of the penalty $\|L_b\hat CL_t^\top\|^2$ on the centred coefficients."""
    n, p = branch_f.shape
    m, q = trunk_f.shape
    wf = xp.ones(n) if wf is None else wf
    wp = xp.ones(m) if wp is None else wp
    wf, wp = wf / xp.sum(wf), wp / xp.sum(wp)
    if bias:
        lb = xp.eye(p + 1).at[-1, :p].set(wf @ branch_f) if xp is jnp else np.eye(p + 1)
        lt = xp.eye(q + 1).at[-1, :q].set(wp @ trunk_f) if xp is jnp else np.eye(q + 1)
        if xp is np:
            lb[-1, :p], lt[-1, :q] = wf @ branch_f, wp @ trunk_f
        branch_f = xp.concatenate([branch_f, xp.ones((n, 1))], axis=1)
        trunk_f = xp.concatenate([trunk_f, xp.ones((m, 1))], axis=1)
    else:
        lb, lt = xp.eye(p), xp.eye(q)
    design = (branch_f[:, None, :, None] * trunk_f[None, :, None, :]).reshape(n * m, -1)
    weights = (wf[:, None] * wp[None, :]).reshape(-1)
    penalty = xp.kron(lb, lt)
    return design, weights, penalty, targets.reshape(-1), (branch_f.shape[1], trunk_f.shape[1])


def dense_solve(branch_f, trunk_f, targets, alpha2, wf=None, wp=None, bias=True, xp=np):
    """`(loss, C_hat)` from the dense `(P Q) × (P Q)` normal equations."""
    design, w, penalty, rhs, shape = dense_system(
        branch_f, trunk_f, targets, alpha2, wf, wp, bias, xp
    )
    hessian = design.T @ (w[:, None] * design) + alpha2 * penalty.T @ penalty
    coef = xp.linalg.solve(hessian, design.T @ (w * rhs))
    residual = design @ coef - rhs
    loss = 0.5 * xp.sum(w * residual**2) + 0.5 * alpha2 * xp.sum((penalty @ coef) ** 2)
    return loss, coef.reshape(shape)


def features(branch, trunk, u, y):
    return jax.vmap(branch)(u), jax.vmap(trunk)(y)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_readout_and_loss_match_the_dense_normal_equations(weighted, bias):
    branch, trunk = networks()
    u, y, targets, wf, wp = data()
    wf, wp = (wf, wp) if weighted else (None, None)
    alpha2 = 1e-3
    loss, readout = vploss.vploss_deeponet(
        branch,
        trunk,
        u,
        y,
        targets,
        alpha2=alpha2,
        use_bias=bias,
        weights_functions=wf,
        weights_points=wp,
    )
    b, t = (np.asarray(a) for a in features(branch, trunk, u, y))
    ref_loss, ref_coef = dense_solve(
        b, t, np.asarray(targets), alpha2, None if wf is None else np.asarray(wf),
        None if wp is None else np.asarray(wp), bias,
    )  # fmt: skip
    np.testing.assert_allclose(readout.coefficients(), ref_coef, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-12)
    prediction = readout.predict(jnp.asarray(b), jnp.asarray(t))
    raw = np.c_[b, np.ones(len(b))] @ ref_coef @ np.c_[t, np.ones(len(t))].T if bias else None
    np.testing.assert_allclose(prediction, raw if bias else b @ ref_coef @ t.T, atol=1e-11)
    assert readout(jnp.asarray(b[2]), jnp.asarray(t[4])) == pytest.approx(prediction[2, 4])


@pytest.mark.slow
def test_feature_offsets_change_nothing():
    """Offsets of 1e2 on every branch and trunk feature: the loss and the predictions are
    those of the unshifted features to float64 rounding (the penalty is on the centred
    coefficients) and of their dense solve, and so are the gradients."""
    branch, trunk = networks()
    u, y, targets, wf, wp = data()
    kwargs = dict(alpha2=1e-4, weights_functions=wf, weights_points=wp)
    loss, readout = vploss.vploss_deeponet(branch, trunk, u, y, targets, **kwargs)
    shifted_b, shifted_t = Shifted(branch, 100.0), Shifted(trunk, -100.0)
    loss_s, readout_s = vploss.vploss_deeponet(shifted_b, shifted_t, u, y, targets, **kwargs)
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-12)
    b, t = features(branch, trunk, u, y)
    bs, ts = features(shifted_b, shifted_t, u, y)
    np.testing.assert_allclose(readout_s.predict(bs, ts), readout.predict(b, t), atol=1e-11)
    # The dense solve of the unshifted features (the shifted one's normal equations
    # hold the offsets squared: in float64 it lost two digits here, 1.4e-2 relative).
    _, ref = dense_solve(np.asarray(b), np.asarray(t), np.asarray(targets), 1e-4,
                         np.asarray(wf), np.asarray(wp))  # fmt: skip
    raw = np.c_[b, np.ones(len(b))] @ ref @ np.c_[t, np.ones(len(t))].T
    np.testing.assert_allclose(readout_s.predict(bs, ts), raw, atol=1e-10)
    grads = [
        eqx.filter_grad(lambda n: vploss.vploss_deeponet(n[0], n[1], u, y, targets, **kwargs)[0])(
            nets
        )
        for nets in [(branch, trunk), (shifted_b, shifted_t)]
    ]
    for a, c in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-8, atol=1e-11)


def test_alpha2_zero_with_rank_deficient_features_is_the_least_squares_fit():
    """A repeated branch feature and alpha2 = 0: finite, and the least-squares loss."""
    branch, trunk = networks()
    repeated = lambda x: jnp.concatenate([branch(x), branch(x)[:1]])  # noqa: E731
    u, y, targets, _, _ = data()
    loss, readout = vploss.vploss_deeponet(repeated, trunk, u, y, targets, alpha2=0.0)
    b, t = features(repeated, trunk, u, y)
    design, w, _, rhs, _ = dense_system(np.asarray(b), np.asarray(t), np.asarray(targets), 0.0)
    solution = np.linalg.lstsq(design * np.sqrt(w[:, None]), np.sqrt(w) * rhs, rcond=None)[0]
    reference = 0.5 * np.sum(w * (design @ solution - rhs) ** 2)
    np.testing.assert_allclose(float(loss), reference, rtol=1e-8)
    assert np.all(np.isfinite(readout.weight))
    grads = eqx.filter_grad(lambda b_, t_: vploss.vploss_deeponet(
        lambda x: jnp.concatenate([b_(x), b_(x)[:1]]), t_, u, y, targets, alpha2=0.0)[0]
    )(branch, trunk)  # fmt: skip
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def _loss(nets, kwargs):
    u, y, targets, wf, wp = data()
    return vploss.vploss_deeponet(
        nets[0], nets[1], u, y, targets, weights_functions=wf, weights_points=wp, **kwargs
    )


def _dense_loss(nets, alpha2):
    """The reduced loss through a dense differentiable solve (`jnp.linalg.solve`)."""
    u, y, targets, wf, wp = data()
    b, t = features(*nets, u, y)
    return dense_solve(b, t, targets, alpha2, wf, wp, True, xp=jnp)


def test_gradient_in_both_networks_taylor_finite_differences_and_dense_solve():
    nets = networks()
    kwargs = dict(alpha2=1e-3, alpha1=1e-2)
    loss_fn = lambda n: _loss(n, kwargs)[0]  # noqa: E731
    grad = eqx.filter_grad(loss_fn)(nets)
    # jax.grad through the dense solve of the same problem (plus the alpha1 penalty).
    params = eqx.filter(nets, eqx.is_inexact_array)
    penalty = lambda n: 0.5e-2 * sum(jnp.sum(a**2) for a in jax.tree.leaves(  # noqa: E731
        eqx.filter(n, eqx.is_inexact_array)))  # fmt: skip
    dense_grad = eqx.filter_grad(lambda n: _dense_loss(n, 1e-3)[0] + penalty(n))(nets)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(dense_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)
    assert all(np.any(g != 0) for g in jax.tree.leaves(eqx.filter(grad, eqx.is_array)))
    del params
    # Central differences and the Taylor test along a random direction.
    direction = random_direction(nets, seed=3)
    slope = float(tree_dot(grad, direction))
    move = lambda h: eqx.apply_updates(nets, jax.tree.map(lambda d: h * d, direction))  # noqa: E731
    h = 1e-5
    fd = (float(loss_fn(move(h))) - float(loss_fn(move(-h)))) / (2 * h)
    assert fd == pytest.approx(slope, rel=1e-6)
    base = float(loss_fn(nets))
    remainders = [abs(float(loss_fn(move(h))) - base - h * slope) for h in (1e-2, 5e-3, 2.5e-3)]
    ratios = np.array(remainders[:-1]) / np.array(remainders[1:])
    assert np.all((ratios > 3.5) & (ratios < 4.5)), ratios


@pytest.mark.slow
def test_readout_implicit_derivative_matches_the_dense_solve():
    """The JVP of the fitted readout's raw coefficients in both networks' parameters
    (the implicit derivative of the envelope mechanism) against `jax.jvp` through the
    dense solve."""
    nets = networks()
    direction = random_direction(nets, seed=5)

    def coefficients(n):
        return _loss(n, dict(alpha2=1e-3))[1].coefficients()

    params, static = eqx.partition(nets, eqx.is_inexact_array)
    tangent = eqx.filter(direction, eqx.is_inexact_array)
    _, t_coef = jax.jvp(lambda p: coefficients(eqx.combine(p, static)), (params,), (tangent,))
    _, t_ref = jax.jvp(
        lambda p: _dense_loss(eqx.combine(p, static), 1e-3)[1], (params,), (tangent,)
    )
    np.testing.assert_allclose(t_coef, t_ref, rtol=1e-7, atol=1e-10)
    # Reverse mode through the readout: the gradient of a prediction.
    u, y, _, _, _ = data()

    def prediction(p):
        branch, trunk = eqx.combine(p, static)
        readout = _loss((branch, trunk), dict(alpha2=1e-3))[1]
        return readout(branch(u[1]), trunk(y[2]))

    def dense_prediction(p):
        branch, trunk = eqx.combine(p, static)
        coef = _dense_loss((branch, trunk), 1e-3)[1]
        return jnp.r_[branch(u[1]), 1.0] @ coef @ jnp.r_[trunk(y[2]), 1.0]

    for a, b in zip(
        jax.tree.leaves(jax.grad(prediction)(params)),
        jax.tree.leaves(jax.grad(dense_prediction)(params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.slow
def test_float32_within_the_perturbation_bound():
    """The float32 readout (of float32 features) is within the Wedin bound
    `eps32·(2κ + κ²η)` of the stacked problem `[√w X_c; √alpha2 I]` (times 10, for the
    two factors) of the float64 solve of the same features; the float32 gradient is
    close to the float64 one."""
    alpha2 = 1e-4
    branch, trunk = networks(jnp.float32)
    u, y, targets, wf, wp = data(jnp.float32)
    loss, readout = vploss.vploss_deeponet(branch, trunk, u, y, targets, alpha2=alpha2)
    assert loss.dtype == jnp.float32
    b, t = (np.asarray(a, np.float64) for a in features(branch, trunk, u, y))
    bc, tc = np.c_[b - b.mean(0), np.ones(len(b))], np.c_[t - t.mean(0), np.ones(len(t))]
    design, w, _, rhs, shape = dense_system(bc, tc, np.asarray(targets, np.float64), alpha2,
                                            bias=False)  # fmt: skip
    stacked = np.r_[design * np.sqrt(w[:, None]), np.sqrt(alpha2) * np.eye(design.shape[1])]
    response = np.r_[np.sqrt(w) * rhs, np.zeros(design.shape[1])]
    exact = np.linalg.lstsq(stacked, response, rcond=None)[0]
    singular = np.linalg.svd(stacked, compute_uv=False)
    kappa = singular[0] / singular[-1]
    eta = np.linalg.norm(stacked @ exact - response) / (singular[0] * np.linalg.norm(exact))
    bound = 10 * np.finfo(np.float32).eps * (2 * kappa + kappa**2 * eta)
    centred = np.block([
        [np.asarray(readout.weight), np.asarray(readout.branch_bias)[:, None]],
        [np.asarray(readout.trunk_bias)[None, :], np.asarray(readout.bias)[None, None]],
    ])  # fmt: skip
    error = np.linalg.norm(centred.ravel() - exact) / np.linalg.norm(exact)
    assert error < min(bound, 1e-2), (error, bound, kappa)
    grad32 = eqx.filter_grad(
        lambda n: vploss.vploss_deeponet(n[0], n[1], u, y, targets, alpha2=alpha2)[0]
    )((branch, trunk))
    nets64 = cast((branch, trunk), jnp.float64)
    u64, y64, t64 = (a.astype(jnp.float64) for a in (u, y, targets))
    grad64 = eqx.filter_grad(
        lambda n: vploss.vploss_deeponet(n[0], n[1], u64, y64, t64, alpha2=alpha2)[0]
    )(nets64)
    g32 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(grad32)])
    g64 = np.concatenate([np.ravel(a) for a in jax.tree.leaves(grad64)])
    assert np.linalg.norm(g32 - g64) / np.linalg.norm(g64) < min(bound, 1e-2)


@pytest.mark.slow
def test_jit_and_vmap():
    branch, trunk = networks()
    u, y, targets, wf, wp = data()
    eager = vploss.vploss_deeponet(branch, trunk, u, y, targets, weights_points=wp)
    jitted = eqx.filter_jit(vploss.vploss_deeponet)(branch, trunk, u, y, targets, weights_points=wp)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-12)
    np.testing.assert_allclose(jitted[1].weight, eager[1].weight, rtol=1e-10, atol=1e-12)
    stacked = jnp.stack([targets, 2 * targets + 1])
    losses, readouts = jax.vmap(
        lambda tg: vploss.vploss_deeponet(branch, trunk, u, y, tg, weights_points=wp)
    )(stacked)
    for i in range(2):
        single = vploss.vploss_deeponet(branch, trunk, u, y, stacked[i], weights_points=wp)
        np.testing.assert_allclose(float(losses[i]), float(single[0]), rtol=1e-10)
        np.testing.assert_allclose(readouts.weight[i], single[1].weight, rtol=1e-8, atol=1e-10)


def test_zero_weights_drop_functions_and_points():
    """A function and a point of weight zero, with NaN targets there: the loss and the
    readout of the data set without them."""
    branch, trunk = networks()
    u, y, targets, _, _ = data()
    wf = jnp.ones(N_FUNCTIONS).at[3].set(0.0)
    wp = jnp.ones(N_POINTS).at[1].set(0.0)
    dirty = targets.at[3, :].set(jnp.nan).at[:, 1].set(jnp.nan)
    loss, readout = vploss.vploss_deeponet(
        branch, trunk, u, y, dirty, weights_functions=wf, weights_points=wp
    )
    keep_f, keep_p = np.arange(N_FUNCTIONS) != 3, np.arange(N_POINTS) != 1
    ref_loss, ref = vploss.vploss_deeponet(
        branch, trunk, u[keep_f], y[keep_p], targets[keep_f][:, keep_p]
    )
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-10)
    np.testing.assert_allclose(readout.coefficients(), ref.coefficients(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(targets=np.zeros((6, 7))), ValueError, r"\(n, m\) = \(7, 6\).*got shape \(6, 7\)"),
        (dict(targets=np.zeros(7)), ValueError, r"\(n, m\) = \(7, 6\)"),
        (dict(y_points=np.zeros((5, 1))), ValueError, r"\(n, m\) = \(7, 5\)"),
        (dict(weights_functions=np.ones(6)), ValueError, r"`weights_functions`.*shape \(7,\)"),
        (dict(weights_points=np.ones((6, 1))), ValueError, r"`weights_points`.*shape \(6,\)"),
        (dict(alpha2=-1.0), ValueError, "alpha2"),
        (dict(use_bias=1), TypeError, "use_bias"),
        (dict(refine_steps=-1), ValueError, "refine_steps"),
        (dict(u_sensors=np.zeros((7, 4))), ValueError, "failed on one sample"),
    ],
)  # fmt: skip
def test_bad_input_raises_clear_errors(change, error, match):
    branch, trunk = networks()
    u, y, targets, _, _ = data()
    kwargs = dict(u_sensors=u, y_points=y, targets=targets) | change
    with pytest.raises(error, match=match):
        vploss.vploss_deeponet(branch, trunk, **kwargs)


@pytest.mark.parametrize("where", ["u_sensors", "y_points", "targets"])
def test_non_finite_inputs_are_runtime_errors(where):
    branch, trunk = networks()
    u, y, targets, _, _ = data()
    arrays = dict(u_sensors=u, y_points=y, targets=targets)
    arrays[where] = arrays[where].at[0, 0].set(jnp.inf)
    with pytest.raises(Exception, match=f"`{where}` is not finite"):
        eqx.filter_jit(vploss.vploss_deeponet)(branch, trunk, **arrays)
    with pytest.raises(Exception, match="not finite"):  # the gradient alone too
        eqx.filter_jit(eqx.filter_grad(
            lambda b: vploss.vploss_deeponet(b, trunk, **arrays)[0]))(branch)  # fmt: skip


def test_negative_weights_are_a_runtime_error():
    branch, trunk = networks()
    u, y, targets, _, wp = data()
    with pytest.raises(Exception, match="must be >= 0"):
        vploss.vploss_deeponet(branch, trunk, u, y, targets, weights_points=wp.at[0].set(-1))


def test_readout_rejects_wrong_feature_shapes():
    branch, trunk = networks()
    u, y, targets, _, _ = data()
    _, readout = vploss.vploss_deeponet(branch, trunk, u, y, targets)
    with pytest.raises(ValueError, match=r"shape \(4,\).*shape \(3,\)"):
        readout(jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"\(n, 4\).*\(m, 3\)"):
        readout.predict(jnp.zeros((2, 4)), jnp.zeros(3))


@pytest.mark.slow
def test_second_derivatives_match_the_dense_solve():
    """A Hessian-vector product of the loss (forward over reverse: the envelope rule
    differentiated through the readout's implicit derivative) against the dense solve."""
    nets = networks()
    params, static = eqx.partition(nets, eqx.is_inexact_array)
    tangent = eqx.filter(random_direction(nets, seed=7), eqx.is_inexact_array)

    def hvp(loss):
        grad = jax.grad(lambda p: loss(eqx.combine(p, static)))
        return jax.tree.leaves(jax.jvp(grad, (params,), (tangent,))[1])

    ours = hvp(lambda n: _loss(n, dict(alpha2=1e-3))[0])
    dense = hvp(lambda n: _dense_loss(n, 1e-3)[0])
    for a, b in zip(ours, dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)
