"""Checks strategies run in ``prepare``: the model fits the strategy, what it trains is trainable."""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from .joint import require_heads

__all__ = ["require_heads", "require_trainable", "require_head_type"]


def require_trainable(module: nn.Module, what: str, strategy: str) -> None:
    """Raise when ``module`` has parameters but every one of them is frozen."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        raise InputError(f"strategy {strategy!r} trains the {what}, but its parameters are "
                         f"frozen; unfreeze them with .requires_grad_(True) or use a strategy "
                         "for a frozen backbone (HeadsOnly, ZTW, fit_class_means)")


def require_head_type(model: nn.Module, head_type: type, strategy: str, hint: str) -> None:
    """Raise unless every exit head of ``model`` is a ``head_type``."""
    require_heads(model, strategy)
    wrong = [type(h).__name__ for h in model.heads if not isinstance(h, head_type)]
    if wrong:
        raise InputError(f"strategy {strategy!r} needs {head_type.__name__} exits, but the model "
                         f"has {', '.join(wrong)}; {hint}")
