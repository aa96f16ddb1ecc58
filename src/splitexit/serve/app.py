"""The server half as an HTTP service: codec payloads in, predictions and logits out.

:func:`create_app` wraps any server-half module (payload in, logits out) in a FastAPI app
with micro-batching of concurrent requests (:class:`~splitexit.serve.batcher.MicroBatcher`),
``/health`` and ``/metrics`` endpoints, a bearer token, request size limits, a body deadline
and a bounded queue. :func:`splitexit.serve.runner.serve` runs it with uvicorn (graceful
shutdown on SIGINT/SIGTERM) behind the connection guards of :mod:`splitexit.serve.connections`
(header deadline, connection cap, keep-alive timeout). Payloads are decoded with
:func:`splitexit.split.codec.decode` under a byte limit and checked against the expected
per-sample shapes (:class:`~splitexit.payload.PayloadSpec`) before anything is queued;
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
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from torch import nn

from splitexit.errors import PayloadError
from splitexit.split import codec as wire

from ..payload import PayloadSpec
from .batcher import HTTPError, MicroBatcher
from .connections import LOGGER
from .metrics import ServerMetrics
from .protocol import HEALTH_PATH, INFER_PATH, METRICS_PATH
from .settings import ServerSettings

__all__ = ["CLIENT_CLOSED", "create_app"]

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: counted in ``/metrics`` when a client disconnects before its request could be answered
CLIENT_CLOSED = 499


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
