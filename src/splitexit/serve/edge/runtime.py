"""The edge runtime: local exits on the device, offload of undecided samples, fallback on
failure, and exactly one labelled :class:`~.answers.Answer` per input."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np

from splitexit.errors import InputError
from splitexit.policies import ExitPolicy
from splitexit.runtime.arrays import NUMPY
from splitexit.runtime.loop import check_batch, init_state, payload_select, payload_tensors
from splitexit.split.codec import Codec

from .answers import EXIT, FAILED, FALLBACK, SERVER, Answer, EdgeStats
from .breaker import CircuitBreaker
from .offload import Offloader, Sent, late_reason
from .settings import EdgeSettings


def _finite_rows(arrays, n: int) -> np.ndarray:
    """Bool ``(n,)``: every value of the row is finite in each array (rows first)."""
    ok = np.ones(n, dtype=bool)
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            ok &= np.isfinite(a.reshape(n, -1)).all(axis=1)
    return ok


class EdgeRuntime:
    """Runs the device part, offloads undecided samples, falls back locally on failure.

    Args:
        device: the device part (stages before the cut and the local exits): any runtime with
            ``run(x, policy) -> DeviceOutput`` and ``num_exits``, e.g. a bundle's
            ``load_bundle(dir).device()`` (ONNX Runtime) or a PyTorch ``DevicePart``.
        policy: exit policy of the local exits; it also judges the server's logits.
        server_url: base URL of the server half (``None``: never offload, answer locally).
        codec: wire codec (a :class:`Codec` or its spelling).
        settings: deadline, retries, breaker, token and sizes.
        client: an ``httpx.AsyncClient`` to use (one is created and owned otherwise); it runs
            on the runtime's own event loop thread.

    Thread-safe: several threads may call :meth:`classify` at once. :meth:`close` (or leaving
    the ``with`` block) takes at most about two seconds, whatever the server does.
    """

    def __init__(self, device, policy: ExitPolicy, server_url: str | None,
                 codec: Codec | str | None = "fp32", settings: EdgeSettings | None = None,
                 client: httpx.AsyncClient | None = None):
        if not callable(getattr(device, "run", None)) or not isinstance(
                getattr(device, "num_exits", None), int):
            raise InputError(f"device must be a device runtime with run(x, policy) and "
                             f"num_exits (a bundle's .device() or a DevicePart), got "
                             f"{type(device).__name__}")
        if not isinstance(policy, ExitPolicy):
            raise InputError(f"policy must be an ExitPolicy, got {type(policy).__name__}")
        if client is not None and not isinstance(client, httpx.AsyncClient):
            raise InputError(f"client must be an httpx.AsyncClient (the runtime bounds every "
                             f"exchange on its own event loop), got {type(client).__name__}")
        self.device = device.eval() if callable(getattr(device, "eval", None)) else device
        self.policy = policy
        self.server_url = server_url.rstrip("/") if server_url else None
        codec = "fp32" if codec is None else codec
        self.codec = Codec.parse(codec) if isinstance(codec, str) else codec
        self.settings = settings or EdgeSettings()
        self.breaker = CircuitBreaker(self.settings.breaker_failures,
                                      self.settings.breaker_reset_s)
        self.stats = EdgeStats()
        self._closed = False
        self._close_lock = threading.Lock()
        self._offloader = None if self.server_url is None else Offloader(
            self.server_url, self.codec, self.settings, self.breaker, self.stats, client)

    @property
    def server_limits(self) -> dict[str, int] | None:
        """The server's advertised limits (``None``: not known yet, or no server)."""
        return None if self._offloader is None else self._offloader.server_limits

    @server_limits.setter
    def server_limits(self, limits: dict[str, int] | None) -> None:
        if self._offloader is not None:
            self._offloader.server_limits = limits

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Cancel what is still in flight, close the connections and stop the I/O thread;
        bounded (about two seconds at most) whatever the server does."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._offloader is not None:
            self._offloader.close()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ inference
    def classify(self, x) -> list[Answer]:
        """Answer every sample of a batch exactly once, within the deadline.

        Args:
            x: input batch ``(N, *input_shape)``, float: a numpy array (or a torch tensor).

        Returns:
            ``N`` answers in input order. An input the device half, the codec or the server
            half cannot compute (finite values that overflow) gets its own ``failed`` answer
            (or its local ``fallback``), with the reason in ``error``.

        Raises:
            InputError: wrong type, dtype, shape or non-finite input (the whole batch).
        """
        t0 = time.monotonic()
        deadline = t0 + self.settings.deadline_s
        if self._closed:
            raise InputError("this EdgeRuntime is closed; create a new one")
        check_batch(x, getattr(self.device, "input_shape", None))
        n = int(x.shape[0])
        answers: list[Answer | None] = [None] * n
        groups = self._device_pass(x, np.arange(n), answers, t0)
        t_device = 1e3 * (time.monotonic() - t0)
        bad = sum(a is not None for a in answers)  # inputs that broke the device runtime
        jobs = []  # per group: (group, positions in out.undecided to send, their payload)
        for index, out in groups:
            for r in np.flatnonzero(out.decided).tolist():
                i = int(index[r])
                logits = out.logits[r]
                if np.isfinite(logits).all():
                    answers[i] = Answer(i, int(out.predictions[r]), EXIT,
                                        int(out.exit_index[r]), t_device, logits=logits)
                else:
                    bad += 1
                    answers[i] = Answer(i, -1, FAILED, -1, t_device, error=(
                        f"exit {int(out.exit_index[r])}'s logits are not finite for this input:"
                        " its values overflow the device half"))
            m = len(out.undecided)
            if not m:
                continue
            if self.server_url is None:
                jobs.append((index, out, np.zeros(0, dtype=np.int64), None))
                continue
            ok = _finite_rows(payload_tensors(out.payload), m)
            send = np.flatnonzero(ok)
            payload = out.payload if ok.all() else payload_select(out.payload, send)
            jobs.append((index, out, send, payload))
        sent = (self._offloader.offload([(len(send), payload) for _, _, send, payload in jobs],
                                        deadline)
                if any(len(j[2]) for j in jobs) else {})
        t_end = 1e3 * (time.monotonic() - t0)
        offloaded = failed = 0
        for k, (index, out, send, _) in enumerate(jobs):
            rows = out.undecided.tolist()
            done = sent.get(k, {})
            results = [Sent(None, None, "no server configured") for _ in rows]
            late = late_reason(self.settings.deadline_s, None)
            for p, j in enumerate(send.tolist()):
                results[j] = done.get(p) or Sent(None, None, late)
            not_sent = set(range(len(rows))) - set(send.tolist())
            if self.server_url is not None:
                for j in not_sent:
                    results[j] = Sent(None, None, "the device half's output at the cut is not "
                                       "finite for this input (its values overflow); it was "
                                       "not sent", bad_input=True)
            offloaded += len(send)
            failed += sum(1 for j in send.tolist() if results[j].logits is None
                          and not results[j].bad_input)
            bad += sum(1 for r in results if r.bad_input)
            got = [j for j, r in enumerate(results) if r.logits is not None]
            decision = None
            if got:
                width = results[got[0]].logits.shape[0]
                logits = np.zeros((len(rows), width), dtype=np.float32)
                for j in got:
                    logits[j] = results[j].logits
                final = self.device.num_exits - 1
                state = out.state or init_state(self.policy, len(rows), width, NUMPY)
                decision = self.policy.final_decision(final, logits, state)
                for j in got:  # e.g. an ensemble over a local exit that overflowed
                    if not np.isfinite(decision[j]).all():
                        results[j] = Sent(None, results[j].request_id, "the policy's decision "
                                           "on the server's logits is not finite (this "
                                           "input's values overflow the device half)",
                                           bad_input=True)
            fallback = out.fallback_logits
            usable = (_finite_rows([fallback], len(rows)) if fallback is not None
                      else np.zeros(len(rows), dtype=bool))
            for j, i in enumerate(rows):
                i = int(index[i])
                r = results[j]
                if r.logits is not None:
                    answers[i] = Answer(i, int(decision[j].argmax()), SERVER,
                                        self.device.num_exits - 1, t_end, r.request_id,
                                        logits=decision[j])
                elif usable[j]:
                    answers[i] = Answer(i, int(fallback[j].argmax()), FALLBACK,
                                        out.fallback_exit, t_end, r.request_id, r.error,
                                        fallback[j])
                else:
                    reason = r.error if fallback is None else (
                        f"{r.error}; the local fallback exit's logits are not finite either")
                    answers[i] = Answer(i, -1, FAILED, -1, t_end, r.request_id, reason)
        done = [a for a in answers if a is not None]
        assert len(done) == n, "every input gets exactly one answer"
        self.stats.offload(offloaded, failed, bad)
        self.stats.record(done)
        return done

    def _device_pass(self, x, index: np.ndarray, answers: list, t0: float) -> list:
        """``[(input indices, DeviceOutput)]``; a part that fails is halved until the inputs
        that break the device half are alone, and each of those gets a failed answer."""
        try:
            return [(index, self.device.run(x, self.policy).as_numpy())]
        except Exception as exc:  # noqa: BLE001 - the batch passed check_batch: an input's
            if len(index) == 1:   # values break the device half; it alone pays
                i = int(index[0])
                answers[i] = Answer(i, -1, FAILED, -1, 1e3 * (time.monotonic() - t0),
                                    error=f"the device half failed on this input "
                                    f"({type(exc).__name__}: {exc})")
                return []
        half = len(index) // 2
        return (self._device_pass(x[:half], index[:half], answers, t0)
                + self._device_pass(x[half:], index[half:], answers, t0))
