"""Offloading from the edge: the undecided samples go to the server half over HTTP in
requests within the server's limits, with retries and backoff under one deadline, through the
circuit breaker, on an asyncio event loop of their own.

The server's limits (``max_request_samples``, ``max_request_bytes``) are read from
``GET /health`` with the token, once; a 413 that carries new limits re-splits the refused
request, a 422 naming rows drops just those samples, and answers larger than
``EdgeSettings.max_response_bytes`` are not read past that size. Every sample sent gets a
:class:`Sent` outcome, or none when the deadline passes first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from splitexit.errors import InputError
from splitexit.runtime.loop import payload_select
from splitexit.split.codec import Codec

from ..protocol import CONTENT_TYPE, HEALTH_PATH, INFER_PATH, REQUEST_ID_HEADER
from .answers import EdgeStats
from .breaker import CircuitBreaker
from .settings import EdgeSettings


class _RequestFailed(Exception):
    def __init__(self, reason: str, retryable: bool, breaker: bool | None = None):
        super().__init__(reason)
        self.retryable = retryable
        #: whether it counts against the server in the circuit breaker
        self.breaker = retryable if breaker is None else breaker


class _TooLarge(_RequestFailed):
    """413: the request exceeds the server's limits (which the answer may carry)."""

    def __init__(self, reason: str, limits: dict | None):
        super().__init__(reason, False)
        self.limits = limits


class _BadRows(_RequestFailed):
    """422 naming the request's samples the server half cannot compute (non-finite logits)."""

    def __init__(self, reason: str, rows: list[int]):
        super().__init__(reason, False)
        self.rows = rows


@dataclass
class _Chunk:
    """Samples of one request: ``pos`` are positions in the job's list of samples to send;
    ``payload`` holds their rows, ``body`` their encoded message."""

    job: int
    pos: np.ndarray
    payload: Any
    body: bytes


@dataclass
class Sent:
    """What became of one sample to send: the server's logits, or why there are none."""

    logits: np.ndarray | None
    request_id: str | None
    error: str | None = None
    bad_input: bool = False


def _advertised(limits: object) -> dict[str, int]:
    """The request limits a server's answer advertises (positive ints of known names)."""
    if not isinstance(limits, dict):
        return {}
    return {k: int(v) for k, v in limits.items()
            if k in ("max_request_samples", "max_request_bytes") and isinstance(v, int)
            and v > 0}


def _limit(*values: int | None) -> int | None:
    values = tuple(v for v in values if v is not None)
    return min(values) if values else None


def late_reason(deadline_s: float, error: str | None) -> str:
    """Why a sample has no server answer when the deadline has passed."""
    late = f"no answer within the deadline of {deadline_s:g} s"
    return f"{late} (last error: {error})" if error else late


