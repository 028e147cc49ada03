import importlib.metadata

from ._core.readout import VPLinear as VPLinear
from ._core.stats import (
    AbstractStats as AbstractStats,
    InnerStats as InnerStats,
    RESULTS as RESULTS,
)
from ._flow.barrier import (
    barrier_minimise as barrier_minimise,
    BarrierStats as BarrierStats,
    LogBarrier as LogBarrier,
)
from ._flow.cpflow import CPFlow as CPFlow, vploss_cpflow as vploss_cpflow
from ._flow.icnn import ICNN as ICNN
from ._ggn import (
    GaussNewtonOutputs as GaussNewtonOutputs,
    GeneralisedGaussNewton as GeneralisedGaussNewton,
    ggn_operator as ggn_operator,
    vpggn as vpggn,
)
from ._least_squares.levenberg_marquardt import (
    least_squares as least_squares,
    LeastSquaresProgress as LeastSquaresProgress,
    LeastSquaresSolution as LeastSquaresSolution,
    LeastSquaresStats as LeastSquaresStats,
    VarProLevenbergMarquardt as VarProLevenbergMarquardt,
)
from ._model import load_model as load_model, save_model as save_model, VPModel as VPModel
from ._operator.deeponet import (
    DeepONetReadout as DeepONetReadout,
    vploss_deeponet as vploss_deeponet,
)
from ._readout_losses.base import (
    AbstractReadoutLoss as AbstractReadoutLoss,
    Curvature as Curvature,
    Labels as Labels,
)
from ._readout_losses.logistic import (
    SigmoidBinaryCrossEntropy as SigmoidBinaryCrossEntropy,
    vploss_bce as vploss_bce,
)
from ._readout_losses.loss import vploss_glm as vploss_glm
from ._readout_losses.poisson import (
    PoissonLogLikelihood as PoissonLogLikelihood,
    vploss_poisson as vploss_poisson,
)
from ._readout_losses.softmax import (
    SoftmaxCrossEntropy as SoftmaxCrossEntropy,
    vploss_ce as vploss_ce,
)
from ._readout_losses.solvers import (
    AbstractGLMSolver as AbstractGLMSolver,
    AutoNewton as AutoNewton,
    BudgetedNewtonCG as BudgetedNewtonCG,
    KernelNewton as KernelNewton,
    Newton as Newton,
    NewtonCG as NewtonCG,
    OptimistixMinimiser as OptimistixMinimiser,
    QuasiNewton as QuasiNewton,
)
from ._refit import refit_readout as refit_readout
from ._ridge.gcv import GCVStats as GCVStats
from ._ridge.loss import vploss_msereg as vploss_msereg
from ._ridge.lstsq import (
    AbstractRidgeSolver as AbstractRidgeSolver,
    AutoRidge as AutoRidge,
    CholeskyRidge as CholeskyRidge,
    DualRidge as DualRidge,
    SVDRidge as SVDRidge,
)
from ._ridge.residual import (
    vpjacobian_msereg as vpjacobian_msereg,
    vpresidual_msereg as vpresidual_msereg,
)
from ._stochastic.base import AbstractStochasticReadout as AbstractStochasticReadout
from ._stochastic.slimtik import SlimTik as SlimTik, SlimTikState as SlimTikState
from ._stochastic.windowed import WindowedReadout as WindowedReadout, WindowedState as WindowedState
from ._uncertainty import (
    readout_posterior as readout_posterior,
    ReadoutPosterior as ReadoutPosterior,
)


__version__ = importlib.metadata.version("vploss")
