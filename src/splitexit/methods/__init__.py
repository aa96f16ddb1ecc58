"""The published early-exit methods, each a recipe registered under its name
(:func:`fit_method`, :func:`list_methods`), and the method-specific pieces they use: T-RECX's
early-view model, the exit gate, online caching. CBNet is its own package
(:mod:`splitexit.cbnet`).
"""

from .gate import ExitGate, GatedMultiExitModel, calibrate_gate, fit_gate
from .online import OnlineCache, OnlineStats
from .recipes import (
    METHODS,
    Fitted,
    Method,
    fit_method,
    list_methods,
    register_method,
    with_heads,
)
from .trecx import EarlyView, early_view_model

__all__ = ["METHODS", "Method", "Fitted", "fit_method", "list_methods", "register_method",
           "with_heads", "early_view_model", "EarlyView", "ExitGate", "GatedMultiExitModel",
           "fit_gate", "calibrate_gate", "OnlineCache", "OnlineStats"]
