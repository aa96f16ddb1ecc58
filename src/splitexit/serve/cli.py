"""Commands ``splitexit prepare``, ``splitexit serve`` and ``splitexit edge``.

Each wraps a public function: :func:`~splitexit.serve.export_model_dir`,
:func:`~splitexit.serve.create_app` + :func:`~splitexit.serve.serve` (or
:func:`splitexit.serve.ray_app.deploy`) and :class:`~splitexit.serve.EdgeRuntime`.
The bearer token may come from the ``SPLITEXIT_TOKEN`` environment variable instead of the
command line (which other users of the machine can read).
"""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["register", "run_edge"]


def _token(args) -> str | None:
    return args.token or os.environ.get("SPLITEXIT_TOKEN") or None


def _cmd_prepare(args) -> int:
    from splitexit import checkpoint
    from splitexit.errors import InputError
    from splitexit.multiexit import MultiExitModel
    from splitexit.policies import NeverExit

    from .modeldir import export_model_dir

    model = checkpoint.load(args.checkpoint)
    if not isinstance(model, MultiExitModel):
        raise InputError(f"{args.checkpoint} holds a plain backbone; train a multi-exit model "
                         "(splitexit train --strategy joint) so the device has local exits")
    policy = checkpoint.load_policy(args.checkpoint, args.policy, default=NeverExit())
    cut = None if args.cut in ("input", "none") else args.cut
    out = export_model_dir(model, cut, args.out, codec=args.codec, policy=policy)
    print(f"wrote model directory {out} (cut {cut or 'input'}, codec {args.codec}, policy "
          f"{policy.config()}); serve it with `splitexit serve {out}`")
    return 0


def _settings(args):
    from .app import ServerSettings

    return ServerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          token=_token(args), max_request_bytes=args.max_request_bytes,
                          max_request_samples=args.max_request_samples, threads=args.threads,
                          runtime=args.runtime)


def _cmd_serve(args) -> int:
    settings = _settings(args)
    if args.ray:
        from . import ray_app

        url = ray_app.deploy(args.model_dir, args.replicas, settings, args.host, args.port)
        print(f"Ray Serve: {args.replicas} replica(s) of {args.model_dir} at {url}; Ctrl-C stops")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            ray_app.shutdown()
        return 0
    import torch

    from .app import create_app, serve
    from .modeldir import load_server

    if args.threads:
        torch.set_num_threads(args.threads)
    # the inference thread re-takes the GIL between torch ops; with the default 5 ms switch
    # interval it waits behind the event loop's Python work (request parsing, decoding)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    server, cfg = load_server(args.model_dir, settings.runtime)
    app = create_app(server, cfg.payload, settings,
                     info={"cut": cfg.cut, "codec": cfg.codec, "model": cfg.model})
    print(f"serving {args.model_dir} (cut {cfg.cut or 'input'}) on http://{args.host}:"
          f"{args.port}{' with a bearer token' if settings.token else ''}", flush=True)
    serve(app, args.host, args.port)
    return 0


def run_edge(model_dir: str | os.PathLike, server_url: str | None, x, settings=None,
             codec: str | None = None, batch_size: int = 1, workers: int = 1):
    """Run the edge runtime of ``model_dir`` over the inputs ``x`` against ``server_url``.

    Args:
        x: inputs ``(N, *input_shape)``.
        settings: :class:`~splitexit.serve.EdgeSettings` (defaults when ``None``).
        codec: wire codec (the directory's when ``None``).
        batch_size: samples per :meth:`EdgeRuntime.classify` call.
        workers: concurrent callers (threads), each taking whole batches.

    Returns:
        ``(answers in input order, stats snapshot)``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .edge import EdgeRuntime
    from .modeldir import load_device

    device, policy, cfg = load_device(model_dir)
    starts = list(range(0, len(x), batch_size))
    with EdgeRuntime(device, policy, server_url, codec or cfg.codec, settings) as edge:
        def call(start: int):
            answers = edge.classify(x[start: start + batch_size])
            for a in answers:
                a.index += start
            return answers

        with ThreadPoolExecutor(workers) as pool:
            batches = list(pool.map(call, starts))
        return [a for b in batches for a in b], edge.stats.snapshot()


def _cmd_edge(args) -> int:
    from splitexit.data import load_dataset

    from .edge import EdgeSettings

    ds = load_dataset(args.dataset, seed=args.seed)
    x, y = ds.test.x, ds.test.y
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    settings = EdgeSettings(deadline_s=args.deadline_ms / 1e3, retries=args.retries,
                            token=_token(args))
    answers, stats = run_edge(args.model_dir, args.server, x, settings, args.codec,
                              args.batch_size, args.workers)
    correct = sum(int(a.prediction == int(y[a.index])) for a in answers)
    stats["accuracy"] = correct / len(answers)
    if args.out:
        with open(args.out, "w") as f:
            for a in answers:
                f.write(json.dumps({**a.to_json(), "logits": None, "label": a.label,
                                    "target": int(y[a.index])}) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


def register(sub) -> None:
    """Add ``prepare``, ``serve`` and ``edge`` to the ``splitexit`` command line."""
    p = sub.add_parser("prepare", aliases=["export-server"],
                       help="write a model directory (server half + device part) from a "
                       "trained multi-exit checkpoint and a cut")
    p.add_argument("checkpoint", help="multi-exit checkpoint (splitexit train)")
    p.add_argument("--cut", required=True, help="cut name (splitexit list cuts), or 'input' "
                   "for full offload")
    p.add_argument("--codec", default="fp32", help="wire codec, e.g. fp32, fp16, int8-ch+zstd")
    p.add_argument("--policy", default=None, help="exit policy name or JSON (default: the "
                   "checkpoint's calibration.json, else never exit locally)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("serve", help="run the server half of a model directory over HTTP")
    p.add_argument("model_dir")
    p.add_argument("--host", default="127.0.0.1", help="interface (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="bearer token clients must send (or set "
                   "SPLITEXIT_TOKEN)")
    p.add_argument("--max-batch", type=int, default=32, help="samples per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a request waits for others to join its batch")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--max-request-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads for inference")
    p.add_argument("--runtime", default="eager",
                   help="eager or torchscript: run the server half eagerly or as one frozen "
                        "TorchScript graph (no GIL between ops: steadier under concurrent "
                        "requests)")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="Python thread switch interval (lower: the inference thread waits "
                   "less for the GIL behind request handling)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of uvicorn")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("edge", help="run the edge runtime on a data set against a server")
    p.add_argument("model_dir")
    p.add_argument("--server", default=None, help="server URL (omit to answer locally only)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=1000, help="test samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="concurrent edge callers")
    p.add_argument("--deadline-ms", type=float, default=1000.0)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--codec", default=None, help="wire codec (default: the directory's)")
    p.add_argument("--token", default=None)
    p.add_argument("--out", default=None, help="write one JSON line per answer here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_edge)


if __name__ == "__main__":  # pragma: no cover - `python -m splitexit.serve.cli` = splitexit
    from splitexit.cli import main

    sys.exit(main())
