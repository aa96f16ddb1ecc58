"""The exit policy protocol, the threshold statistics (each defined once, over array ops) and
the plain policies: max-prob, entropy, margin, patience, never, fixed; ``leave_at``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from ..errors import InputError
from ..runtime.arrays import TORCH, ops_of

# Policies run on torch tensors and on numpy arrays alike: every array operation goes through
# the ops of splitexit.runtime.arrays (picked from the logits), so this module imports no torch
# and the edge runs the very same policy code. State is a dict of arrays, batch first.
State = dict


def maxprob_statistic(F, z):
    """Top softmax probability per row, in the primitives ``F`` (numpy, torch or ONNX)."""
    return F.amax(F.softmax(z))


def entropy_statistic(F, z):
    """Softmax entropy (nats) per row."""
    logp = F.log_softmax(z)
    return F.neg(F.sum(F.mul(F.exp(logp), logp)))


def margin_statistic(F, z):
    """Gap between the two top softmax probabilities per row."""
    first, second = F.top2(F.softmax(z))
    return F.sub(first, second)


def _per_exit(value: float | Sequence[float], exit_index: int) -> float:
    """Exit ``exit_index``'s value of a number or a per-exit tuple. A tuple of one value per
    head (no value for the final exit) gives its last value at the final exit; its length is
    checked against the model by :meth:`ExitPolicy.check_exits`."""
    if isinstance(value, (int, float)):
        return float(value)
    if exit_index >= len(value):
        return float(value[-1])
    return float(value[exit_index])


@dataclass(frozen=True)
class ExitPolicy:
    """Base policy. Subclasses implement :meth:`decide`.

    Attributes:
        temperature: logits are divided by it before scoring, one value or one per exit
            (fit it with :func:`fit_temperature` on the calibration split).
    """

    # keyword-only, so a subclass's own field (threshold, patience) is the first positional
    temperature: float | tuple[float, ...] = field(default=1.0, kw_only=True)

    name = "policy"
    #: the exit count this policy was last checked against (see :meth:`check_exits`)
    _fits_exits = None

    def check_exits(self, num_exits: int) -> None:
        """Raise :class:`InputError` unless this policy fits a model with ``num_exits`` exits
        (``num_exits - 1`` heads and the final exit): every per-exit value has one entry per
        head or one per exit. The runtimes call it (through
        :func:`splitexit.runtime.loop.check_policy`) where the policy meets the model."""
        _check_length(self.name, "temperature", self.temperature, num_exits)

    def init_state(self, n: int, num_classes: int, ops=TORCH) -> State:
        """Per-sample state for a batch of ``n``; every array's first dimension is ``n``.

        ``ops`` (:mod:`splitexit.runtime.arrays`) says which arrays: torch by default, numpy
        on runtimes without PyTorch."""
        return {}

    def decide(self, exit_index: int, logits, state: State) -> tuple:
        """Return ``(exit_now, decision_logits)`` and update ``state`` in place."""
        raise NotImplementedError

    def final_decision(self, exit_index: int, logits, state: State):
        """The decision logits at the final exit, where every remaining sample leaves (no
        test needed). Policies whose decision is the exit's own logits skip the statistic."""
        return self.decide(exit_index, logits, state)[1]

    def scaled(self, exit_index: int, logits):
        t = _per_exit(self.temperature, exit_index)
        return logits if t == 1.0 else logits / t

    def config(self) -> dict:
        cfg = asdict(self)
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in cfg.items()}}


