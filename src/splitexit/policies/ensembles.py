"""Ensembles of the exits so far (ZTW's geometric ensemble, BoostNet's additive one), their
weight fitting, and temperature scaling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..errors import InputError
from ..runtime.arrays import TORCH, ops_of
from ..runtime.loop import check_logits
from .base import (
    MaxProb,
    _per_exit,
)


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
