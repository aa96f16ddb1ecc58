"""Checkpoints as safetensors weights plus a JSON description; never pickle.

A directory holds ``weights.safetensors`` and ``model.json``. Zoo models rebuild from the JSON
alone; a model built from your own code rebuilds from the architecture you pass again
(:func:`load` with ``model=``; the checkpoint never imports code by itself); any other model
reloads into an instance the caller builds (:func:`load_weights`).

Weights are stored under **canonical keys**, independent of where a model is cut:

- a backbone stage traced by torch.fx or cut from an ``nn.Sequential`` keeps the original
  module's qualified names (``backbone.layer1.0.conv1.weight``, not
  ``backbone.stages.1.module.layer1.0.conv1.weight``); a stage that is a module of its own
  (the zoo's parts, ``StagedModel.from_modules``) is keyed by its name
  (``backbone.stages.<stage name>.<...>``);
- an exit head is keyed by its cut name (``heads.<cut>.<...>``);
- every other submodule (gates, converters ...) keeps its own name.

So the same weights load into the same architecture staged at other cuts. A weight two stages
share (torch.fx may reference one module from both) is stored once. Checkpoints written
before canonical keys (stage-indexed keys, no layout marker) still load into a model staged
as they were saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .errors import CorruptFileError, InputError

__all__ = ["save", "load", "load_multiexit", "load_weights", "read_meta", "load_policy", "canonical_keys",
           "canonical_state_dict", "load_canonical_state_dict"]

FORMAT = "splitexit-checkpoint"
VERSION = 1
WEIGHTS = "weights.safetensors"
META = "model.json"
LAYOUT_KEY = "splitexit.keys"  # safetensors metadata entry naming the key layout
CANONICAL = "canonical"  # keys as canonical_keys gives them
MODULE = "module"  # keys as model.state_dict() gives them (every checkpoint before canonical)


# canonical keys --------------------------------------------------------------------------------
def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _staged_children(staged) -> list[tuple[str, str, nn.Module]]:
    """``(path, canonical path, module)`` of what a :class:`StagedModel` holds."""
    from .stages import Stage

    stages = list(staged.stages)
    inner = [s.module if isinstance(s, Stage) else s for s in stages]
    # stages cut from one nn.Sequential keep its child names; together they are that Sequential
    sequential = all(isinstance(m, nn.Sequential) for m in inner)
    if sequential:
        names = [n for m in inner for n in m._modules]
        sequential = len(names) == len(set(names))
    stage_names = [getattr(s, "name", None) for s in stages]
    unique_names = None not in stage_names and len(set(stage_names)) == len(stage_names)
    out = []
    for i, (stage, module) in enumerate(zip(stages, inner)):
        path = f"stages.{i}.module" if isinstance(stage, Stage) else f"stages.{i}"
        if isinstance(module, fx.GraphModule) or sequential:
            canon = ""  # fx keeps the original qualified names inside the stage's graph
        elif unique_names:
            canon = f"stages.{stage_names[i]}"
        else:
            canon = path
        out.append((path, canon, module))
    out += [(name, name, m) for name, m in staged._modules.items()
            if name != "stages" and m is not None]
    return out


def _module_paths(model: nn.Module) -> dict[str, str]:
    """Every module path in ``model`` (shared modules under each of theirs) -> canonical path."""
    from .multiexit import MultiExitModel
    from .stages import StagedModel

    paths: dict[str, str] = {}

    def visit(module: nn.Module, path: str, canon: str) -> None:
        paths[path] = canon
        if isinstance(module, StagedModel):
            children = _staged_children(module)
        elif (isinstance(module, MultiExitModel)
              and len(module.head_cuts) == len(module.heads)):
            children = [(n, n, m) for n, m in module._modules.items()
                        if n != "heads" and m is not None]
            children += [(f"heads.{i}", f"heads.{cut}", h)
                         for i, (cut, h) in enumerate(zip(module.head_cuts, module.heads))]
        else:
            children = [(n, n, m) for n, m in module._modules.items() if m is not None]
        for rel, canon_rel, child in children:
            visit(child, _join(path, rel), _join(canon, canon_rel))

    visit(model, "", "")
    return paths


def canonical_keys(model: nn.Module) -> dict[str, str]:
    """``model.state_dict()`` key -> its canonical key (see the module docstring).

    Example:
        >>> canonical_keys(model)["backbone.stages.1.module.layer1.0.conv1.weight"]
        'backbone.layer1.0.conv1.weight'
    """
    paths = _module_paths(model)
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        out[key] = _join(paths[module], leaf) if module in paths else key
    return out


class _Ambiguous(Exception):
    pass


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state under canonical keys (a shared weight once; tensors not copied).

    Raises:
        InputError: two different tensors would get one canonical key.
    """
    names = canonical_keys(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        canon = names[key]
        if canon in out:
            if not _same(out[canon], value):
                raise InputError(f"two different tensors of {type(model).__name__} have the "
                                 f"canonical key {canon!r}; save with their module keys instead")
            continue
        out[canon] = value
    return out


def _mismatch(directory, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
              layout: str) -> str | None:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more"
                                                  if len(missing) > 5 else ""))
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}" + (f" and {len(unexpected) - 5} more"
                                                        if len(unexpected) > 5 else ""))
    if wrong:
        parts.append("shape mismatch " + ", ".join(
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in wrong[:5]))
    how = ("keys are the original modules' names and the heads' cut names, so the staging "
           "may differ but the modules and head cuts may not" if layout == CANONICAL else
           "keys name stages by index (a checkpoint from before canonical keys): stage the "
           "model at the cuts it was saved with")
    return (f"the architecture of checkpoint {directory} does not match this model ("
            + "; ".join(parts) + f"). Build the model with the same architecture, exit cuts, "
            f"head type, classes and input shape it was saved from ({how})")


