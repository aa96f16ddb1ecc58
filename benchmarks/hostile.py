"""Hostile peers on loopback, shared by the hardening tests and ``python -m benchmarks serve``.

- :class:`HalfOpenAttacker` holds many half-sent requests open against a server;
- :class:`RawServer` is an HTTP server that misbehaves on purpose: :func:`trickle` answers one
  byte every 20 ms, :class:`FatAnswer` sends 300 MB bodies;
- :func:`serve_process` runs ``splitexit serve`` as a subprocess with its log in a file;
- :func:`valid_requests` checks that valid requests are still answered within a deadline;
- :func:`edge_memory_growth` runs an edge (without PyTorch) in its own process and reports how
  much its peak memory grew.

Everything binds 127.0.0.1 only, is bounded in time and stops by itself.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["HalfOpenAttacker", "RawServer", "trickle", "FatAnswer", "serve_process",
           "valid_requests", "edge_memory_growth", "EDGE_MEMORY_SCRIPT"]


class HalfOpenAttacker:
    """Holds ``target`` half-sent requests open (non-blocking connects; a connection the server
    closes is opened again every 0.2 s) until :meth:`stop` / the end of the ``with`` block.

    ``stats``: ``held`` (now), ``held_max``, ``opened``, ``closed_by_server``,
    ``connect_errors``, ``pending``; ``timeline``: ``(held, pending)`` every 0.5 s.
    """

    HALF = b"POST /v1/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.stats = {"held": 0, "held_max": 0, "opened": 0, "closed_by_server": 0,
                      "connect_errors": 0, "pending": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.timeline: list[tuple[int, int]] = []
        self._next_sample = 0.0

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_opened(self, timeout_s: float = 15.0) -> bool:
        """Wait until ``target`` connections were opened (at most ``timeout_s``)."""
        t_end = time.monotonic() + timeout_s
        while self.stats["opened"] < self.target and time.monotonic() < t_end:
            time.sleep(0.05)
        return self.stats["opened"] >= self.target

    def _run(self):
        sel = selectors.DefaultSelector()
        pending: set = set()
        held: set = set()
        next_top_up = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_top_up:
                    for _ in range(self.target - len(held) - len(pending)):
                        s = socket.socket()
                        s.setblocking(False)
                        s.connect_ex(("127.0.0.1", self.port))
                        sel.register(s, selectors.EVENT_WRITE)
                        pending.add(s)
                    next_top_up = now + 0.2
                for key, _ in sel.select(0.05):
                    s = key.fileobj
                    if s in pending:
                        pending.discard(s)
                        try:
                            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                                raise OSError
                            s.send(self.HALF)
                        except OSError:
                            self.stats["connect_errors"] += 1
                            sel.unregister(s)
                            s.close()
                            continue
                        sel.modify(s, selectors.EVENT_READ)
                        held.add(s)
                        self.stats["opened"] += 1
                    else:  # readable: the server closed it (EOF) or reset it
                        try:
                            gone = s.recv(1) == b""
                        except OSError:
                            gone = True
                        if gone:
                            self.stats["closed_by_server"] += 1
                            held.discard(s)
                            sel.unregister(s)
                            s.close()
                self.stats["held"] = len(held)
                self.stats["pending"] = len(pending)
                self.stats["held_max"] = max(self.stats["held_max"], len(held))
                if now >= self._next_sample:
                    self.timeline.append((len(held), len(pending)))
                    self._next_sample = now + 0.5
        finally:
            for s in held | pending:
                sel.unregister(s)
                s.close()
            sel.close()


def raise_open_file_limit(needed: int) -> None:
    """Raise this process's soft open-file limit to at least ``needed`` (up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, 4096)), hard))


def valid_requests(url: str, body: bytes, seconds: float, deadline_s: float,
                   headers: dict | None = None) -> list[bool]:
    """Valid ``/v1/infer`` + ``/health`` requests for ``seconds`` (a new connection each: the
    hardest case for a crowded server): for each, whether both were answered 200 within
    ``deadline_s``."""
    import httpx

    results = []
    t_stop = time.monotonic() + seconds
    while time.monotonic() < t_stop:
        t0 = time.monotonic()
        try:
            with httpx.Client(timeout=deadline_s) as client:
                r = client.post(url + "/v1/infer", content=body, headers=headers or {})
                h = client.get(url + "/health", headers=headers or {})
            ok = r.status_code == 200 and h.status_code == 200
        except httpx.HTTPError:
            ok = False
        results.append(ok and time.monotonic() - t0 <= deadline_s)
        time.sleep(0.1)
    return results


