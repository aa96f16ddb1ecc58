"""Checkpoints as safetensors weights plus a JSON description; never pickle.

A directory holds ``weights.safetensors`` and ``model.json``. Zoo models rebuild from the JSON
alone; any other model reloads into an instance the caller builds (:func:`load_weights`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CorruptFileError, InputError

__all__ = ["save", "load", "load_weights", "read_meta", "load_policy"]

FORMAT = "splitexit-checkpoint"
VERSION = 1
WEIGHTS = "weights.safetensors"
META = "model.json"


def save(model: nn.Module, directory: str | os.PathLike, **metadata) -> Path:
    """Write ``model`` to ``directory`` (created if needed).

    Args:
        metadata: JSON-able extras stored beside the spec (policy, dataset, metrics ...).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    meta = {"format": FORMAT, "version": VERSION, "class": type(model).__name__,
            "spec": getattr(model, "spec", None), **metadata}
    (path / META).write_text(json.dumps(meta, indent=2, default=_jsonable))
    return path


def _jsonable(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def read_meta(directory: str | os.PathLike) -> dict:
    """The JSON description of a checkpoint, validated."""
    path = Path(directory)
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


def load_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a checkpoint's weights into ``model``; names and shapes must match exactly."""
    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}. The file is truncated or "
                               "corrupt; save the model again") from exc
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                for k in wrong[:5]))
        raise CorruptFileError(f"checkpoint {directory} does not match this model ("
                               + "; ".join(parts) + "); build the model with the same "
                               "architecture, classes and input shape it was saved from")
    model.load_state_dict(state)
    model.eval()
    return model


def load(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a zoo model from its checkpoint (weights identical, eval mode)."""
    from .zoo import create_model, create_multiexit

    meta = read_meta(directory)
    spec = meta.get("spec")
    if not spec or "model" not in spec:
        raise InputError(f"{directory} holds a model not built from the zoo; build it yourself "
                         "and call splitexit.checkpoint.load_weights(model, directory)")
    common = dict(num_classes=spec["num_classes"], input_shape=tuple(spec["input_shape"]),
                  **spec.get("model_kwargs", {}))
    if "exits" in spec:
        model = create_multiexit(spec["model"], exits=spec["exits"], head=spec["head"],
                                 head_kwargs=spec.get("head_kwargs") or None, **common)
    else:
        model = create_model(spec["model"], **common)
    return load_weights(model, directory)


def load_policy(directory: str | os.PathLike, spec: str | None = None, default=None):
    """The exit policy to serve a checkpoint with.

    Args:
        spec: a policy name (``"maxprob"``) or JSON (``'{"name": "maxprob", "threshold": 0.9}'``);
            wins over the checkpoint's ``calibration.json``.
        default: returned when neither is there; ``None`` raises instead.

    Raises:
        InputError: no policy given and the checkpoint was never calibrated.
    """
    from .policies import make_policy

    calibration = Path(directory) / "calibration.json"
    if spec:
        return make_policy(json.loads(spec) if spec.lstrip().startswith("{") else spec)
    if calibration.is_file():
        return make_policy(json.loads(calibration.read_text())["policy"])
    if default is not None:
        return default
    raise InputError(f"no policy: run `splitexit calibrate {directory}` first or pass "
                     "--policy '{\"name\": \"maxprob\", \"threshold\": 0.9}'")
