"""PyTorch vs another runtime of the same exit program: :func:`parity`.

Exit programs run on ONNX Runtime through :class:`splitexit.runtime.OrtProgram` (pieces
exported by :func:`splitexit.program.export_pieces`, or a bundle's
:meth:`~splitexit.runtime.bundle.Bundle.program`); this module only compares one with the
PyTorch model it came from.
"""

from __future__ import annotations

import numpy as np
import torch

from ..multiexit import MultiExitModel
from ..policies import ExitPolicy

__all__ = ["parity"]


def _tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


def _same(a: torch.Tensor, b) -> float:
    return float((a == _tensor(b)).double().mean())


def parity(model: MultiExitModel, runtime, x: torch.Tensor, policy: ExitPolicy) -> dict:
    """Compare PyTorch and another runtime's early-exit inference on ``x``.

    Args:
        model: the PyTorch multi-exit model.
        runtime: anything with ``infer(x, policy)`` and ``forward(x)`` (every exit's logits
            for the whole batch), e.g. an :class:`~splitexit.runtime.OrtProgram`; it may
            answer in numpy or torch.
        x: an input batch.
        policy: the exit policy.

    Returns:
        ``{"same_predictions", "same_exits", "max_abs_logit_diff"}``: fractions of samples with
        equal predictions and equal exit indices, and the largest logit difference over all
        exits (from running every exit on the whole batch).
    """
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            ref = model.infer(x, policy)
            ref_logits = model(x)
    finally:
        for m, mode in was_training:
            m.training = mode
    got = runtime.infer(x, policy)
    got_logits = runtime.forward(x)
    diff = max(float((a - _tensor(b)).abs().max())
               for a, b in zip(ref_logits, got_logits, strict=True))
    return {"same_predictions": _same(ref.predictions, got.predictions),
            "same_exits": _same(ref.exit_index, got.exit_index),
            "max_abs_logit_diff": diff}
