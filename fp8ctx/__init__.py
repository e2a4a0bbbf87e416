"""fp8ctx: run PyTorch models with their weights held in FP8 — scoped, lazy and exactly reversible."""

from ._budget import CurvePoint, FP8Plan, plan
from ._config import DEFAULT_LAYERS, FP8Config
from ._context import fp8_weights, functional_call
from ._errors import FP8Error
from ._memory import MemoryReport
from ._report import DenseEntry, DenseInventory, LayerReport, OutputReport, Report, report
from ._sensitivity import CANDIDATE_LAYERS, LayerSensitivity, Sensitivity, sensitivity
from ._store import FP8Store
from ._layout import FP8Layout
from ._tensor import FP8Tensor
from ._version import __version__

__all__ = [
    # entry points
    "fp8_weights",
    "functional_call",
    "report",
    "sensitivity",
    "plan",
    # representation
    "FP8Store",
    "FP8Tensor",
    "FP8Layout",
    # reports
    "Report",
    "LayerReport",
    "OutputReport",
    "DenseInventory",
    "DenseEntry",
    "Sensitivity",
    "LayerSensitivity",
    "FP8Plan",
    "CurvePoint",
    "MemoryReport",
    # options
    "FP8Config",
    "DEFAULT_LAYERS",
    "CANDIDATE_LAYERS",
    # errors
    "FP8Error",
]
