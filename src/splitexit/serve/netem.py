"""Network emulation on loopback: a shaping TCP proxy between the edge and the server.

:class:`NetemProxy` listens on ``127.0.0.1`` and forwards to a target, shaping each direction
with a bandwidth (a shared store-and-forward link per direction: a chunk occupies the link for
``len * 8 / rate`` seconds), a one-way delay with uniform jitter (delivery order is kept, as in
TCP), loss (a lost chunk arrives one retransmission timeout later, which is what loss looks
like above TCP), random connection resets, and outages switched at run time:

- ``"down"``: connections are reset and new ones refused at once (server unreachable).
- ``"blackhole"``: connections stay open but nothing gets through (a dead link; clients see
  timeouts).

It runs its own asyncio loop in a daemon thread; :meth:`NetemProxy.close` stops everything it
started. Buffers are bounded (a full queue stops reading: backpressure like a real link).

Example:
    >>> with NetemProxy("127.0.0.1", server_port, LinkConditions.from_link(get_link("lte"))) as p:
    ...     edge = EdgeRuntime(device, policy, p.url)
    ...     p.set_outage("down")   # link down from now on
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from dataclasses import dataclass, replace

from splitexit.devices import LinkProfile, get_link
from splitexit.errors import InputError

__all__ = ["LinkConditions", "NetemProxy", "OUTAGE_MODES"]

OUTAGE_MODES = (None, "down", "blackhole")
_CHUNK = 8192
_QUEUE_CHUNKS = 128  # per direction and connection: at most 1 MiB buffered


@dataclass(frozen=True)
class LinkConditions:
    """Conditions applied by the proxy.

    Attributes:
        up_mbps: edge -> server bandwidth in Mbit/s (``None``: unlimited).
        down_mbps: server -> edge bandwidth in Mbit/s (``None``: unlimited).
        delay_ms: one-way delay added in each direction (half the round-trip time).
        jitter_ms: uniform jitter added to the one-way delay, in ``[-jitter, +jitter]``.
        loss: probability that a chunk is lost; it then arrives ``rto_ms`` later.
        rto_ms: retransmission timeout charged for a lost chunk (Linux's minimum is 200 ms).
        reset_rate: probability per chunk that the connection is reset.
    """

    up_mbps: float | None = None
    down_mbps: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rto_ms: float = 200.0
    reset_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not v > 0
                                  or not math.isfinite(v)):
                raise InputError(f"LinkConditions.{name} must be > 0 Mbit/s or None "
                                 f"(unlimited), got {v!r}")
        for name in ("delay_ms", "jitter_ms", "rto_ms"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 600_000:
                raise InputError(f"LinkConditions.{name} must be in 0..600000 ms, got {v!r}")
        for name in ("loss", "reset_rate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise InputError(f"LinkConditions.{name} must be a probability in [0, 1], "
                                 f"got {v!r}")

    @classmethod
    def from_link(cls, link: LinkProfile | str, time_scale: float = 1.0,
                  rto_ms: float = 200.0) -> LinkConditions:
        """Conditions of a link profile (``splitexit.devices.get_link``).

        Args:
            link: profile or its name (``"lte"``, ``"wifi"``, ...).
            time_scale: multiply every time by it (0.1 runs the link ten times faster:
                delays and transfer times shrink tenfold) to keep long runs short.
            rto_ms: retransmission timeout for lost chunks, before scaling.
        """
        link = get_link(link) if isinstance(link, str) else link
        if not time_scale > 0:
            raise InputError(f"time_scale must be > 0, got {time_scale!r}")
        return cls(up_mbps=link.uplink_mbps / time_scale,
                   down_mbps=link.downlink_mbps / time_scale,
                   delay_ms=link.rtt_ms / 2 * time_scale,
                   jitter_ms=link.jitter_ms / 2 * time_scale,
                   loss=link.loss_rate, rto_ms=rto_ms * time_scale)


class _Conn:
    def __init__(self, client: asyncio.StreamWriter):
        self.client = client
        self.server: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        for w in (self.client, self.server):
            if w is not None:
                w.transport.abort()


class NetemProxy:
    """A shaping TCP proxy on loopback (see the module docstring).

    Args:
        target_host: host the proxy forwards to.
        target_port: port it forwards to.
        conditions: initial link conditions (``LinkConditions()`` = a perfect link).
        listen_host: address to listen on; loopback by default.
        listen_port: port (0 picks a free one; read :attr:`port`).
        seed: seed of the jitter / loss / reset draws.
    """

    def __init__(self, target_host: str, target_port: int,
                 conditions: LinkConditions | None = None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, seed: int = 0):
        self.target = (target_host, int(target_port))
        self.listen = (listen_host, int(listen_port))
        self._conditions = conditions or LinkConditions()
        self._outage: str | None = None
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._link_free = {"up": 0.0, "down": 0.0}
        self.port: int | None = None
        self.stats = {"connections": 0, "refused": 0, "resets": 0, "lost_chunks": 0,
                      "bytes_up": 0, "bytes_down": 0, "dropped_bytes": 0}

    # ------------------------------------------------------------------ control
    @property
    def url(self) -> str:
        """``http://host:port`` of the proxy."""
        return f"http://{self.listen[0]}:{self.port}"

    @property
    def conditions(self) -> LinkConditions:
        return self._conditions

    def set_conditions(self, conditions: LinkConditions | None = None, **changes) -> None:
        """Replace the conditions, or change some fields (``set_conditions(delay_ms=50)``)."""
        self._conditions = replace(conditions or self._conditions, **changes)

    def set_outage(self, mode: str | None) -> None:
        """Start (``"down"`` / ``"blackhole"``) or end (``None``) an outage."""
        if mode not in OUTAGE_MODES:
            raise InputError(f"outage mode must be one of {OUTAGE_MODES}, got {mode!r}")
        self._outage = mode
        if mode == "down" and self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_all)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            conn.abort()
            self.stats["resets"] += 1

    def start(self) -> NetemProxy:
        """Bind and start forwarding in a daemon thread; returns ``self``."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._handle, *self.listen))
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                error.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            self._abort_all()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="splitexit-netem", daemon=True)
        self._thread.start()
        ready.wait(10)
        if error:
            self._thread = None
            raise InputError(f"cannot listen on {self.listen}: {error[0]}")
        return self

    def close(self) -> None:
        """Stop the proxy and reset its connections (idempotent)."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> NetemProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ forwarding
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        if self._outage == "down":
            self.stats["refused"] += 1
            conn.abort()
            return
        self.stats["connections"] += 1
        self._conns.add(conn)
        try:
            up_reader, conn.server = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats["refused"] += 1
            self._conns.discard(conn)
            conn.abort()
            return
        try:
            await asyncio.gather(self._pipe(reader, conn.server, "up", conn),
                                 self._pipe(up_reader, writer, "down", conn))
        except (ConnectionError, OSError):
            pass
        finally:
            self._conns.discard(conn)
            conn.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    direction: str, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(_QUEUE_CHUNKS)

        async def deliver() -> None:
            failed = False
            while True:
                item = await queue.get()
                if item is None:
                    return
                if failed:  # keep draining so the reader never blocks on a full queue
                    continue
                at, data = item
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self._outage is not None:
                    self.stats["dropped_bytes"] += len(data)
                    continue
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError, RuntimeError):
                    failed = True
                    conn.abort()

        deliverer = asyncio.create_task(deliver())
        last_at = 0.0
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self._outage == "down":
                    conn.abort()
                    break
                if self._outage == "blackhole":
                    self.stats["dropped_bytes"] += len(data)
                    continue
                cond = self._conditions
                if cond.reset_rate and self._rng.random() < cond.reset_rate:
                    self.stats["resets"] += 1
                    conn.abort()
                    break
                self.stats["bytes_" + direction] += len(data)
                now = loop.time()
                rate = cond.up_mbps if direction == "up" else cond.down_mbps
                sent = now
                if rate:
                    start = max(now, self._link_free[direction])
                    sent = start + len(data) * 8 / (rate * 1e6)
                    self._link_free[direction] = sent
                extra = cond.delay_ms
                if cond.jitter_ms:
                    extra += self._rng.uniform(-cond.jitter_ms, cond.jitter_ms)
                if cond.loss and self._rng.random() < cond.loss:
                    self.stats["lost_chunks"] += 1
                    extra += cond.rto_ms
                at = max(sent + max(0.0, extra) / 1e3, last_at)
                last_at = at
                await queue.put((at, data))
        finally:
            if not deliverer.done():
                await queue.put(None)
            await asyncio.gather(deliverer, return_exceptions=True)
            if writer.can_write_eof() and not writer.is_closing():
                try:
                    writer.write_eof()
                except (OSError, RuntimeError):
                    pass
