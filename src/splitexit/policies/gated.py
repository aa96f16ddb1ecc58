"""Gated policies: only enabled exits fire (online caching); a gate in front of the exits
(exit 0 is the gate, the inner policy decides the rest)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..runtime.arrays import TORCH, ops_of
from ..runtime.loop import check_policy
from .base import (
    ExitPolicy,
    MaxProb,
    State,
    _check_length,
    _check_numbers,
)


@dataclass(frozen=True)
class GatedMaxProb(MaxProb):
    """MaxProb where only the ``enabled`` exits may fire (online caching switches exits on)."""

    enabled: tuple[bool, ...] = ()
    name = "gated-maxprob"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.enabled, list):
            object.__setattr__(self, "enabled", tuple(bool(v) for v in self.enabled))

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        _check_length(self.name, "enabled", self.enabled, num_exits, allow_empty=True)

    def decide(self, exit_index, logits, state):
        fire, decision = super().decide(exit_index, logits, state)
        if exit_index >= len(self.enabled) or not self.enabled[exit_index]:
            fire = ops_of(fire).zeros_like(fire)
        return fire, decision


@dataclass(frozen=True)
class Gated(ExitPolicy):
    """An exit gate's routing as an exit policy (a gated model lowered to an exit program).

    Exit 0 is the gate: its "logits" are the gate's one logit per sample, and it never
    answers; a sample whose ``sigmoid(logit)`` reaches ``gate_threshold`` is hard and runs to
    the final exit without leaving early. Every other sample follows ``inner`` at the later
    exits (exit ``e`` here is the gated model's exit ``e - 1``). A threshold of 1 never gates.
    """

    inner: ExitPolicy | dict = field(default_factory=lambda: MaxProb())
    gate_threshold: float = 0.5
    name = "gated"

    def __post_init__(self):
        inner = self.inner
        if isinstance(inner, dict):
            from . import create_policy  # the registry holds every policy class

            inner = create_policy(inner)
        if not isinstance(inner, ExitPolicy):
            raise InputError(f"gated: inner must be a policy or its config, got {inner!r}")
        object.__setattr__(self, "inner", inner)
        _check_numbers(self.name, "gate_threshold", self.gate_threshold)
        if not 0.0 <= float(self.gate_threshold) <= 1.0:
            raise InputError(f"gate_threshold is a probability in [0, 1], got "
                             f"{self.gate_threshold}")

    def check_exits(self, num_exits: int) -> None:
        if num_exits < 2:
            raise InputError("a gated policy needs the gate (exit 0) and at least the final exit")
        check_policy(self.inner, num_exits - 1)  # the gate is exit 0; inner sees the rest

    def config(self) -> dict:
        return {"name": self.name, "inner": self.inner.config(),
                "gate_threshold": float(self.gate_threshold)}

    def init_state(self, n, num_classes, ops=TORCH):
        return {"gate.hard": ops.full_bool(n, False)}

    @staticmethod
    def _inner_state(state: State) -> State:
        return {k[len("inner."):]: v for k, v in state.items() if k.startswith("inner.")}

    def _with_inner(self, state: State, logits) -> State:
        inner = self._inner_state(state)
        if not inner:
            ops = ops_of(logits)
            n, c = logits.shape
            created = (self.inner.init_state(n, c) if ops.name == "torch"
                       else self.inner.init_state(n, c, ops=ops))
            for k, v in created.items():
                state["inner." + k] = v
            inner = created
        return inner

    def _store(self, state: State, inner: State) -> None:
        for k, v in inner.items():
            state["inner." + k] = v

    def decide(self, exit_index, logits, state):
        ops = ops_of(logits)
        if exit_index == 0:  # the gate
            if self.gate_threshold >= 1.0:
                hard = ops.full_bool(logits.shape[0], False)
            else:
                probability = ops.sigmoid(logits[:, 0])
                hard = probability >= self.gate_threshold
            state["gate.hard"] = hard
            return ops.full_bool(logits.shape[0], False), logits
        inner = self._with_inner(state, logits)
        fire, decision = self.inner.decide(exit_index - 1, logits, inner)
        self._store(state, inner)
        return fire & ~state["gate.hard"], decision

    def final_decision(self, exit_index, logits, state):
        inner = self._with_inner(state, logits)
        decision = self.inner.final_decision(exit_index - 1, logits, inner)
        self._store(state, inner)
        return decision
