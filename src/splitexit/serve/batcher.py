"""Micro-batching: concurrent requests merged into batches that run on one inference thread
(:class:`MicroBatcher`), and the HTTP error a refused request carries (:class:`HTTPError`)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitexit.errors import InputError
from splitexit.split import codec as wire

from .metrics import ServerMetrics
from .settings import ServerSettings

__all__ = ["HTTPError", "MicroBatcher"]


class HTTPError(Exception):
    """A request refused with an HTTP status and a reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}
        self.extra = extra or {}



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
