"""The server half as an HTTP service: codec payloads in, predictions and logits out.

:func:`create_app` wraps any server-half module (payload in, logits out) in a FastAPI app
with micro-batching of concurrent requests (:class:`MicroBatcher`), ``/health`` and
``/metrics`` endpoints, a bearer token, request size limits, a body deadline and a bounded
queue. :func:`serve` runs it with uvicorn (graceful shutdown on SIGINT/SIGTERM) behind the
connection guards of :mod:`splitexit.serve.connections` (header deadline, connection cap,
keep-alive timeout). Payloads are decoded with :func:`splitexit.split.codec.decode` under a
byte limit and checked against the expected per-sample shapes before anything is queued;
nothing is unpickled.

Endpoints::

    POST /v1/infer   body: one codec message (application/octet-stream), optional headers
                     X-Request-ID and Authorization: Bearer <token>
                     200 {"request_id", "predictions", "logits", "batch_size", "queue_ms",
                          "compute_ms"}
                     4xx/5xx {"error": reason, "request_id"} (413 adds "limits", a 422 for
                          non-finite logits adds "rows"); every status counted in /metrics
    GET  /health     {"status": "ok" | "draining"}; with the token also the model, cut,
                     codec, payload spec and "limits"
    GET  /metrics    counts, latency percentiles, batch sizes (token required when set)
"""

from __future__ import annotations

import asyncio
import hmac
import re
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import nn

from splitexit.errors import InputError, PayloadError
from splitexit.split import codec as wire

from .connections import LOGGER, fit_open_files, guarded_protocol
from .protocol import HEALTH_PATH, INFER_PATH, METRICS_PATH

