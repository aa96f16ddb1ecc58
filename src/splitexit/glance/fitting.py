"""What the glance module's training and distillation steps share: the minibatch fitting loop,
the checks of epochs, of teacher and student configurations and of a knowledge-distillation
term's weight and temperature, and a teacher's logits computed once."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from .model import GFNet

__all__ = ["check_kd", "batched_logits", "minibatch_epochs", "same_config_but"]


def _check_epochs(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_kd(alpha, temperature) -> bool:
    """Whether a knowledge-distillation term of weight ``alpha`` (0: none) at ``temperature``
    is on.

    Raises:
        InputError: ``alpha`` not a finite number >= 0, or ``temperature`` not one > 0.
    """
    for name, v in (("kd_alpha", alpha), ("kd_temperature", temperature)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, got {v!r}")
    if alpha < 0 or temperature <= 0:
        raise InputError(f"kd_alpha must be >= 0 (0: no distillation) and kd_temperature > 0 "
                         f"(e.g. 2 to 4), got {alpha!r} and {temperature!r}")
    return alpha > 0


@torch.no_grad()
def batched_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """``teacher``'s logits on ``x`` (put in eval mode, no gradients, in batches): a
    distillation target computed once, not per training batch."""
    teacher.eval()
    return torch.cat([teacher(x[i: i + batch_size]) for i in range(0, len(x), batch_size)])


def minibatch_epochs(params, n: int, loss_fn, *, epochs: int, lr: float, batch_size: int,
                     seed: int, one_cycle: bool = True, before_epoch=None):
    """The fitting loop of the glance module's fine-tuning and distillation steps: Adam on
    ``params`` (optionally with a one-cycle schedule), each epoch over a permutation of
    ``range(n)`` drawn from one generator seeded with ``seed``, in minibatches ``idx`` whose
    loss is ``loss_fn(idx)``. Yields ``(epoch, mean loss)`` after every epoch (the caller
    logs); ``before_epoch()`` runs before each (to set train modes)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = None
    if one_cycle:
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * -(-n // batch_size))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i: i + batch_size]
            loss = loss_fn(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            total += loss.item() * len(idx)
        yield epoch, total / n


def same_config_but(teacher: GFNet, student: GFNet, keys: tuple[str, ...], what: str) -> None:
    """Raise unless the two nets' configurations agree in everything but ``keys`` (``what``
    names them in the error)."""
    a, b = teacher.config.to_json(), student.config.to_json()
    for d in (a, b):
        for k in keys:
            d.pop(k, None)
    if a != b:
        raise InputError(f"the student's configuration must be the teacher's but for {what}; "
                         f"they differ in "
                         f"{sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))}")
