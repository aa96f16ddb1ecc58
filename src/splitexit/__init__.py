"""splitexit: early exits, split computing, CBNet and compression for edge inference.

The one idea: a model is a chain of stages (:class:`StagedModel`). Exit heads attach at cuts
(:class:`MultiExitModel`), split computing cuts at one of them, and every piece has a cost.

The public names below are imported on first use, so that ``splitexit.runtime``,
``splitexit.policies``, the wire codec and the edge runtime load on a device without PyTorch.
"""

from __future__ import annotations

import importlib

from .errors import (
    CorruptFileError,
    CutError,
    DatasetMissingError,
    InputError,
    PayloadError,
    SplitexitError,
)

__version__ = "0.1.0"

_LAZY = {
    "OperatingPoint": "calibration", "choose_operating_point": "calibration",
    "oracle": "calibration", "pareto_front": "calibration", "sweep": "calibration",
    "calibrate": "calibration", "Calibration": "calibration",
    "fit_method": "methods", "list_methods": "methods",
    "load": "checkpoint", "load_weights": "checkpoint", "save": "checkpoint",
    "CostTable": "cost", "cost_table": "cost", "count_macs": "cost",
    "ConvHead": "heads", "ExitHead": "heads", "LinearHead": "heads", "SDNHead": "heads",
    "create_head": "heads",
    "ExitResult": "multiexit", "MultiExitModel": "multiexit",
    "Entropy": "policies", "ExitPolicy": "policies", "FixedExit": "policies",
    "Margin": "policies", "MaxProb": "policies", "NeverExit": "policies",
    "Patience": "policies", "fit_temperature": "policies", "create_policy": "policies",
    "PixelShare": "policies", "MeanConfidence": "policies",
    "Stage": "stages", "StagedModel": "stages", "list_cuts": "stages",
    "create_model": "zoo", "create_multiexit": "zoo", "list_models": "zoo",
    "bundle": "deploy", "load_bundle": "deploy",
}

__all__ = [
    "StagedModel", "Stage", "list_cuts", "MultiExitModel", "ExitResult",
    "ExitHead", "LinearHead", "SDNHead", "ConvHead", "create_head",
    "ExitPolicy", "MaxProb", "Entropy", "Margin", "Patience", "NeverExit", "FixedExit",
    "create_policy", "fit_temperature", "PixelShare", "MeanConfidence",
    "CostTable", "cost_table", "count_macs",
    "OperatingPoint", "sweep", "pareto_front", "oracle", "choose_operating_point",
    "calibrate", "Calibration", "fit_method", "list_methods",
    "create_model", "create_multiexit", "list_models", "save", "load", "load_weights",
    "bundle", "load_bundle",
    "SplitexitError", "InputError", "CutError", "DatasetMissingError", "CorruptFileError",
    "PayloadError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitexit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
