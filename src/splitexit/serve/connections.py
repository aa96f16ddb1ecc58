"""Guards for uvicorn's HTTP connections: slow and idle clients are cut off, open connections
are capped, and the process's open-file limit is fitted to the cap.

uvicorn (0.54) bounds the idle time *between* requests (``timeout_keep_alive``) but nothing
bounds the time a client takes to send a request's headers: one client holding thousands of
half-sent requests keeps thousands of sockets open until the process runs out of file
descriptors. Its ``limit_concurrency`` does not help here: it closes nothing and answers the
*valid* requests 503 once the held connections reach it. :func:`guarded_protocol` wraps
uvicorn's own HTTP protocol class (httptools, else h11) with:

- a deadline for the request headers (``header_timeout_s``), armed when a connection opens and
  when the first byte of a further request arrives on a kept-alive one, disarmed once the
  headers are complete; the request body has its own deadline in the app
  (``ServerSettings.body_timeout_s``, answered 408);
- a cap on open connections (``max_connections``): a connection over the cap closes the
  oldest connection that is *waiting for a request* (half-sent headers or idle keep-alive;
  never one whose request is running), or itself when every connection is busy;
- one log line per dropped client (``uvicorn.error`` logger, no traceback).

:func:`fit_open_files` raises the soft ``RLIMIT_NOFILE`` to what the cap needs (up to the hard
limit) and lowers the cap, with a warning, when the limit cannot hold it.
"""

from __future__ import annotations

import logging
import os

from uvicorn.protocols.http.auto import AutoHTTPProtocol

__all__ = ["guarded_protocol", "fit_open_files", "LOGGER"]

#: where dropped clients are reported (uvicorn's own error log: same format and level)
LOGGER = logging.getLogger("uvicorn.error")

#: file descriptors kept free beside the connections (log files, model files, the listener)
_SPARE_FDS = 32


def _client(proto) -> str:
    client = getattr(proto, "client", None)
    return f"{client[0]}:{client[1]}" if client else "unknown client"


def guarded_protocol(header_timeout_s: float, max_connections: int, base: type | None = None
                     ) -> type:
    """uvicorn's HTTP protocol class with a header deadline and a connection cap.

    Args:
        header_timeout_s: longest time from a connection's opening (or a further request's
            first byte) to its complete request headers; the connection is closed after it.
        max_connections: open connections at most (see the module docstring for who is
            closed when a new one arrives over it).
        base: the protocol class to wrap (uvicorn's ``AutoHTTPProtocol`` when ``None``).

    Returns:
        A class to pass as ``uvicorn.Config(http=...)``.
    """
    base = base or AutoHTTPProtocol

    class GuardedHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer = None
        _seen_cycle = None
        _since = 0.0
        _served = 0

        # -------------------------------------------------------------- state
        def _waiting(self) -> bool:
            """Whether the connection waits for a request (nothing of ours is running)."""
            cycle = self.cycle
            return (cycle is None or cycle.response_complete) and not getattr(
                self, "pipeline", None)

        def _arm(self) -> None:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _drop(self, why: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                LOGGER.warning("dropped client %s: %s", _client(self), why)
                self.transport.close()

        def _expired(self) -> None:
            self._header_timer = None
            if self._waiting():
                self._drop(f"no complete request headers within {header_timeout_s:g} s")

        def _sync(self) -> None:
            if self.cycle is not self._seen_cycle:  # a request's headers are complete
                self._seen_cycle = self.cycle
                self._served += 1
                self._disarm()

        # -------------------------------------------------------------- protocol
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._since = self.loop.time()
            self._arm()
            if len(self.connections) > max_connections:
                self._make_room()

        def _make_room(self) -> None:
            victim, key = None, None
            for conn in self.connections:
                if conn is self or not isinstance(conn, GuardedHTTPProtocol):
                    continue
                if conn.transport is None or conn.transport.is_closing() or not conn._waiting():
                    continue
                k = (conn._served > 0, conn._since)  # never-served (half-sent) first, oldest
                if key is None or k < key:
                    victim, key = conn, k
            if victim is None:
                self._drop(f"{max_connections} connections open and all busy")
            else:
                victim._drop(f"{max_connections} connections open; the oldest one waiting "
                             "for a request makes room for a new one")

        def data_received(self, data: bytes) -> None:
            if self._waiting():
                self._arm()
            super().data_received(data)
            self._sync()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync()
            self._since = self.loop.time()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    GuardedHTTPProtocol.__name__ = GuardedHTTPProtocol.__qualname__ = \
        f"Guarded{base.__name__}"
    return GuardedHTTPProtocol


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: a conservative guess
        return 64


def fit_open_files(max_connections: int, backlog: int) -> tuple[int, int]:
    """Make room for ``max_connections`` sockets under the open-file limit.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard limit when the cap needs it. When even
    the hard limit is too low, the cap is lowered (with a warning) so that the process never
    runs out of file descriptors: connections accepted in one burst (up to ``backlog``) and
    the files the server already holds are kept free. ``backlog`` is lowered first (to an
    eighth of the limit) when it alone would take most of it.

    Returns:
        ``(max_connections, backlog)`` that fit.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return max_connections, backlog
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = _open_fds()
    need = max_connections + backlog + in_use + _SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return max_connections, backlog
    backlog = max(16, min(backlog, soft // 8))
    allowed = soft - backlog - in_use - _SPARE_FDS
    if allowed < max_connections:
        LOGGER.warning("the open-file limit is %d (hard %s): serving at most %d connections "
                       "instead of %d (raise it with `ulimit -n`)", soft,
                       "unlimited" if hard == resource.RLIM_INFINITY else hard,
                       max(16, allowed), max_connections)
        max_connections = max(16, allowed)
    return max_connections, backlog
