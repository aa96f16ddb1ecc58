"""The same server app on Ray Serve, for scale-out over replicas (``splitexit serve --ray``).

Each replica loads the bundle (or model directory) itself and runs the app of :func:`create_app` (same
endpoints, limits, token and micro-batching per replica); Ray Serve's HTTP proxy spreads the
requests over the replicas. Ray is optional: this module imports it only inside functions, so
``import splitexit.serve`` works without it. Install with ``pip install "ray[serve]"``.

Payloads stay codec messages end to end; Ray's own control plane (actor creation) serializes
the replica's constructor arguments, which here are only a path, a settings dict and, for a
bundle of your own architecture on a PyTorch runtime, the ``path.py:function`` spelling.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import asdict
from typing import Any

from splitexit.errors import InputError

from .settings import ServerSettings

__all__ = ["ray_available", "build_deployment", "deploy", "shutdown"]


def ray_available() -> str | None:
    """``None`` when Ray Serve is installed, else the reason it is not (Ray is not imported)."""
    for name in ("ray", "ray.serve"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{name} is not installed; install Ray Serve with pip install 'ray[serve]'"
    return None


class _Replica:
    """One replica: the FastAPI app of :func:`create_app`, called in-process over ASGI."""

    def __init__(self, model_dir: str, settings: dict[str, Any], model: str | None = None):
        import httpx

        from .app import create_app
        from .bundled import load_serving

        sys.setswitchinterval(0.0005)  # see `splitexit serve --switch-interval-ms`
        server, spec, info = load_serving(model_dir, settings.get("runtime"), model,
                                          settings.get("threads"))
        self.app = create_app(server, spec, ServerSettings(**settings),
                              info={**info, "replica_pid": os.getpid()})
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://replica", timeout=None)
        self.max_body = ServerSettings(**settings).max_request_bytes
        self.max_samples = ServerSettings(**settings).max_request_samples

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return JSONResponse({"error": f"request body of {length} bytes exceeds the limit of "
                                 f"{self.max_body} bytes",
                                 "request_id": request.headers.get("x-request-id", ""),
                                 "limits": {"max_request_samples": self.max_samples,
                                            "max_request_bytes": self.max_body}},
                                status_code=413)
        body = await request.body()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "x-request-id", "content-type")}
        resp = await self.client.request(request.method, request.url.path, content=body,
                                         headers=headers)
        keep = {k: v for k, v in resp.headers.items()
                if k.lower() in ("x-request-id", "www-authenticate", "retry-after")}
        return Response(resp.content, status_code=resp.status_code, headers=keep,
                        media_type=resp.headers.get("content-type"))


def build_deployment(model_dir: str | os.PathLike, replicas: int = 1,
                     settings: ServerSettings | None = None, cpus_per_replica: float = 0.5,
                     model: str | None = None):
    """A bound Ray Serve application serving ``model_dir`` (a bundle or a model directory)
    with ``replicas`` replicas (``model``: ``path.py:function`` for a bundle of your own
    architecture on a PyTorch runtime).

    Raises:
        InputError: Ray Serve is missing or ``replicas`` < 1.
    """
    reason = ray_available()
    if reason:
        raise InputError(reason)
    if not isinstance(replicas, int) or replicas < 1:
        raise InputError(f"replicas must be an int >= 1, got {replicas!r}")
    from ray import serve

    settings = settings or ServerSettings()
    deployment = serve.deployment(
        _Replica, name="splitexit-server", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=max(16, settings.max_batch * 4))
    return deployment.bind(str(os.fspath(model_dir)), asdict(settings), model)


def deploy(model_dir: str | os.PathLike, replicas: int = 1,
           settings: ServerSettings | None = None, host: str = "127.0.0.1", port: int = 8000,
           num_cpus: int | None = None, model: str | None = None) -> str:
    """Start a local Ray instance and Ray Serve on ``host:port``; return the base URL.

    Call :func:`shutdown` to stop it.
    """
    app = build_deployment(model_dir, replicas, settings, model=model)
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="splitexit", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def shutdown() -> None:
    """Stop Ray Serve and the local Ray instance started by :func:`deploy`."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if ray.is_initialized():
            ray.shutdown()