__all__ = ["ServerSettings", "PayloadSpec", "MicroBatcher", "ServerMetrics", "create_app",
           "BackgroundServer", "serve", "uvicorn_config", "INFER_PATH"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: counted in ``/metrics`` when a client disconnects before its request could be answered
CLIENT_CLOSED = 499


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


@dataclass(frozen=True)
class PayloadSpec:
    """What one sample of a request must look like: per-tensor shapes without the batch dim.

    Attributes:
        shapes: per-sample shape of each tensor of the payload (one entry for a plain tensor).
        dtype: dtype every decoded tensor must have (the codec restores the original dtype).
        is_tuple: whether the payload is a tuple of tensors rather than one tensor.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    is_tuple: bool = False

    @property
    def sample_bytes(self) -> int:
        """Decoded bytes of one sample."""
        size = self.dtype.itemsize
        return sum(size * _prod(s) for s in self.shapes)

    def check(self, payload: wire.Payload) -> int:
        """Validate a decoded payload; return its batch size.

        Raises:
            PayloadError: the number of tensors, their dtype, shapes or batch sizes differ.
        """
        tensors = payload if isinstance(payload, tuple) else (payload,)
        if isinstance(payload, tuple) != self.is_tuple or len(tensors) != len(self.shapes):
            raise PayloadError(f"payload carries {len(tensors)} tensor(s) "
                               f"({'tuple' if isinstance(payload, tuple) else 'single'}); this "
                               f"server expects {len(self.shapes)} "
                               f"({'tuple' if self.is_tuple else 'single'})")
        n = None
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if t.dtype != self.dtype:
                raise PayloadError(f"tensor {i} has dtype {t.dtype}; this server expects "
                                   f"{self.dtype} (encode the float32 payload with any codec)")
            if t.dim() != len(shape) + 1 or tuple(t.shape[1:]) != tuple(shape):
                raise PayloadError(f"tensor {i} has shape {tuple(t.shape)}; this server expects "
                                   f"(N, {', '.join(map(str, shape))}) at its cut")
            if n is None:
                n = t.shape[0]
            elif t.shape[0] != n:
                raise PayloadError("the payload's tensors have different batch sizes")
        if not n:
            raise PayloadError("empty batch: send at least one sample")
        return int(n)

    def to_json(self) -> dict:
        """JSON form (used in a model directory's serve.json)."""
        return {"shapes": [list(s) for s in self.shapes], "dtype": str(self.dtype).split(".")[-1],
                "is_tuple": self.is_tuple}

    @classmethod
    def from_json(cls, doc: dict) -> PayloadSpec:
        """Inverse of :meth:`to_json`."""
        dtype = getattr(torch, str(doc.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown payload dtype {doc.get('dtype')!r} in serve.json")
        return cls(tuple(tuple(int(d) for d in s) for s in doc["shapes"]), dtype,
                   bool(doc.get("is_tuple", False)))

    @classmethod
    def from_tensors(cls, tensors: Sequence[dict]) -> PayloadSpec:
        """From a bundle manifest's payload: ``[{"shape": [...], "dtype": "float32"}, ...]``
        (one entry: a plain tensor; several: a tuple, as the device sends it)."""
        dtypes = {str(t["dtype"]) for t in tensors}
        if len(dtypes) != 1:
            raise InputError(f"the payload mixes dtypes {sorted(dtypes)}; a server takes one "
                             "dtype for every tensor of its payload")
        dtype = getattr(torch, dtypes.pop(), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown payload dtype {tensors[0]['dtype']!r}")
        return cls(tuple(tuple(int(d) for d in t["shape"]) for t in tensors), dtype,
                   len(tensors) > 1)

    @classmethod
    def of(cls, payload: wire.Payload) -> PayloadSpec:
        """The spec of an example payload (batch dim dropped)."""
        tensors = payload if isinstance(payload, tuple) else (payload,)
        return cls(tuple(tuple(t.shape[1:]) for t in tensors), tensors[0].dtype,
                   isinstance(payload, tuple))


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


class HTTPError(Exception):
    """A request refused with an HTTP status and a reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.extra = extra or {}


class ServerMetrics:
    """Thread-safe counters, bounded latency samples and batch sizes for ``/metrics``."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.started = time.time()
        self.status = Counter()
        self.samples = 0
        self.batches = 0
        self.batch_sizes = Counter()
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.queue_ms: deque[float] = deque(maxlen=window)
        self.compute_ms: deque[float] = deque(maxlen=window)

    def request(self, status: int, latency_ms: float, samples: int = 0) -> None:
        with self._lock:
            self.status[status] += 1
            self.samples += samples
            self.latency_ms.append(latency_ms)

    def batch(self, size: int, compute_ms: float, queue_ms: Sequence[float]) -> None:
        with self._lock:
            self.batches += 1
            self.batch_sizes[size] += 1
            self.compute_ms.append(compute_ms)
            self.queue_ms.extend(queue_ms)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            total = sum(self.status.values())
            return {
                "uptime_s": time.time() - self.started,
                "requests": total,
                "requests_ok": self.status.get(200, 0),
                "requests_by_status": {str(k): v for k, v in sorted(self.status.items())},
                "samples": self.samples,
                "batches": self.batches,
                "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items())
                                    / self.batches if self.batches else 0.0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "latency_ms": _percentiles(self.latency_ms),
                "queue_ms": _percentiles(self.queue_ms),
                "compute_ms": _percentiles(self.compute_ms),
            }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "mean": statistics.fmean(s),
            "n": len(s)}


@dataclass
class _Job:
    tensors: tuple[torch.Tensor, ...]
    is_tuple: bool
    n: int
    future: asyncio.Future
    enqueued: float

    @property
    def signature(self) -> tuple:
        return (self.is_tuple, tuple((t.dtype, tuple(t.shape[1:])) for t in self.tensors))


class MicroBatcher:
    """Merges concurrent requests into batches and runs them on one inference thread.

    A batch starts with the oldest waiting request and takes further requests (with the same
    per-sample shapes) while it holds at most ``max_batch`` samples and the first request has
    waited less than ``max_wait_ms``. Requests queue up while a batch runs, so load increases
    batch sizes by itself.

    Args:
        module: the server half: payload (tensor or tuple) in, logits ``(N, C)`` out.
        settings: batching limits.
        metrics: where batch sizes and timings are recorded.
    """

    def __init__(self, module: nn.Module | Callable, settings: ServerSettings,
                 metrics: ServerMetrics | None = None):
        self.module = module
        self.settings = settings
        self.metrics = metrics or ServerMetrics()
        self._pending: deque[_Job] = deque()
        self._pending_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the batching task on the running event loop (idempotent)."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="splitexit-infer",
                                            initializer=self._init_thread)
        self._task = asyncio.create_task(self._worker(), name="splitexit-batcher")

    def _init_thread(self) -> None:
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Finish the queued requests (up to ``drain_timeout_s``), then stop."""
        if self._task is None:
            return
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
        except TimeoutError:
            self._task.cancel()
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(HTTPError(503, "server shutting down; retry elsewhere"))
        self._pending_samples = 0
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._task = None

    async def submit(self, payload: wire.Payload, n: int) -> tuple[torch.Tensor, int, float,
                                                                   float]:
        """Queue one request; return ``(logits, batch_size, queue_ms, compute_ms)``.

        Raises:
            HTTPError: 503 when the queue is full or the server is shutting down; 500 when the
                model fails on the batch.
        """
        if not self.running:
            self.start()
        if self._closing:
            raise HTTPError(503, "server shutting down; retry elsewhere")
        if self._pending_samples + n > self.settings.max_queue_samples:
            raise HTTPError(503, f"server overloaded: {self._pending_samples} samples queued "
                            "(max_queue_samples); retry later", {"Retry-After": "1"})
        tensors = payload if isinstance(payload, tuple) else (payload,)
        loop = asyncio.get_running_loop()
        job = _Job(tensors, isinstance(payload, tuple), n, loop.create_future(), loop.time())
        self._pending.append(job)
        self._pending_samples += n
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.settings.max_wait_ms / 1e3
        assert self._wakeup is not None
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].enqueued + wait_s
            while (self._pending_samples < self.settings.max_batch and not self._closing):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            await self._run(batch, loop)

    def _take_batch(self) -> list[_Job]:
        first = self._pending.popleft()
        batch, n = [first], first.n
        sig = first.signature
        skipped: list[_Job] = []
        while self._pending and n < self.settings.max_batch:
            job = self._pending[0]
            if job.signature != sig:
                skipped.append(self._pending.popleft())
                continue
            if n + job.n > self.settings.max_batch:
                break
            batch.append(self._pending.popleft())
            n += job.n
        self._pending.extendleft(reversed(skipped))
        self._pending_samples -= n
        return batch

    async def _run(self, batch: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        queue_ms = [1e3 * (started - j.enqueued) for j in batch]
        try:
            logits = await loop.run_in_executor(self._executor, self._forward, batch)
        except Exception as exc:  # noqa: BLE001 - a failing batch must not stop the server
            err = HTTPError(500, f"model failed on a batch of {sum(j.n for j in batch)}: "
                            f"{type(exc).__name__}: {exc}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        compute_ms = 1e3 * (loop.time() - started)
        size = sum(j.n for j in batch)
        self.metrics.batch(size, compute_ms, queue_ms)
        finite = torch.isfinite(logits).all(1)
        offset = 0
        for job, q in zip(batch, queue_ms):
            rows = logits[offset: offset + job.n]
            bad = (~finite[offset: offset + job.n]).nonzero().flatten().tolist()
            offset += job.n
            if job.future.done():
                continue
            if bad:  # only the requests carrying such samples fail; the batch's others answer
                job.future.set_exception(HTTPError(
                    422, f"the model's logits are not finite (inf or NaN) for sample(s) "
                    f"{_listing(bad)} of this request: their values overflow inside the model; "
                    "send values in the range the model was trained on (the other samples "
                    "may be sent again without them)", extra={"rows": bad}))
            else:
                job.future.set_result((rows, size, q, compute_ms))

    def _forward(self, batch: list[_Job]) -> torch.Tensor:
        first = batch[0]
        if len(batch) == 1:
            tensors = first.tensors
        else:
            tensors = tuple(torch.cat([j.tensors[i] for j in batch])
                            for i in range(len(first.tensors)))
        payload = tensors if first.is_tuple else tensors[0]
        with torch.inference_mode():
            out = self.module(payload)
        if isinstance(out, tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != sum(
                j.n for j in batch):
            raise InputError("the server module must return logits of shape (N, classes), got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out.float()


def _listing(rows: Sequence[int], most: int = 20) -> str:
    shown = ", ".join(map(str, rows[:most]))
    return f"[{shown}{', ...' if len(rows) > most else ''}]"


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id", "")
    return rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex


def _error(status: int, reason: str, request_id: str, headers: dict[str, str] | None = None,
           extra: dict[str, Any] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason, "request_id": request_id, **(extra or {})},
                        status_code=status, headers=headers)


#: what a client may send at most, shown by ``/health`` (with the token) and in 413 errors
def _limits(settings: ServerSettings) -> dict[str, int]:
    return {"max_request_samples": settings.max_request_samples,
            "max_request_bytes": settings.max_request_bytes}


async def _read_body(request: Request, settings: ServerSettings) -> bytes:
    limit = settings.max_request_bytes
    too_large = {"limits": _limits(settings)}
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise HTTPError(400, "invalid Content-Length header")
        if int(length) > limit:
            raise HTTPError(413, f"request body of {length} bytes exceeds the limit of {limit} "
                            "bytes; send fewer samples per request or a stronger codec",
                            extra=too_large)
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body exceeds the limit of {limit} bytes; send "
                                "fewer samples per request or a stronger codec", extra=too_large)
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), settings.body_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {settings.body_timeout_s:g}"
                        f" s ({size} bytes received); send it at once", {"Connection": "close"}
                        ) from None
    return b"".join(chunks)


def create_app(module: nn.Module | Callable, spec: PayloadSpec | None = None,
               settings: ServerSettings | None = None, info: dict | None = None) -> FastAPI:
    """Wrap a server half in a FastAPI app with micro-batching.

    Args:
        module: server half: payload in, logits ``(N, C)`` out (put it in eval mode).
        spec: expected per-sample payload (shapes, dtype); requests that differ get 422.
            Without it any payload the module accepts runs (errors become 500).
        settings: batching and limits (defaults when ``None``).
        info: extra JSON fields shown by ``/health`` (model name, cut, codec...).

    Returns:
        The app; its micro-batcher is ``app.state.batcher`` and metrics ``app.state.metrics``.
    """
    settings = settings or ServerSettings()
    if isinstance(module, nn.Module):
        module.eval()
    metrics = ServerMetrics()
    batcher = MicroBatcher(module, settings, metrics)
    if spec is not None:
        decoded_limit = spec.sample_bytes * settings.max_request_samples + 4096
    else:
        decoded_limit = 16 * settings.max_request_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            app.state.draining = True
            await batcher.stop()

    app = FastAPI(title="splitexit server half", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.draining = False
    private_info = {"spec": spec.to_json() if spec else None, **(info or {}),
                    "limits": _limits(settings),
                    "settings": {k: v for k, v in asdict(settings).items() if k != "token"}}

    def authorized(request: Request) -> bool:
        if settings.token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), settings.token.encode())

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException):
        # unknown paths (404), wrong methods (405): the same JSON errors as everything else
        metrics.request(exc.status_code, 0.0)
        return _error(exc.status_code, str(exc.detail), _request_id(request),
                      getattr(exc, "headers", None))

    @app.post(INFER_PATH)
    async def infer(request: Request):
        t0 = time.perf_counter()
        rid = _request_id(request)
        n = 0
        try:
            if not authorized(request):
                raise HTTPError(401, "missing or wrong bearer token; send 'Authorization: "
                                "Bearer <token>'", {"WWW-Authenticate": "Bearer"})
            if app.state.draining:
                raise HTTPError(503, "server shutting down; retry elsewhere")
            body = await _read_body(request, settings)
            if not body:
                raise HTTPError(400, "empty request body: send one codec message "
                                "(splitexit.split.codec.Codec.encode)")
            try:
                payload = wire.decode(body, max_bytes=max(decoded_limit, len(body)))
            except PayloadError as exc:
                if "max_bytes" in str(exc):  # well-formed but larger than this server takes
                    raise HTTPError(413, f"payload too large: {exc}; send fewer samples per "
                                    f"request (max_request_samples="
                                    f"{settings.max_request_samples})",
                                    extra={"limits": _limits(settings)}) from exc
                raise HTTPError(400, f"malformed payload: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - nothing a client sends may crash us
                raise HTTPError(400, f"malformed payload: {type(exc).__name__}: {exc}") from exc
            try:
                n = spec.check(payload) if spec is not None else _batch_size(payload)
            except PayloadError as exc:
                raise HTTPError(422, str(exc)) from exc
            if n > settings.max_request_samples:
                raise HTTPError(413, f"{n} samples in one request exceed max_request_samples="
                                f"{settings.max_request_samples}; split the request",
                                extra={"limits": _limits(settings)})
            logits, size, queue_ms, compute_ms = await batcher.submit(payload, n)
            answer = {"request_id": rid, "predictions": logits.argmax(1).tolist(),
                      "logits": logits.tolist(), "batch_size": size, "queue_ms": queue_ms,
                      "compute_ms": compute_ms}
            response = JSONResponse(answer, headers={"X-Request-ID": rid})
        except HTTPError as exc:
            metrics.request(exc.status, 1e3 * (time.perf_counter() - t0))
            return _error(exc.status, exc.reason, rid, exc.headers, exc.extra)
        except ClientDisconnect:  # the client left mid-body: nobody to answer
            metrics.request(CLIENT_CLOSED, 1e3 * (time.perf_counter() - t0))
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:  # noqa: BLE001 - a failure is a JSON error, counted as such
            metrics.request(500, 1e3 * (time.perf_counter() - t0))
            LOGGER.error("request %s failed: %s: %s", rid, type(exc).__name__, exc)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}", rid)
        metrics.request(200, 1e3 * (time.perf_counter() - t0), n)
        return response

    @app.get(HEALTH_PATH)
    async def health(request: Request):
        # liveness for everyone; what is served (model, cut, codec, limits) with the token
        status = "draining" if app.state.draining else "ok"
        doc = {"status": status, **(private_info if authorized(request) else {})}
        return JSONResponse(doc, status_code=503 if app.state.draining else 200)

    @app.get(METRICS_PATH)
    async def metrics_endpoint(request: Request):
        if not authorized(request):
            return _error(401, "missing or wrong bearer token", _request_id(request),
                          {"WWW-Authenticate": "Bearer"})
        return JSONResponse(metrics.snapshot())

    return app


def _batch_size(payload: wire.Payload) -> int:
    tensors = payload if isinstance(payload, tuple) else (payload,)
    if tensors[0].dim() == 0 or tensors[0].shape[0] == 0:
        raise PayloadError("payload has no batch dimension or is empty")
    return int(tensors[0].shape[0])


def uvicorn_config(app: FastAPI, log_level: str = "warning", graceful_timeout_s: float = 10.0,
                   **kwargs):
    """The ``uvicorn.Config`` that runs ``app`` with its settings' connection guards.

    Slow and idle clients are cut off (``header_timeout_s``, ``keep_alive_s``; the body's
    deadline is the app's), open connections are capped (``max_connections``, lowered to what
    the open-file limit allows; see :mod:`splitexit.serve.connections`).
    """
    import uvicorn

    settings: ServerSettings = getattr(app.state, "settings", None) or ServerSettings()
    max_connections, backlog = fit_open_files(settings.max_connections,
                                              kwargs.pop("backlog", 2048))
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                          http=guarded_protocol(settings.header_timeout_s, max_connections),
                          timeout_keep_alive=settings.keep_alive_s, backlog=backlog,
                          lifespan="on", **kwargs)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 10.0, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM, then drain in-flight requests.

    Args:
        host: interface to bind; keep ``127.0.0.1`` unless the server must be reachable from
            other machines (then put it behind TLS and set a token).
        port: TCP port (0 picks a free one).
        graceful_timeout_s: how long in-flight requests may take to finish on shutdown.
    """
    import uvicorn

    uvicorn.Server(uvicorn_config(app, log_level, graceful_timeout_s, host=host,
                                  port=port)).run()


class BackgroundServer:
    """Runs an app with uvicorn in a daemon thread on ``127.0.0.1`` (tests, benchmarks), with
    the connection guards of :func:`uvicorn_config`.

    Args:
        app: the ASGI app.
        host: interface (loopback by default).
        port: TCP port; 0 picks a free one (read :attr:`port`).

    Example:
        >>> with BackgroundServer(create_app(server, spec)) as srv:
        ...     httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn_config(app, graceful_timeout_s=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL ``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        """Start serving; returns once the server accepts connections."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="splitexit-server", daemon=True)
        self._thread.start()
        t_end = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > t_end or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.01)
        return self

    def stop(self, force: bool = False) -> None:
        """Shut down (graceful: in-flight requests finish; ``force``: drop them at once)."""
        self._server.should_exit = True
        self._server.force_exit = force
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for local servers in tests and benches)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, timeout_s: float = 60.0, process=None,
                       interval_s: float = 0.2) -> None:
    """Poll ``url/health`` until it answers 200.

    Args:
        process: a ``subprocess.Popen`` running the server; its early exit is reported at once.

    Raises:
        RuntimeError: the process exited, or no healthy answer within ``timeout_s``.
    """
    import httpx

    t_end = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            detail = process.stderr.read().decode()[-2000:] if process.stderr else ""
            raise RuntimeError(f"server process exited with {process.returncode}: {detail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > t_end:
            raise RuntimeError(f"server at {url} did not become healthy within {timeout_s:g} s")
        time.sleep(interval_s)
