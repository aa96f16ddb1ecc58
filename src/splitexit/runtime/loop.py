"""The one early-exit loop, shared by every runtime (PyTorch, TorchScript, ONNX Runtime, the
device half and the server half of a split, CBNet) and by the offline replay.

A runtime gives a ``step(k, e, payload, previous)`` that runs stage ``k`` and, when ``e`` is
not ``None``, exit head ``e`` at its end; the loop does the rest: per-sample decisions by the
policy, exited samples leaving the batch together with their payload and policy state rows.
It works on torch tensors and on numpy arrays alike (:mod:`splitexit.runtime.arrays`), and
imports no torch, so an edge device runs it with ONNX Runtime alone.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .arrays import is_torch, ops_of

__all__ = ["ExitResult", "ExitRun", "Step", "advance_exits", "infer_exits", "all_exit_logits",
           "simulate_exits", "payload_tensors", "payload_select", "init_state", "check_batch",
           "check_policy", "check_logits", "check_labels"]


def payload_tensors(payload) -> tuple:
    """The tensors (or arrays) of a payload, as a tuple."""
    return payload if isinstance(payload, tuple) else (payload,)


def payload_select(payload, index):
    """Rows ``index`` (bool mask or indices) of every tensor in the payload."""
    if isinstance(payload, tuple):
        return tuple(t[index] for t in payload)
    return payload[index]


_DTYPES: dict = {}


def _dtype(torch_in: bool, name: str):
    """The torch or numpy dtype called ``name`` (cached: the check is on every call)."""
    key = (torch_in, name)
    found = _DTYPES.get(key)
    if found is None:
        found = getattr(sys.modules["torch"], name) if torch_in else np.dtype(name)
        _DTYPES[key] = found
    return found


def _wrong_dtype(x, torch_in: bool, want: str | None) -> InputError:
    got = str(x.dtype).removeprefix("torch.")
    floating = x.is_floating_point() if torch_in else x.dtype.kind == "f"
    name = want or "float32"
    convert = ((f"x.to(torch.{name})" if name != "float32" else "x.float()") if torch_in
               else f"x.astype(np.{name})")
    if not floating:
        return InputError(
            f"expected a floating-point ({name}) batch, got dtype {got}; convert it with "
            f"{convert} and "
            "preprocess it as the model's training data was (the same scaling and "
            "normalisation): a runtime never guesses how to scale integer inputs")
    return InputError(f"expected a {name} batch (the model computes in {name}), got dtype "
                      f"{got}; convert it with {convert}: inputs are never converted silently")


def check_batch(x, input_shape: Sequence[int] | None = None,
                dtype: str | None = "float32") -> None:
    """Raise a clear :class:`InputError` for a wrong type, dtype, shape or non-finite batch.

    Works on numpy arrays and torch tensors alike (one definition for every runtime).
    ``dtype`` is the dtype the runtime computes in (``"float32"`` for ONNX Runtime programs,
    the weights' dtype for a PyTorch model; ``None``: any floating-point dtype). A batch of
    another dtype is refused, never converted: float64 data (numpy's default) must be
    converted by the caller, so PyTorch and ONNX Runtime see the same numbers.
    """
    torch_in = is_torch(x)
    if not torch_in and not isinstance(x, np.ndarray):
        raise InputError(f"expected a torch.Tensor or numpy batch, got {type(x).__name__}; "
                         "convert with np.asarray(x, dtype=np.float32)")
    if dtype is None:
        if not (x.is_floating_point() if torch_in else x.dtype.kind == "f"):
            raise _wrong_dtype(x, torch_in, None)
    elif x.dtype is not (_DTYPES.get((torch_in, dtype)) or _dtype(torch_in, dtype)) \
            and x.dtype != _dtype(torch_in, dtype):
        raise _wrong_dtype(x, torch_in, dtype)
    if input_shape is not None:
        want = input_shape if type(input_shape) is tuple else tuple(input_shape)
        if x.ndim == len(want):
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), got "
                             f"{tuple(x.shape)}; add the batch dimension with "
                             f"{'x.unsqueeze(0)' if torch_in else 'x[None]'}")
        if x.shape[1:] != want:  # torch.Size and numpy shapes are tuples
            raise InputError(f"expected a batch of shape (N, {', '.join(map(str, want))}), "
                             f"got {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError("empty batch: pass at least one sample")
    # a finite sum proves every element finite (one reduction); only a non-finite sum (a
    # NaN/inf element, or an overflow of huge finite values) needs the element-wise check
    if not math.isfinite(float(x.sum())) and not ops_of(x).is_finite(x):
        raise InputError("input contains NaN or infinite values; clean or impute them first")


def check_logits(logits: Sequence, labels=None) -> None:
    """Raise a clear :class:`InputError` unless ``logits`` is a non-empty list of finite
    ``(N, C)`` arrays, one per exit (the same ``N``), and ``labels`` (when given) ``N``
    class indices in ``0 .. C - 1`` of the final exit.

    Dense exits (per-pixel logits ``(N, C, H, W)``, e.g. segmentation) are accepted when every
    exit has the final exit's shape; their labels are per pixel, which a per-sample accuracy
    does not score (see :mod:`splitexit.segmentation` for mIoU), so labels are refused then."""
    if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence) or not logits:
        raise InputError("expected every exit's logits as a list of (N, C) tensors, one per "
                         f"exit (what model.collect_logits(x) returns), got {type(logits).__name__}")
    n = None
    final = logits[-1]
    dense = getattr(final, "ndim", 0) > 2
    for e, lg in enumerate(logits):
        if not (is_torch(lg) or isinstance(lg, np.ndarray)) or (
                lg.ndim != 2 if not dense else tuple(lg.shape[1:]) != tuple(final.shape[1:])):
            want = ("an (N, C) tensor" if not dense else
                    f"a dense (N, {', '.join(map(str, final.shape[1:]))}) tensor like the final "
                    "exit's")
            raise InputError(f"exit {e}'s logits must be {want}, got "
                             f"{getattr(lg, 'shape', type(lg).__name__)}")
        if n is None:
            n = lg.shape[0]
        elif lg.shape[0] != n:
            raise InputError(f"every exit's logits must cover the same samples: exit 0 has "
                             f"{n} rows, exit {e} has {lg.shape[0]}")
        if not math.isfinite(float(lg.sum())) and not ops_of(lg).is_finite(lg):
            raise InputError(f"exit {e}'s logits contain NaN or infinite values, so no decision "
                             "on them means anything; find where they come from (NaN inputs, "
                             "or a model that overflows) and fix that first")
    if labels is not None:
        if dense:
            raise InputError("these logits are dense (per pixel); a per-sample accuracy does not "
                             "score them: use splitexit.segmentation (mIoU, pixel accuracy, "
                             "its threshold sweep) instead")
        check_labels(labels, logits[-1].shape[1], n)


def check_labels(labels, num_classes: int | None = None, n: int | None = None,
                 dense: bool = False) -> None:
    """Raise a clear :class:`InputError` unless ``labels`` are ``n`` integer class indices in
    ``0 .. num_classes - 1`` (torch or numpy); with ``dense``, ``n`` label maps (one class
    per pixel, ``(N, H, W)``) of a dense model."""
    torch_in = is_torch(labels)
    if not torch_in and not isinstance(labels, np.ndarray):
        raise InputError(f"labels must be a tensor of class indices, got "
                         f"{type(labels).__name__}; convert with torch.as_tensor(y).long()")
    integer = (not labels.is_floating_point() and not labels.is_complex()) if torch_in else \
        labels.dtype.kind in "iu"
    if not integer or (labels.ndim != 1 and not dense) or labels.ndim < 1:
        kind = "a 1-D tensor" if not dense else "(N, H, W) label maps"
        raise InputError(f"labels must be {kind} of integer class indices, got dtype "
                         f"{labels.dtype} and shape {tuple(labels.shape)}; use y.long()")
    if n is not None and labels.shape[0] != n:
        raise InputError(f"{labels.shape[0]} labels for {n} samples; give one label per sample")
    if labels.shape[0] == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        span = f"0 .. {num_classes - 1}" if num_classes is not None else "0, 1, ..."
        raise InputError(f"labels must be class indices in {span}, got labels in {lo} .. {hi}; "
                         "remap them to 0 .. C - 1 (e.g. with torch.unique(y, "
                         "return_inverse=True)) or build the model for more classes")


def _not_a_policy(policy) -> InputError:
    from ..policies import POLICIES

    known = ", ".join(POLICIES.list())
    if isinstance(policy, str):
        return InputError(f"the policy must be an exit policy object, got the string "
                          f"{policy!r}; build one with splitexit.create_policy({policy!r}, ...) "
                          f"(known: {known})")
    if isinstance(policy, (int, float)) and not isinstance(policy, bool):
        return InputError(f"the policy must be an exit policy object, got the number {policy!r}; "
                          f"to exit on a confidence threshold write MaxProb({policy!r}) (or "
                          f"splitexit.create_policy('maxprob', threshold={policy!r}))")
    return InputError(f"the policy must be an exit policy object (MaxProb(0.9), Entropy(0.1), "
                      f"Patience(2), ...; known: {known}), got {type(policy).__name__}")


def check_policy(policy, num_exits: int) -> None:
    """Raise a clear :class:`InputError` unless ``policy`` is an exit policy that fits a model
    with ``num_exits`` exits (per-exit thresholds and temperatures of the right length, ...).

    Where a policy meets a model (every runtime's ``infer``, the offline replay, lowering, a
    bundle). It costs one attribute read per call: a policy that passed is marked with the
    exit count it fits, and the full check runs again only for another count.
    """
    if getattr(policy, "_fits_exits", None) == num_exits:
        return
    if not all(callable(getattr(policy, m, None))
               for m in ("decide", "final_decision", "init_state")):
        raise _not_a_policy(policy)
    fits = getattr(policy, "check_exits", None)
    if fits is not None:
        fits(num_exits)
    try:
        object.__setattr__(policy, "_fits_exits", num_exits)
    except (AttributeError, TypeError):  # a policy without a __dict__: checked every call
        pass


def init_state(policy, n: int, num_classes: int, ops) -> dict:
    """``policy``'s per-sample state for ``n`` samples, in the arrays of ``ops``."""
    if ops.name == "torch":
        return policy.init_state(n, num_classes)
    try:
        return policy.init_state(n, num_classes, ops=ops)
    except TypeError as exc:
        raise InputError(f"the policy {getattr(policy, 'name', policy)!r} has no numpy form "
                         "(its init_state takes no ops=); run it on a PyTorch runtime") from exc


@dataclass
class ExitResult:
    """Per-sample outcome of early-exit inference (torch tensors or numpy arrays, as the input).

    Attributes:
        predictions: predicted class per sample.
        exit_index: index of the exit each sample left at (``num_exits - 1`` is the final one).
        logits: the logits each prediction came from.
    """

    predictions: object
    exit_index: object
    logits: object

    def exit_fractions(self, num_exits: int) -> list[float]:
        counts = ops_of(self.exit_index).bincount(self.exit_index, num_exits)
        return (counts / max(1, len(self.exit_index))).tolist()

    def accuracy(self, labels) -> float:
        return float((self.predictions == labels).sum()) / max(1, len(labels))


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
    active: object
    payload: object
    state: dict | None
    previous: object
    fallback: object
    fallback_exit: int
    next_stage: int
    next_exit: int

    @classmethod
    def start(cls, x) -> ExitRun:
        """A run over batch ``x`` (already checked) before any stage."""
        ops = ops_of(x)
        n = x.shape[0]
        result = ExitResult(ops.empty_long(n), ops.empty_long(n), None)
        return cls(result, ops.arange(n), x, None, None, None, -1, 0, 0)

    @property
    def done(self) -> bool:
        """Whether every sample has exited."""
        return len(self.active) == 0


Step = Callable[[int, "int | None", object, object], tuple[object, object]]


def advance_exits(run: ExitRun, step: Step, exit_stages: Sequence[int], policy,
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
    check_policy(policy, len(exit_stages))
    last = len(exit_stages) - 1
    n = len(result.predictions)
    ops = ops_of(result.predictions)
    for k in range(run.next_stage, end):
        at_exit = e <= last and exit_stages[e] == k
        payload, logits = step(k, e if at_exit and e < last else None, payload, previous)
        if not at_exit:
            continue
        if e == last:
            logits = payload_tensors(payload)[0]
        if state is None:
            state = init_state(policy, len(active), logits.shape[1], ops)
        m = len(active)
        if e == last:
            fire, decision = None, policy.final_decision(e, logits, state)
            leaving = m
        else:
            fire, decision = policy.decide(e, logits, state)
            leaving = ops.count(fire)
        if leaving == m:  # everyone left (always so at batch 1 once an exit fires)
            if m == n:  # nobody left before: whole-batch results, no scatter
                result.predictions = ops.classes(decision)
                ops.fill(result.exit_index, e)
                result.logits = decision if result.logits is None else ops.cast_like(
                    decision, result.logits)
            else:
                result.predictions[active] = ops.classes(decision)
                result.exit_index[active] = e
                result.logits[active] = ops.cast_like(decision, result.logits)
            return ExitRun(result, active[:0], None, None, None, None, e, k + 1, e + 1)
        if leaving:
            if result.logits is None:  # sized by the first decision written (an exit gate's
                result.logits = ops.empty_like_rows(n, decision)  # logits are not classes)
                result.predictions = ops.predictions_like(n, decision)  # per pixel if dense
            rows = active[fire]
            result.predictions[rows] = ops.classes(decision[fire])
            result.exit_index[rows] = e
            result.logits[rows] = ops.cast_like(decision[fire], result.logits)
            keep = ~fire
            active = active[keep]
            payload = payload_select(payload, keep)
            state = {name: v[keep] for name, v in state.items()}
            logits, decision = logits[keep], decision[keep]
        previous, fallback, fallback_exit = logits, decision, e
        e += 1
    return ExitRun(result, active, payload, state, previous, fallback, fallback_exit, end, e)


def _one_sample(ops, decision, e: int) -> ExitResult:
    return ExitResult(ops.classes(decision), ops.full_long(1, e), decision)


def infer_exits(step: Step, exit_stages: Sequence[int], policy, end: int, x) -> ExitResult:
    """Early-exit inference over a whole model (every backend's ``infer``).

    A batch runs :func:`advance_exits`. A single sample makes the same decisions without the
    loop's bookkeeping (no indices, no scatter, no run state: it leaves at the first exit
    that fires), which is worth tens of microseconds per call at batch 1.
    """
    if x.shape[0] != 1:  # advance_exits checks the policy
        return advance_exits(ExitRun.start(x), step, exit_stages, policy, end).result
    check_policy(policy, len(exit_stages))
    ops = ops_of(x)
    last = len(exit_stages) - 1
    state: dict | None = None
    previous = None
    payload = x
    e = 0
    for k in range(end):
        at_head = e < last and exit_stages[e] == k
        payload, logits = step(k, e if at_head else None, payload, previous)
        if at_head:
            if state is None:
                state = init_state(policy, 1, logits.shape[1], ops)
            fire, decision = policy.decide(e, logits, state)
            if bool(fire):
                return _one_sample(ops, decision, e)
            previous = logits
            e += 1
    logits = payload_tensors(payload)[0]
    if state is None:
        state = init_state(policy, 1, logits.shape[1], ops)
    return _one_sample(ops, policy.final_decision(last, logits, state), last)


def all_exit_logits(step: Step, exit_stages: Sequence[int], end: int, x) -> list:
    """Every exit's logits for the whole batch, nobody leaving (what ``forward`` returns),
    through the same ``step`` a backend gives :func:`advance_exits`."""
    outs: list = []
    payload, e, heads = x, 0, len(exit_stages) - 1
    for k in range(end):
        at_head = e < heads and exit_stages[e] == k
        payload, logits = step(k, e if at_head else None, payload, outs[-1] if outs else None)
        if at_head:
            outs.append(logits)
            e += 1
    outs.append(payload_tensors(payload)[0])
    return outs


def simulate_exits(logits: Sequence, policy) -> ExitResult:
    """Offline replay of a policy over per-exit logits ``[(N, C), ...]`` (or dense
    ``[(N, C, H, W), ...]``: predictions are then per pixel, ``(N, H, W)``).

    Raises:
        InputError: logits that are not ``(N, C)`` (or all dense) per exit or not finite,
            or a policy that does not fit this many exits.
    """
    check_logits(logits)
    check_policy(policy, len(logits))
    ops = ops_of(logits[0])
    n, c = logits[0].shape[:2]
    state = init_state(policy, n, c, ops)
    decided = ops.full_bool(n, False)
    predictions = ops.predictions_like(n, logits[0])
    exit_index = ops.empty_long(n)
    out = ops.empty_like_rows(n, logits[0])
    last = len(logits) - 1
    for e, lg in enumerate(logits):
        if e == last:
            decision, new = policy.final_decision(e, lg, state), ~decided
        else:
            fire, decision = policy.decide(e, lg, state)
            new = fire & ~decided
        predictions[new] = ops.classes(decision[new])
        exit_index[new] = e
        out[new] = ops.cast_like(decision[new], out)
        decided |= new
        if ops.all(decided):
            break
    return ExitResult(predictions, exit_index, out)
