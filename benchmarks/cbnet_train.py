"""Training for ``python -m benchmarks cbnet``: every model, cached by its settings.

Weights go to ``<models>/<dataset>/<name>-<hash of every setting it depends on>.safetensors``
(safetensors only, nothing pickled), so a rerun with the same settings loads them in seconds
and a changed setting retrains exactly what depends on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from splitexit import cbnet
from splitexit.cbnet.search import (
    PUBLISHED,
    SEARCH_SPACE,
    ConverterSpec,
    FinalExit,
    finetune_joint,
)
from splitexit.data import Dataset
from splitexit.errors import InputError
from splitexit.multiexit import MultiExitModel
from splitexit.training import Baseline, JointWeighted, train
from splitexit.zoo import create_model, create_multiexit

__all__ = ["Trained", "train_models", "candidate_specs"]


def candidate_specs(names: tuple[str, ...] | None) -> list[ConverterSpec]:
    """The search-space entries named (all of them when ``names`` is ``None``)."""
    if names is None:
        return list(SEARCH_SPACE)
    by = {s.name: s for s in SEARCH_SPACE} | {s.key(): s for s in SEARCH_SPACE}
    unknown = [n for n in names if n not in by]
    if unknown:
        raise InputError(f"unknown converter candidates {unknown}; choose from "
                         f"{[s.key() for s in SEARCH_SPACE]}")
    return [by[n] for n in names]


def _key(name: str, settings: dict) -> str:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{digest[:12]}"


def _cached(models: Path | None, key: str, build: Callable[[], nn.Module],
            fit: Callable[[nn.Module], float]) -> tuple[nn.Module, float | None]:
    """``build()`` with the weights cached under ``key``, or trained by ``fit`` and saved."""
    model = build()
    file = None if models is None else models / f"{key}.safetensors"
    if file is not None and file.is_file():
        model.load_state_dict(load_file(str(file)))
        return model.eval(), None
    seconds = fit(model)
    model.eval()
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                  str(file))
    return model, seconds


@dataclass
class Trained:
    """Everything trained on one data set."""

    lenet: nn.Module
    branchy: MultiExitModel
    threshold: float
    targets: cbnet.CBNetTargets
    light: nn.Module
    published: cbnet.CBNetPipeline
    #: name -> (spec, pipeline, variant): variant "fine-tuned classifier" / "jointly fine-tuned"
    candidates: dict[str, tuple[ConverterSpec, cbnet.CBNetPipeline, str]] = field(
        default_factory=dict)
    facts: dict = field(default_factory=dict)
    #: B-LeNet trained as many epochs in all as the longest-trained CBNet (None: not built)
    control: MultiExitModel | None = None
    control_epochs: int = 0


def train_models(ds: Dataset, s, models: Path | None) -> Trained:
    """Train (or load) LeNet, B-LeNet, the published converter and every candidate.

    ``s`` is a :class:`~splitexit.bench.cbnet.CBNetBenchSettings`.
    """
    train_split = ds.train if s.train_limit is None else ds.train.subset(
        min(s.train_limit, len(ds.train)), seed=s.seed)
    where = None if models is None else models / ds.name
    facts: dict = {"dataset": ds.name, "train_images": len(train_split),
                   "test_images": len(ds.test), "calib_images": len(ds.calib)}
    base = {"dataset": ds.name, "n": len(train_split), "seed": s.seed, "bs": s.batch_size}

    lenet_set = {**base, "epochs": s.lenet_epochs, "lr": s.lr}

    def fit_lenet(m):
        torch.manual_seed(s.seed)
        m.load_state_dict(create_model("lenet", ds.num_classes, ds.input_shape).state_dict())
        return train(m, train_split, Baseline(), epochs=s.lenet_epochs, lr=s.lr,
                     batch_size=s.batch_size, seed=s.seed, progress=s.progress).seconds

    lenet, facts["lenet_train_s"] = _cached(
        where, _key("lenet", lenet_set),
        lambda: create_model("lenet", ds.num_classes, ds.input_shape), fit_lenet)

    branchy_set = {**lenet_set, "branchy_epochs": s.branchy_epochs,
                   "from_lenet": s.branchy_from_lenet}

    def fit_branchy(m):
        trained, h = cbnet.train_branchynet(
            train_split, ds.num_classes, ds.input_shape, epochs=s.branchy_epochs,
            lr=s.lr / 2 if s.branchy_from_lenet else s.lr, batch_size=s.batch_size,
            seed=s.seed + 1, init=lenet if s.branchy_from_lenet else None, progress=s.progress)
        m.load_state_dict(trained.state_dict())
        return h.seconds

    branchy, facts["branchynet_train_s"] = _cached(
        where, _key("branchy", branchy_set),
        lambda: create_multiexit("b-lenet", ds.num_classes, ds.input_shape, head="published"),
        fit_branchy)
    threshold = cbnet.choose_threshold(branchy, ds.calib, s.max_drop)
    entropy, predictions = cbnet.first_exit_entropy(branchy, train_split.x)
    targets = cbnet.select_targets(train_split.x, train_split.y, entropy, threshold,
                                   ds.num_classes, predictions=predictions,
                                   per_class=s.targets_per_class, seed=s.seed)
    facts.update(threshold=threshold, train_hard_share=targets.hard_fraction,
                 target_index=targets.target_index.tolist(),
                 fallback_classes=targets.fallback_classes)
    light = cbnet.light_classifier(branchy)

    steps_per_epoch = math.ceil(len(train_split) / s.batch_size)
    conv_epochs = max(s.converter_epochs, math.ceil(s.converter_min_steps / steps_per_epoch))
    facts["converter_epochs"] = conv_epochs
    target_set = {**branchy_set, "max_drop": s.max_drop, "per_class": s.targets_per_class,
                  "conv_epochs": conv_epochs, "conv_lr": s.converter_lr}

    def converter(spec: ConverterSpec, teacher: nn.Module | None):
        settings = {**target_set, "spec": spec.key()}

        # a candidate's own (shorter) converter training still gets the minimum steps
        epochs = conv_epochs if spec.converter_epochs is None else max(
            spec.converter_epochs, math.ceil(s.converter_min_steps / steps_per_epoch))

        def fit(m):
            if spec.distilled:
                return cbnet.distill_converter(
                    m, teacher, train_split.x, epochs=epochs, lr=s.converter_lr,
                    batch_size=s.batch_size, seed=s.seed, progress=s.progress).seconds
            return cbnet.train_converter(
                m, train_split.x, targets, epochs=epochs, lr=s.converter_lr,
                batch_size=s.batch_size, seed=s.seed, progress=s.progress).seconds

        def build():
            torch.manual_seed(s.seed)
            return spec.build(ds.input_shape)

        conv, seconds = _cached(where, _key("converter-" + spec.key(), settings), build, fit)
        facts[f"train_s {spec.name}"] = seconds
        return conv, settings

    published_conv, _ = converter(PUBLISHED, None)
    published = cbnet.CBNetPipeline(published_conv, light, ds.num_classes).eval()
    trained = Trained(lenet, branchy, threshold, targets, light, published, facts=facts)
    specs = candidate_specs(s.candidates)
    # the control first: a candidate may distil it
    control_key = _control(trained, ds, s, train_split, where, branchy_set, conv_epochs, specs)
    teachers: dict = {None: (None, None), "published": (published, None)}
    if trained.control is not None:
        teachers["control"] = (FinalExit(trained.control).eval(), control_key)

    for spec in specs:
        conv, conv_set = converter(spec, published_conv)
        ft_set = {**conv_set, "ft_epochs": s.finetune_epochs, "ft_lr": s.finetune_lr}

        def fit_ft(m, conv=conv):
            return cbnet.finetune_classifier(
                m, conv, train_split, epochs=s.finetune_epochs, lr=s.finetune_lr,
                batch_size=s.batch_size, seed=s.seed, progress=s.progress).seconds

        tuned, sec = _cached(where, _key("finetuned-" + spec.key(), ft_set),
                             lambda: copy.deepcopy(light), fit_ft)
        facts[f"finetune_s {spec.name}"] = sec
        pipe = cbnet.CBNetPipeline(conv, tuned, ds.num_classes).eval()
        trained.candidates[f"{spec.name}, fine-tuned classifier"] = (
            spec, pipe, "fine-tuned classifier")
        joint_epochs = _joint_epochs(spec, s)
        joint_lr = s.finetune_lr if spec.joint_lr is None else spec.joint_lr
        if joint_epochs:
            joint_set = {**ft_set, "joint_epochs": joint_epochs, "joint_lr": joint_lr}
            if spec.joint_teacher not in teachers:
                raise InputError(f"candidate {spec.name!r} distils the {spec.joint_teacher!r} "
                                 "teacher, which this run does not train; keep the "
                                 "equal-training control on (no --no-control)")
            teacher, teacher_key = teachers[spec.joint_teacher]
            if teacher_key is not None:  # a retrained teacher retrains its students
                joint_set["teacher"] = teacher_key

            def fit_joint(m, joint_epochs=joint_epochs, joint_lr=joint_lr, teacher=teacher,
                          spec=spec):
                return finetune_joint(m, train_split, epochs=joint_epochs, lr=joint_lr,
                                      batch_size=s.batch_size, seed=s.seed, teacher=teacher,
                                      shift=spec.joint_shift,
                                      weight_decay=spec.joint_weight_decay,
                                      progress=s.progress).seconds

            joint, sec = _cached(where, _key("joint-" + spec.key(), joint_set),
                                 lambda pipe=pipe: copy.deepcopy(pipe), fit_joint)
            facts[f"joint_s {spec.name}"] = sec
            label = "jointly fine-tuned" + (f" ({joint_epochs} epochs)"
                                            if spec.joint_epochs is not None else "") + {
                None: "", "published": ", distilling the published CBNet",
                "control": ", distilling the equal-training BranchyNet control",
            }[spec.joint_teacher] + (f", random shifts of up to {spec.joint_shift} px"
                                     if spec.joint_shift else "")
            trained.candidates[f"{spec.name}, {label}"] = (spec, joint.eval(), label)
    return trained


def _joint_epochs(spec: ConverterSpec, s) -> int:
    return s.joint_epochs if spec.joint_epochs is None else spec.joint_epochs


def _control(trained: Trained, ds: Dataset, s, train_split, where, branchy_set: dict,
             conv_epochs: int, specs: list[ConverterSpec]) -> str | None:
    """BranchyNet trained on for as many epochs as the longest-trained candidate CBNet gets in
    all (converter + classifier fine-tuning + joint), counting LeNet's and B-LeNet's.

    Returns:
        Its cache key (``None``: not built: turned off, or no candidate trains longer).
    """
    if not s.equal_training_control:
        return None
    # a candidate whose joint epochs are 0 still gets its classifier fine-tuning
    joint = max((_joint_epochs(spec, s) for spec in specs), default=0)
    extra = conv_epochs + s.finetune_epochs + joint - s.lenet_epochs - s.branchy_epochs
    if extra <= 0:
        return None
    control_set = {**branchy_set, "control_extra_epochs": extra}
    key = _key("branchy-control", control_set)

    def fit(m):
        m.load_state_dict(trained.branchy.state_dict())
        return train(m, train_split, JointWeighted(cbnet.BRANCHYNET_WEIGHTS), epochs=extra,
                     lr=s.lr / 2, batch_size=s.batch_size, seed=s.seed + 2,
                     progress=s.progress).seconds

    trained.control, trained.facts["control_train_s"] = _cached(
        where, key,
        lambda: create_multiexit("b-lenet", ds.num_classes, ds.input_shape, head="published"),
        fit)
    trained.control_epochs = s.lenet_epochs + s.branchy_epochs + extra
    return key
