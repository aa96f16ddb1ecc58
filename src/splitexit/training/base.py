"""The training loop and the strategy contract every multi-exit training method follows.

A strategy is a small object: it prepares the model (freezing what it must not train), names
the parameters to optimise, and computes the loss of one batch from every exit's logits.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError

__all__ = ["Strategy", "TrainConfig", "TrainHistory", "train", "seed_everything", "evaluate_exits",
           "as_split", "model_classes"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Strategy:
    """Base class of training strategies.

    Subclasses override :meth:`loss`, and :meth:`prepare` when they freeze parts or need the
    training data first (class means, QuickNets' sample selection).
    """

    name = "strategy"

    def prepare(self, model: nn.Module, data=None) -> None:
        """Check the model fits the strategy and freeze what it does not train."""

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise InputError(f"strategy {self.name!r} has no trainable parameters in this model "
                             "(everything is frozen); unfreeze with p.requires_grad_(True)")
        return params

    def on_epoch_start(self, model: nn.Module, epoch: int, num_epochs: int) -> None:
        """Hook for schedules (SDN's weight ramp, ...)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items()
                                      if not k.startswith("_")}}


def as_split(data, what: str = "data"):
    """``data`` as a split with ``.x``, ``.y`` and ``.loader``: a split as it is, an ``(x, y)``
    pair of tensors as a :class:`~splitexit.data.Split` (checked there); else a clear error."""
    if hasattr(data, "loader") and hasattr(data, "x") and hasattr(data, "y"):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        from ..data import Split

        return Split(*data)
    raise InputError(f"{what} must be a data split (e.g. load_dataset('digits').train) or an "
                     f"(x, y) pair of tensors (x float32 (N, ...), y int64 labels (N,)), got "
                     f"{type(data).__name__}")


def model_classes(model: nn.Module) -> int | None:
    """The number of classes a model was built for, when it says (its spec or its heads)."""
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and isinstance(spec.get("num_classes"), int):
        return spec["num_classes"]
    counts = {h.num_classes for h in getattr(model, "heads", ()) if hasattr(h, "num_classes")}
    return counts.pop() if len(counts) == 1 else None


@dataclass
class TrainConfig:
    """Optimiser settings: Adam with cosine decay, like most of the papers' small-model runs."""

    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    progress: bool | None = None  # None: show bars when stderr is a terminal


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train(model: nn.Module, data, strategy: Strategy, config: TrainConfig | None = None,
          **overrides) -> TrainHistory:
    """Train ``model`` on ``data`` (a :class:`splitexit.data.Split`) with ``strategy``.

    Args:
        model: a :class:`MultiExitModel` (or a :class:`StagedModel` for the baseline).
        data: the training split (``.x``, ``.y``, ``.loader(batch_size, shuffle, seed)``), or
            an ``(x, y)`` pair of tensors.
        strategy: how the exits are trained (see :mod:`splitexit.training`).
        config: optimiser settings; keyword ``overrides`` replace single fields.

    Returns:
        The per-epoch mean loss and the wall time.

    Raises:
        InputError: data that is not a split or an ``(x, y)`` pair, labels that are not class
            indices of the model, an unknown option, or a diverging loss.
    """
    import time

    from ..runtime.loop import check_labels

    if not isinstance(strategy, Strategy):
        raise InputError(f"strategy must be a training strategy such as JointWeighted() (see "
                         f"splitexit.training), got {type(strategy).__name__}")
    data = as_split(data)
    classes = model_classes(model)
    check_labels(data.y, classes, len(data.x), dense=getattr(model, "dense", False))
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise InputError(f"unknown training option(s) {', '.join(map(repr, unknown))}; the "
                         f"options are {', '.join(f.name for f in fields(TrainConfig))}")
    # a copy: the caller's config is never changed by the overrides
    config = replace(config or TrainConfig(), **overrides)
    if config.epochs < 0 or config.lr <= 0 or config.batch_size < 1:
        raise InputError("epochs must be >= 0, lr > 0 and batch_size >= 1")
    seed_everything(config.seed)
    strategy.prepare(model, data)
    params = strategy.parameters(model)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loader = data.loader(config.batch_size, shuffle=True, seed=config.seed)
    steps = max(1, config.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    # progress=None: a bar on a terminal, one line per epoch otherwise (a log file of a long
    # benchmark is never silent for long); False: nothing
    show = sys.stderr.isatty() if config.progress is None else config.progress
    lines = config.progress is None and not show
    history = TrainHistory()
    t0 = time.perf_counter()
    model.train()
    _keep_frozen_bn_eval(model)
    for epoch in range(config.epochs):
        strategy.on_epoch_start(model, epoch, config.epochs)
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"{strategy.name} {epoch + 1}/{config.epochs}", disable=not show,
                   leave=False)
        for x, y in bar:
            try:
                loss = strategy.loss(model, x, y)
            except IndexError as exc:  # cross-entropy's "Target 14 is out of bounds"
                raise InputError(f"a label does not fit the model's classes ({exc}); labels "
                                 f"must be class indices 0 .. C - 1 of the model's C outputs "
                                 f"(this data's labels span {int(data.y.min())} .. "
                                 f"{int(data.y.max())}); build the model for more classes or "
                                 "remap the labels") from exc
            if not torch.isfinite(loss):
                raise InputError(f"training diverged (loss {float(loss)}); lower the learning "
                                 f"rate (now {config.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        history.loss.append(total / max(1, count))
        if lines:
            print(f"{strategy.name} epoch {epoch + 1}/{config.epochs}: loss "
                  f"{history.loss[-1]:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
    model.eval()
    history.seconds = time.perf_counter() - t0
    return history


def _keep_frozen_bn_eval(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are frozen keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


@torch.no_grad()
def evaluate_exits(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 512) -> list[float]:
    """Accuracy of every exit when forced to stop there (the anytime view)."""
    from ..runtime.loop import check_labels

    logits = model.collect_logits(x, batch_size)
    check_labels(y, logits[-1].shape[1], len(logits[-1]))
    return [float((lg.argmax(1) == y).double().mean()) for lg in logits]


def freeze(modules: Iterable[nn.Module]) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