def load_canonical_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                              source: str = "the state") -> nn.Module:
    """Load a state keyed canonically (:func:`canonical_state_dict`) into ``model``, however
    ``model`` is staged; names and shapes must match exactly. A weight several stages share
    gets the one stored value.

    Raises:
        CorruptFileError: names or shapes do not match (the message lists them).
    """
    names = canonical_keys(model)
    own = model.state_dict()
    by_canon = {}
    for key, canon in names.items():
        by_canon.setdefault(canon, own[key])
    problem = _mismatch(source, by_canon, state, CANONICAL)
    if problem:
        raise CorruptFileError(problem)
    model.load_state_dict({key: state[names[key]] for key in own})
    return model


# files ----------------------------------------------------------------------------------------
def save(model: nn.Module, directory: str | os.PathLike, **metadata) -> Path:
    """Write ``model`` to ``directory`` (created if needed), weights under canonical keys.

    Args:
        metadata: JSON-able extras stored beside the spec (policy, dataset, metrics ...).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    try:
        state, layout = canonical_state_dict(model), CANONICAL
    except InputError:  # an unusual model whose canonical keys collide: its own keys
        state, layout = model.state_dict(), MODULE
    # copies: safetensors refuses tensors that share memory
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(state, str(path / WEIGHTS), metadata={LAYOUT_KEY: layout})
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
            "spec": _config(model), "weights_layout": layout,
            "weights_sha256": digest, **metadata}
    (path / META).write_text(json.dumps(meta, indent=2, default=_jsonable))
    return path


def _config(model: nn.Module) -> dict | None:
    """The model's description: its ``config()`` (multi-exit models, gated, T-RECX, kept
    exits), else its ``spec`` (a backbone, CBNet)."""
    from .multiexit import MultiExitModel

    described = model.config() if isinstance(model, MultiExitModel) else None
    return described or getattr(model, "spec", None)


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _no_checkpoint(path: Path) -> CorruptFileError:
    return CorruptFileError(f"no checkpoint at {path}: the directory does not exist, so it is "
                            "not a splitexit checkpoint; check the path, or write one with "
                            "`splitexit train --out DIR` or splitexit.checkpoint.save")


def read_meta(directory: str | os.PathLike) -> dict:
    """The JSON description of a checkpoint, validated."""
    path = Path(directory)
    if not path.is_dir():
        raise _no_checkpoint(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CorruptFileError(f"{path} is not a splitexit checkpoint: it needs {META} and "
                               f"{WEIGHTS} (write one with splitexit.checkpoint.save)")
    try:
        meta = json.loads((path / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path / META} is not valid JSON ({exc}); the checkpoint is "
                               "corrupt, save it again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptFileError(f"{path / META} is not a splitexit checkpoint description")
    if meta.get("version") != VERSION:
        raise CorruptFileError(f"checkpoint version {meta.get('version')} is not supported "
                               f"(this splitexit reads version {VERSION})")
    return meta


def _recorded_digest(directory: Path) -> str | None:
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError):
        return None
    digest = meta.get("weights_sha256") if isinstance(meta, dict) else None
    return digest if isinstance(digest, str) else None


def _read_weights(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The stored tensors and their key layout; clear errors for a missing or corrupt file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise _no_checkpoint(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise CorruptFileError(f"no checkpoint weights at {directory}: it has no {WEIGHTS}; "
                               "save the model there with splitexit.checkpoint.save")
    recorded = _recorded_digest(directory)
    if recorded is not None and hashlib.sha256(path.read_bytes()).hexdigest() != recorded:
        raise CorruptFileError(f"{path} is truncated or corrupt: its SHA-256 differs from the "
                               f"one {META} recorded when it was saved; save the model again")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}. The file is truncated or "
                               "corrupt; save the model again") from exc
    return state, header.get(LAYOUT_KEY, MODULE)


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (eval mode after); names and shapes must
    match exactly. Canonical keys load into the same architecture however it is staged.

    Raises:
        CorruptFileError: no checkpoint there, a corrupt weights file, or weights of another
            architecture (each says which).
    """
    state, layout = _read_weights(directory)
    if layout == CANONICAL:
        load_canonical_state_dict(model, state, str(directory))
    else:
        problem = _mismatch(directory, model.state_dict(), state, MODULE)
        if problem:
            raise CorruptFileError(problem)
        model.load_state_dict(state)
    model.eval()
    return model


