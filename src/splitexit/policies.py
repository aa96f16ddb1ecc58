"""Exit policies: per-sample decision rules, with per-sample state, shared by real and offline runs.

A policy sees one exit's logits for the samples still in the batch and returns which of them
leave now and the logits their prediction comes from. Its state is a dict of tensors whose
first dimension is the batch; the runtime filters that state with the same index it uses to
shrink the batch, so :meth:`MultiExitModel.infer` and :meth:`MultiExitModel.simulate` agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from .errors import InputError
from .registry import Registry
from .runtime.arrays import TORCH, ops_of
from .runtime.loop import check_logits, check_policy

__all__ = ["POLICIES", "ExitPolicy", "MaxProb", "Entropy", "Margin", "Patience", "NeverExit", "FixedExit",
           "make_policy", "register_policy", "fit_temperature", "GeometricEnsemble",
           "AdditiveEnsemble", "GatedMaxProb", "fit_ensemble_weights", "ensemble_logits", "leave_at",
           "maxprob_statistic", "entropy_statistic", "margin_statistic", "Gated"]

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

    def statistic(self, logits):
        """The per-sample statistic compared with the threshold (float32)."""
        if type(self).statistic_fn is None:
            raise NotImplementedError(f"{type(self).__name__} defines no statistic_fn")
        ops = ops_of(logits)
        return type(self).statistic_fn(ops, ops.float32(logits))

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

    What a sample that leaves there costs under ``policy`` on any runtime: a plain threshold
    policy gets thresholds it cannot reach before that exit (and a temperature that flattens
    the softmax to uniform there, so a maximum probability of exactly 1 cannot fire) and one
    it always reaches at it; ``exit_index = num_exits - 1`` never fires (the no-exit overhead).
    Any other policy becomes :class:`FixedExit`, which skips the decisions.
    """
    if not 0 <= exit_index < num_exits:
        raise InputError(f"exit_index must lie in 0..{num_exits - 1}, got {exit_index}")
    if not is_plain_threshold(policy):
        return FixedExit(exit_index)
    lo, hi = policy.valid_range
    never, always = (hi, lo) if policy.higher_is_confident else (lo, hi)
    heads = num_exits - 1
    thresholds = tuple(never if e < exit_index else always for e in range(max(1, heads)))
    temperatures = tuple(1e9 if e < exit_index else 1.0 for e in range(max(1, heads)))
    return replace(policy, threshold=thresholds, temperature=temperatures)


@dataclass(frozen=True)
class GeometricEnsemble(MaxProb):
    """ZTW's geometric ensemble: exit on a weighted product of the softmax of every head so far.

    At exit ``k`` the decision logits are ``sum_{j<=k} w[k][j] * log_softmax(z_j) + b[k]`` (a
    weighted geometric mean of the heads' distributions, up to normalisation). As in ZTW, every
    exit ``k`` has its own weights over the heads up to it and its own per-class bias, fitted
    with :func:`fit_ensemble_weights`. The heads' log-probabilities seen so far are carried per
    sample in the policy state and shrink with the batch. The sample exits when the ensemble's
    top probability reaches ``threshold``. Unfitted (empty ``weights``), every head weighs 1.

    Attributes:
        weights: per exit ``k``, the ``k + 1`` weights of exits ``0..k``.
        biases: per exit, one per-class bias vector (empty means zeros).
    """

    weights: tuple[tuple[float, ...], ...] = ()
    biases: tuple[tuple[float, ...], ...] = ()
    name = "geometric-ensemble"
    combine = "log_softmax"

    def __post_init__(self):
        super().__post_init__()
        for field_name in ("weights", "biases"):
            value = getattr(self, field_name)
            rows = tuple(tuple(float(x) for x in v) for v in value)
            object.__setattr__(self, field_name, rows)
        for k, row in enumerate(self.weights):
            if len(row) != k + 1:
                raise InputError(f"ensemble weights of exit {k} need {k + 1} entries (exits "
                                 f"0..{k}), got {len(row)}")

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        for field_name in ("weights", "biases"):
            rows = getattr(self, field_name)
            if rows and len(rows) != num_exits:
                raise InputError(f"the ensemble has {field_name} for {len(rows)} exits but the "
                                 f"model has {num_exits}; fit it on this model's logits "
                                 "(fit_ensemble_weights)")

    def term(self, exit_index: int, logits):
        """One head's unweighted contribution (log-probabilities, or raw logits)."""
        ops = ops_of(logits)
        z = ops.float32(self.scaled(exit_index, logits))
        return ops.log_softmax(z) if self.combine == "log_softmax" else z

    def combine_terms(self, exit_index: int, terms):
        """Decision logits at ``exit_index`` from the terms ``(N, exit_index + 1, C)``."""
        if not self.weights:
            out = terms.sum(1)
        elif exit_index >= len(self.weights):
            raise InputError(f"the ensemble has weights for {len(self.weights)} exits but the "
                             f"model has more; fit it on this model's logits")
        else:
            w = ops_of(terms).constant(self.weights[exit_index], terms)
            out = (terms * w[None, :, None]).sum(1)
        if exit_index < len(self.biases):
            out = out + ops_of(out).constant(self.biases[exit_index], out)
        return out

    def init_state(self, n, num_classes, ops=TORCH):
        return {"terms": ops.zeros((n, max(1, len(self.weights)), num_classes))}

    def decide(self, exit_index, logits, state):
        term = self.term(exit_index, logits)
        if self.weights:
            if exit_index >= len(self.weights):
                raise InputError(f"the ensemble has weights for {len(self.weights)} exits but "
                                 "the model has more; fit it on this model's logits")
            state["terms"][:, exit_index] = term
            decision = self.combine_terms(exit_index, state["terms"][:, : exit_index + 1])
        else:  # unweighted: a running sum is all that is needed
            state["terms"][:, 0] += term
            decision = self.combine_terms(exit_index, state["terms"][:, :1])
        return self.statistic(decision) >= _per_exit(self.threshold, exit_index), decision