@contextmanager
def serve_process(target, *extra: str, env: dict | None = None, nofile: int | None = None,
                  log: Path):
    """``splitexit serve target`` on 127.0.0.1 as a subprocess, its log in the file ``log``
    (a pipe nobody reads would block a server that logs a lot), optionally with a lowered
    open-file limit. Yields ``(process, url, port)``; the process is killed on exit."""
    from splitexit.serve.runner import free_port, wait_until_healthy

    port = free_port()

    def limit():  # runs in the child before exec
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", "serve", str(target),
                                 "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                                 *extra],
                                stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 90, process=proc, interval_s=0.1)
        yield proc, url, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


class RawServer:
    """A misbehaving HTTP server on 127.0.0.1: ``answer(conn, request_head, stop)`` writes the
    response; each connection has its own daemon thread; :meth:`close` stops it all."""

    def __init__(self, answer):
        self.answer = answer
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        conn.settimeout(5)
        try:
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, body = buf.split(b"\r\n\r\n", 1)
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                self.requests.append(head.split(b"\r\n")[0])
                self.answer(conn, head, self.stop)
        except OSError:
            pass

    def close(self):
        self.stop.set()
        self.sock.close()
        self.thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def trickle(conn, head, stop):
    """A valid answer, one byte every 20 ms (it would take minutes)."""
    body = b'{"logits": [' + b"0.0, " * 20000 + b"0.0]}"
    data = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)
    for i in range(len(data)):
        if stop.is_set():
            return
        conn.sendall(data[i: i + 1])
        time.sleep(0.02)


class FatAnswer:
    """300 MB answers (``mb``): chunked (no length: only a streaming cap stops it) and, on every
    second connection, with a Content-Length. ``GET /health`` gets a small valid answer."""

    def __init__(self, mb: int = 300):
        self.mb = mb
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, conn, head, stop):
        chunk = b"[" * (1 << 20)
        if head.startswith(b"GET /health"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 15\r\n\r\n{\"status\":\"ok\"}")
            return
        with self._lock:
            declared = self.calls % 2 == 1
            self.calls += 1
        if declared:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(self.mb * len(chunk)).encode()
                         + b"\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(self.mb):
            if stop.is_set():
                return
            if declared:
                conn.sendall(chunk)
            else:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")


# The edge process of a device (no PyTorch): peak-memory growth over two classify calls
# after a warm-up; argv: bundle, server URL, inputs (.npy).
EDGE_MEMORY_SCRIPT = r"""
import json, sys, time
sys.modules["torch"] = None  # the edge process of a device: no PyTorch
import numpy as np
from splitexit.runtime.bundle import load_bundle
from splitexit.serve.edge import EdgeRuntime, EdgeSettings

def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith("VmHWM:")) / 1024

b = load_bundle(sys.argv[1])
x = np.load(sys.argv[3])
out = {}
with EdgeRuntime(b.device(), b.policy, sys.argv[2], b.codec,
                 EdgeSettings(deadline_s=20, retries=0)) as edge:
    edge.classify(x[:2])   # warm-up: sessions, threads, the HTTP client
    before = hwm()
    indices = []
    for i in range(2):
        t0 = time.monotonic()
        answers = edge.classify(x)
        out[f"call{i}_s"] = time.monotonic() - t0
        indices.append(sorted(a.index for a in answers))
    out["errors"] = sorted({a.error for a in answers if a.error})
    out["sources"] = sorted({a.source for a in answers})
    out["answers_once"] = all(ix == list(range(len(x))) for ix in indices)
out["growth_mb"] = hwm() - before
print(json.dumps(out))
"""


def edge_memory_growth(bundle_dir: str | Path, url: str, inputs_npy: str | Path,
                       timeout_s: float = 120) -> dict:
    """Run :data:`EDGE_MEMORY_SCRIPT` in its own process; its JSON result (``growth_mb``,
    ``sources``, ``errors``, ``answers_once``, ``call0_s``, ``call1_s``).

    Raises:
        RuntimeError: the edge process failed (its stderr's tail is in the message).
    """
    proc = subprocess.run([sys.executable, "-c", EDGE_MEMORY_SCRIPT, str(bundle_dir), url,
                           str(inputs_npy)], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"edge memory run failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
