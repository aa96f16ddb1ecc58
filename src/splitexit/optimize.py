"""Inference-time optimisation: BatchNorm folding and TorchScript segments.

:func:`fuse_for_inference` folds BatchNorm into the preceding convolution.
:func:`trace_for_inference` compiles a model to frozen TorchScript: a plain model becomes one
graph; a :class:`~splitexit.multiexit.MultiExitModel` becomes one graph per stage (with the
exit head at its end fused in), run by the same exit loop as ``infer``, so a sample that
exits early still skips the later graphs. At batch 1 this removes most of PyTorch's per-op
Python overhead, which on small networks costs as much as the arithmetic.

Benchmarks apply the same optimisation to the baseline and to the multi-exit model, so ratios
compare like with like. Outputs change only by float rounding (~1e-7); the optimised copies
are for inference (eval mode), the original is left untouched.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from .errors import InputError
from .multiexit import (
    ExitResult,
    MultiExitModel,
    Piece,
    all_exit_logits,
    check_input,
    infer_exits,
    inference,
)
from .policies import ExitPolicy, _per_exit, is_plain_threshold
from .stages import Payload, Stage, StagedModel, payload_tensors

__all__ = ["fuse_for_inference", "trace_for_inference", "script_module", "TracedMultiExit"]


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


def script_module(module: nn.Module, args: tuple) -> torch.jit.ScriptModule:
    """Trace ``module`` on ``args`` (its positional arguments) and freeze it (weights become
    constants): one graph that runs without Python between operations.

    Raises:
        InputError: the module cannot be traced (data-dependent control flow, unsupported ops).
    """
    return _freeze(_trace(module, args))


def _freeze(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(module.eval())


def _trace(module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """Trace ``module`` on ``args`` (not frozen: traced modules nest in scripted ones)."""
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream (in favour of torch.compile / torch.export, neither of
        # which cuts per-op overhead on CPU at batch 1 without a compiler tool chain); it still
        # works, and the ONNX Runtime path (splitexit.export) is the long-term alternative
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.trace(module.eval(), args, check_trace=False)
        except Exception as exc:  # data-dependent control flow, unsupported ops
            raise InputError(f"cannot trace {type(module).__name__} to TorchScript ({exc}); "
                             "run it eagerly instead") from exc


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        check_input(example, getattr(model, "input_shape", None))
        return example
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise InputError("the model has no input_shape; pass example=a batch of inputs")
    return torch.zeros(2, *shape)


# Two adapters, not one with a flag: TorchScript type-checks every branch, and ``out[1]`` does
# not compile for a stage piece, whose output is a 1-tuple.
class _HeadPiece(nn.Module):
    def __init__(self, piece: nn.Module):
        super().__init__()
        self.piece = piece

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.piece(x)
        return out[0], out[1]


class _StagePiece(nn.Module):
    def __init__(self, piece: nn.Module):
        super().__init__()
        self.piece = piece

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.piece(x)
        return out[0], out[0]


class _BatchOneExits(nn.Module):
    """The traced pieces and the threshold test in one TorchScript program: batch 1, one call.

    The statistic is computed exactly as :mod:`splitexit.policies` does (same ops, same order),
    so the exits equal the eager ones.
    """

    def __init__(self, pieces: list[nn.Module], has_head: list[bool]):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.has_head: list[bool] = has_head

    def fires(self, logits: torch.Tensor, threshold: float, temperature: float,
              kind: int) -> bool:
        z = logits if temperature == 1.0 else logits / temperature
        z = z.float()
        if kind == 0:
            return bool(torch.softmax(z, 1).amax(1) >= threshold)
        if kind == 1:
            logp = torch.log_softmax(z, 1)
            return bool(-(logp.exp() * logp).sum(1) <= threshold)
        top2 = torch.softmax(z, 1).topk(2, 1)[0]
        return bool(top2[:, 0] - top2[:, 1] >= threshold)

    def forward(self, x: torch.Tensor, thresholds: list[float], temperatures: list[float],
                kind: int) -> tuple[torch.Tensor, int]:
        payload, logits = x, x
        e, k = 0, 0
        for piece in self.pieces:
            payload, logits = piece(payload)
            if self.has_head[k]:
                if self.fires(logits, thresholds[e], temperatures[e], kind):
                    return logits, e
                e += 1
            k += 1
        return logits, e


_KINDS = {"maxprob": 0, "entropy": 1, "margin": 2}


class TracedMultiExit:
    """A :class:`MultiExitModel` compiled to one frozen TorchScript graph per stage.

    Each stage that ends at an exit is traced together with its head, so one call per exit.
    :meth:`infer` runs the shared exit loop (:func:`~splitexit.multiexit.advance_exits`):
    same predictions and exits as ``model.infer``, with outputs equal up to float rounding.
    Build it with :func:`trace_for_inference`.
    """

    def __init__(self, model: MultiExitModel, example: torch.Tensor):
        self.exit_stages = list(model.exit_stages)
        self.num_exits = model.num_exits
        self.exit_names = model.exit_names
        self.input_shape = model.input_shape
        self.pieces: list[torch.jit.ScriptModule] = []
        traced_pieces: list[torch.jit.ScriptModule] = []
        self.has_head: list[bool] = []
        self.takes_previous: list[bool] = []
        payload: Payload = example
        previous: torch.Tensor | None = None
        e = 0
        with torch.no_grad():
            for k in range(model.backbone.num_stages):
                at_head = e < len(model.heads) and self.exit_stages[e] == k
                piece = Piece.of(model, k, k, e if at_head else None, previous is not None)
                args = payload_tensors(payload)
                if piece.takes_previous:
                    args = (*args, previous)
                traced = _trace(piece, tuple(args))
                traced_pieces.append(traced)
                self.pieces.append(_freeze(traced))
                self.has_head.append(at_head)
                self.takes_previous.append(piece.takes_previous)
                payload, logits = model.step(k, e if at_head else None, payload, previous)
                if at_head:
                    previous = logits
                    e += 1
        # the unfrozen traces only compose that program; the frozen pieces serve the rest
        self._batch_one = self._compose_batch_one(traced_pieces)

    def _compose_batch_one(self, traced_pieces: list[torch.jit.ScriptModule]
                           ) -> torch.jit.ScriptModule | None:
        """One TorchScript program for batch-1 early exits, when every payload is one tensor
        and no head takes the previous logits (else batch 1 uses the exit loop)."""
        if any(self.takes_previous):
            return None
        wrapped = []
        for k, traced in enumerate(traced_pieces):
            out = next(traced.graph.outputs()).type()
            sizes = len(out.elements()) if isinstance(out, torch._C.TupleType) else 0
            if sizes != (2 if self.has_head[k] else 1):
                return None  # a tuple payload
            wrapped.append(_HeadPiece(traced) if self.has_head[k] else _StagePiece(traced))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _freeze(torch.jit.script(_BatchOneExits(wrapped, list(self.has_head))))
        except Exception:  # noqa: BLE001 - the exit loop serves batch 1 as well
            return None

    def step(self, k: int, e: int | None, payload: Payload, previous: torch.Tensor | None
             ) -> tuple[Payload, torch.Tensor | None]:
        """Stage ``k`` (and its exit head, computed whenever the stage has one)."""
        args = payload_tensors(payload)
        outs = self.pieces[k](*args, previous) if self.takes_previous[k] else self.pieces[k](*args)
        if self.has_head[k]:
            return (outs[0] if len(outs) == 2 else tuple(outs[:-1])), outs[-1]
        return (outs[0] if len(outs) == 1 else tuple(outs)), None

    @inference
    def infer(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Early-exit inference, as :meth:`MultiExitModel.infer`.

        A single sample under a max-prob, entropy or margin policy runs as one TorchScript
        call (stages, heads and threshold tests in one program); anything else runs the
        shared exit loop. Both give the eager model's exits.
        """
        check_input(x, self.input_shape)
        if x.shape[0] == 1 and self._batch_one is not None and is_plain_threshold(policy):
            heads = self.num_exits - 1
            logits, e = self._batch_one(
                x, [_per_exit(policy.threshold, i) for i in range(heads)],
                [_per_exit(policy.temperature, i) for i in range(heads)], _KINDS[policy.name])
            return ExitResult(logits.argmax(1), torch.tensor([e]), logits)
        return infer_exits(self.step, self.exit_stages, policy, len(self.pieces), x)

    @inference
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for the whole batch, as ``MultiExitModel.forward``."""
        check_input(x, self.input_shape)
        return all_exit_logits(self.step, self.exit_stages, len(self.pieces), x)


def trace_for_inference(model: nn.Module, example: torch.Tensor | None = None, fuse: bool = True
                        ) -> TracedMultiExit | torch.jit.ScriptModule:
    """Compile ``model`` to frozen TorchScript for fast (batch-1) inference.

    Args:
        model: a :class:`MultiExitModel` (one graph per stage, early exits kept) or any
            traceable module, e.g. a :class:`StagedModel` baseline (one graph).
        example: an input batch to trace with; zeros of ``model.input_shape`` when ``None``.
            Any batch size works afterwards.
        fuse: fold BatchNorm first (:func:`fuse_for_inference`).

    Returns:
        A :class:`TracedMultiExit` (``infer(x, policy)``, ``__call__`` -> every exit's
        logits) for a multi-exit model, else a ``torch.jit.ScriptModule``.

    Raises:
        InputError: no example and no ``input_shape``, or a piece that cannot be traced.
    """
    example = _example(model, example)
    model = fuse_for_inference(model) if fuse else copy.deepcopy(model).eval()
    if isinstance(model, MultiExitModel):
        return TracedMultiExit(model, example)
    inputs = payload_tensors(example) if isinstance(model, StagedModel) else (example,)
    return script_module(model, tuple(inputs))