@dataclass(frozen=True)
class AdditiveEnsemble(GeometricEnsemble):
    """BoostNet's additive model: the decision logits at exit ``k`` are the sum of raw logits
    of every exit so far (each head was trained as a correction of the ones before it)."""

    name = "additive-ensemble"
    combine = "logits"


def ensemble_logits(policy: GeometricEnsemble, logits: Sequence) -> list:
    """The decision logits ``policy`` forms at every exit for whole (offline) logit lists."""
    terms = ops_of(logits[0]).stack([policy.term(e, lg) for e, lg in enumerate(logits)], 1)
    return [policy.combine_terms(e, terms[:, : e + 1]) for e in range(len(logits))]


def fit_ensemble_weights(logits: Sequence, labels,
                         steps: int = 300, lr: float = 0.05,
                         policy: GeometricEnsemble | None = None) -> GeometricEnsemble:
    """Fit ZTW's ensembles: for every exit ``k`` separately, the weights of heads ``0..k`` and a
    per-class bias minimising the NLL of that exit's ensemble.

    Args:
        logits: per-exit logits of the *training* split (backbone and heads frozen).
        labels: their classes.
        policy: the policy to fill in (a :class:`GeometricEnsemble` by default).

    Returns:
        ``policy`` with fitted ``weights`` and ``biases``.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    if len(logits) < 2:
        raise InputError("an ensemble needs at least two exits' logits")
    if any(lg.shape != logits[0].shape for lg in logits) or len(labels) != len(logits[0]):
        raise InputError("every exit's logits must be (N, C) for the same N labels")
    check_logits(logits, labels)
    policy = policy or GeometricEnsemble()
    terms = torch.stack([policy.term(e, lg.detach()) for e, lg in enumerate(logits)], dim=1)
    c = terms.shape[2]
    weights, biases = [], []
    for k in range(len(logits)):
        # start from "this head alone": the ensemble can only add what earlier heads know
        log_w = torch.full((k + 1,), -4.0)
        log_w[k] = 0.0
        log_w.requires_grad_(True)
        bias = torch.zeros(c, requires_grad=True)
        opt = torch.optim.Adam([log_w, bias], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            out = (terms[:, : k + 1] * log_w.exp()[None, :, None]).sum(1) + bias
            F.cross_entropy(out, labels).backward()
            opt.step()
        weights.append(tuple(float(w) for w in log_w.detach().exp()))
        biases.append(tuple(float(b) for b in bias.detach()))
    return replace(policy, weights=tuple(weights), biases=tuple(biases))


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
            inner = make_policy(inner)
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


#: policy classes by their ``name``
POLICIES: Registry[type[ExitPolicy]] = Registry("policy")
for _cls in (MaxProb, Entropy, Margin, Patience, NeverExit, FixedExit, GeometricEnsemble,
             AdditiveEnsemble, GatedMaxProb, Gated):
    POLICIES.add(_cls.name, _cls)
_POLICY_FIELDS = {"maxprob": "threshold", "entropy": "threshold", "margin": "threshold",
                  "patience": "patience", "fixed": "exit_index"}


def register_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Add a policy class to the registry :func:`make_policy` and checkpoints use."""
    return POLICIES.add(cls.name, cls)


def make_policy(config: dict | str, **kwargs) -> ExitPolicy:
    """Build a policy from ``{"name": ..., **fields}`` or ``"maxprob"`` plus keyword fields."""
    cfg = {"name": config} if isinstance(config, str) else dict(config)
    cfg.update(kwargs)
    name = cfg.pop("name")
    cls = POLICIES.get(name)
    for k, v in list(cfg.items()):
        if isinstance(v, list):
            cfg[k] = tuple(v)
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise InputError(f"bad fields for policy {name!r}: {exc}") from exc


def fit_temperature(logits, labels, steps: int = 200) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising NLL of ``logits / T``.

    Fit on the calibration split, one exit at a time.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    check_logits([logits], labels)
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)
    logits = logits.detach().float()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))

