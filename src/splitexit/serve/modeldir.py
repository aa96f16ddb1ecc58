"""A deployable model directory: the server half, the device part and how they talk.

Layout (written by :func:`export_model_dir`, read by :func:`load_server` / :func:`load_device`)::

    MODEL_DIR/
      serve.json                {"format": "splitexit-serve", "version": 1, "cut", "codec",
                                 "policy", "payload": PayloadSpec, "model": zoo spec, ...}
      server/                   splitexit.checkpoint of the server half (safetensors + JSON)
      device/                   splitexit.checkpoint of the device part (stages + local exits)

Both halves are rebuilt from the zoo spec and get their own weights only; the server never
needs the device's weights and vice versa. Nothing is pickled.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitexit import checkpoint
from splitexit.errors import CorruptFileError, InputError
from splitexit.multiexit import MultiExitModel
from splitexit.policies import ExitPolicy, NeverExit, create_policy
from splitexit.split.codec import Codec
from splitexit.stages import StagedModel

from ..payload import PayloadSpec
from .device import DevicePart
from .settings import RUNTIMES

__all__ = ["ServeConfig", "export_model_dir", "load_server", "load_device", "server_half",
           "read_config", "check_server"]

FORMAT = "splitexit-serve"
VERSION = 1
CONFIG = "serve.json"


@dataclass(frozen=True)
class ServeConfig:
    """What ``serve.json`` says.

    Attributes:
        cut: cut name of the split (``None``: the device sends the raw input).
        codec: codec spelling the device uses (the server accepts any codec).
        policy: exit policy configuration of the device's local exits.
        payload: per-sample payload the server expects.
        model: zoo spec of the multi-exit model both halves come from.
        num_classes: number of classes.
    """

    cut: str | None
    codec: str
    policy: dict
    payload: PayloadSpec
    model: dict
    num_classes: int

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "cut": self.cut, "codec": self.codec,
                "policy": self.policy, "payload": self.payload.to_json(), "model": self.model,
                "num_classes": self.num_classes}


def server_half(model: MultiExitModel | StagedModel, cut: str | int | None) -> StagedModel:
    """The stages after ``cut`` (the whole backbone when ``cut`` is ``None``); shares weights."""
    backbone = model.backbone if isinstance(model, MultiExitModel) else model
    if cut is None:
        return backbone
    return backbone.split(cut)[1]


def export_model_dir(model: MultiExitModel, cut: str | int | None, directory: str | os.PathLike,
                     codec: Codec | str = "fp32", policy: ExitPolicy | None = None) -> Path:
    """Write a model directory that ``splitexit serve`` and ``splitexit edge`` load.

    Args:
        model: a zoo multi-exit model (``splitexit.zoo.create_multiexit``), trained.
        cut: where to split (a cut name of its backbone) or ``None`` for full offload.
        directory: output directory (created; existing files are overwritten).
        codec: codec the device uses on the wire.
        policy: exit policy of the local exits (``NeverExit()`` when ``None``).

    Returns:
        The directory.

    Raises:
        InputError: the model is not a zoo multi-exit model, or the cut is unknown.
    """
    if not isinstance(model, MultiExitModel) or not getattr(model, "spec", None):
        raise InputError("export_model_dir needs a zoo multi-exit model (built with "
                         "splitexit.zoo.create_multiexit or loaded with checkpoint.load) so that "
                         "both halves can be rebuilt; for other models call "
                         "splitexit.serve.create_app(server_module, spec) directly")
    codec = Codec.parse(codec) if isinstance(codec, str) else codec
    policy = policy or NeverExit()
    cut_name = None if cut is None else model.backbone.cut_names[model.backbone.cut_index(cut)]
    device = DevicePart(model, cut_name)
    server = server_half(model, cut_name)
    example = torch.zeros(2, *model.input_shape)
    with torch.inference_mode():
        model.eval()
        payload = example
        for stage in device.stages:
            payload = stage(payload)
    cfg = ServeConfig(cut_name, codec.spec(), policy.config(), PayloadSpec.of(payload),
                      dict(model.spec), int(model.spec["num_classes"]))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(server, out / "server", part="server", cut=cut_name)
    checkpoint.save(device, out / "device", part="device", cut=cut_name)
    (out / CONFIG).write_text(json.dumps(cfg.to_json(), indent=2))
    return out


def read_config(directory: str | os.PathLike) -> ServeConfig:
    """Read and validate ``serve.json``.

    Raises:
        CorruptFileError: missing or invalid file.
    """
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CorruptFileError(f"{directory} is not a splitexit model directory (no {CONFIG}); "
                               "write one with `splitexit prepare` or "
                               "splitexit.serve.export_model_dir")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise CorruptFileError(f"{path}: format {doc.get('format')!r} version "
                                   f"{doc.get('version')!r}, expected {FORMAT!r} {VERSION}")
        return ServeConfig(doc["cut"], str(doc["codec"]), dict(doc["policy"]),
                           PayloadSpec.from_json(doc["payload"]), dict(doc["model"]),
                           int(doc["num_classes"]))
    except CorruptFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{path} is invalid ({type(exc).__name__}: {exc}); export the "
                               "model directory again") from exc


def _check_spec(cfg: ServeConfig) -> dict:
    """The zoo call ``serve.json`` describes, checked before anything is built."""
    from splitexit import zoo

    spec = cfg.model
    where = f"{CONFIG} model spec"
    for key in ("model", "num_classes", "input_shape", "exits", "head"):
        if key not in spec:
            raise CorruptFileError(f"{where} lacks {key!r}; export the model directory again")
    name = spec["model"]
    builder = zoo.MODELS.get(name) if name in zoo.MODELS else None
    if builder is None:
        raise CorruptFileError(f"{where} names the model {name!r}, which is not in the zoo "
                               f"({', '.join(zoo.list_models())}); export the model directory "
                               "again")
    kwargs = spec.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CorruptFileError(f"{where}: model_kwargs must be an object, got {kwargs!r}")
    params = inspect.signature(builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [k for k in params if k not in ("num_classes", "input_shape")]
    unknown = sorted(set(kwargs) - set(known)) if not accepts_any else []
    if unknown:
        raise CorruptFileError(f"{where}: {name} takes no argument(s) {', '.join(unknown)} "
                               f"(it takes {', '.join(known) or 'none'}); fix model_kwargs or "
                               "export the model directory again")
    if cfg.num_classes != spec["num_classes"]:
        raise CorruptFileError(f"{CONFIG}: num_classes {cfg.num_classes} differs from the model "
                               f"spec's {spec['num_classes']!r}; export the model directory again")
    return spec


def _build(spec: dict) -> MultiExitModel:
    from splitexit.zoo import create_multiexit

    return create_multiexit(spec["model"], num_classes=spec["num_classes"],
                            input_shape=tuple(spec["input_shape"]), exits=spec["exits"],
                            head=spec["head"], head_kwargs=spec.get("head_kwargs") or None,
                            **(spec.get("model_kwargs") or {}))


def _stored_elements(weights: Path) -> int:
    """Number of values in a checkpoint's safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    path = weights / checkpoint.WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptFileError(f"cannot read {path}: {exc}; export the model directory "
                               "again") from exc