def _check_numbers(policy: str, field_name: str, value) -> None:
    """A number, or a non-empty list of numbers (one per exit); else a clear error."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(value):
        return
    if isinstance(value, (list, tuple)) and value and all(number(v) for v in value):
        return
    raise InputError(f"{policy} {field_name} must be a number or a list of numbers (one per "
                     f"exit), got {value!r}")


def _check_length(policy: str, field_name: str, value, num_exits: int,
                  allow_empty: bool = False) -> None:
    """A per-exit tuple needs one value per head, or one per exit; a number fits any model."""
    if not isinstance(value, (tuple, list)) or (allow_empty and not value):
        return
    heads = num_exits - 1
    if len(value) in (heads, num_exits):
        return
    counts = f"{num_exits}" if heads == 0 else f"{heads} (one per head) or {num_exits}"
    raise InputError(
        f"{policy} {field_name} {tuple(value)} has {len(value)} value(s), but the model has "
        f"{num_exits} exit(s) ({heads} head(s) and the final exit); give one number for every "
        f"exit, or {counts} values. Values are never repeated to fill missing exits")


@dataclass(frozen=True)
class ThresholdPolicy(ExitPolicy):
    """A policy that compares a per-sample statistic with a threshold (one, or one per exit)."""

    threshold: float | tuple[float, ...] = 0.9
    higher_is_confident = True
    valid_range = (-math.inf, math.inf)

    def __post_init__(self):
        _check_numbers(self.name, "threshold", self.threshold)
        _check_numbers(self.name, "temperature", self.temperature)
        values = (self.threshold,) if isinstance(self.threshold, (int, float)) else self.threshold
        if isinstance(self.threshold, list):
            object.__setattr__(self, "threshold", tuple(self.threshold))
        if isinstance(self.temperature, list):
            object.__setattr__(self, "temperature", tuple(self.temperature))
        lo, hi = self.valid_range
        for v in values:
            if not (lo <= float(v) <= hi) or math.isnan(float(v)):
                raise InputError(f"{self.name} threshold {v} is out of range [{lo}, {hi}]")
        temps = ((self.temperature,) if isinstance(self.temperature, (int, float))
                 else self.temperature)
        if any(not t > 0 for t in temps):
            raise InputError(f"temperature must be > 0, got {self.temperature}")

    #: the statistic, written once over array primitives (see :func:`maxprob_statistic`)
    statistic_fn = None

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        _check_length(self.name, "threshold", self.threshold, num_exits)

    def statistic_over(self, F, z):
        """The per-sample statistic of float32 logits ``z``, in the array primitives ``F``
        (numpy, torch, or ONNX nodes: :class:`~splitexit.export.exit_graph.OnnxOps`): the
        one definition every runtime and the graph form share. Stateless statistics set
        ``statistic_fn``; those with parameters override this method."""
        if type(self).statistic_fn is None:
            raise NotImplementedError(f"{type(self).__name__} defines no statistic_fn")
        return type(self).statistic_fn(F, z)

    def statistic(self, logits):
        """The per-sample statistic compared with the threshold (float32)."""
        ops = ops_of(logits)
        return self.statistic_over(ops, ops.float32(logits))

    def decide(self, exit_index, logits, state):
        stat = self.statistic(self.scaled(exit_index, logits))
        t = _per_exit(self.threshold, exit_index)
        fire = stat >= t if self.higher_is_confident else stat <= t
        return fire, logits

    def final_decision(self, exit_index, logits, state):
        if type(self).decide is ThresholdPolicy.decide:  # decision = the logits themselves
            return logits
        return super().final_decision(exit_index, logits, state)  # e.g. ensembles, gates

    def with_threshold(self, threshold) -> ThresholdPolicy:
        return replace(self, threshold=threshold)


def is_plain_threshold(policy: ExitPolicy) -> bool:
    """Whether ``policy`` is exactly max-prob, entropy or margin: a stateless threshold test
    on the exit's own logits (no ensemble, gate or state), so it can be compiled into a graph."""
    return type(policy) in (MaxProb, Entropy, Margin)


@dataclass(frozen=True)
class MaxProb(ThresholdPolicy):
    """Exit when the top softmax probability is at least ``threshold`` (SDN, ZTW)."""

    threshold: float | tuple[float, ...] = 0.9
    name = "maxprob"
    valid_range = (0.0, 1.0)
    statistic_fn = staticmethod(maxprob_statistic)


