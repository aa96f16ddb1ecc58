"""T-RECX: one early exit plus early-view assistance for the final classifier.

T-RECX (tinyML) adds one depthwise-separable early exit to a tiny CNN and lets the final
classifier also read the early exit's features, which counters overthinking. Here the stages
after the exit carry a pooled copy of the exit's features next to their own payload, and the
final stage adds a linear map of it to its logits. Because the backbones end in a linear
classifier, ``final(x) + W v`` is exactly a linear classifier over ``[final features, v]``.
The result is an ordinary :class:`MultiExitModel`, so it runs on the real per-sample path.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..heads import create_head
from ..multiexit import MultiExitModel
from ..stages import Stage, StagedModel

__all__ = ["early_view_model", "EarlyView"]


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


class EarlyView(nn.Module):
    """Wraps one backbone stage after the early exit.

    ``role`` is ``"start"`` (the stage right after the exit: takes the exit's features, starts
    carrying their pooled copy), ``"carry"`` (passes the copy along) or ``"final"`` (the last
    stage: adds ``assist(copy)`` to its logits). A stage that is both first and last after the
    exit uses ``"start-final"``.
    """

    def __init__(self, stage: nn.Module, role: str, assist: nn.Linear | None = None):
        super().__init__()
        self.stage, self.role, self.assist = stage, role, assist

    def forward(self, x: torch.Tensor, view: torch.Tensor | None = None):
        if self.role.startswith("start"):
            view = _pool(x)
        out = self.stage(x)
        if self.role.endswith("final"):
            return out + self.assist(view)
        return out, view


def early_view_model(backbone: StagedModel, cut: str, num_classes: int,
                     input_shape: Sequence[int], head: str | nn.Module = "depthwise",
                     head_kwargs: dict | None = None) -> MultiExitModel:
    """A copy of ``backbone`` with one exit at ``cut`` and early-view assistance.

    The assistance weights start at zero, so before training the final exit equals the
    backbone's own output. Train it jointly (e.g. :class:`JointWeighted`).

    Args:
        backbone: a trained (or fresh) staged backbone; it is copied, not modified.
        cut: the cut of the early exit (a single-tensor cut).
        num_classes: classes of the task.
        input_shape: per-sample input shape.
        head: head type of the early exit (T-RECX uses ``"depthwise"``), or a head module.

    Raises:
        InputError: an unknown cut, a cut or later cut carrying several tensors.
    """
    i = backbone.cut_index(cut)
    shapes = backbone.payload_shapes(torch.zeros(1, *input_shape))
    for name in backbone.cut_names[i:]:
        if len(shapes[name]) != 1:
            raise InputError(f"cut {name!r} carries {len(shapes[name])} tensors; early-view "
                             "assistance needs single-tensor cuts from the exit on")
    feat_shape = shapes[cut][0]
    base = copy.deepcopy(backbone)
    assist = nn.Linear(feat_shape[0], num_classes)
    nn.init.zeros_(assist.weight)
    nn.init.zeros_(assist.bias)
    stages = list(base.stages[: i + 1])
    rest = list(base.stages[i + 1:])
    for j, stage in enumerate(rest):
        first, last = j == 0, j == len(rest) - 1
        role = ("start" if first else "carry") + ("-final" if last else "")
        role = {"start": "start", "carry": "carry", "start-final": "start-final",
                "carry-final": "final"}[role]
        stages.append(Stage(EarlyView(stage, role, assist if last else None), stage.name))
    staged = StagedModel(stages, base.cut_names)
    exit_head = (head if isinstance(head, nn.Module)
                 else create_head(head, feat_shape, num_classes, **(head_kwargs or {})))
    model = MultiExitModel(staged, {cut: exit_head}, input_shape=input_shape)
    described = getattr(backbone, "spec", None)
    if isinstance(described, dict) and described and hasattr(exit_head, "config"):
        # rebuilt as: the backbone as described, then this early exit with assistance
        model.spec = {**described, "trecx": {"cut": cut, "head": exit_head.config()}}
    return model
