"""How the server half batches, what it accepts and how it runs: :class:`ServerSettings` and
the server runtimes (no torch, no FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass

from splitexit.errors import InputError

__all__ = ["RUNTIMES", "ServerSettings"]

#: how a server half can run: PyTorch eagerly, one frozen TorchScript graph, or (bundles) the
#: bundle's ``server.onnx`` on ONNX Runtime (see :func:`splitexit.serve.load_serving`)
RUNTIMES = ("eager", "torchscript", "onnxruntime")


@dataclass(frozen=True)
class ServerSettings:
    """How the server batches and what it accepts.

    Attributes:
        max_batch: largest number of samples run in one forward pass; concurrent requests are
            merged up to it (a single larger request is refused with 413 unless it fits
            ``max_request_samples``, then it runs alone).
        max_wait_ms: how long the first request of a batch waits for others to join.
        token: when set, ``/v1/infer`` and ``/metrics`` need ``Authorization: Bearer <token>``
            and ``/health`` shows only ``{"status"}`` without it (``splitexit serve`` refuses
            to start without a token unless ``--no-auth``).
        max_request_bytes: largest request body accepted (413 above it).
        max_request_samples: largest number of samples in one request (413 above it).
        max_queue_samples: samples waiting at most; further requests get 503 (retry later).
        threads: torch intra-op threads of the inference thread (unchanged when ``None``).
        max_connections: open connections at most (:func:`serve` / :class:`BackgroundServer`):
            a new connection over it closes the oldest one waiting for a request; lowered to
            what the open-file limit allows.
        header_timeout_s: a client's request headers must be complete this long after it
            connects (or starts a further request); the connection is closed otherwise.
        body_timeout_s: the whole request body must arrive within this time after the
            headers; 408 otherwise (and the connection is closed).
        keep_alive_s: an idle kept-alive connection is closed after this time.
        runtime: how the server half runs: ``"eager"`` PyTorch, ``"torchscript"`` (one
            frozen graph; see :func:`~splitexit.serve.load_server`) or ``"onnxruntime"`` (a
            bundle's ``server.onnx``). Read by ``splitexit serve`` and the Ray replicas when
            they load the model directory or bundle.
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0
    token: str | None = None
    max_request_bytes: int = 4 * 1024 * 1024
    max_request_samples: int = 256
    max_queue_samples: int = 4096
    threads: int | None = None
    runtime: str = "eager"
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        checks = [("max_batch", self.max_batch, 1), ("max_request_bytes",
                  self.max_request_bytes, 64), ("max_request_samples", self.max_request_samples,
                  1), ("max_queue_samples", self.max_queue_samples, 1),
                  ("max_connections", self.max_connections, 1)]
        for name, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"ServerSettings.{name} must be an int >= {low}, got {value!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 < value <= 3600):
                raise InputError(f"ServerSettings.{name} must be in (0, 3600] seconds, got "
                                 f"{value!r}")
        if not (isinstance(self.max_wait_ms, (int, float)) and 0 <= self.max_wait_ms <= 10_000):
            raise InputError(f"ServerSettings.max_wait_ms must be in 0..10000 ms, got "
                             f"{self.max_wait_ms!r}")
        if self.token is not None and (not isinstance(self.token, str) or len(self.token) < 8):
            raise InputError("ServerSettings.token must be a string of at least 8 characters "
                             "(or None for no authentication)")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InputError(f"ServerSettings.threads must be a positive int or None, got "
                             f"{self.threads!r}")
        if self.runtime not in RUNTIMES:
            raise InputError(f"ServerSettings.runtime must be one of {', '.join(RUNTIMES)}, "
                             f"got {self.runtime!r}")
