"""The exit program: any multi-exit model lowered to ordered pieces, exits, a cut and a policy.

Whatever built the model (the zoo, a user's module cut by name inside a block, ``keep_exits``,
T-RECX, a CBNet pipeline), :func:`lower` turns it into the same :class:`ExitProgram`:

- pieces, in order: the stages between two decision points (an exit or the cut) and the exit
  head at the end of the last one (:class:`~splitexit.multiexit.Piece`), each with the
  per-sample specs of its input and output payload, its MACs and parameters;
- the piece of every exit, the exit names, the cut (the last device piece) and the policy.

Every runtime runs this program through the same protocol and the same exit loop: PyTorch
(:meth:`ExitProgram.step`), ONNX Runtime (:class:`~splitexit.runtime.ort.OrtProgram`, from the
pieces exported by :func:`export_pieces`), the device and the server half of a bundle
(:mod:`splitexit.deploy`).

In a split program (``cut`` given) the pieces up to the cut carry the exits at or before it
(the device's local exits) and everything after the cut is one server piece ending at the
final exit: the server answers with the final logits, as the HTTP runtime does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .cost import count_macs
from .errors import InputError
from .multiexit import MultiExitModel, Piece, check_input, inference
from .payload import TensorSpec
from .policies import ExitPolicy, Gated, NeverExit
from .runtime.loop import ExitResult, all_exit_logits, check_policy, infer_exits
from .stages import Payload, StagedModel, payload_tensors

__all__ = ["PieceSpec", "ExitProgram", "lower", "as_multiexit", "INPUT_CUT",
           "policy_for_exits", "export_pieces"]

#: the cut that sends the raw input (full offload: no device stage)
INPUT_CUT = "input"

def _specs(payload: Payload) -> list[TensorSpec]:
    return [TensorSpec.of(t) for t in payload_tensors(payload)]


@dataclass
class PieceSpec:
    """One piece of a program.

    Attributes:
        start, end: first and last backbone stage it runs.
        exit: the exit whose head ends it (``None``: no head; the final exit is the output of
            the last piece, not a head).
        takes_previous: its head takes the previous exit's logits (cascading heads).
        inputs, outputs: its payload in and out (without the logits).
        part: ``"device"`` or ``"server"``.
        macs, params: per-sample MACs and parameter count (the head's included).
    """

    start: int
    end: int
    exit: int | None
    takes_previous: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    part: str = "device"
    macs: float = 0.0
    params: int = 0

    def to_json(self) -> dict:
        return {"stages": [self.start, self.end], "exit": self.exit,
                "takes_previous": self.takes_previous,
                "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "part": self.part,
                "macs": self.macs, "params": self.params}


@dataclass
class ExitProgram:
    """A multi-exit model as ordered pieces with their exits, cut and policy.

    Attributes:
        model: the multi-exit model the pieces come from (weights shared, not copied).
        pieces: the pieces, in order.
        exit_stages: the piece index of every exit (the last: the final exit).
        exit_names: exit names (cut names of the heads, then ``"final"``).
        exit_ids: each exit's index in ``model`` (local exits of a split skip the rest).
        cut: cut name of the split, :data:`INPUT_CUT` for full offload, ``None`` for none.
        device_pieces: pieces on the device (all of them without a server).
        policy: the exit policy.
        input_shape: per-sample input shape.
        num_classes: classes of the logits.
    """

    model: MultiExitModel
    pieces: list[PieceSpec]
    exit_stages: list[int]
    exit_names: list[str]
    exit_ids: list[int]
    cut: str | None
    device_pieces: int
    policy: ExitPolicy
    input_shape: tuple[int, ...]
    num_classes: int
    _modules: list[Piece] = field(default_factory=list, repr=False)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def has_server(self) -> bool:
        return self.device_pieces < len(self.pieces)

    @property
    def payload(self) -> list[TensorSpec]:
        """What crosses the cut (the server's input)."""
        if not self.has_server:
            raise InputError("this program has no server half (no cut)")
        return self.pieces[self.device_pieces].inputs

    def module(self, j: int) -> Piece:
        """Piece ``j`` as a module: payload tensors (and previous logits) in, payload tensors
        (and its exit's logits) out."""
        return self._modules[j]

    def step(self, k: int, e: int | None, payload: Payload, previous):
        """Piece ``k`` in PyTorch (the runtime protocol)."""
        piece = self._modules[k]
        args = payload_tensors(payload)
        outs = piece(*args, previous) if piece.takes_previous else piece(*args)
        if self.pieces[k].exit is not None:
            return (outs[0] if len(outs) == 2 else tuple(outs[:-1])), outs[-1]
        return (outs[0] if len(outs) == 1 else tuple(outs)), None

    @inference
    def infer(self, x: torch.Tensor, policy: ExitPolicy | None = None) -> ExitResult:
        """Early-exit inference in PyTorch through the pieces (same exits as ``model.infer``
        for a program without a cut; with one, the server answers after the cut)."""
        check_input(x, self.input_shape, self.model.input_dtype)
        return infer_exits(self.step, self.exit_stages, policy or self.policy,
                           len(self.pieces), x)

    @inference
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits (nobody leaves)."""
        check_input(x, self.input_shape, self.model.input_dtype)
        return all_exit_logits(self.step, self.exit_stages, len(self.pieces), x)

    def on_onnx_runtime(self, directory: str | Path, exit_graph: bool = False,
                        threads: int | None = 1, opset: int | None = None):
        """This program on ONNX Runtime: every piece exported to ``directory`` and run as an
        :class:`~splitexit.runtime.ort.OrtProgram`; with ``exit_graph``, also the batch-1
        exit graph of the program's policy (``exits.onnx``), which answers single samples."""
        from .export.exit_graph import export_exit_graph
        from .runtime.ort import OrtProgram, OrtSession

        directory = Path(directory)
        sessions = [OrtSession(f, threads) for f in export_pieces(self, directory, opset)]
        graph = None
        if exit_graph:
            graph = OrtSession(export_exit_graph(self, None, directory / "exits.onnx",
                                                 **({"opset": opset} if opset else {})),
                               threads)
        return OrtProgram(sessions, self.exit_stages, self.exit_names,
                          [p.takes_previous for p in self.pieces], self.input_shape, graph,
                          self.policy.config() if exit_graph else None)

    def to_json(self) -> dict:
        return {"pieces": [p.to_json() for p in self.pieces], "exit_stages": self.exit_stages,
                "exit_names": self.exit_names, "exit_ids": self.exit_ids, "cut": self.cut,
                "device_pieces": self.device_pieces, "policy": self.policy.config(),
                "input_shape": list(self.input_shape), "num_classes": self.num_classes}


def as_multiexit(model: nn.Module, input_shape: Sequence[int] | None = None) -> MultiExitModel:
    """Any deployable model as a :class:`MultiExitModel` (modules shared, not copied).

    A multi-exit model stays as it is; a CBNet pipeline becomes converter -> classifier with
    the final exit only; a :class:`StagedModel` or any other module becomes a model without
    heads (one exit: its output).
    """
    if isinstance(model, MultiExitModel):
        return model
    shape = input_shape or getattr(model, "input_shape", None)
    if hasattr(model, "converter") and hasattr(model, "classifier"):  # a CBNet pipeline
        staged = StagedModel([model.converter, model.classifier], ["converted"])
        return MultiExitModel(staged, {}, shape).train(model.training)
    if isinstance(model, StagedModel):
        return MultiExitModel(model, {}, shape).train(model.training)
    return MultiExitModel(StagedModel([model], []), {}, shape).train(model.training)


class GateHead(nn.Module):
    """An exit gate as the head of a piece without stages: one logit per sample, as ``(N, 1)``
    (the gate's exit never answers; :class:`~splitexit.policies.Gated` reads it)."""

    def __init__(self, gate: nn.Module):
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x).reshape(-1, 1)


def policy_for_exits(policy: ExitPolicy, exits: Sequence[int]) -> ExitPolicy:
    """``policy`` for a program that keeps the model's exits ``exits`` (the final one last):
    per-exit thresholds and temperatures follow their exits, so exit ``i`` of the program is
    judged as the model's exit ``exits[i]`` was.

    Raises:
        InputError: a policy that does not fit the model (``exits[-1] + 1`` exits).
    """
    check_policy(policy, int(exits[-1]) + 1)
    changes = {}
    for name in ("threshold", "temperature"):
        value = getattr(policy, name, None)
        if isinstance(value, tuple):
            changes[name] = tuple(value[min(e, len(value) - 1)] for e in exits) or value[-1:]
    return replace(policy, **changes) if changes else policy


def _boundaries(model: MultiExitModel, heads: list[int], cut_stage: int | None) -> list[int]:
    ends = {model.exit_stages[e] for e in heads} | {model.backbone.num_stages - 1}
    if cut_stage is not None and cut_stage >= 0:
        ends.add(cut_stage)
    return sorted(ends)


def lower(model: nn.Module, policy: ExitPolicy | None = None, cut: str | int | None = None,
          example: torch.Tensor | None = None) -> ExitProgram:
    """Lower ``model`` to an :class:`ExitProgram`.

    Args:
        model: a :class:`MultiExitModel` (any backbone, heads at any cuts, ``keep_exits``
            subsets, T-RECX), a CBNet pipeline, or a plain module / :class:`StagedModel`.
        policy: the exit policy (``NeverExit`` when ``None``).
        cut: ``None`` (everything on one side), a cut name or index of the backbone (device
            pieces up to it, its local exits, one server piece after it) or
            :data:`INPUT_CUT` (the device sends the raw input).
        example: an input batch; zeros of the model's input shape when ``None``.

    Raises:
        InputError: no input shape, an unknown cut, a cut that leaves no server stage, or a
            piece that fails on the example.
    """
    model = as_multiexit(model, None if example is None else tuple(example.shape[1:]))
    if example is None:
        if model.input_shape is None:
            raise InputError("the model has no input_shape; pass example=an input batch")
        example = torch.zeros(2, *model.input_shape)
    check_input(example, model.input_shape, model.input_dtype)
    input_shape = tuple(int(d) for d in example.shape[1:])
    policy = policy or NeverExit()
    gate = getattr(model, "gate", None)
    if gate is not None and not isinstance(policy, Gated):
        check_policy(policy, model.num_exits)
        policy = Gated(policy, float(model.gate_threshold))
    check_policy(policy, model.num_exits + (gate is not None))
    backbone = model.backbone
    last_stage = backbone.num_stages - 1
    if cut is None:
        cut_name, cut_stage = None, None
    elif cut == INPUT_CUT:
        cut_name, cut_stage = INPUT_CUT, -1
    else:
        cut_stage = backbone.cut_index(cut)
        cut_name = backbone.cut_names[cut_stage]
    heads = list(range(len(model.heads)))
    if cut_stage is not None:
        heads = [e for e in heads if model.exit_stages[e] <= cut_stage]
    ends = _boundaries(model, heads, cut_stage)
    if cut_stage is not None:  # everything after the cut is one server piece
        ends = [k for k in ends if k <= cut_stage] + [last_stage]
    head_at = {model.exit_stages[e]: e for e in heads}
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    pieces: list[PieceSpec] = []
    modules: list[Piece] = []
    exit_stages: list[int] = []
    try:
        with torch.no_grad():
            payload: Payload = example[:2]
            previous = None
            start = 0
            if gate is not None:  # exit 0: the gate on the raw input (it never answers)
                module = Piece([], GateHead(gate), 1)
                inputs = _specs(payload)
                macs = count_macs(lambda m=module, a=payload: m(a)) / len(payload)
                pieces.append(PieceSpec(0, -1, 0, False, inputs, inputs, "device",
                                        float(macs), sum(p.numel() for p in gate.parameters())))
                modules.append(module)
                exit_stages.append(0)
            for end in ends:
                e = head_at.get(end)
                module = Piece.of(model, start, end, e, previous is not None)
                args = payload_tensors(payload)
                inputs = _specs(payload)
                try:
                    outs = module(*args, previous) if module.takes_previous else module(*args)
                except InputError:
                    raise
                except Exception as exc:
                    raise InputError(f"stages {start}..{end} fail on the example "
                                     f"({type(exc).__name__}: {exc})") from exc
                if e is not None:
                    payload = outs[0] if len(outs) == 2 else tuple(outs[:-1])
                    previous = outs[-1]
                    exit_stages.append(len(pieces))
                else:
                    payload = outs[0] if len(outs) == 1 else tuple(outs)
                part = "device" if cut_stage is None or end <= cut_stage else "server"
                macs = count_macs(lambda m=module, a=args, p=previous: (
                    m(*a, p) if m.takes_previous else m(*a))) / len(args[0])
                params = sum(p.numel() for p in module.parameters())
                program_exit = None if e is None else e + (gate is not None)
                pieces.append(PieceSpec(start, end, program_exit, module.takes_previous, inputs,
                                        _specs(payload), part, float(macs), int(params)))
                modules.append(module)
                start = end + 1
    finally:
        for m, mode in was_training:
            m.training = mode
    final = payload_tensors(payload)[0]
    if final.dim() != 2 and not getattr(model, "dense", False):
        raise InputError(f"the model's output has shape {tuple(final.shape)}; an exit program "
                         "ends in logits (N, classes)")
    exit_stages.append(len(pieces) - 1)
    device_pieces = len(pieces) if cut_stage is None else sum(
        1 for p in pieces if p.part == "device")
    if cut_stage is not None and device_pieces == len(pieces):
        raise InputError(f"cut {cut!r} leaves no stage for the server; valid cuts: "
                         f"{backbone.cut_names}")
    names = [model.head_cuts[e] for e in heads] + ["final"]
    ids = heads + [model.num_exits - 1]
    if len(heads) < len(model.heads):  # a split keeps the local exits and the final
        policy = (replace(policy, inner=policy_for_exits(policy.inner, ids))
                  if isinstance(policy, Gated) else policy_for_exits(policy, ids))
    if gate is not None:
        names, ids = ["gate", *names], [-1, *ids]
    return ExitProgram(model, pieces, exit_stages, names, ids,
                       cut_name, device_pieces, policy, input_shape, int(final.shape[1]),
                       modules)


def export_pieces(program: ExitProgram, directory: str | Path, opset: int | None = None,
                  dynamic_batch: bool = True) -> list[Path]:
    """Export every piece of ``program`` as its own ONNX graph (``piece{j}.onnx``).

    Inputs are ``in0, in1, ...`` (the payload tensors, then ``previous`` for a cascading
    head), outputs ``out0, ...`` (the payload) and ``logits`` for a piece with an exit.
    """
    from .export.onnx import DEFAULT_OPSET, export_piece

    directory = Path(directory)
    files = []
    example = torch.zeros(2 if dynamic_batch else 1, *program.input_shape)
    with torch.no_grad():
        payload: Payload = example
        previous = None
        for j, spec in enumerate(program.pieces):
            module = program.module(j)
            args = payload_tensors(payload)
            if module.takes_previous:
                args = (*args, previous)
            in_names = [f"in{i}" for i in range(len(spec.inputs))] + (
                ["previous"] if module.takes_previous else [])
            out_names = [f"out{i}" for i in range(len(spec.outputs))] + (
                ["logits"] if spec.exit is not None else [])
            if spec.exit is None and j == len(program.pieces) - 1:
                out_names = ["logits"]
            path = export_piece(module, tuple(args), directory / f"piece{j}.onnx",
                                dynamic_batch=dynamic_batch, input_names=in_names,
                                output_names=out_names, opset=opset or DEFAULT_OPSET,
                                as_payload=False)
            files.append(path)
            payload, logits = program.step(j, spec.exit, payload, previous)
            if logits is not None:
                previous = logits
    return files
