"""The device side of a split multi-exit model: stages up to the cut plus the local exits.

:class:`DevicePart` runs the device half of a :class:`~splitexit.multiexit.MultiExitModel`
with the exit heads that sit before (or at) the cut, lets the policy decide per sample, and
hands back the undecided samples' payload (optionally through a bottleneck encoder) together
with the policy state, so the server's logits can be judged by the same policy as the local
exits. The deepest local exit's decision logits are kept for every undecided sample: they are
the fallback answer when the server or the link fails.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from splitexit.errors import InputError
from splitexit.multiexit import ExitRun, MultiExitModel, advance_exits, check_input
from splitexit.policies import ExitPolicy
from splitexit.runtime.device import DeviceOutput, device_output
from splitexit.stages import Payload, payload_tensors

__all__ = ["DevicePart", "DeviceOutput"]


class DevicePart(nn.Module):
    """Device half of a multi-exit model, with its local exits.

    Args:
        model: the multi-exit model (its weights are shared, not copied).
        cut: cut name (or index) where the model is split; ``None`` sends the raw input (full
            offload, no local stage, no fallback).
        encoder: optional module applied to the cut payload before it is sent (a bottleneck
            encoder; the server half must then start with the matching decoder).

    Example:
        >>> device = DevicePart(model, "block1")
        >>> out = device.run(x, MaxProb(0.9))
        >>> out.undecided  # rows to offload; out.payload is what to send
    """

    def __init__(self, model: MultiExitModel, cut: str | int | None,
                 encoder: nn.Module | None = None):
        super().__init__()
        if not isinstance(model, MultiExitModel):
            raise InputError(f"DevicePart needs a MultiExitModel, got {type(model).__name__}; "
                             "wrap a plain backbone with MultiExitModel(backbone, {})")
        backbone = model.backbone
        if cut is None:
            last_stage = -1
        else:
            last_stage = backbone.cut_index(cut)
            if last_stage >= backbone.num_stages - 1:
                raise InputError(f"cut {cut!r} leaves no stage for the server; valid cuts: "
                                 f"{backbone.cut_names}")
        self.cut = None if cut is None else backbone.cut_names[last_stage]
        self.stages = nn.ModuleList(list(backbone.stages[: last_stage + 1]))
        local = [e for e in range(model.num_exits - 1) if model.exit_stages[e] <= last_stage]
        self.heads = nn.ModuleList([model.heads[e] for e in local])
        self.exit_stages = [model.exit_stages[e] for e in local]
        self.exit_ids = local
        self.exit_names = [model.head_cuts[e] for e in local]
        self._model_exit_stages = list(model.exit_stages)
        self.num_exits = model.num_exits
        self.input_shape = model.input_shape
        self.encoder = encoder

    @property
    def has_exits(self) -> bool:
        """Whether any exit head runs on the device (and can serve as fallback)."""
        return len(self.heads) > 0

    def _head(self, i: int, payload: Payload, previous: torch.Tensor | None) -> torch.Tensor:
        features = payload_tensors(payload)
        if len(features) != 1:
            raise InputError(f"the cut {self.exit_names[i]!r} carries {len(features)} tensors; "
                             "attach exit heads at single-tensor cuts")
        head = self.heads[i]
        if getattr(head, "uses_previous", False):
            return head(features[0], previous)
        return head(features[0])

    def step(self, k: int, e: int | None, payload: Payload, previous: torch.Tensor | None
             ) -> tuple[Payload, torch.Tensor | None]:
        """Stage ``k`` of the device half and, when ``e`` is given, local exit ``e``."""
        payload = self.stages[k](payload)
        return payload, (None if e is None else self._head(e, payload, previous))

    @torch.inference_mode()
    def run(self, x: torch.Tensor | np.ndarray, policy: ExitPolicy) -> DeviceOutput:
        """Run the device stages and local exits on a batch (a tensor, or a numpy array).

        Raises:
            InputError: wrong type, dtype, shape, or non-finite input.
        """
        check_input(x, self.input_shape)
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        run = advance_exits(ExitRun.start(x), self.step, self._model_exit_stages, policy,
                            len(self.stages))
        return device_output(run, len(x), self.encoder)
