"""splitexit: early exits, split computing, CBNet and compression for edge inference.

The one idea: a model is a chain of stages (:class:`StagedModel`). Exit heads attach at cuts
(:class:`MultiExitModel`), split computing cuts at one of them, and every piece has a cost.
"""

from .calibration import OperatingPoint, choose_operating_point, oracle, pareto_front, sweep
from .checkpoint import load, load_weights, save
from .cost import CostTable, cost_table, count_macs
from .errors import (
                     CorruptFileError,
                     CutError,
                     DatasetMissingError,
                     InputError,
                     PayloadError,
                     SplitexitError,
)
from .heads import ConvHead, ExitHead, LinearHead, SDNHead, make_head
from .multiexit import ExitResult, MultiExitModel
from .policies import (
                     Entropy,
                     ExitPolicy,
                     FixedExit,
                     Margin,
                     MaxProb,
                     NeverExit,
                     Patience,
                     fit_temperature,
                     make_policy,
)
from .stages import Stage, StagedModel, list_cuts
from .zoo import create_model, create_multiexit, list_models

__version__ = "0.1.0"

__all__ = [
    "StagedModel", "Stage", "list_cuts", "MultiExitModel", "ExitResult",
    "ExitHead", "LinearHead", "SDNHead", "ConvHead", "make_head",
    "ExitPolicy", "MaxProb", "Entropy", "Margin", "Patience", "NeverExit", "FixedExit",
    "make_policy", "fit_temperature",
    "CostTable", "cost_table", "count_macs",
    "OperatingPoint", "sweep", "pareto_front", "oracle", "choose_operating_point",
    "create_model", "create_multiexit", "list_models", "save", "load", "load_weights",
    "SplitexitError", "InputError", "CutError", "DatasetMissingError", "CorruptFileError",
    "PayloadError",
]
