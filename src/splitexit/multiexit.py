"""MultiExitModel: a staged backbone with exit heads at cuts, exiting for real per sample.

``forward`` returns every exit's logits (training, offline analysis). ``infer`` runs stage by
stage and removes the samples that exit from the batch, so compute really shrinks; it agrees
exactly with ``simulate``, which replays the same policy over ``forward``'s logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError
from .policies import ExitPolicy
from .stages import Payload, StagedModel, payload_select, payload_tensors

__all__ = ["MultiExitModel", "ExitResult", "ExitRun", "advance_exits", "infer_exits",
           "all_exit_logits", "check_input", "StageWithHead"]


def inference(fn):
    """``torch.inference_mode`` for an inference entry point, entered only when it is not on
    already: re-entering it costs about 14 us at batch 1 (the dispatcher's state is switched
    and restored even when nothing changes), a serving loop usually runs inside it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def check_input(x: torch.Tensor, input_shape: Sequence[int] | None = None) -> None:
    """Raise a clear :class:`InputError` for a wrong type, dtype, shape or non-finite input."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}; "
                         "convert with torch.as_tensor(x, dtype=torch.float32)")
    if not x.is_floating_point():
        raise InputError(f"expected a floating-point batch, got dtype {x.dtype}; scale images "
                         "to [0, 1] and convert with x.float() / 255")
    if input_shape is not None:
        want = tuple(input_shape)
        if x.dim() == len(want):
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}; add the batch dimension with x.unsqueeze(0)")
        if tuple(x.shape[1:]) != want:
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), "
                             f"got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch: pass at least one sample")
    # a finite sum proves every element finite (one reduction); only a non-finite sum (a
    # NaN/inf element, or an overflow of huge finite values) needs the element-wise check
    if not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        raise InputError("input contains NaN or infinite values; clean or impute them first")


@dataclass
class ExitResult:
    """Per-sample outcome of early-exit inference.

    Attributes:
        predictions: predicted class per sample.
        exit_index: index of the exit each sample left at (``num_exits - 1`` is the final one).
        logits: the logits each prediction came from.
    """

    predictions: torch.Tensor
    exit_index: torch.Tensor
    logits: torch.Tensor

    def exit_fractions(self, num_exits: int) -> list[float]:
        counts = torch.bincount(self.exit_index, minlength=num_exits).double()
        return (counts / max(1, len(self.exit_index))).tolist()

    def accuracy(self, labels: torch.Tensor) -> float:
        return float((self.predictions == labels).double().mean())


class MultiExitModel(nn.Module):
    """A :class:`StagedModel` backbone plus exit heads at some of its cuts.

    The backbone's own output is the final exit. Heads are given by cut name.

    Args:
        backbone: the staged network; its output are the final logits.
        heads: ``{cut_name: head}``; each head maps the payload at its cut to logits.
        input_shape: per-sample input shape; inputs are checked against it when given.

    Example:
        >>> model = MultiExitModel(staged, {"layer1": LinearHead((16, 8, 8), 10)})
        >>> result = model.infer(x, MaxProb(0.9))
        >>> result.exit_index  # where each sample left
    """

    def __init__(self, backbone: StagedModel, heads: Mapping[str, nn.Module] | Iterable,
                 input_shape: Sequence[int] | None = None):
        super().__init__()
        self.backbone = backbone
        items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
        items.sort(key=lambda kv: backbone.cut_index(kv[0]))
        cuts = [c for c, _ in items]
        if len(set(cuts)) != len(cuts):
            raise InputError(f"one head per cut, got {cuts}")
        self.head_cuts: list[str] = cuts
        self.heads = nn.ModuleList([h for _, h in items])
        self.exit_stages = [backbone.cut_index(c) for c in cuts] + [backbone.num_stages - 1]
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def keep_exits(self, exits: Sequence[int]) -> MultiExitModel:
        """A model with only heads ``exits`` (indices; the final exit always stays).

        Modules are shared, not copied. Use it to drop heads that cost more than they save
        (see :func:`~splitexit.calibration.select_exits`).
        """
        exits = sorted(set(int(e) for e in exits))
        if any(not 0 <= e < len(self.heads) for e in exits):
            raise InputError(f"exit indices must lie in 0..{len(self.heads) - 1} (the heads), "
                             f"got {exits}")
        if len(exits) < len(self.heads) and any(
                getattr(h, "uses_previous", False) for h in self.heads):
            raise InputError("cascading heads take the previous head's logits; they cannot be "
                             "dropped one by one")
        return MultiExitModel(self.backbone, {self.head_cuts[e]: self.heads[e] for e in exits},
                              self.input_shape)

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    @property
    def exit_names(self) -> list[str]:
        return [*self.head_cuts, "final"]

    def _features(self, e: int, payload: Payload) -> torch.Tensor:
        if isinstance(payload, tuple):
            if len(payload) == 1:
                return payload[0]
            raise InputError(
                f"the cut {self.head_cuts[e]!r} carries {len(payload)} tensors (it lies inside "
                "a block); attach exit heads at single-tensor cuts, e.g. after a whole block")
        return payload

    def run_head(self, e: int, payload: Payload, previous: torch.Tensor | None) -> torch.Tensor:
        head = self.heads[e]
        features = self._features(e, payload)
        if getattr(head, "uses_previous", False):
            return head(features, None if previous is None else previous.detach())
        return head(features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order (the last is the backbone's own output)."""
        outs: list[torch.Tensor] = []
        payload: Payload = x
        e = 0
        for k, stage in enumerate(self.backbone.stages):
            payload = stage(payload)
            while e < len(self.heads) and self.exit_stages[e] == k:
                outs.append(self.run_head(e, payload, outs[-1] if outs else None))
                e += 1
        outs.append(payload_tensors(payload)[0])
        return outs

    def step(self, k: int, e: int | None, payload: Payload, previous: torch.Tensor | None
             ) -> tuple[Payload, torch.Tensor | None]:
        """Run stage ``k`` and, when ``e`` is given, exit head ``e`` at its end."""
        payload = self.backbone.stages[k](payload)
        return payload, (None if e is None else self.run_head(e, payload, previous))

    @inference
    def infer(self, x: torch.Tensor, policy: ExitPolicy) -> ExitResult:
        """Early-exit inference for real: exited samples leave the batch.

        Raises:
            InputError: wrong type, dtype, shape, or non-finite input.
        """
        check_input(x, self.input_shape)
        return infer_exits(self.step, self.exit_stages, policy, self.backbone.num_stages, x)

    @torch.no_grad()
    def simulate(self, logits: Sequence[torch.Tensor], policy: ExitPolicy) -> ExitResult:
        """Replay ``policy`` offline over every exit's logits (as returned by ``forward``)."""
        if len(logits) != self.num_exits:
            raise InputError(f"expected logits of {self.num_exits} exits, got {len(logits)}")
        return simulate_exits(logits, policy)

    @torch.no_grad()
    def collect_logits(self, x: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
        """Every exit's logits over a data set, in batches (eval mode)."""
        was_training = self.training
        self.eval()
        chunks = [self(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return [torch.cat([c[e] for c in chunks]) for e in range(self.num_exits)]


def _one_sample(decision: torch.Tensor, e: int) -> ExitResult:
    return ExitResult(decision.argmax(dim=1), torch.full((1,), e, dtype=torch.long), decision)


class FirstCascadeHead(nn.Module):
    """A cascading head at the first exit, which has no previous logits to take."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features, None)


class StageWithHead(nn.Module):
    """A stage and the exit head at its end as one module: tensors in, ``(*payload, logits)`` out.

    The unit exported to ONNX and traced to TorchScript: one call per exit instead of two,
    which matters at batch 1. Without a head it returns the stage's payload tensors. When
    ``takes_previous`` the last input is the previous exit's logits (cascading heads).
    """

    def __init__(self, stage: nn.Module, head: nn.Module | None, num_inputs: int,
                 takes_previous: bool = False):
        super().__init__()
        self.stage, self.head = stage, head
        self.num_inputs, self.takes_previous = num_inputs, takes_previous

    @classmethod
    def of(cls, model: MultiExitModel, k: int, e: int | None, has_previous: bool
           ) -> StageWithHead:
        """Stage ``k`` of ``model`` with exit head ``e`` (``None``: the stage alone)."""
        stage = model.backbone.stages[k]
        num_inputs = getattr(stage, "num_inputs", 1)
        if e is None:
            return cls(stage, None, num_inputs)
        head = model.heads[e]
        uses_previous = bool(getattr(head, "uses_previous", False))
        if uses_previous and not has_previous:
            return cls(stage, FirstCascadeHead(head), num_inputs)
        return cls(stage, head, num_inputs, takes_previous=uses_previous)

    def forward(self, *tensors: torch.Tensor):
        inputs = tensors[: self.num_inputs]
        out = self.stage(inputs[0] if self.num_inputs == 1 else tuple(inputs))
        outs = payload_tensors(out)
        if self.head is None:
            return outs
        if len(outs) != 1:
            raise InputError(f"this cut carries {len(outs)} tensors; exit heads attach at "
                             "single-tensor cuts (after a whole block)")
        logits = self.head(outs[0], tensors[-1]) if self.takes_previous else self.head(outs[0])
        return (*outs, logits)


@dataclass
class ExitRun:
    """A batch part-way through early-exit inference: what a device half hands to a server.

    Attributes:
        result: the batch's result so far; rows of samples still ``active`` are not yet set.
        active: original batch indices of the samples that have not exited.
        payload: their payload at the next stage's input (what a split sends on the wire).
        state: their policy state rows (``None`` before the first exit).
        previous: their raw logits at the last exit evaluated (cascading heads take them).
        fallback: their decision logits at that exit (the answer to give when the rest of
            the network cannot run, e.g. the link to the server is down).
        fallback_exit: index of that exit (-1 before the first exit).
        next_stage: first stage still to run.
        next_exit: first exit still to evaluate.
    """

    result: ExitResult
    active: torch.Tensor
    payload: Payload | None
    state: dict | None
    previous: torch.Tensor | None
    fallback: torch.Tensor | None
    fallback_exit: int
    next_stage: int
    next_exit: int

    @classmethod
    def start(cls, x: torch.Tensor) -> ExitRun:
        """A run over batch ``x`` (already checked) before any stage."""
        n = x.shape[0]
        result = ExitResult(torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long),
                            torch.empty(0))
        return cls(result, torch.arange(n), x, None, None, None, -1, 0, 0)

    @property
    def done(self) -> bool:
        """Whether every sample has exited."""
        return len(self.active) == 0


Step = Callable[[int, "int | None", Payload, "torch.Tensor | None"],
                tuple[Payload, "torch.Tensor | None"]]


def advance_exits(run: ExitRun, step: Step, exit_stages: Sequence[int], policy: ExitPolicy,
                  end: int) -> ExitRun:
    """The early-exit loop every backend shares (PyTorch, TorchScript, ONNX Runtime, split).

    Runs stages ``run.next_stage .. end - 1`` through ``step(k, e, payload, previous)``, which
    returns the stage's output payload and, when ``e`` is not ``None``, exit ``e``'s logits.
    At each exit the policy decides per sample; the samples that leave are written to the
    result and removed from the batch, together with their payload and policy state rows.
    The final exit (the backbone's output, at stage ``exit_stages[-1]``) takes every sample
    left. One host synchronisation per exit (how many leave).
    """
    result, active, payload = run.result, run.active, run.payload
    state, previous = run.state, run.previous
    fallback, fallback_exit, e = run.fallback, run.fallback_exit, run.next_exit
    last = len(exit_stages) - 1
    n = len(result.predictions)
    for k in range(run.next_stage, end):
        at_exit = e <= last and exit_stages[e] == k
        payload, logits = step(k, e if at_exit and e < last else None, payload, previous)
        if not at_exit:
            continue
        if e == last:
            logits = payload_tensors(payload)[0]
        if state is None:
            state = policy.init_state(len(active), logits.shape[1])
        m = len(active)
        if e == last:
            fire, decision = None, policy.final_decision(e, logits, state)
            leaving = m
        else:
            fire, decision = policy.decide(e, logits, state)
            leaving = int(fire.sum()) if m > 1 else int(fire)
        if leaving == m:  # everyone left (always so at batch 1 once an exit fires)
            if m == n:  # nobody left before: whole-batch results, no scatter
                result.predictions = decision.argmax(dim=1)
                result.exit_index.fill_(e)
                result.logits = decision if result.logits.numel() == 0 else decision.to(
                    result.logits.dtype)
            else:
                result.predictions[active] = decision.argmax(dim=1)
                result.exit_index[active] = e
                result.logits[active] = decision.to(result.logits.dtype)
            return ExitRun(result, active[:0], None, None, None, None, e, k + 1, e + 1)
        if result.logits.numel() == 0:
            result.logits = torch.empty(n, logits.shape[1], dtype=logits.dtype)
        if leaving:
            rows = active[fire]
            result.predictions[rows] = decision[fire].argmax(dim=1)
            result.exit_index[rows] = e
            result.logits[rows] = decision[fire].to(result.logits.dtype)
            keep = ~fire
            active = active[keep]
            payload = payload_select(payload, keep)
            state = {name: v[keep] for name, v in state.items()}
            logits, decision = logits[keep], decision[keep]
        previous, fallback, fallback_exit = logits, decision, e
        e += 1
    return ExitRun(result, active, payload, state, previous, fallback, fallback_exit, end, e)


def infer_exits(step: Step, exit_stages: Sequence[int], policy: ExitPolicy, end: int,
                x: torch.Tensor) -> ExitResult:
    """Early-exit inference over a whole model (every backend's ``infer``).

    A batch runs :func:`advance_exits`. A single sample makes the same decisions without the
    loop's bookkeeping (no indices, no scatter, no run state: it leaves at the first exit
    that fires), which is worth tens of microseconds per call at batch 1.
    """
    if x.shape[0] != 1:
        return advance_exits(ExitRun.start(x), step, exit_stages, policy, end).result
    last = len(exit_stages) - 1
    state: dict | None = None
    previous: torch.Tensor | None = None
    payload: Payload = x
    e = 0
    for k in range(end):
        at_head = e < last and exit_stages[e] == k
        payload, logits = step(k, e if at_head else None, payload, previous)
        if at_head:
            if state is None:
                state = policy.init_state(1, logits.shape[1])
            fire, decision = policy.decide(e, logits, state)
            if bool(fire):
                return _one_sample(decision, e)
            previous = logits
            e += 1
    logits = payload_tensors(payload)[0]
    if state is None:
        state = policy.init_state(1, logits.shape[1])
    return _one_sample(policy.final_decision(last, logits, state), last)


def all_exit_logits(step: Step, exit_stages: Sequence[int], end: int, x: Payload
                    ) -> list[torch.Tensor]:
    """Every exit's logits for the whole batch, nobody leaving (what ``forward`` returns),
    through the same ``step`` a backend gives :func:`advance_exits`."""
    outs: list[torch.Tensor] = []
    payload, e, heads = x, 0, len(exit_stages) - 1
    for k in range(end):
        at_head = e < heads and exit_stages[e] == k
        payload, logits = step(k, e if at_head else None, payload, outs[-1] if outs else None)
        if at_head:
            outs.append(logits)
            e += 1
    outs.append(payload_tensors(payload)[0])
    return outs


def simulate_exits(logits: Sequence[torch.Tensor], policy: ExitPolicy) -> ExitResult:
    """Offline replay of a policy over per-exit logits ``[(N, C), ...]``."""
    n, c = logits[0].shape
    state = policy.init_state(n, c)
    decided = torch.zeros(n, dtype=torch.bool)
    predictions = torch.empty(n, dtype=torch.long)
    exit_index = torch.empty(n, dtype=torch.long)
    out = torch.empty(n, c, dtype=logits[0].dtype)
    last = len(logits) - 1
    for e, lg in enumerate(logits):
        if e == last:
            decision, new = policy.final_decision(e, lg, state), ~decided
        else:
            fire, decision = policy.decide(e, lg, state)
            new = fire & ~decided
        predictions[new] = decision[new].argmax(dim=1)
        exit_index[new] = e
        out[new] = decision[new].to(out.dtype)
        decided |= new
        if bool(decided.all()):
            break
    return ExitResult(predictions, exit_index, out)
