"""Inference-time graph optimisation: fold BatchNorm into the preceding convolution.

Applied to the baseline and to the multi-exit model alike before timing, so ratios compare
like with like. Outputs change only by float rounding (~1e-7); the folded copy is for
inference (eval mode), the original is left untouched.
"""

from __future__ import annotations

import copy

from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from .stages import Stage

__all__ = ["fuse_for_inference"]


def _fuse_module(module: nn.Module) -> nn.Module:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    try:
        return fuse(module)
    except Exception:  # untraceable (data-dependent control flow): keep it as it is
        return module


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv + BatchNorm pair folded.

    Works on a :class:`StagedModel`, a :class:`MultiExitModel` (stages and heads) or any
    traceable module; stage and head boundaries are kept.
    """
    model = copy.deepcopy(model).eval()
    stages = [m for m in model.modules() if isinstance(m, Stage)]
    for stage in stages:
        stage.module = _fuse_module(stage.module)
    heads = getattr(model, "heads", None)
    if heads is not None:
        for head in heads:
            for name, child in list(head.named_children()):
                setattr(head, name, _fuse_module(child))
    if not stages and heads is None and not isinstance(model, fx.GraphModule):
        model = _fuse_module(model)
    return model.eval()