def _rebuild(cfg: ServeConfig, directory: str | os.PathLike | None = None,
             part: str = "server") -> MultiExitModel:
    """The multi-exit model of ``serve.json``; with ``directory``, the spec is checked first
    on PyTorch's meta device (no memory) against ``part``'s stored weights, so an
    inconsistent spec (e.g. absurd layer widths) is refused before anything is allocated."""
    spec = _check_spec(cfg)
    if directory is not None:
        try:
            with torch.device("meta"):
                shell = _build(spec)
                half = server_half(shell, cfg.cut) if part == "server" else \
                    DevicePart(shell, cfg.cut)
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError, InputError) as exc:
            raise CorruptFileError(f"{CONFIG} describes a model that cannot be built "
                                   f"({type(exc).__name__}: {exc}); export the model directory "
                                   "again") from exc
        want = sum(t.numel() for t in half.state_dict().values())
        have = _stored_elements(Path(directory) / part)
        if want != have:
            raise CorruptFileError(
                f"{CONFIG} describes a {part} half of {want:,} values ({want * 4 / 1e9:.3g} GB "
                f"as float32) but {Path(directory) / part} stores {have:,}: the model spec "
                "(e.g. its layer widths) does not match the weights; export the model "
                "directory again")
    try:
        return _build(spec)
    except (TypeError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"{CONFIG} describes a model that cannot be built "
                               f"({type(exc).__name__}: {exc}); export the model directory "
                               "again") from exc