@dataclass(frozen=True)
class Entropy(ThresholdPolicy):
    """Exit when the softmax entropy (nats) is at most ``threshold`` (BranchyNet)."""

    threshold: float | tuple[float, ...] = 0.1
    name = "entropy"
    higher_is_confident = False
    valid_range = (0.0, math.inf)
    statistic_fn = staticmethod(entropy_statistic)


@dataclass(frozen=True)
class Margin(ThresholdPolicy):
    """Exit when the gap between the two top probabilities is at least ``threshold``."""

    threshold: float | tuple[float, ...] = 0.5
    name = "margin"
    valid_range = (0.0, 1.0)
    statistic_fn = staticmethod(margin_statistic)


@dataclass(frozen=True)
class Patience(ExitPolicy):
    """PABEE: exit once ``patience`` consecutive earlier exits agreed with this one."""

    patience: int = 2
    name = "patience"

    def __post_init__(self):
        if int(self.patience) != self.patience or self.patience < 1:
            raise InputError(f"patience must be an integer >= 1, got {self.patience}")

    def init_state(self, n, num_classes, ops=TORCH):
        return {"last": ops.full_long(n, -1), "count": ops.zeros_long(n)}

    def decide(self, exit_index, logits, state):
        ops = ops_of(logits)
        pred = logits.argmax(1)
        same = pred == state["last"]
        state["count"] = ops.where(same, state["count"] + 1, ops.zeros_like(state["count"]))
        state["last"] = pred
        return state["count"] >= self.patience, logits


@dataclass(frozen=True)
class NeverExit(ExitPolicy):
    """Every sample runs to the final exit (the no-exit overhead reference)."""

    name = "never"

    def decide(self, exit_index, logits, state):
        return ops_of(logits).full_bool(logits.shape[0], False), logits


@dataclass(frozen=True)
class FixedExit(ExitPolicy):
    """Every sample leaves at exit ``exit_index`` (anytime evaluation: stop at exit k)."""

    exit_index: int = 0
    name = "fixed"

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        if not 0 <= self.exit_index < num_exits:
            raise InputError(f"FixedExit(exit_index={self.exit_index}) on a model with "
                             f"{num_exits} exits; use an exit index in 0..{num_exits - 1}")

    def decide(self, exit_index, logits, state):
        fire = ops_of(logits).full_bool(logits.shape[0], exit_index >= self.exit_index)
        return fire, logits


def leave_at(policy: ExitPolicy, exit_index: int, num_exits: int) -> ExitPolicy:
    """``policy`` with every decision still computed, forced to leave at ``exit_index``.

    What a sample that leaves there costs under ``policy`` on any runtime: a threshold policy
    with a graph form (max-prob, entropy, margin, and the dense meanconf and pixelshare) gets
    thresholds it cannot reach before that exit (and a temperature that flattens the softmax
    to uniform there, so a maximum probability of exactly 1 cannot fire, nor can a pixel
    reach a pixelshare ``pixel_threshold`` above ``1 / classes``) and one it always reaches
    at it; ``exit_index = num_exits - 1`` never fires (the no-exit overhead). Any other policy
    becomes :class:`FixedExit`, which skips the decisions.
    """
    if not 0 <= exit_index < num_exits:
        raise InputError(f"exit_index must lie in 0..{num_exits - 1}, got {exit_index}")
    from . import has_graph_statistic  # the dense policies' module imports this one

    if not has_graph_statistic(policy):
        return FixedExit(exit_index)
    lo, hi = policy.valid_range
    never, always = (hi, lo) if policy.higher_is_confident else (lo, hi)
    heads = num_exits - 1
    thresholds = tuple(never if e < exit_index else always for e in range(max(1, heads)))
    temperatures = tuple(1e9 if e < exit_index else 1.0 for e in range(max(1, heads)))
    return replace(policy, threshold=thresholds, temperature=temperatures)