def load(directory: str | os.PathLike, model: nn.Module | str | None = None) -> nn.Module:
    """Rebuild a model from its checkpoint (weights identical, eval mode).

    Args:
        model: needed for a checkpoint of your own architecture (it never imports code by
            itself): your ``nn.Module`` (uncut: it is cut and given heads as the checkpoint
            records; or a :class:`MultiExitModel` built already, staged at any cuts), or
            ``"path/to/file.py:function"`` (runs code from that file). A zoo checkpoint needs
            none; given a module, its weights load into that module.

        directory: a checkpoint directory, or a bundle (``splitexit.deploy.bundle``): its
            weights, checked against the bundle's checksums first.

    Raises:
        InputError: a checkpoint of user code without ``model``, or ``model`` of the wrong
            kind.
        CorruptFileError: a bundle whose files do not match their checksums.
    """
    if (Path(directory) / "manifest.json").is_file():  # a bundle: its weights, once verified
        from .runtime.bundle import load_bundle

        bundled = load_bundle(directory)
        directory = bundled.directory / bundled.manifest.get("weights", {}).get(
            "directory", "weights")
    meta = read_meta(directory)
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    if {"keep_exits", "gate", "trecx", "segmenter"} & set(spec):
        return load_weights(_rebuild(spec, model, str(directory)), directory)
    if "model" in spec:  # zoo
        if isinstance(model, str):
            raise InputError(f"{directory} holds the zoo model {spec['model']!r}, which "
                             "rebuilds from the checkpoint alone; drop the model argument "
                             "(--model on the command line)")
        return load_weights(model if model is not None else _zoo_model(spec), directory)
    if "cuts" in spec and "num_classes" in spec and "input_shape" in spec:  # user code
        from .usermodel import rebuild

        if model is None:
            raise InputError(_needs_model(directory, spec))
        return load_weights(rebuild(model, spec, str(directory)), directory)
    if model is None or isinstance(model, str):
        hint = ("; a CBNet pipeline loads with splitexit.cbnet.load_pipeline(directory)"
                if "cbnet" in spec else "")
        raise InputError(f"{directory} holds a model not built from the zoo; build it yourself "
                         "and call splitexit.checkpoint.load_weights(model, directory) (or "
                         f"load(directory, model=your_module)){hint}")
    return load_weights(model, directory)


def load_multiexit(directory: str | os.PathLike, dataset: str | None = None,
                   model: nn.Module | str | None = None):
    """:func:`load` for a multi-exit model, checked: a multi-exit checkpoint, trained on
    ``dataset`` when given (as its metadata records).

    Raises:
        InputError: nothing there, a model without exits, or one trained on another data set
            (each message says what to pass instead).
    """
    from .multiexit import MultiExitModel

    if not (Path(directory) / "model.json").is_file() and not (
            Path(directory) / "manifest.json").is_file():
        raise InputError(f"no multi-exit checkpoint at {directory}; `splitexit train --out DIR` "
                         "(or the early-exit benchmark, in OUT/models) saves one")
    loaded = load(directory, model)
    if not isinstance(loaded, MultiExitModel):
        raise InputError(f"{directory} holds a {type(loaded).__name__}, not a multi-exit model; "
                         "pass the directory of a MultiExitModel checkpoint")
    trained_on = read_meta(directory).get("dataset") if (
        Path(directory) / "model.json").is_file() else None
    if dataset is not None and trained_on not in (None, dataset):
        raise InputError(f"{directory} was trained on {trained_on!r}, this run uses {dataset!r}")
    return loaded


