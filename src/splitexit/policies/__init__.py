"""Exit policies: per-sample decision rules, with per-sample state, shared by real and offline runs.

A policy sees one exit's logits for the samples still in the batch and returns which of them
leave now and the logits their prediction comes from. Its state is a dict of tensors whose
first dimension is the batch; the runtime filters that state with the same index it uses to
shrink the batch, so :meth:`MultiExitModel.infer` and :meth:`MultiExitModel.simulate` agree.

The policies live in ``base`` (the protocol, statistics and plain policies), ``ensembles``,
``gated`` and ``dense`` (per-pixel confidence, for segmentation); this package registers them
(:data:`POLICIES`) and builds them by name.
"""

from __future__ import annotations

from ..errors import InputError
from ..registry import Registry
from .base import (
    Entropy,
    ExitPolicy,
    FixedExit,
    Margin,
    MaxProb,
    NeverExit,
    Patience,
    ThresholdPolicy,
    _per_exit,
    entropy_statistic,
    is_plain_threshold,
    leave_at,
    margin_statistic,
    maxprob_statistic,
)
from .dense import DENSE_POLICIES, MeanConfidence, PixelShare
from .ensembles import (
    AdditiveEnsemble,
    GeometricEnsemble,
    ensemble_logits,
    fit_ensemble_weights,
    fit_temperature,
)
from .gated import Gated, GatedMaxProb

__all__ = ["POLICIES", "ExitPolicy", "ThresholdPolicy", "MaxProb", "Entropy", "Margin",
           "Patience", "NeverExit", "FixedExit", "create_policy", "register_policy",
           "fit_temperature", "GeometricEnsemble", "AdditiveEnsemble", "GatedMaxProb",
           "fit_ensemble_weights", "ensemble_logits", "leave_at", "is_plain_threshold",
           "maxprob_statistic", "entropy_statistic", "margin_statistic", "Gated",
           "PixelShare", "MeanConfidence", "has_graph_statistic"]

_ = _per_exit  # re-exported for the TorchScript exits (splitexit.optimize)


#: policy classes by their ``name``
POLICIES: Registry[type[ExitPolicy]] = Registry("policy")
for _cls in (MaxProb, Entropy, Margin, Patience, NeverExit, FixedExit, GeometricEnsemble,
             AdditiveEnsemble, GatedMaxProb, Gated, PixelShare, MeanConfidence):
    POLICIES.add(_cls.name, _cls)


def has_graph_statistic(policy: ExitPolicy) -> bool:
    """Whether ``policy``'s exit test lowers to ONNX nodes
    (:func:`splitexit.export.exit_graph.decision_nodes`): a plain threshold policy
    (:func:`is_plain_threshold`) or a dense one (meanconf, pixelshare)."""
    return is_plain_threshold(policy) or type(policy) in DENSE_POLICIES


def register_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Add a policy class to the registry :func:`create_policy` and checkpoints use."""
    return POLICIES.add(cls.name, cls)


def create_policy(config: dict | str, **kwargs) -> ExitPolicy:
    """Build a policy from ``{"name": ..., **fields}`` or ``"maxprob"`` plus keyword fields."""
    cfg = {"name": config} if isinstance(config, str) else dict(config)
    cfg.update(kwargs)
    name = cfg.pop("name")
    cls = POLICIES.get(name)
    for k, v in list(cfg.items()):
        if isinstance(v, list):
            cfg[k] = tuple(v)
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise InputError(f"bad fields for policy {name!r}: {exc}") from exc