def _check_policy_and_codec(cfg: ServeConfig, directory) -> None:
    """The device's policy and codec: a bad field is refused when the server starts, too."""
    where = Path(directory) / CONFIG
    try:
        create_policy(cfg.policy)
    except (InputError, TypeError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"{where}: invalid policy {cfg.policy!r} ({exc}); fix it or "
                               "export the model directory again") from exc
    try:
        Codec.parse(cfg.codec)
    except (InputError, ValueError) as exc:
        raise CorruptFileError(f"{where}: invalid codec {cfg.codec!r} ({exc}); fix it or "
                               "export the model directory again") from exc


def check_server(module, payload: PayloadSpec, num_classes: int | None, where: str) -> None:
    """Run ``module`` once on zeros of the payload spec: a spec that disagrees with the model
    (dtype, shapes, tensor count) is refused at load time instead of failing every request.

    Raises:
        CorruptFileError: the module fails on such a payload or gives no ``(N, classes)``
            logits.
    """
    if isinstance(module, nn.Module):
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if dtypes and payload.dtype not in dtypes:
            raise CorruptFileError(
                f"{where} declares a {str(payload.dtype).removeprefix('torch.')} payload but "
                f"the server half computes in "
                f"{', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}: every "
                "request would fail; write it again")
    tensors = tuple(torch.zeros(2, *s, dtype=payload.dtype) for s in payload.shapes)
    example = tensors if payload.is_tuple else tensors[0]
    try:
        with torch.inference_mode():
            out = module(example)
    except Exception as exc:  # noqa: BLE001 - any failure here means: refuse to start
        raise CorruptFileError(f"{where} does not fit its server half: a payload of the "
                               f"declared spec ({payload.to_json()}) fails "
                               f"({type(exc).__name__}: {str(exc)[:300]}); write it again"
                               ) from exc
    out = out[0] if isinstance(out, tuple) else out
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or (
            num_classes is not None and out.shape[1] != num_classes):
        raise CorruptFileError(f"{where}: the server half gives "
                               f"{tuple(getattr(out, 'shape', ()))} for 2 samples, not logits "
                               f"of {num_classes or 'some'} classes; write it again")
    if not torch.isfinite(out).all():
        raise CorruptFileError(f"{where}: the server half gives non-finite logits for a payload "
                               "of zeros: its weights are corrupt (NaN/inf); write it again")


def load_server(directory: str | os.PathLike, runtime: str = "eager"
                ) -> tuple[nn.Module, ServeConfig]:
    """The server half (eval mode, its own weights) and the directory's configuration.

    Args:
        runtime: ``"eager"`` (the PyTorch module) or ``"torchscript"``: BatchNorm folded and
            the half traced to one frozen TorchScript graph, which runs a whole batch without
            taking Python's GIL between operations (an eager forward re-takes it after every
            op, and waits for it while the server's event loop parses and answers requests).
    """
    if runtime not in RUNTIMES:
        raise InputError(f"unknown server runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        raise InputError(f"{directory} is a model directory (PyTorch checkpoints); the "
                         "onnxruntime runtime serves bundles (`splitexit bundle`): use "
                         "--runtime eager or torchscript here")
    cfg = read_config(directory)
    _check_policy_and_codec(cfg, directory)
    server = server_half(_rebuild(cfg, directory, "server"), cfg.cut)
    checkpoint.load_weights(server, Path(directory) / "server")
    server.eval()
    check_server(server, cfg.payload, cfg.num_classes, str(Path(directory) / CONFIG))
    if runtime == "torchscript":
        from splitexit.optimize import fuse_for_inference, script_module

        example = [torch.zeros(2, *shape, dtype=cfg.payload.dtype)
                   for shape in cfg.payload.shapes]
        server = script_module(fuse_for_inference(server),
                               (example[0] if len(example) == 1 else tuple(example),))
    return server, cfg


def load_device(directory: str | os.PathLike) -> tuple[DevicePart, ExitPolicy, ServeConfig]:
    """The device part (eval mode, its own weights), its exit policy and the configuration."""
    cfg = read_config(directory)
    device = DevicePart(_rebuild(cfg, directory, "device"), cfg.cut)
    checkpoint.load_weights(device, Path(directory) / "device")
    return device.eval(), create_policy(cfg.policy), cfg
