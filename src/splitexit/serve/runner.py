"""Running the server half: with uvicorn in this process (:func:`serve`, blocking, or
:class:`BackgroundServer`, in a thread) behind the connection guards, and the two steps of
starting ``splitexit serve`` as a process (:func:`free_port`, :func:`wait_until_healthy`)."""

from __future__ import annotations

import threading
import time

from fastapi import FastAPI

from .connections import fit_open_files, guarded_protocol
from .settings import ServerSettings

__all__ = ["BackgroundServer", "free_port", "serve", "uvicorn_config", "wait_until_healthy"]


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
    """A TCP port that is free on ``host`` right now, for a server started as a process
    (``splitexit serve --port``); another process may take it before the server binds it."""
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
