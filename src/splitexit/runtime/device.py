"""The device half of a split exit program: what it decided, and what it hands to the server.

:func:`device_output` turns the shared loop's :class:`~splitexit.runtime.loop.ExitRun` (stopped
at the cut) into a :class:`DeviceOutput`: the samples a local exit decided, the payload of the
rest, their policy state (so the server's logits are judged by the same policy) and the
deepest local exit's decision logits as their fallback. Every device runtime (PyTorch's
:class:`~splitexit.serve.DevicePart`, the ONNX Runtime :class:`OrtDevice` of a bundle) returns
it, so the edge runtime works with either. No torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .arrays import is_torch, ops_of, to_numpy
from .loop import ExitRun

__all__ = ["DeviceOutput", "device_output", "OrtDevice"]


@dataclass
class DeviceOutput:
    """Result of the device pass over a batch of ``n`` samples.

    Attributes:
        decided: bool ``(n,)``: the sample left at a local exit.
        predictions: ``(n,)`` class of decided samples (-1 for undecided ones).
        exit_index: ``(n,)`` exit of decided samples (-1 for undecided ones).
        logits: ``(n, C)`` decision logits of decided samples (zeros elsewhere; ``None`` when
            no sample met an exit).
        undecided: indices of the samples to offload, in batch order.
        payload: what to send for them (the cut payload, encoded by the bottleneck encoder
            when there is one); ``None`` when every sample decided.
        state: the policy state rows of the undecided samples.
        fallback_logits: ``(len(undecided), C)`` decision logits of the deepest local exit for
            the undecided samples (``None`` without local exits).
        fallback_exit: index of that exit (-1 without local exits).
    """

    decided: object
    predictions: object
    exit_index: object
    logits: object
    undecided: object
    payload: object
    state: dict
    fallback_logits: object
    fallback_exit: int

    def as_numpy(self) -> DeviceOutput:
        """The same output with every array in numpy (what the edge runtime works on)."""
        def conv(a):
            return None if a is None else to_numpy(a)

        payload = self.payload
        if isinstance(payload, tuple):
            payload = tuple(to_numpy(t) for t in payload)
        elif payload is not None:
            payload = to_numpy(payload)
        return DeviceOutput(conv(self.decided), conv(self.predictions), conv(self.exit_index),
                            conv(self.logits), conv(self.undecided), payload,
                            {k: to_numpy(v) for k, v in (self.state or {}).items()},
                            conv(self.fallback_logits), self.fallback_exit)


def device_output(run: ExitRun, n: int, encoder=None) -> DeviceOutput:
    """The :class:`DeviceOutput` of a run stopped at the cut (``n`` samples)."""
    ops = ops_of(run.result.predictions)
    undecided = run.active
    decided = ops.full_bool(n, True)
    decided[undecided] = False
    result = run.result
    result.predictions[undecided] = -1
    result.exit_index[undecided] = -1
    logits = result.logits
    if logits is not None:
        logits = ops.float32(logits)
        logits[undecided] = 0
    payload = run.payload
    if payload is not None and encoder is not None:
        payload = encoder(payload)
    fallback = None if run.fallback is None else ops.float32(run.fallback)
    return DeviceOutput(decided, result.predictions, result.exit_index, logits, undecided,
                        payload, run.state or {}, fallback, run.fallback_exit)


class OrtDevice:
    """The device part of a bundle on ONNX Runtime: pieces up to the cut and the local exits.

    Args:
        program: the bundle's exit program (device pieces, then the server as one piece).
        end: number of device pieces.
        num_exits: exits of the whole program (the last is the server's final exit).
    """

    def __init__(self, program, end: int, num_exits: int,
                 exit_names: Sequence[str] | None = None):
        self.program = program
        self.end = int(end)
        self.num_exits = int(num_exits)
        self.input_shape = program.input_shape
        local = [e for e, k in enumerate(program.exit_stages[:-1]) if k < self.end]
        self.exit_ids = local
        self.exit_names = [program.exit_names[e] for e in local] if exit_names is None \
            else list(exit_names)

    @property
    def has_exits(self) -> bool:
        return len(self.exit_ids) > 0

    def run(self, x, policy) -> DeviceOutput:
        """Run the device pieces and local exits on a batch (numpy, or torch converted)."""
        if is_torch(x):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        run = self.program.run_until(x, policy, self.end)
        return device_output(run, x.shape[0])

    def eval(self) -> OrtDevice:  # the runtime protocol of modules; nothing to switch
        return self
