"""The server half of a bundle (or of an older model directory), ready for :func:`create_app`.

:func:`load_serving` looks at a directory and returns ``(module, PayloadSpec, info)``:

- a bundle (``manifest.json``, written by ``splitexit bundle`` / :func:`splitexit.deploy.bundle`):
  ``runtime="onnxruntime"`` (the default) runs its ``server.onnx`` on ONNX Runtime (the
  session takes the batched torch payload and returns torch logits); ``"eager"`` and
  ``"torchscript"`` rebuild the PyTorch server half from the bundle's ``weights/`` (a zoo
  model from the checkpoint alone; a model of your own code needs ``model=
  "path.py:fn"``, given explicitly, which runs code from that file);
- a model directory (``serve.json``, written by ``splitexit prepare``): as
  :func:`~splitexit.serve.modeldir.load_server`.

The payload spec (per-sample shapes and dtype of what crosses the cut) comes from the bundle's
manifest, so requests are checked before anything runs; the server half runs once on zeros of
that spec before serving, so a manifest that disagrees with its model is refused at start.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from splitexit.errors import CorruptFileError, InputError
from splitexit.runtime.bundle import MANIFEST, Bundle, load_bundle

from ..payload import PayloadSpec
from .modeldir import check_server
from .settings import RUNTIMES

__all__ = ["is_bundle", "load_serving", "bundle_server", "BUNDLE_RUNTIMES"]

#: runtimes a bundle's server half can run on (the first is the default)
BUNDLE_RUNTIMES = ("onnxruntime", "eager", "torchscript")


def is_bundle(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a bundle (``manifest.json``) rather than a model directory."""
    return (Path(directory) / MANIFEST).is_file()


class _ServerPiece(nn.Module):
    """The server piece of an exit program as a server module: payload in, logits out."""

    def __init__(self, piece: nn.Module):
        super().__init__()
        self.piece = piece

    def forward(self, payload):
        args = payload if isinstance(payload, tuple) else (payload,)
        return self.piece(*args)[0]


def _pytorch_model(b: Bundle, model: nn.Module | str | None) -> nn.Module:
    from splitexit import checkpoint

    weights = b.directory / "weights"
    meta = checkpoint.read_meta(weights)
    spec = meta.get("spec") if isinstance(meta.get("spec"), dict) else {}
    if "model" not in spec and model is None:
        source = (spec.get("user_model") or {}).get("path")
        hint = f" (it was built from {source})" if source else ""
        raise InputError(f"bundle {b.directory} holds a model of your own code{hint}; the "
                         "PyTorch runtimes rebuild it from that code: pass --model "
                         "path/to/file.py:function (runs code from that file), or serve the "
                         "bundle with --runtime onnxruntime, which needs no code")
    return checkpoint.load(weights, model=model)


def bundle_server(b: Bundle, runtime: str = "onnxruntime", model: nn.Module | str | None = None,
                  threads: int | None = None):
    """The server half of bundle ``b`` as a callable: payload (torch) in, logits out.

    Args:
        runtime: ``"onnxruntime"`` (the bundle's ``server.onnx``), ``"eager"`` or
            ``"torchscript"`` (PyTorch, rebuilt from ``weights/``).
        model: for the PyTorch runtimes of a bundle of your own architecture: your module, or
            ``"path/to/file.py:function"`` (runs code from that file).
        threads: ONNX Runtime intra-op threads (``None``: ONNX Runtime decides).

    Raises:
        InputError: a bundle without a server half, an unknown runtime, or a user model's
            bundle without ``model`` for a PyTorch runtime.
    """
    if runtime not in BUNDLE_RUNTIMES:
        raise InputError(f"unknown server runtime {runtime!r} for a bundle: use one of "
                         f"{', '.join(BUNDLE_RUNTIMES)}")
    if not b.has_server:
        raise InputError(f"bundle {b.directory} has no server half (it was bundled without "
                         "--cut: everything runs on the device); bundle it with --cut NAME "
                         "or --cut input to serve it")
    if runtime == "onnxruntime":
        return b.server(threads)
    from splitexit.program import lower

    net = _pytorch_model(b, model)
    example = torch.zeros(2, *b.input_shape)
    program = lower(net, b.policy, b.cut, example)
    if program.device_pieces != b.device_pieces or len(program.pieces) != len(
            b.manifest["pieces"]):
        raise CorruptFileError(f"the model rebuilt from {b.directory / 'weights'} splits at "
                               f"{b.cut!r} into other pieces than the bundle's; bundle it again")
    server = _ServerPiece(program.module(program.device_pieces)).eval()
    if runtime == "torchscript":
        from splitexit.optimize import fuse_for_inference, script_module

        spec = PayloadSpec.from_json(b.payload)
        payload = tuple(torch.zeros(2, *s, dtype=spec.dtype) for s in spec.shapes)
        server = script_module(fuse_for_inference(server),
                               (payload if spec.is_tuple else payload[0],))
    return server


def load_serving(directory: str | os.PathLike, runtime: str | None = None,
                 model: nn.Module | str | None = None, threads: int | None = None
                 ) -> tuple[object, PayloadSpec, dict]:
    """The server half of a bundle or a model directory: ``(module, payload spec, info)``.

    Args:
        runtime: ``None`` picks ``"onnxruntime"`` for a bundle and ``"eager"`` for a model
            directory.
        model: see :func:`bundle_server` (bundles of your own architecture, PyTorch runtimes).
        threads: ONNX Runtime intra-op threads (bundles on ``"onnxruntime"``).

    ``info`` is what ``/health`` shows: cut, codec, model, runtime, and ``bundle``.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise InputError(f"unknown server runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if is_bundle(directory):
        b = load_bundle(directory)
        runtime = runtime or BUNDLE_RUNTIMES[0]
        module = bundle_server(b, runtime, model, threads)
        payload = PayloadSpec.from_json(b.payload)
        check_server(module, payload, len(b.classes), str(Path(directory) / MANIFEST))
        weights = b.manifest.get("weights")
        spec = weights.get("model") if isinstance(weights, dict) else None
        # a zoo spec names the model; a user model's records a local file path: not shown
        name = spec.get("model") if isinstance(spec, dict) else None
        info = {"bundle": True, "cut": b.cut, "codec": b.codec, "runtime": runtime,
                "model": name if isinstance(name, str) else "own architecture",
                "classes": len(b.classes)}
        return module, payload, info
    if model is not None:
        raise InputError(f"{directory} is a model directory of a zoo model; drop --model")
    from .modeldir import load_server

    runtime = runtime or "eager"
    server, cfg = load_server(directory, runtime)
    return server, cfg.payload, {"bundle": False, "cut": cfg.cut, "codec": cfg.codec,
                                 "runtime": runtime, "model": cfg.model}
