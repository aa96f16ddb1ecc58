"""Online layer caching: exits learned from a frozen model's own predictions on live traffic.

For a pretrained model without training data, the exit heads ("caches") start untrained and
switched off. A random fraction of each incoming batch (the probes) also runs the whole model;
the model's own final prediction is the label every cache learns from. Before each update the
probes score the caches (test-then-train), and a cache is switched on once, over a window of
recent probes, its confident predictions agree with the model's output often enough; it is
switched off again if that agreement falls. Served traffic uses the real per-sample path
(:meth:`MultiExitModel.infer`) with only the switched-on caches allowed to fire.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cost import cost_table
from ..errors import InputError
from ..multiexit import ExitResult, MultiExitModel, check_input
from ..policies import GatedMaxProb, MaxProb

__all__ = ["OnlineCache", "OnlineStats"]


@dataclass
class OnlineStats:
    """What the cache has seen and done so far.

    Attributes:
        samples: samples served.
        probes: samples also run through the whole model (the learning signal).
        served_agreement: fraction of probed samples whose *served* prediction equals the
            model's own final prediction (cumulative).
        exit_counts: samples served at each exit.
        served_macs: MACs spent serving (exits as taken); ``probe_macs``: extra MACs of probes.
        history: one entry per batch (samples so far, enabled exits, agreement in the window,
            mean MACs per served sample in the batch).
    """

    samples: int = 0
    probes: int = 0
    agreed: int = 0
    exit_counts: list[int] = field(default_factory=list)
    served_macs: float = 0.0
    probe_macs: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def served_agreement(self) -> float:
        return self.agreed / self.probes if self.probes else float("nan")

    def to_dict(self) -> dict:
        return {"samples": self.samples, "probes": self.probes,
                "served_agreement": self.served_agreement, "exit_counts": self.exit_counts,
                "mean_served_macs": self.served_macs / max(1, self.samples),
                "mean_macs_with_probes": (self.served_macs + self.probe_macs)
                / max(1, self.samples), "history": self.history}


class OnlineCache:
    """Learn and switch on exit caches of a frozen model from its own predictions on traffic.

    Args:
        model: a pretrained :class:`MultiExitModel`; its backbone is frozen here, its heads are
            the caches (untrained heads are fine).
        threshold: top-probability a cache needs to answer a sample.
        probe_fraction: share of each batch also run through the whole model to learn from.
        target_agreement: agreement with the model's output (over the window's confident
            probes) needed to switch a cache on.
        window: probes remembered per cache for that agreement.
        min_confident: confident probes needed in the window before a cache may switch on.
        lr: Adam learning rate of the caches.
        seed: seed of the probe selection.

    Example:
        >>> cache = OnlineCache(model)
        >>> for batch in traffic:
        ...     result = cache.process(batch)   # served predictions, exits really taken
        >>> cache.stats.served_agreement
    """

    def __init__(self, model: MultiExitModel, threshold: float = 0.9,
                 probe_fraction: float = 0.25, target_agreement: float = 0.99,
                 window: int = 300, min_confident: int = 100, lr: float = 2e-3, seed: int = 0):
        if not isinstance(model, MultiExitModel) or len(model.heads) == 0:
            raise InputError("online caching needs a MultiExitModel with exit heads (the "
                             "caches); build one with splitexit.create_multiexit")
        if not 0 < probe_fraction <= 1:
            raise InputError(f"probe_fraction must lie in (0, 1], got {probe_fraction}")
        if not 0 < target_agreement <= 1 or window < 1 or not 1 <= min_confident <= window:
            raise InputError("need 0 < target_agreement <= 1 and 1 <= min_confident <= window")
        heads = [p for p in model.heads.parameters()]
        if heads and not any(p.requires_grad for p in heads):
            raise InputError("the caches (exit heads) are frozen; unfreeze them with "
                             "model.heads.requires_grad_(True)")
        self.model = model.eval()
        model.backbone.requires_grad_(False)
        self.threshold = float(threshold)
        self.probe_fraction = float(probe_fraction)
        self.target_agreement = float(target_agreement)
        self.min_confident = int(min_confident)
        self.enabled = [False] * len(model.heads)
        self._windows = [deque(maxlen=window) for _ in model.heads]
        self._served_window: deque = deque(maxlen=window)
        self._opt = torch.optim.Adam(model.heads.parameters(), lr=lr)
        self._gen = torch.Generator().manual_seed(seed)
        self._exit_macs: list[float] | None = None
        self.stats = OnlineStats(exit_counts=[0] * model.num_exits)

    @property
    def policy(self) -> GatedMaxProb:
        """The serving policy: only switched-on caches may answer."""
        return GatedMaxProb(threshold=self.threshold, enabled=tuple(self.enabled))

    def window_agreement(self) -> list[float]:
        """Per cache: agreement with the model's output over its window's confident probes."""
        out = []
        for w in self._windows:
            confident = [agree for conf, agree in w if conf]
            out.append(sum(confident) / len(confident) if confident else float("nan"))
        return out

    def process(self, x: torch.Tensor) -> ExitResult:
        """Serve a batch with the caches switched on so far, then learn from its probes."""
        check_input(x, self.model.input_shape)
        if self._exit_macs is None:
            self._exit_macs = cost_table(self.model, x[:1], measure=False).exit_macs
        result = self.model.infer(x, self.policy)
        probe = (torch.rand(len(x), generator=self._gen) < self.probe_fraction).nonzero().flatten()
        macs = torch.tensor(self._exit_macs, dtype=torch.float64)
        self.stats.samples += len(x)
        self.stats.served_macs += float(macs[result.exit_index].sum())
        for e, c in enumerate(torch.bincount(result.exit_index,
                                             minlength=self.model.num_exits).tolist()):
            self.stats.exit_counts[e] += c
        if len(probe):
            self._learn(x[probe], result.predictions[probe])
            self.stats.probe_macs += len(probe) * self._exit_macs[-1]
        self.stats.history.append({
            "samples": self.stats.samples, "enabled": list(self.enabled),
            "served_agreement_window": (sum(self._served_window) / len(self._served_window)
                                        if self._served_window else float("nan")),
            "mean_macs": float(macs[result.exit_index].mean())})
        return result

    def _learn(self, x: torch.Tensor, served: torch.Tensor) -> None:
        model = self.model
        features = []
        with torch.no_grad():
            payload = x
            e = 0
            for k, stage in enumerate(model.backbone.stages):
                payload = stage(payload)
                while e < len(model.heads) and model.exit_stages[e] == k:
                    features.append(payload)
                    e += 1
            target = payload.argmax(1) if isinstance(payload, torch.Tensor) else \
                payload[0].argmax(1)
        outs, previous = [], None
        for e, feat in enumerate(features):
            previous = model.run_head(e, feat, previous)
            outs.append(previous)
        # score first (these probes are unseen by the caches), then train on them
        with torch.no_grad():
            for e, logits in enumerate(outs):
                conf, pred = MaxProb().statistic(logits), logits.argmax(1)
                self._windows[e].extend(zip((conf >= self.threshold).tolist(),
                                            (pred == target).tolist()))
            agree = (served == target)
            self._served_window.extend(agree.tolist())
            self.stats.agreed += int(agree.sum())
            self.stats.probes += len(target)
        loss = sum(F.cross_entropy(o, target) for o in outs) / len(outs)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        for e, (w, a) in enumerate(zip(self._windows, self.window_agreement())):
            confident = sum(conf for conf, _ in w)
            self.enabled[e] = confident >= self.min_confident and a >= self.target_agreement
