"""The tables that list the losses and the solvers: the registry of readout losses is
every public readout-loss function, and what is built from a table (the resolution of a
`loss=` argument, error messages, the name types) agrees with it."""

import dataclasses
import inspect
import typing

import jax.numpy as jnp
import optimistix as optx
import pytest

import vploss
from vploss._loss_family import loss_family
from vploss._readout_losses.registry import READOUT_LOSSES
from vploss._readout_losses.solvers import _SOLVERS, as_readout_solver, SolverName
from vploss._ridge.loss import _RIDGE_SOLVERS, as_ridge_solver, RidgeSolverName


# The public loss functions that are no readout loss's: the ridge loss, the VarPro loss
# of any readout loss object, the flow and the DeepONet's bilinear ridge readout.
NOT_READOUT_LOSSES = {"vploss_msereg", "vploss_glm", "vploss_cpflow", "vploss_deeponet"}


def test_every_public_readout_loss_is_registered():
    public = {name for name in dir(vploss) if name.startswith("vploss_")} - NOT_READOUT_LOSSES
    assert {function.__name__ for function in READOUT_LOSSES} == public
    for function, build in READOUT_LOSSES.items():
        assert getattr(vploss, function.__name__) is function
        loss = build(3)
        assert getattr(vploss, type(loss).__name__) is type(loss)
        assert f"`{function.__name__}`" in loss.name


def test_a_function_resolves_to_its_loss():
    family = loss_family(vploss.vploss_ce, 4)
    assert family.fit is vploss.vploss_ce
    assert family.readout_loss == vploss.SoftmaxCrossEntropy(4)
    assert loss_family(vploss.vploss_msereg, None).readout_loss is None
    poisson = vploss.PoissonLogLikelihood()
    assert loss_family(poisson, None).readout_loss is poisson


@pytest.mark.parametrize(
    "loss, function",
    [
        (vploss.vploss_msereg, vploss.vploss_msereg),
        (vploss.PoissonLogLikelihood(), vploss.vploss_glm),
        *((function, function) for function in READOUT_LOSSES),
    ],
    ids=lambda value: getattr(value, "__name__", type(value).__name__),
)
def test_penalty_defaults_are_the_signatures(loss, function):
    """The defaults `vpggn` reads the penalties with are those of the loss function."""
    defaults = loss_family(loss, None).defaults
    parameters = inspect.signature(function).parameters
    for name in ("alpha1", "alpha2"):
        default = parameters[name].default
        if default is inspect.Parameter.empty:
            assert name not in defaults
        else:
            assert defaults[name] == default


def test_unknown_loss_errors_list_every_loss():
    x, y = jnp.zeros((4, 2)), jnp.zeros(4)
    with pytest.raises(TypeError) as ggn_error:
        vploss.vpggn(jnp.sum, lambda v: v, x, y, alpha2=1e-2)
    with pytest.raises(ValueError) as refit_error:
        vploss.refit_readout(lambda v: v, [(x, y)], loss=jnp.sum, alpha2=1e-2)
    for error in (ggn_error, refit_error):
        message = str(error.value)
        for function in (vploss.vploss_msereg, *READOUT_LOSSES):
            assert f"`vploss.{function.__name__}`" in message
        assert "`vploss.AbstractReadoutLoss`" in message


@pytest.mark.parametrize(
    "names, table", [(SolverName, _SOLVERS), (RidgeSolverName, _RIDGE_SOLVERS)]
)
def test_solver_name_types_are_the_tables(names, table):
    assert typing.get_args(names) == tuple(table)


def test_a_solver_name_is_its_object_with_the_options():
    expected = {
        "auto": vploss.AutoNewton(gtol=1e-3, max_steps=7),
        "newton": vploss.Newton(gtol=1e-3, max_steps=7),
        "newton-cg": vploss.NewtonCG(gtol=1e-3, max_steps=7),
        "kernel-newton": vploss.KernelNewton(gtol=1e-3, max_steps=7),
        "budgeted-newton-cg": vploss.BudgetedNewtonCG(gtol=1e-3, max_steps=7),
        "bfgs": vploss.QuasiNewton(minimiser=optx.BFGS(rtol=0.0, atol=0.0), gtol=1e-3, max_steps=7),
        "lbfgs": vploss.QuasiNewton(
            minimiser=optx.LBFGS(rtol=0.0, atol=0.0), gtol=1e-3, max_steps=7
        ),
    }
    assert list(expected) == list(_SOLVERS)
    for name, solver in expected.items():
        assert as_readout_solver(name, 1e-3, 7) == solver
        # Without `max_steps` a name keeps its object's own budget (100; one update for
        # the fixed-budget solver).
        default = 1 if name == "budgeted-newton-cg" else 100
        assert as_readout_solver(name, None, None) == dataclasses.replace(
            solver, gtol=None, max_steps=default
        )
    for name, solver in _RIDGE_SOLVERS.items():
        assert as_ridge_solver(name) is solver


def test_unknown_solver_errors_list_every_name():
    with pytest.raises(ValueError) as readout_error:
        as_readout_solver("newtons", None, None)
    with pytest.raises(ValueError) as ridge_error:
        as_ridge_solver("qr")
    for error, table in ((readout_error, _SOLVERS), (ridge_error, _RIDGE_SOLVERS)):
        assert all(repr(name) in str(error.value) for name in table)
    objects = [f"`vploss.{type(solver).__name__}()`" for solver in _RIDGE_SOLVERS.values()]
    assert all(name in str(ridge_error.value) for name in objects)
