"""Cheaper glance and focus CNNs for a trained GFNet, fitted to its own (no labels).

:func:`distil_encoders` gives a student GFNet, whose glance and focus CNNs have another design
(``GFNetConfig.encoder_channels`` / ``encoder_strides``, e.g. one block fewer), every other
weight of a trained teacher (fusion cell, classifier, patch policy) and fits the two CNNs to
the teacher's: the glance CNN to the teacher's glance feature map (which the policy's state
term and the recurrent state read), the focus CNN to the teacher's pooled features of the
patches the teacher's learned policy looks at, plus one random patch per image. Mean squared
error, Adam with a one-cycle schedule, everything else frozen.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..training.bottlefit import softened_kl
from .fitting import _check_epochs, minibatch_epochs, same_config_but
from .grid import crop_patches
from .model import GFNet, global_pool, mark_used
from .patch_policies import masked_scores

__all__ = ["distil_encoders", "finetune_student"]


def distil_encoders(student: GFNet, teacher: GFNet, data, epochs: int, *, lr: float = 3e-3,
                    batch_size: int = 128, seed: int = 0, log: list | None = None) -> list:
    """Fit ``student``'s glance and focus CNNs to a trained ``teacher``'s; every other weight
    is the teacher's. ``data`` needs ``x`` (images; its labels are never read). The CNNs
    start from weights drawn with ``seed`` (the same student whatever the caller ran before).

    Returns the log (one entry per epoch and CNN: the loss relative to the target's variance).

    Raises:
        InputError: a bad epoch count, or nets that differ in more than the CNNs' design, or a
            student whose glance feature map has another shape than the teacher's.
    """
    _check_epochs("epochs", epochs)
    same_config_but(teacher, student, ("encoder_channels", "encoder_strides"),
                    "the glance and focus CNNs")
    if student.map_shape != teacher.map_shape:
        raise InputError(f"the student's glance feature map {student.map_shape} must have the "
                         f"teacher's shape {teacher.map_shape} (the patch policy reads it); "
                         "choose encoder strides that end at the same size")
    shared = {k: v for k, v in teacher.state_dict().items()
              if not k.startswith(("glance.encoder.", "focus.encoder."))}
    missing, unexpected = student.load_state_dict(shared, strict=False)
    assert not unexpected and all(k.startswith(("glance.encoder.", "focus.encoder."))
                                  for k in missing)
    with torch.random.fork_rng():  # the CNNs start from ``seed``, whatever ran before
        torch.manual_seed(seed)
        for encoder in (student.glance.encoder, student.focus.encoder):
            for m in encoder.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    log = [] if log is None else log
    teacher.eval()
    student.eval()
    if epochs == 0:
        return log
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        small, glance_maps, patches, features = [], [], [], []
        for i in range(0, len(data.x), 500):
            x = data.x[i: i + 500]
            s = teacher.glance.downsample(x)
            small.append(s)
            glance_maps.append(teacher.glance.encoder(s))
            _, chosen = teacher.rollout(x, "learned")
            used = x.new_zeros(len(x), teacher.grid.locations)
            for t in range(chosen.shape[1]):
                used = mark_used(used, chosen[:, t])
            extra = masked_scores(torch.rand(used.shape, generator=gen), used).argmax(1)
            for location in [*chosen.unbind(1), extra]:
                p = crop_patches(x, teacher.focus.pixel_index, location, teacher.grid.patch)
                patches.append(p)
                features.append(global_pool(teacher.focus.encoder(p)))
    _fit(student.glance.encoder, torch.cat(small), torch.cat(glance_maps), False, "glance",
         epochs, lr, batch_size, seed, log, t0)
    _fit(student.focus.encoder, torch.cat(patches), torch.cat(features), True, "focus",
         epochs, lr, batch_size, seed + 1, log, t0)
    student.eval()
    return log


def finetune_student(student: GFNet, teacher: GFNet, data, epochs: int, *, lr: float = 1e-3,
                     alpha: float = 0.5, temperature: float = 2.0, batch_size: int = 128,
                     seed: int = 0, log: list | None = None) -> list:
    """Fine-tune a distilled ``student``'s glance and focus CNNs, fusion cell and classifier
    end to end on its own learned policy's patches (the policy frozen): every step's loss is
    ``(1 - alpha)`` cross-entropy with the labels plus ``alpha`` the knowledge-distillation
    term (``temperature``-softened KL divergence) to the teacher's logits after the same step
    of its own rollout; with ``alpha=1`` no label is read (a compression of the teacher, not
    more training on labels). Adam with a one-cycle schedule."""
    _check_epochs("epochs", epochs)
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise InputError(f"alpha is a share in [0, 1] and the temperature > 0, got {alpha!r} "
                         f"and {temperature!r}")
    log = [] if log is None else log
    teacher.eval()
    if epochs == 0:
        return log
    t0 = time.perf_counter()
    with torch.no_grad():
        soft = torch.cat([torch.stack(teacher.rollout(data.x[i: i + 500], "learned")[0], 1)
                          for i in range(0, len(data.x), 500)])  # (N, steps + 1, classes)
    trained = [student.glance, student.focus, student.classifier]
    params = list({id(p): p for m in trained for p in m.parameters()}.values())
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    policy = student.policy

    def train_modes():
        student.eval()
        for m in trained:
            m.train()

    def loss_fn(idx):
        x, target = data.x[idx], soft[idx]
        y = data.y[idx] if alpha < 1 else None  # pure distillation reads no label
        h, glance_map = student.glance(x)
        with torch.no_grad():
            prior = policy.prior(x)
        used = h.new_zeros(len(idx), student.grid.locations)
        loss = _kd(student.classifier(h), y, target[:, 0], alpha, temperature)
        for t in range(student.config.steps):
            with torch.no_grad():
                location = policy.choose(prior, h, glance_map, used)
            h = student.focus(x, h, location)
            used = mark_used(used, location)
            loss = loss + _kd(student.classifier(h), y, target[:, t + 1], alpha, temperature)
        return loss / (student.config.steps + 1)

    for epoch, loss in minibatch_epochs(params, len(data.x), loss_fn, epochs=epochs, lr=lr,
                                        batch_size=batch_size, seed=seed,
                                        before_epoch=train_modes):
        log.append({"stage": "student-finetune", "epoch": epoch, "loss": loss,
                    "seconds": time.perf_counter() - t0})
        print(f"[student-finetune] epoch {epoch + 1}/{epochs} loss {loss:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return log


def _kd(logits, y, teacher_logits, alpha: float, temperature: float) -> torch.Tensor:
    """``(1 - alpha)`` cross-entropy with ``y`` plus ``alpha`` the softened KL divergence to
    the teacher's logits (``y`` is not read when ``alpha == 1``)."""
    if alpha == 0:
        return F.cross_entropy(logits, y)
    kl = softened_kl(logits, teacher_logits, temperature)
    return kl if alpha == 1 else (1 - alpha) * F.cross_entropy(logits, y) + alpha * kl


def _fit(encoder: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, pooled: bool,
         what: str, epochs: int, lr: float, batch_size: int, seed: int, log: list,
         t0: float) -> None:
    """Fit ``encoder`` (its feature map, or its global average when ``pooled``) to
    ``targets`` by mean squared error; it ends in eval mode."""
    scale = float(targets.var()) + 1e-12

    def loss_fn(idx):
        out = encoder(inputs[idx])
        return F.mse_loss(out.mean((2, 3)) if pooled else out, targets[idx]) / scale

    for epoch, mse in minibatch_epochs(list(encoder.parameters()), len(inputs), loss_fn,
                                       epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                       before_epoch=encoder.train):
        log.append({"stage": f"distil-{what}-cnn", "epoch": epoch, "relative_mse": mse,
                    "seconds": time.perf_counter() - t0})
        print(f"[distil-{what}-cnn] epoch {epoch + 1}/{epochs} relative mse {mse:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    encoder.eval()