class Offloader:
    """Sends samples to the server half and collects its logits, within a deadline.

    Args:
        server_url: base URL of the server half.
        codec: wire codec of the requests.
        settings: deadline, retries, backoff, token, workers and size caps.
        breaker: the circuit breaker (shared with the runtime, which reports its state).
        stats: the runtime's counters; requests, retries, bytes and errors are recorded there.
        client: an ``httpx.AsyncClient`` to use (one is created and owned otherwise); it runs
            on the offloader's own event loop thread.
    """

    def __init__(self, server_url: str, codec: Codec, settings: EdgeSettings,
                 breaker: CircuitBreaker, stats: EdgeStats,
                 client: httpx.AsyncClient | None = None):
        self.server_url = server_url
        self.codec = codec
        self.settings = settings
        self.breaker = breaker
        self.stats = stats
        self._headers = {"Content-Type": CONTENT_TYPE, "Accept-Encoding": "identity"}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"
        #: the server's advertised limits (``None``: not known yet)
        self.server_limits: dict[str, int] | None = None
        self._limits_lock = threading.Lock()
        self._own_client = client is None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="splitexit-edge-io")
        self._thread.start()
        if client is None:
            limits = httpx.Limits(max_connections=settings.workers,
                                  max_keepalive_connections=settings.workers)
            client = httpx.AsyncClient(limits=limits)
        self._client = client

    def close(self) -> None:
        """Cancel what is still in flight, close the connections and stop the I/O thread;
        bounded (about two seconds at most) whatever the server does."""
        loop = self._loop

        async def shutdown() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=0.5)
            if self._own_client:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.aclose(), 0.5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=1.5)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(1.0)
        if not self._thread.is_alive():
            loop.close()

    def _late(self, error: str | None) -> str:
        return late_reason(self.settings.deadline_s, error)

    def _failed(self, reason: str) -> None:
        """A request failed for a reason of the server or the link: remember it."""
        self.stats.error(reason)

    def offload(self, jobs: list[tuple[int, Any]], deadline: float
                ) -> dict[int, dict[int, Sent]]:
        """Send each job's samples in requests within the limits.

        Args:
            jobs: per job, the number of samples to send and their payload (rows first).
            deadline: ``time.monotonic()`` by which every exchange ends.

        Returns:
            ``{job: {row: Sent}}`` for the samples that got an outcome before the deadline.
        """
        self._learn_limits(deadline)
        chunks: list[_Chunk] = []
        unsendable: dict[int, dict[int, Sent]] = {}
        for k, (count, payload) in enumerate(jobs):
            if count:
                chunks += self._plan(k, np.arange(count), payload, unsendable)
        future = asyncio.run_coroutine_threadsafe(self._send_all(chunks, deadline), self._loop)
        try:
            sent = future.result(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        except (cf.TimeoutError, cf.CancelledError):
            future.cancel()
            sent = {}
        for k, rows in unsendable.items():
            sent.setdefault(k, {}).update(rows)
        return sent

    def _plan(self, job: int, pos: np.ndarray, payload, unsendable: dict) -> list[_Chunk]:
        """Requests for the samples ``pos`` (rows of ``payload``) within the limits; a sample
        the codec refuses (e.g. beyond float16's range for ``fp16``) is answered locally."""
        limits = self.server_limits or {}
        max_samples = _limit(limits.get("max_request_samples"),
                             self.settings.max_request_samples)
        max_bytes = _limit(limits.get("max_request_bytes"), self.settings.max_request_bytes)
        out: list[_Chunk] = []

        def add(lo: int, hi: int) -> None:
            part = payload_select(payload, slice(lo, hi))
            try:
                body = self.codec.encode(part)
            except InputError as exc:
                if hi - lo == 1:
                    unsendable.setdefault(job, {})[int(pos[lo])] = Sent(
                        None, None, f"the codec {self.codec.spec()} cannot send this input's "
                        f"payload ({exc})", bad_input=True)
                    return
                body = None
            if body is None:  # find the sample(s) the codec refuses
                mid = (lo + hi) // 2
                add(lo, mid)
                add(mid, hi)
                return
            if max_bytes is not None and len(body) > max_bytes and hi - lo > 1:
                # as many samples per request as the measured size allows (checked again)
                step = max(1, min(hi - lo - 1, (hi - lo) * max_bytes // len(body)))
                for start in range(lo, hi, step):
                    add(start, min(hi, start + step))
                return
            out.append(_Chunk(job, pos[lo:hi], part, body))

        step = max_samples or len(pos)
        for lo in range(0, len(pos), step):
            add(lo, min(len(pos), lo + step))
        return out

    def _learn_limits(self, deadline: float) -> None:
        """Read the server's limits from ``/health`` (with the token) once; a failed read
        (link down) is tried again on a later call."""
        if self.server_limits is not None or self.breaker.state != CircuitBreaker.CLOSED:
            return
        if not self._limits_lock.acquire(blocking=False):
            return  # another call is asking; a 413 would carry the limits anyway
        try:
            if self.server_limits is not None:
                return
            budget = (deadline - time.monotonic()) / 2
            if budget <= 0.005:
                return
            future = asyncio.run_coroutine_threadsafe(
                asyncio.wait_for(self._fetch("GET", HEALTH_PATH, None, self._headers, budget),
                                 budget), self._loop)
            try:
                status, content = future.result(timeout=budget + 0.5)
            except Exception:  # noqa: BLE001 - unknown limits: requests are split on 413s
                future.cancel()
                return
            limits = {}
            if status == 200:
                with contextlib.suppress(ValueError):
                    doc = json.loads(content)
                    limits = _advertised(doc.get("limits") if isinstance(doc, dict) else None)
            self.server_limits = limits  # an answer without limits: none advertised
        finally:
            self._limits_lock.release()

    async def _send_all(self, chunks: list[_Chunk], deadline: float
                        ) -> dict[int, dict[int, Sent]]:
        result: dict[int, dict[int, Sent]] = {}
        await asyncio.gather(*(self._send(c, deadline, result) for c in chunks))
        return result

    async def _send(self, chunk: _Chunk, deadline: float, result: dict) -> None:
        """One request's samples: retries, re-splits on 413, drops the rows a 422 names."""
        rows = result.setdefault(chunk.job, {})

        def settle(outcome: Sent, pos=None) -> None:
            for p in (chunk.pos if pos is None else pos).tolist():
                rows[int(p)] = outcome

        error: str | None = None
        attempt = 0
        while True:
            if not self.breaker.allow():
                return settle(Sent(None, None, "circuit breaker open after repeated failures "
                                    f"(last error: {self.stats.last_error or error})"))
            if deadline - time.monotonic() <= 1e-3:
                return settle(Sent(None, None, self._late(error)))
            rid = uuid.uuid4().hex
            try:
                logits, received = await self._exchange(chunk, rid, deadline)
            except asyncio.TimeoutError:
                self.breaker.failure()
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                self._failed(self._late(None))
                return settle(Sent(None, rid, self._late(error)))
            except _TooLarge as exc:
                self.breaker.success()  # the server works; this request was too large
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                if exc.limits:
                    self.server_limits = {**(self.server_limits or {}), **exc.limits}
                unsendable: dict = {}
                parts = self._plan(chunk.job, chunk.pos, chunk.payload, unsendable)
                for p, outcome in unsendable.get(chunk.job, {}).items():
                    rows[p] = outcome
                if exc.limits and (len(parts) > 1 or (parts and len(parts[0].pos)
                                                       < len(chunk.pos))):
                    await asyncio.gather(*(self._send(c, deadline, result) for c in parts))
                    return None
                self._failed(str(exc))
                return settle(Sent(None, rid, str(exc)))
            except _BadRows as exc:
                self.breaker.success()
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                bad = sorted({r for r in exc.rows if 0 <= r < len(chunk.pos)})
                if not bad:  # rows the request does not have: the answer is wrong
                    self._failed(str(exc))
                    return settle(Sent(None, rid, str(exc)))
                settle(Sent(None, rid, f"the server half cannot compute this input: {exc}",
                             bad_input=True), chunk.pos[bad])
                keep = np.setdiff1d(np.arange(len(chunk.pos)), bad)
                if not len(keep):
                    return None
                payload = payload_select(chunk.payload, keep)
                chunk = _Chunk(chunk.job, chunk.pos[keep], payload, self.codec.encode(payload))
                continue  # the rest again, at once: one bad input costs one answer
            except _RequestFailed as exc:
                error = str(exc)
                self._failed(error)
                if exc.breaker:
                    self.breaker.failure()
                else:
                    self.breaker.success()  # the server works; it refused this request
                self.stats.request(len(chunk.body), 0, False, attempt > 0)
                if not exc.retryable:
                    return settle(Sent(None, rid, error))
                if attempt >= self.settings.retries:
                    return settle(Sent(None, rid, f"gave up after {attempt + 1} attempts: "
                                        f"{error}"))
                wait = min(self.settings.backoff_s * 2 ** attempt, self.settings.backoff_max_s,
                           max(0.0, deadline - time.monotonic()))
                await asyncio.sleep(wait)
                attempt += 1
                continue
            self.breaker.success()
            self.stats.request(len(chunk.body), received, True, attempt > 0)
            for p, row in zip(chunk.pos.tolist(), logits):
                rows[int(p)] = Sent(row, rid)
            return None

    async def _fetch(self, method: str, path: str, body: bytes | None, headers: dict,
                     timeout: float) -> tuple[int, bytes]:
        """One exchange, the answer read as a stream and never past ``max_response_bytes``.

        Raises:
            _RequestFailed: connection / protocol errors (retryable), an answer too large.
        """
        cap = self.settings.max_response_bytes
        request = self._client.build_request(method, self.server_url + path, content=body,
                                             headers=headers, timeout=httpx.Timeout(timeout))
        try:
            response = await self._client.send(request, stream=True)
            try:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > cap:
                    raise _RequestFailed(f"the server's answer of {declared} bytes exceeds "
                                         f"max_response_bytes={cap}; not read", False, True)
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":  # a compressed answer could expand past the cap
                    raise _RequestFailed(f"the server's answer is {encoding}-encoded; the edge "
                                         "asks for and reads identity encoding only", False,
                                         True)
                buf = bytearray()
                async for part in response.aiter_raw():
                    buf += part
                    if len(buf) > cap:
                        raise _RequestFailed(f"the server's answer exceeds max_response_bytes="
                                             f"{cap}; stopped reading it", False, True)
                return response.status_code, bytes(buf)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise _RequestFailed(f"{type(exc).__name__}: {exc or 'connection failed'}",
                                 True) from exc

    async def _exchange(self, chunk: _Chunk, rid: str, deadline: float
                        ) -> tuple[np.ndarray, int]:
        """POST one request; its logits and the answer's size. The deadline bounds it all.

        Raises:
            asyncio.TimeoutError: the deadline passed.
            _RequestFailed: (and subclasses) any other failure.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise asyncio.TimeoutError
        headers = {**self._headers, REQUEST_ID_HEADER: rid}
        status, content = await asyncio.wait_for(
            self._fetch("POST", INFER_PATH, chunk.body, headers, remaining), remaining)
        m = len(chunk.pos)
        try:
            doc = json.loads(content)
        except ValueError:
            doc = None
        if status != 200:
            reason = doc.get("error") if isinstance(doc, dict) else None
            reason = f"server answered {status}: {reason or content[:200].decode(errors='replace')}"
            if status == 413:
                limits = _advertised(doc.get("limits") if isinstance(doc, dict) else None)
                raise _TooLarge(reason, limits or None)
            if status == 422 and isinstance(doc, dict) and isinstance(doc.get("rows"), list) \
                    and all(isinstance(r, int) for r in doc["rows"]):
                raise _BadRows(reason, doc["rows"])
            raise _RequestFailed(reason, status >= 500 or status in (408, 429))
        try:
            logits = np.asarray(doc["logits"], dtype=np.float32)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise _RequestFailed(f"invalid server answer: {type(exc).__name__}: {exc}",
                                 True) from exc
        if doc.get("request_id") != rid or logits.ndim != 2 or logits.shape[0] != m \
                or logits.shape[1] < 1 or not np.isfinite(logits).all():
            raise _RequestFailed(f"server answer does not match request {rid} ({m} samples)",
                                 True)
        return logits, len(content)
