"""Device and server as real processes: HTTP server half, edge runtime, network emulation.

- :func:`create_app` / :func:`serve` (``splitexit serve BUNDLE``): the server half behind
  FastAPI with micro-batching (modules ``settings``, ``batcher``, ``metrics``,
  ``app``, ``runner``); :mod:`splitexit.serve.ray_app` deploys it on Ray Serve.
  :func:`load_serving` loads the server half of a bundle (ONNX Runtime or PyTorch) or of a
  model directory.
- :class:`EdgeRuntime` (``splitexit edge BUNDLE``): local exits, offload, deadline, retries,
  circuit breaker, local fallback; exactly one labelled answer per input. It runs with numpy,
  onnxruntime, httpx and zstandard alone (no PyTorch).
- :class:`NetemProxy`: bandwidth, delay, jitter, loss and outages on loopback.
- :func:`export_model_dir` (``splitexit prepare``): the older PyTorch model directory.

The names are imported on first use: ``import splitexit.serve.edge`` (or
``from splitexit.serve import EdgeRuntime``) loads neither torch nor FastAPI. Ray is optional
and only imported by :mod:`splitexit.serve.ray_app`.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "create_app": "app", "MicroBatcher": "batcher", "ServerMetrics": "metrics",
    "PayloadSpec": "splitexit.payload", "ServerSettings": "settings",
    "BackgroundServer": "runner", "free_port": "runner", "serve": "runner",
    "uvicorn_config": "runner", "wait_until_healthy": "runner",
    "DevicePart": "device",
    "DeviceOutput": "splitexit.runtime.device",
    "Answer": "edge", "CircuitBreaker": "edge", "EdgeRuntime": "edge", "EdgeSettings": "edge",
    "EdgeStats": "edge",
    "ServeConfig": "modeldir", "export_model_dir": "modeldir", "load_device": "modeldir",
    "load_server": "modeldir", "read_config": "modeldir",
    "is_bundle": "bundled", "load_serving": "bundled", "bundle_server": "bundled",
    "LinkConditions": "netem", "NetemProxy": "netem",
    "INFER_PATH": "protocol",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'splitexit.serve' has no attribute {name!r}")
    target = module if "." in module else f"{__name__}.{module}"
    value = getattr(importlib.import_module(target), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
