"""Early-exit inference on ONNX Runtime: every stage and exit head is its own graph.

:class:`OrtExitPipeline` runs the same logic as :meth:`MultiExitModel.infer`: stage by stage,
each exit's policy (the very same :mod:`splitexit.policies` objects, on torch views of the
ONNX Runtime outputs) decides per sample, and exited samples leave the batch together with
their policy state. Split computing cuts the same loop in two: :meth:`OrtExitPipeline.run_device`
runs the stages up to a cut (and their exits) and returns a :class:`DeviceOutcome` holding the
samples still active; :meth:`OrtExitPipeline.run_server` finishes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptFileError, InputError
from ..multiexit import (
    ExitResult,
    ExitRun,
    FirstCascadeHead,
    MultiExitModel,
    Piece,
    advance_exits,
    all_exit_logits,
    check_input,
    infer_exits,
)
from ..policies import ExitPolicy
from ..stages import Payload, payload_tensors
from .onnx import DEFAULT_OPSET, OrtPiece, export_piece

__all__ = ["OrtExitPipeline", "DeviceOutcome", "export_multiexit", "parity", "MANIFEST"]

MANIFEST = "pipeline.json"
_FORMAT = 1


def _single(payload: Payload, what: str) -> torch.Tensor:
    tensors = payload_tensors(payload)
    if len(tensors) != 1:
        raise InputError(f"{what} carries {len(tensors)} tensors; exit heads attach at "
                         "single-tensor cuts (after a whole block)")
    return tensors[0]


def export_multiexit(model: MultiExitModel, directory: str | Path,
                     example: torch.Tensor | None = None, opset: int = DEFAULT_OPSET,
                     full_model: bool = True, fused: bool = True) -> Path:
    """Export every stage and exit head of ``model`` as its own ONNX graph plus a manifest.

    Args:
        model: the multi-exit model (exported in eval mode; its modes are left unchanged).
        directory: where ``stage{k}.onnx``, ``head{e}.onnx`` and ``pipeline.json`` go.
        example: an input batch; zeros of ``model.input_shape`` when ``None``.
        opset: ONNX opset version.
        full_model: also export the whole backbone as one graph (``full.onnx``), the
            no-exit baseline.
        fused: also export each stage that ends at an exit together with its head as one
            graph (``stage{k}+head{e}.onnx``), so the pipeline makes one call per exit.

    Returns:
        The manifest path, which :class:`OrtExitPipeline` loads.

    Raises:
        InputError: no example and no ``input_shape``, or a piece that cannot be exported.
    """
    if example is None:
        if model.input_shape is None:
            raise InputError("the model has no input_shape; pass example=a batch of inputs")
        example = torch.zeros(2, *model.input_shape)
    check_input(example, model.input_shape)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    stages, heads = [], []
    try:
        with torch.no_grad():
            payload: Payload = example
            previous = None
            e = 0
            for k, stage in enumerate(model.backbone.stages):
                path = export_piece(stage, payload, directory / f"stage{k}.onnx", opset=opset)
                stages.append({"file": path.name, "name": model.backbone.stages[k].name})
                stage_input = payload
                payload = stage(payload)
                while e < len(model.heads) and model.exit_stages[e] == k:
                    head = model.heads[e]
                    features = _single(payload, f"the cut {model.head_cuts[e]!r}")
                    uses_previous = bool(getattr(head, "uses_previous", False))
                    if uses_previous and previous is None:
                        piece, args = FirstCascadeHead(head), features
                    elif uses_previous:
                        piece, args = head, (features, previous)
                    else:
                        piece, args = head, features
                    path = export_piece(piece, args, directory / f"head{e}.onnx", opset=opset,
                                        as_payload=False)
                    heads.append({"file": path.name, "cut": model.head_cuts[e],
                                  "uses_previous": uses_previous and previous is not None})
                    if fused:
                        stage_in = payload_tensors(stage_input)
                        takes_previous = uses_previous and previous is not None
                        both = Piece(stage, piece, len(stage_in), takes_previous)
                        path = export_piece(both, (*stage_in, previous) if takes_previous
                                            else stage_in, directory / f"stage{k}+head{e}.onnx",
                                            opset=opset, as_payload=False)
                        stages[k]["fused"] = path.name
                    previous = model.run_head(e, payload, previous)
                    e += 1
            if full_model:
                export_piece(model.backbone, example, directory / "full.onnx", opset=opset)
    finally:
        for m, mode in was_training:
            m.training = mode
    manifest = {"format": _FORMAT, "stages": stages, "heads": heads,
                "exit_stages": list(model.exit_stages), "cut_names": model.backbone.cut_names,
                "input_shape": list(model.input_shape) if model.input_shape else None,
                "full_model": "full.onnx" if full_model else None, "opset": opset}
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


#: What the device half of a split early-exit run hands to the server half (the samples still
#: active, their payload at the cut and their policy state): the shared :class:`ExitRun`.
DeviceOutcome = ExitRun


class OrtExitPipeline:
    """Early-exit (and split) inference over exported ONNX graphs with ONNX Runtime.

    Args:
        directory: a directory written by :func:`export_multiexit` (or its manifest path).
        threads: intra-op threads of every session (1 for reproducible timing).
        fused: run a stage and its exit head as one graph where the export has one (one
            ONNX Runtime call per exit); ``False`` runs every stage and head on its own.

    Example:
        >>> export_multiexit(model, "onnx/")
        >>> pipe = OrtExitPipeline("onnx/", threads=1)
        >>> result = pipe.infer(x, MaxProb(0.9))      # same as model.infer(x, MaxProb(0.9))
        >>> outcome = pipe.run_device(x, policy, "block1")   # device half ...
        >>> result = pipe.run_server(outcome, policy)         # ... server half
    """

    def __init__(self, directory: str | Path, threads: int | None = 1, fused: bool = True):
        path = Path(directory)
        manifest_path = path / MANIFEST if path.is_dir() else path
        if not manifest_path.is_file():
            raise InputError(f"no {MANIFEST} at {path}; write one with "
                             "splitexit.export.export_multiexit(model, directory)")
        try:
            manifest = json.loads(manifest_path.read_text())
            self.directory = manifest_path.parent
            if manifest.get("format") != _FORMAT:
                raise CorruptFileError(f"{manifest_path} has format {manifest.get('format')}, "
                                       f"this version reads {_FORMAT}; re-export the model")
            self.cut_names: list[str] = list(manifest["cut_names"])
            self.exit_stages: list[int] = [int(k) for k in manifest["exit_stages"]]
            self.head_cuts = [h["cut"] for h in manifest["heads"]]
            self._uses_previous = [bool(h["uses_previous"]) for h in manifest["heads"]]
            shape = manifest["input_shape"]
            self.input_shape = tuple(shape) if shape else None
            self.stages = [OrtPiece(self.directory / s["file"], threads)
                           for s in manifest["stages"]]
            self.heads = [OrtPiece(self.directory / h["file"], threads)
                          for h in manifest["heads"]]
            self.fused = [OrtPiece(self.directory / s["fused"], threads)
                          if fused and s.get("fused") else None for s in manifest["stages"]]
            full = manifest.get("full_model")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{manifest_path} is not a valid pipeline manifest ({exc}); "
                                   "re-export the model") from exc
        if len(self.exit_stages) != len(self.heads) + 1 or len(self.cut_names) != len(
                self.stages) - 1:
            raise CorruptFileError(f"{manifest_path}: stage, cut and exit counts disagree; "
                                   "re-export the model")
        self.full = OrtPiece(self.directory / full, threads) if full else None

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    @property
    def exit_names(self) -> list[str]:
        return [*self.head_cuts, "final"]

    def _input(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        check_input(x, self.input_shape)
        return x.float()

    def _split_stage(self, cut: str | int) -> int:
        if isinstance(cut, int):
            if not 0 <= cut < len(self.cut_names):
                raise InputError(f"cut index {cut} out of range 0..{len(self.cut_names) - 1}")
            return cut
        if cut not in self.cut_names:
            raise InputError(f"unknown cut {cut!r}; valid cuts: {', '.join(self.cut_names)}")
        return self.cut_names.index(cut)

    def forward(self, x) -> list[torch.Tensor]:
        """Every exit's logits for the whole batch (no exiting), like ``MultiExitModel.forward``."""
        return all_exit_logits(self.step, self.exit_stages, len(self.stages), self._input(x))

    def run_full(self, x) -> torch.Tensor:
        """Final logits of the whole backbone exported as one graph (the no-exit baseline)."""
        if self.full is None:
            raise InputError("this export has no full-model graph; export with full_model=True")
        return _single(self.full(self._input(x)), "the full model's output")

    def _head(self, e: int, payload: Payload, previous: torch.Tensor | None) -> torch.Tensor:
        features = _single(payload, f"the cut {self.head_cuts[e]!r}")
        args = (features, previous) if self._uses_previous[e] else features
        return self.heads[e](args)

    def infer(self, x, policy: ExitPolicy, cut: str | int | None = None) -> ExitResult:
        """Early-exit inference: exited samples leave the batch; same result as PyTorch's.

        Args:
            x: input batch (torch or numpy).
            policy: the exit policy.
            cut: when given, run as a device half up to this cut and a server half after it
                (the result is the same; the split only moves where stages run).

        Raises:
            InputError: wrong type, dtype, shape, non-finite input, or an unknown cut.
        """
        if cut is None:
            return infer_exits(self.step, self.exit_stages, policy, len(self.stages),
                               self._input(x))
        return self.run_server(self.run_device(x, policy, cut), policy)

    def run_device(self, x, policy: ExitPolicy, cut: str | int) -> DeviceOutcome:
        """Device half: stages up to and including ``cut`` and the exits among them."""
        end = self._split_stage(cut) + 1
        return self._run(self._start(x, policy), policy, end)

    def run_server(self, outcome: DeviceOutcome, policy: ExitPolicy) -> ExitResult:
        """Server half: finish the samples a :meth:`run_device` outcome left active."""
        return self._finish(outcome, policy, len(self.stages))

    def _start(self, x, policy: ExitPolicy) -> ExitRun:
        return ExitRun.start(self._input(x))

    def _finish(self, outcome: ExitRun, policy: ExitPolicy, end: int) -> ExitResult:
        if not outcome.done:
            outcome = self._run(outcome, policy, end)
        if not outcome.done:
            raise InputError("the outcome ends before the final exit; pass it to run_server")
        return outcome.result

    def step(self, k: int, e: int | None, payload: Payload, previous: torch.Tensor | None
             ) -> tuple[Payload, torch.Tensor | None]:
        """Run stage ``k`` and, when ``e`` is given, exit head ``e`` (one fused call if exported)."""
        if e is not None and self.fused[k] is not None:
            args = payload_tensors(payload)
            outs = self.fused[k]((*args, previous) if self._uses_previous[e] else args)
            out_payload = outs[0] if len(outs) == 2 else tuple(outs[:-1])
            return out_payload, outs[-1]
        payload = self.stages[k](payload)
        return payload, (None if e is None else self._head(e, payload, previous))

    def _run(self, outcome: ExitRun, policy: ExitPolicy, end: int) -> ExitRun:
        return advance_exits(outcome, self.step, self.exit_stages, policy, end)


def parity(model: MultiExitModel, pipeline: OrtExitPipeline, x: torch.Tensor,
           policy: ExitPolicy) -> dict:
    """Compare PyTorch and ONNX Runtime early-exit inference on ``x``.

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
    got = pipeline.infer(x, policy)
    got_logits = pipeline.forward(x)
    diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits, got_logits, strict=True))
    return {"same_predictions": float((ref.predictions == got.predictions).double().mean()),
            "same_exits": float((ref.exit_index == got.exit_index).double().mean()),
            "max_abs_logit_diff": diff}

