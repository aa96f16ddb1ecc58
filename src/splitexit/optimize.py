"""Inference-time optimisation: BatchNorm folding and TorchScript segments.

:func:`fuse_for_inference` folds BatchNorm into the preceding convolution.
:func:`trace_for_inference` compiles a model to frozen TorchScript: a plain model becomes one
graph; a :class:`~splitexit.multiexit.MultiExitModel` becomes one graph per piece of its exit
program (the stages up to an exit, with its head), run by the same exit loop as ``infer``, so
a sample that exits early still skips the later graphs; at batch 1 the pieces and the policy's
threshold test (its statistic traced from its one definition) run as one scripted program. At batch 1 this removes most of PyTorch's per-op
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
    all_exit_logits,
    check_input,
    infer_exits,
    inference,
)
from .policies import (
    Entropy,
    ExitPolicy,
    Margin,
    MaxProb,
    ThresholdPolicy,
    _per_exit,
    is_plain_threshold,
)
from .runtime.loop import check_policy
from .stages import Payload, Stage, StagedModel, payload_tensors

__all__ = ["fuse_for_inference", "trace_for_inference", "script_module", "TracedMultiExit",
           "OptimizationWarning"]


class OptimizationWarning(UserWarning):
    """An inference optimisation could not be applied; the model runs unoptimised there."""


def _fuse_module(module: nn.Module) -> nn.Module:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    try:
        return fuse(module)
    except Exception as exc:  # untraceable (data-dependent control flow): keep it as it is
        warnings.warn(f"BatchNorm not folded in {type(module).__name__}: torch.fx cannot trace "
                      f"it ({type(exc).__name__}: {str(exc)[:200]}); it runs unfused, with "
                      "the same outputs but slower", OptimizationWarning, stacklevel=3)
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


class _Statistic(nn.Module):
    """``policy.statistic``: the policy's own definition (:mod:`splitexit.policies`), traced
    to the tensor operations it records; not a copy."""

    def __init__(self, policy: ThresholdPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.policy.statistic(logits)


#: the policies with a compiled batch-1 form (:func:`~splitexit.policies.is_plain_threshold`)
_PLAIN = (MaxProb, Entropy, Margin)


class _BatchOneExits(nn.Module):
    """The traced pieces and the threshold test in one TorchScript program: batch 1, one call.

    ``exits`` are the pieces that end at an exit (payload in, ``(payload, logits)`` out),
    ``final`` the last one; ``statistics[kind]`` is the traced statistic of ``_PLAIN[kind]``,
    compared as the policy does (``higher[kind]``: at least, else at most the threshold), so
    the exits equal the eager ones.
    """

    def __init__(self, exits: list[nn.Module], final: nn.Module, statistics: list[nn.Module],
                 higher: list[bool]):
        super().__init__()
        self.exits = nn.ModuleList(exits)
        self.final = final
        self.statistics = nn.ModuleList(statistics)
        self.higher: list[bool] = higher

    def forward(self, x: torch.Tensor, thresholds: list[float], temperatures: list[float],
                kind: int) -> tuple[torch.Tensor, int]:
        payload = x
        e = 0
        for piece in self.exits:
            payload, logits = piece(payload)
            t = temperatures[e]
            z = logits if t == 1.0 else logits / t
            fire = False
            for i, statistic in enumerate(self.statistics):
                if i == kind:
                    stat = statistic(z)
                    fire = bool(stat >= thresholds[e]) if self.higher[i] else bool(
                        stat <= thresholds[e])
            if fire:
                return logits, e
            e += 1
        return self.final(payload)[0], e


class TracedMultiExit:
    """A :class:`MultiExitModel` compiled to frozen TorchScript, one graph per piece of its
    exit program (:func:`splitexit.program.lower`: the stages up to an exit with its head).

    :meth:`infer` runs the shared exit loop: same predictions and exits as ``model.infer``,
    with outputs equal up to float rounding. Build it with :func:`trace_for_inference`.

    Attributes:
        exit_stages: the piece of every exit (the runtime protocol's unit).
    """

    def __init__(self, model: MultiExitModel, example: torch.Tensor):
        from .program import lower

        program = lower(model, None, None, example)
        self.exit_stages = list(program.exit_stages)
        self.num_exits = program.num_exits
        self.exit_names = list(program.exit_names)
        self.input_shape = model.input_shape
        self.has_head = [p.exit is not None for p in program.pieces]
        self.takes_previous = [p.takes_previous for p in program.pieces]
        self.pieces: list[torch.jit.ScriptModule] = []
        traced_pieces: list[torch.jit.ScriptModule] = []
        payload: Payload = example
        previous: torch.Tensor | None = None
        with torch.no_grad():
            for k, spec in enumerate(program.pieces):
                args = payload_tensors(payload)
                if spec.takes_previous:
                    args = (*args, previous)
                traced = _trace(program.module(k), tuple(args))
                traced_pieces.append(traced)
                self.pieces.append(_freeze(traced))
                payload, logits = program.step(k, spec.exit, payload, previous)
                if logits is not None:
                    previous = logits
        # the unfrozen traces only compose that program; the frozen pieces serve the rest
        self._batch_one = self._compose_batch_one(program, traced_pieces, previous)

    @property
    def batch_one_program(self) -> bool:
        """True when a single sample under a max-prob, entropy or margin policy runs as one
        TorchScript call (pieces and threshold tests); False when batch 1 runs the exit loop
        (a tuple payload, a head that takes the previous logits, or scripting failed)."""
        return self._batch_one is not None

    def _compose_batch_one(self, program, traced_pieces: list[torch.jit.ScriptModule],
                           logits: torch.Tensor | None) -> torch.jit.ScriptModule | None:
        """One TorchScript program for batch-1 early exits, when every payload is one tensor,
        every piece but the last ends at an exit and no head takes the previous logits (else
        batch 1 uses the exit loop)."""
        specs = program.pieces
        if (logits is None or any(self.takes_previous) or not all(self.has_head[:-1])
                or self.has_head[-1]
                or any(len(p.inputs) != 1 or len(p.outputs) != 1 for p in specs)):
            return None
        statistics = [_trace(_Statistic(cls()), (logits[:1],)) for cls in _PLAIN]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _freeze(torch.jit.script(_BatchOneExits(
                    traced_pieces[:-1], traced_pieces[-1], statistics,
                    [cls.higher_is_confident for cls in _PLAIN])))
        except Exception as exc:  # noqa: BLE001 - the exit loop serves batch 1 as well
            warnings.warn(f"the batch-1 exit program could not be scripted "
                          f"({type(exc).__name__}: {str(exc)[:200]}); batch 1 runs through the "
                          "exit loop over the traced pieces instead (same answers, more "
                          "Python overhead)", OptimizationWarning, stacklevel=2)
            return None

    def step(self, k: int, e: int | None, payload: Payload, previous: torch.Tensor | None
             ) -> tuple[Payload, torch.Tensor | None]:
        """Piece ``k`` (and its exit head, computed whenever the piece has one)."""
        args = payload_tensors(payload)
        outs = self.pieces[k](*args, previous) if self.takes_previous[k] else self.pieces[k](*args)
        if self.has_head[k]:
            return (outs[0] if len(outs) == 2 else tuple(outs[:-1])), outs[-1]
        return (outs[0] if len(outs) == 1 else tuple(outs)), None

    @inference
    def infer(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Early-exit inference, as :meth:`MultiExitModel.infer`.

        A single sample under a max-prob, entropy or margin policy runs as one TorchScript
        call (pieces and threshold tests); anything else runs the shared exit loop. Both give
        the eager model's exits.
        """
        check_input(x, self.input_shape)
        check_policy(policy, self.num_exits)
        if x.shape[0] == 1 and self._batch_one is not None and is_plain_threshold(policy):
            heads = self.num_exits - 1
            logits, e = self._batch_one(
                x, [_per_exit(policy.threshold, i) for i in range(heads)],
                [_per_exit(policy.temperature, i) for i in range(heads)],
                _PLAIN.index(type(policy)))
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
