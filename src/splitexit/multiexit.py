"""MultiExitModel: a staged backbone with exit heads at cuts, exiting for real per sample.

``forward`` returns every exit's logits (training, offline analysis). ``infer`` runs stage by
stage and removes the samples that exit from the batch, so compute really shrinks; it agrees
exactly with ``simulate``, which replays the same policy over ``forward``'s logits.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import InputError
from .policies import ExitPolicy
from .runtime.loop import (
    ExitResult,
    ExitRun,
    Step,
    advance_exits,
    all_exit_logits,
    check_batch,
    check_logits,
    infer_exits,
    simulate_exits,
)
from .stages import (
    Payload,
    StagedModel,
    not_traced,
    payload_tensors,
    per_sample_shape,
    weights_dtype,
)

__all__ = ["MultiExitModel", "ExitResult", "ExitRun", "Step", "advance_exits", "infer_exits",
           "all_exit_logits", "simulate_exits", "check_input", "Piece", "per_sample_shape",
           "weights_dtype"]


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


def check_input(x, input_shape: Sequence[int] | None = None,
                dtype: str | None = "float32") -> None:
    """Raise a clear :class:`InputError` for a wrong type, dtype, shape or non-finite input
    (torch tensors or numpy arrays; :func:`splitexit.runtime.loop.check_batch`)."""
    check_batch(x, input_shape, dtype)


def head_cut(key: str) -> tuple[str, int]:
    """``"cut@i"`` -> ``("cut", i)``: a head fed by tensor ``i`` of a multi-tensor cut;
    a plain cut name -> ``(name, 0)``."""
    name, sep, index = str(key).rpartition("@")
    if sep and index.isdigit():
        return name, int(index)
    return str(key), 0


class MultiExitModel(nn.Module):
    """A :class:`StagedModel` backbone plus exit heads at some of its cuts.

    The backbone's own output is the final exit. Heads are given by cut name.

    Args:
        backbone: the staged network; its output are the final logits.
        heads: ``{cut_name: head}``; each head maps the payload at its cut to logits.
        input_shape: per-sample input shape (without the batch dimension). Every input is
            checked against it. When given, the heads are checked against the payload at
            their cuts here (a head built for another shape is refused at once); when
            ``None``, the shape of the first batch the model sees is adopted (and checked the
            same way), and later batches must match it.
        dense: the model outputs per-pixel logits ``(N, classes, H, W)`` at every exit (a
            segmentation network; see :mod:`splitexit.segmentation`) instead of ``(N,
            classes)``. Its heads must be dense heads giving the final exit's shape.

    Inputs must have the dtype of the model's weights (float32 unless you converted the
    model): a float64 or float16 batch is refused with an :class:`InputError`, never
    converted, as on every runtime.

    Example:
        >>> model = MultiExitModel(staged, {"layer1": LinearHead((16, 8, 8), 10)})
        >>> result = model.infer(x, MaxProb(0.9))
        >>> result.exit_index  # where each sample left
    """

    def __init__(self, backbone: StagedModel, heads: Mapping[str, nn.Module] | Iterable,
                 input_shape: Sequence[int] | None = None, dense: bool = False):
        super().__init__()
        self.dense = bool(dense)
        if not isinstance(backbone, StagedModel):
            raise InputError(f"the backbone must be a StagedModel, got {type(backbone).__name__}; "
                             "cut your module with StagedModel.from_module(module, cuts) (or "
                             "build the whole model with splitexit.build_multiexit)")
        self.backbone = backbone
        items = list(heads.items()) if isinstance(heads, Mapping) else list(heads)
        for cut, head in items:
            if not isinstance(cut, str):
                raise InputError(f"heads are keyed by cut name, a string, got {cut!r} "
                                 f"({type(cut).__name__}); valid cuts: {backbone.cut_names}")
            if not isinstance(head, nn.Module):
                raise InputError(f"the head at cut {cut!r} must be an nn.Module (e.g. "
                                 f"create_head('linear', shape, num_classes)), got "
                                 f"{type(head).__name__}")
        items.sort(key=lambda kv: backbone.cut_index(head_cut(kv[0])[0]))
        cuts = [c for c, _ in items]
        if len({head_cut(c)[0] for c in cuts}) != len(cuts):
            raise InputError(f"one head per cut, got {cuts}")
        self.head_cuts: list[str] = cuts
        self.heads = nn.ModuleList([h for _, h in items])
        self.head_tensors: list[int] = [head_cut(c)[1] for c in cuts]
        self.exit_stages = [backbone.cut_index(head_cut(c)[0]) for c in cuts] + [
            backbone.num_stages - 1]
        self._input_dtype = weights_dtype(self)
        self.input_shape = None
        if input_shape is not None:
            shape = per_sample_shape(input_shape)
            self.check_fits(shape)
            self.input_shape = shape

    def _apply(self, fn, recurse=True):  # .double(), .half(), .to(...): the input dtype follows
        out = super()._apply(fn, recurse)
        self._input_dtype = weights_dtype(self)
        return out

    @property
    def input_dtype(self) -> str:
        """The dtype inputs must have: the weights' (``"float32"`` unless converted)."""
        return self._input_dtype

    def check_fits(self, input_shape: Sequence[int]) -> None:
        """Run one zero sample of ``input_shape`` through the backbone (eval mode, no
        gradients, modes restored) and raise a clear :class:`InputError` when a stage fails,
        a head was built for another payload shape (its ``in_shape``) or for another number of
        classes than the final exit gives. A head that does not declare its ``in_shape`` (a
        plain module) is run on the payload at its cut instead."""
        shape = per_sample_shape(input_shape)
        first = next(self.parameters(), None)
        x = torch.zeros(1, *shape, dtype=getattr(torch, self._input_dtype),
                        device=None if first is None else first.device)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        classes: list[int | None] = []
        try:
            with torch.no_grad():
                payload: Payload = x
                previous = None
                e = 0
                for k, stage in enumerate(self.backbone.stages):
                    try:
                        payload = stage(payload)
                    except InputError:
                        raise
                    except Exception as exc:
                        raise InputError(
                            f"the backbone fails at stage {k} on an input of shape {shape} "
                            f"({type(exc).__name__}: {exc}); give the per-sample shape the "
                            "model takes") from exc
                    while e < len(self.heads) and self.exit_stages[e] == k:
                        count, previous = self._probe_head(e, payload, previous, shape)
                        classes.append(count)
                        e += 1
        finally:
            for m, mode in modes:
                m.training = mode
        final = payload_tensors(payload)[0]
        if self.dense:
            self._check_dense(final, shape)
        elif final.dim() != 2:
            raise InputError(f"the backbone's output has shape {tuple(final.shape)} for an input "
                             f"of shape {shape}; a multi-exit model ends in logits (N, classes)"
                             " (or pass dense=True for a per-pixel output)")
        for e, count in enumerate(classes):
            if count is not None and count != final.shape[1]:
                raise InputError(
                    f"the exit head at cut {self.head_cuts[e]!r} gives {count} classes, but the "
                    f"final exit gives {final.shape[1]}; build every head for the model's "
                    "number of classes")

    def _check_dense(self, final: torch.Tensor, shape) -> None:
        """A dense model ends in per-pixel logits and every head gives that map (its
        ``out_shape``)."""
        if final.dim() < 3:
            raise InputError(f"dense=True, but the backbone's output has shape "
                             f"{tuple(final.shape)} for an input of shape {shape}; a dense model "
                             "ends in per-pixel logits (N, classes, H, W)")
        want = tuple(final.shape[1:])
        for cut, head in zip(self.head_cuts, self.heads):
            got = getattr(head, "out_shape", None)
            if got is None or tuple(got) != want:
                gives = "one logit row per sample" if got is None else tuple(got)
                raise InputError(
                    f"the exit head at cut {cut!r} gives {gives}, but the final exit gives "
                    f"per-pixel logits {want}; attach dense heads "
                    "(splitexit.segmentation.create_dense_head) built for that output")

    def _probe_head(self, e: int, payload: Payload, previous, shape
                    ) -> tuple[int | None, torch.Tensor | None]:
        """The class count of head ``e`` and its logits (``None`` when it was not run)."""
        cut, head = self.head_cuts[e], self.heads[e]
        features = self._features(e, payload)
        got = tuple(features.shape[1:])
        want = getattr(head, "in_shape", None)
        if want is not None:  # a head that says what it takes is not run (it may need fitting)
            if tuple(want) != got:
                raise InputError(
                    f"the exit head at cut {cut!r} was built for inputs of shape "
                    f"{tuple(want)}, but the payload at that cut has shape {got} (for model "
                    f"inputs of shape {shape}); build it with create_head(kind, {got}, "
                    "num_classes) (backbone.payload_shapes(example) gives the shape at every "
                    "cut)")
            return getattr(head, "num_classes", None), None
        try:
            logits = self.run_head(e, payload, previous)
        except Exception as exc:
            raise InputError(f"the exit head at cut {cut!r} fails on the payload there, of "
                             f"shape {got} ({type(exc).__name__}: {exc}); build the head for "
                             "that shape") from exc
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise InputError(f"the exit head at cut {cut!r} returns "
                             f"{getattr(logits, 'shape', type(logits).__name__)}; a head "
                             "returns logits of shape (N, classes)")
        return int(logits.shape[1]), logits

    def _check(self, x) -> None:
        """The input check of every entry point (type, dtype, shape, finite); the first batch
        fixes the input shape of a model built without one."""
        if not isinstance(x, torch.Tensor):
            hint = ("torch.from_numpy(x)" if type(x).__module__ == "numpy"
                    else "torch.as_tensor(x, dtype=torch.float32)")
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}; convert "
                             f"with {hint} (or run the model's bundle on ONNX Runtime, which "
                             "takes numpy)")
        check_batch(x, self.input_shape, self._input_dtype)
        if self.input_shape is None:
            shape = per_sample_shape(x.shape[1:], "the input's per-sample shape")
            self.check_fits(shape)
            self.input_shape = shape

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
        kept = MultiExitModel(self.backbone, {self.head_cuts[e]: self.heads[e] for e in exits},
                              dense=self.dense)
        kept.input_shape = self.input_shape  # its heads fit: no need to check them again
        described = self.config()
        if described:  # rebuilt as: the full model, then these heads kept
            before = described.pop("keep_exits", None)
            described["keep_exits"] = [before[e] for e in exits] if before else exits
            kept.spec = described
        return kept.train(self.training)

    def config(self) -> dict:
        """How to rebuild this model (JSON; what a checkpoint stores): the zoo model or your
        model's cuts, heads, classes and input shape, plus what was done to it since
        (``keep_exits``; a gate and T-RECX add theirs). ``{}`` for a model assembled by hand:
        rebuild it yourself, then :func:`splitexit.checkpoint.load_weights`."""
        import copy

        return copy.deepcopy(getattr(self, "spec", None) or {})

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    @property
    def exit_names(self) -> list[str]:
        return [*self.head_cuts, "final"]

    def _features(self, e: int, payload: Payload) -> torch.Tensor:
        if isinstance(payload, tuple):
            if len(payload) == 1 or "@" in self.head_cuts[e]:
                return payload[self.head_tensors[e]]
            raise InputError(
                f"the cut {self.head_cuts[e]!r} carries {len(payload)} tensors (it lies inside "
                "a block); attach the head after a whole block, or name the tensor that feeds "
                f"it as '{self.head_cuts[e]}@<index>' (0..{len(payload) - 1})")
        return payload

    def run_head(self, e: int, payload: Payload, previous: torch.Tensor | None) -> torch.Tensor:
        head = self.heads[e]
        features = self._features(e, payload)
        if getattr(head, "uses_previous", False):
            return head(features, None if previous is None else previous.detach())
        return head(features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, in order (the last is the backbone's own output).

        Raises:
            InputError: wrong type, dtype, shape, or non-finite input.
        """
        if not_traced():
            self._check(x)
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
            InputError: wrong type, dtype, shape, or non-finite input; a policy that is not
                an exit policy or does not fit this model's exits.
        """
        self._check(x)
        return infer_exits(self.step, self.exit_stages, policy, self.backbone.num_stages, x)

    @torch.no_grad()
    def simulate(self, logits: Sequence[torch.Tensor], policy: ExitPolicy) -> ExitResult:
        """Replay ``policy`` offline over every exit's logits (as returned by ``forward``).

        Raises:
            InputError: not one ``(N, C)`` tensor per exit, non-finite logits, or a policy
                that does not fit this model's exits.
        """
        check_logits(logits)
        if len(logits) != self.num_exits:
            raise InputError(f"expected logits of {self.num_exits} exits, got {len(logits)}")
        return simulate_exits(logits, policy)

    @torch.no_grad()
    def collect_logits(self, x: torch.Tensor, batch_size: int = 512) -> list[torch.Tensor]:
        """Every exit's logits over a data set, in batches (eval mode).

        Raises:
            InputError: wrong type, dtype, shape, or non-finite input.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._check(x)
        was_training = self.training
        self.eval()
        chunks = [self(x[i: i + batch_size]) for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return [torch.cat([c[e] for c in chunks]) for e in range(self.num_exits)]


class FirstCascadeHead(nn.Module):
    """A cascading head at the first exit, which has no previous logits to take."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features, None)


class Piece(nn.Module):
    """Stages of a backbone and the exit head at their end as one module: tensors in,
    ``(*payload, logits)`` out (the payload alone without a head).

    The unit of an exit program (:mod:`splitexit.program`): exported to ONNX, traced to
    TorchScript, run by every runtime. One call per exit instead of one per stage and head,
    which matters at batch 1. When ``takes_previous`` the last input is the previous exit's
    logits (cascading heads). ``head_tensor`` picks the payload tensor that feeds the head at
    a cut that carries several.
    """

    def __init__(self, stages: Sequence[nn.Module] | nn.Module, head: nn.Module | None,
                 num_inputs: int, takes_previous: bool = False, head_tensor: int = 0):
        super().__init__()
        stages = [stages] if isinstance(stages, nn.Module) else list(stages)
        self.stages = nn.ModuleList(stages)
        self._calls = stages
        self.head = head
        self.num_inputs, self.takes_previous = num_inputs, takes_previous
        self.head_tensor = head_tensor

    @classmethod
    def of(cls, model: MultiExitModel, start: int, end: int, e: int | None,
           has_previous: bool) -> Piece:
        """Stages ``start..end`` of ``model`` with exit head ``e`` (``None``: no head)."""
        stages = list(model.backbone.stages)[start: end + 1]
        num_inputs = getattr(stages[0], "num_inputs", 1)
        if e is None:
            return cls(stages, None, num_inputs)
        head = model.heads[e]
        index = model.head_tensors[e]
        uses_previous = bool(getattr(head, "uses_previous", False))
        if uses_previous and not has_previous:
            return cls(stages, FirstCascadeHead(head), num_inputs, head_tensor=index)
        return cls(stages, head, num_inputs, takes_previous=uses_previous, head_tensor=index)

    def forward(self, *tensors: torch.Tensor):
        inputs = tensors[: self.num_inputs]
        out = inputs[0] if self.num_inputs == 1 else tuple(inputs)
        for stage in self._calls:
            out = stage(out)
        outs = payload_tensors(out)
        if self.head is None:
            return outs
        features = outs[self.head_tensor]
        logits = self.head(features, tensors[-1]) if self.takes_previous else self.head(features)
        return (*outs, logits)
