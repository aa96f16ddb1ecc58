"""Device and server as real processes: HTTP server half, edge runtime, network emulation.

- :func:`create_app` / :func:`serve` (``splitexit serve MODEL_DIR``): the server half behind
  FastAPI with micro-batching; :mod:`splitexit.serve.ray_app` deploys it on Ray Serve.
- :class:`EdgeRuntime` (``splitexit edge``): local exits, offload, deadline, retries, circuit
  breaker, local fallback; exactly one labelled answer per input.
- :class:`NetemProxy`: bandwidth, delay, jitter, loss and outages on loopback.
- :func:`export_model_dir` (``splitexit prepare``): a deployable directory from a trained
  multi-exit model and a cut.

Ray is optional and only imported by :mod:`splitexit.serve.ray_app`.
"""

from .app import (
           BackgroundServer,
           MicroBatcher,
           PayloadSpec,
           ServerMetrics,
           ServerSettings,
           create_app,
           serve,
)
from .device import DeviceOutput, DevicePart
from .edge import Answer, CircuitBreaker, EdgeRuntime, EdgeSettings, EdgeStats
from .modeldir import ServeConfig, export_model_dir, load_device, load_server, read_config
from .netem import LinkConditions, NetemProxy

__all__ = ["Answer", "BackgroundServer", "CircuitBreaker", "DeviceOutput", "DevicePart",
           "EdgeRuntime", "EdgeSettings", "EdgeStats", "LinkConditions", "MicroBatcher",
           "NetemProxy", "PayloadSpec", "ServeConfig", "ServerMetrics", "ServerSettings",
           "create_app", "export_model_dir", "load_device", "load_server", "read_config", "serve"]