def _rebuild(spec: Mapping, model, where: str) -> nn.Module:
    """The architecture ``spec`` describes (a model's ``config()``): the zoo or user model it
    starts from, then T-RECX's early exit, the kept exits and the gate, as recorded."""
    from .heads import create_head
    from .methods import ExitGate, GatedMultiExitModel, early_view_model

    spec = dict(spec)
    trecx, keep, gate = spec.pop("trecx", None), spec.pop("keep_exits", None), spec.pop("gate",
                                                                                        None)
    if "model" in spec:
        if isinstance(model, str):
            raise InputError(f"{where} holds the zoo model {spec['model']!r}, which rebuilds "
                             "from the checkpoint alone; drop the model argument")
        built = model if isinstance(model, nn.Module) else _zoo_model(spec)
    elif "segmenter" in spec:  # a dense model of splitexit.segmentation (heads may differ)
        from .segmentation import create_segmenter

        if isinstance(model, str):
            raise InputError(f"{where} holds a segmentation model, which rebuilds from the "
                             "checkpoint alone; drop the model argument")
        try:
            built = model if isinstance(model, nn.Module) else create_segmenter(
                **spec["segmenter"])
        except TypeError as e:
            raise InputError(f"{where}: malformed segmenter description ({e}); save the "
                             "model again with splitexit.checkpoint.save") from e
    elif "cuts" in spec and "num_classes" in spec and "input_shape" in spec:
        from .usermodel import rebuild

        if model is None:
            raise InputError(_needs_model(where, spec))
        built = rebuild(model, spec, where)
    else:
        raise InputError(f"{where} describes a model splitexit cannot rebuild ({sorted(spec)}); "
                         "build it yourself and call splitexit.checkpoint.load_weights")
    if trecx:
        head = trecx["head"]
        built = early_view_model(getattr(built, "backbone", built), trecx["cut"],
                                 int(head["num_classes"]), tuple(spec["input_shape"]),
                                 head=create_head(head["kind"], head["in_shape"],
                                                head["num_classes"],
                                                **{k: v for k, v in head.items()
                                                   if k not in ("kind", "in_shape",
                                                                "num_classes")}))
    if keep is not None:
        built = built.keep_exits(keep)
    if gate:
        built = GatedMultiExitModel.from_multiexit(
            built, ExitGate(built.input_shape, gate["hidden"], gate["grid"]), gate["threshold"])
    return built


def _needs_model(directory, spec: Mapping) -> str:
    source = spec.get("user_model") or {}
    if source.get("path"):
        given = f"{source['path']}:{source.get('function', 'function')}"
        return (f"{directory} holds a model trained from your own code ({given}); a "
                "checkpoint never imports code by itself. Pass the model: "
                f"splitexit.checkpoint.load(directory, model='{given}') or model=your_module "
                f"in Python, --model {given} on the command line")
    return (f"{directory} holds a model of your own architecture (cut at {spec.get('cuts')}); "
            "pass it: splitexit.checkpoint.load(directory, model=your_module) (the uncut "
            "nn.Module), or --model path/to/file.py:function on the command line")


def _zoo_model(spec: Mapping) -> nn.Module:
    from .zoo import create_model, create_multiexit

    common = dict(num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]),
                  **spec.get("model_kwargs", {}))
    if "exits" in spec:
        return create_multiexit(spec["model"], exits=spec["exits"], head=spec["head"],
                                head_kwargs=spec.get("head_kwargs") or None, **common)
    return create_model(spec["model"], **common)


def load_policy(directory: str | os.PathLike, spec: str | None = None, default=None):
    """The exit policy to serve a checkpoint with.

    Args:
        spec: a policy name (``"maxprob"``) or JSON (``'{"name": "maxprob", "threshold": 0.9}'``);
            wins over the checkpoint's ``calibration.json``, which wins over the policy a
            method's recipe fitted (``splitexit train --method``).
        default: returned when neither is there; ``None`` raises instead.

    Raises:
        InputError: no policy given and the checkpoint was never calibrated.
    """
    from .policies import create_policy

    calibration = Path(directory) / "calibration.json"
    if spec:
        return create_policy(json.loads(spec) if spec.lstrip().startswith("{") else spec)
    if calibration.is_file():
        return create_policy(json.loads(calibration.read_text())["policy"])
    fitted = read_meta(directory).get("policy")  # a method's own (uncalibrated) policy
    if isinstance(fitted, dict):
        return create_policy(fitted)
    if default is not None:
        return default
    raise InputError(f"no policy: run `splitexit calibrate {directory}` first or pass "
                     "--policy '{\"name\": \"maxprob\", \"threshold\": 0.9}'")
