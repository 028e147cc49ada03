import importlib.metadata

from ._diagnostics import InnerStats as InnerStats
from ._readout import VPLinear as VPLinear
from ._ridge import vploss_msereg as vploss_msereg


__version__ = importlib.metadata.version("vploss")
