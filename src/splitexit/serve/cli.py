"""Commands ``splitexit serve``, ``splitexit edge`` and ``splitexit prepare``.

Each wraps a public function: :func:`~splitexit.serve.load_serving` +
:func:`~splitexit.serve.create_app` + :func:`~splitexit.serve.serve` (or
:func:`splitexit.serve.ray_app.deploy`), :class:`~splitexit.serve.EdgeRuntime` and
:func:`~splitexit.serve.export_model_dir`. ``serve`` and ``edge`` take a bundle
(``splitexit bundle``) or an older model directory (``splitexit prepare``). This module
imports no PyTorch: ``edge BUNDLE --inputs x.npy`` runs on a device without it.
The bearer token may come from the ``SPLITEXIT_TOKEN`` environment variable instead of the
command line (which other users of the machine can read).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

__all__ = ["register", "run_edge", "load_edge_device", "main"]


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


def _runtime(args) -> str:
    from .bundled import is_bundle

    if args.runtime:
        return args.runtime
    return "onnxruntime" if is_bundle(args.model_dir) else "eager"


NO_AUTH_WARNING = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: splitexit serve --no-auth: AUTHENTICATION IS OFF.
!! Anyone who can reach http://{host}:{port} can run the model, read /metrics and see what
!! /health shows (model, cut, codec, limits). Set SPLITEXIT_TOKEN instead, or at least keep
!! --host 127.0.0.1.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def _server_token(args) -> str | None:
    """The server's token; no token is an error unless ``--no-auth`` asks for an open server."""
    from splitexit.errors import InputError

    token = _token(args)
    if args.no_auth:
        if token:
            raise InputError("--no-auth and a token (--token or SPLITEXIT_TOKEN) contradict "
                             "each other: drop one")
        print(NO_AUTH_WARNING.format(host=args.host, port=args.port), file=sys.stderr,
              flush=True)
        return None
    if not token:
        raise InputError("no bearer token: set SPLITEXIT_TOKEN (at least 8 characters) or pass "
                         "--token, and give it to the clients; to serve without "
                         "authentication pass --no-auth")
    return token


def _settings(args, token: str | None = None):
    from .settings import ServerSettings

    token = token if token is not None or args.no_auth else _server_token(args)
    return ServerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          token=token, max_request_bytes=args.max_request_bytes,
                          max_request_samples=args.max_request_samples,
                          max_queue_samples=args.max_queue_samples, threads=args.threads,
                          runtime=_runtime(args), max_connections=args.max_connections,
                          header_timeout_s=args.header_timeout_s,
                          body_timeout_s=args.body_timeout_s, keep_alive_s=args.keep_alive_s)


def _cmd_serve(args) -> int:
    token = _server_token(args)  # before importing anything heavy: a refusal is immediate
    settings = _settings(args, token)
    if args.ray:
        from . import ray_app

        url = ray_app.deploy(args.model_dir, args.replicas, settings, args.host, args.port,
                             model=args.model)
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

    from .app import create_app
    from .bundled import load_serving
    from .runner import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    # the inference thread re-takes the GIL between torch ops; with the default 5 ms switch
    # interval it waits behind the event loop's Python work (request parsing, decoding)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    server, spec, info = load_serving(args.model_dir, settings.runtime, args.model,
                                      args.threads)
    app = create_app(server, spec, settings, info=info)
    what = "bundle" if info["bundle"] else "model directory"
    print(f"serving {what} {args.model_dir} (cut {info['cut'] or 'input'}, runtime "
          f"{settings.runtime}) on http://{args.host}:{args.port}"
          f"{' with a bearer token' if settings.token else ''}", flush=True)
    serve(app, args.host, args.port)
    return 0


def load_edge_device(path: str | os.PathLike, threads: int | None = 1):
    """``(device runtime, policy, codec)`` of a bundle (ONNX Runtime, no torch) or of a model
    directory (PyTorch)."""
    from splitexit.runtime.bundle import MANIFEST, load_bundle

    if (Path(path) / MANIFEST).is_file():
        b = load_bundle(path)
        return b.device(threads), b.policy, b.codec
    from .modeldir import load_device

    device, policy, cfg = load_device(path)
    return device, policy, cfg.codec


def run_edge(model_dir: str | os.PathLike, server_url: str | None, x, settings=None,
             codec: str | None = None, batch_size: int = 1, workers: int = 1,
             threads: int | None = 1):
    """Run the edge runtime of a bundle (or model directory) over the inputs ``x``.

    Args:
        model_dir: a bundle (runs on ONNX Runtime, no torch needed) or a model directory.
        x: inputs ``(N, *input_shape)``: a numpy array (or a torch tensor).
        settings: :class:`~splitexit.serve.EdgeSettings` (defaults when ``None``).
        codec: wire codec (the bundle's / directory's when ``None``).
        batch_size: samples per :meth:`EdgeRuntime.classify` call.
        workers: concurrent callers (threads), each taking whole batches.
        threads: ONNX Runtime intra-op threads of a bundle's device part.

    Returns:
        ``(answers in input order, stats snapshot)``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .edge import EdgeRuntime

    device, policy, own_codec = load_edge_device(model_dir, threads)
    starts = list(range(0, len(x), batch_size))
    with EdgeRuntime(device, policy, server_url, codec or own_codec, settings) as edge:
        def call(start: int):
            answers = edge.classify(x[start: start + batch_size])
            for a in answers:
                a.index += start
            return answers

        with ThreadPoolExecutor(workers) as pool:
            batches = list(pool.map(call, starts))
        return [a for b in batches for a in b], edge.stats.snapshot()


def _load_npy(path: str, what: str):
    import numpy as np

    from splitexit.errors import InputError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path} ({exc}); give a .npy file written by "
                         "numpy.save (object arrays are refused)") from exc


def _edge_inputs(args):
    """``(x, y or None)``: a .npy file (no torch) or the test split of a data set."""
    if args.inputs:
        import numpy as np

        from splitexit.errors import InputError

        x = _load_npy(args.inputs, "--inputs")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputError(f"--inputs {args.inputs} holds {x.dtype} values; save the inputs "
                             "as float32, scaled as the model was trained")
        x = x.astype(np.float32, copy=False)
        y = _load_npy(args.labels, "--labels") if args.labels else None
        if y is not None and (y.ndim != 1 or len(y) != len(x)):
            raise InputError(f"--labels holds shape {y.shape}; give one label per input "
                             f"({len(x)})")
    else:
        from splitexit.data import load_dataset

        ds = load_dataset(args.dataset, seed=args.seed)
        x, y = ds.test.x, ds.test.y
    if args.limit:
        x = x[: args.limit]
        y = None if y is None else y[: args.limit]
    return x, y


def offload_failure(stats: dict, max_failed_fraction: float) -> str | None:
    """Why an edge run counts as failed (``None``: it did not): every offloaded input, or more
    than ``max_failed_fraction`` of them, got no server answer."""
    sent, failed = stats.get("offloaded", 0), stats.get("offload_failed", 0)
    if not sent or (failed < sent and failed <= max_failed_fraction * sent):
        return None
    return (f"{failed} of {sent} offloaded inputs got no server answer "
            f"({100 * failed / sent:.0f}%{'' if failed == sent else ', over --max-failed-fraction'}"
            f" {max_failed_fraction:g}); they got local fallback (or failed) answers. Last "
            f"error: {stats.get('last_error')}")


def _cmd_edge(args) -> int:
    from splitexit.errors import InputError

    from .edge import EdgeSettings

    if not 0 <= args.max_failed_fraction <= 1:
        raise InputError(f"--max-failed-fraction must be in 0..1, got {args.max_failed_fraction}")
    x, y = _edge_inputs(args)
    settings = EdgeSettings(deadline_s=args.deadline_ms / 1e3, retries=args.retries,
                            token=_token(args))
    answers, stats = run_edge(args.model_dir, args.server, x, settings, args.codec,
                              args.batch_size, args.workers)
    if y is not None:
        correct = sum(int(a.prediction == int(y[a.index])) for a in answers)
        stats["accuracy"] = correct / len(answers)
    if args.out:
        with open(args.out, "w") as f:
            for a in answers:
                row = {**a.to_json(), "logits": None, "label": a.label}
                if y is not None:
                    row["target"] = int(y[a.index])
                f.write(json.dumps(row) + "\n")
    print(json.dumps(stats, indent=2))
    failure = offload_failure(stats, args.max_failed_fraction)
    if failure:
        print(f"splitexit edge: offloading failed: {failure}", file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    """Add ``prepare``, ``serve`` and ``edge`` to the ``splitexit`` command line."""
    p = sub.add_parser("prepare", aliases=["export-server"],
                       help="write an older PyTorch model directory (zoo models) from a "
                       "checkpoint and a cut; prefer `splitexit bundle` (any model, ONNX "
                       "pieces, a device without PyTorch)")
    p.add_argument("checkpoint", help="multi-exit checkpoint (splitexit train)")
    p.add_argument("--cut", required=True, help="cut name (splitexit list cuts), or 'input' "
                   "for full offload")
    p.add_argument("--codec", default="fp32", help="wire codec, e.g. fp32, fp16, int8-ch+zstd")
    p.add_argument("--policy", default=None, help="exit policy name or JSON (default: the "
                   "checkpoint's calibration.json, else never exit locally)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("serve", help="run the server half of a bundle (splitexit bundle --cut) "
                       "or a model directory over HTTP")
    p.add_argument("model_dir", metavar="BUNDLE",
                   help="a split bundle (manifest.json) or a model directory (serve.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="bearer token clients must send; prefer "
                   "SPLITEXIT_TOKEN (the command line is visible to other users). Required "
                   "unless --no-auth")
    p.add_argument("--no-auth", action="store_true",
                   help="serve WITHOUT authentication (refused otherwise when no token is set)")
    p.add_argument("--max-batch", type=int, default=32, help="samples per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a request waits for others to join its batch")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body (413 above it)")
    p.add_argument("--max-request-samples", type=int, default=256,
                   help="most samples in one request (413 above it)")
    p.add_argument("--max-queue-samples", type=int, default=4096,
                   help="samples waiting at most; further requests get 503 with Retry-After")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most (a new one closes the oldest connection "
                   "waiting for a request); lowered to what the open-file limit allows")
    p.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="a client's request headers must be complete within this time")
    p.add_argument("--body-timeout-s", type=float, default=30.0,
                   help="a request body must arrive within this time (408 otherwise)")
    p.add_argument("--keep-alive-s", type=float, default=5.0,
                   help="an idle kept-alive connection is closed after this time")
    p.add_argument("--threads", type=int, default=None,
                   help="torch (and ONNX Runtime) threads for inference")
    p.add_argument("--runtime", default=None, choices=["onnxruntime", "eager", "torchscript"],
                   help="onnxruntime (bundles only; their default): the bundle's server.onnx; "
                        "eager or torchscript (model directories' default: eager): the "
                        "PyTorch server half, eagerly or as one frozen TorchScript graph (no "
                        "GIL between ops: steadier under concurrent requests)")
    p.add_argument("--model", default=None, metavar="PATH.py:FUNCTION",
                   help="a bundle of your own architecture on --runtime eager/torchscript: "
                        "the file and function that build it (RUNS CODE FROM THAT FILE); not "
                        "needed for onnxruntime or zoo models")
    p.add_argument("--switch-interval-ms", type=float, default=0.5,
                   help="Python thread switch interval (lower: the inference thread waits "
                   "less for the GIL behind request handling)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of uvicorn")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("edge", help="run the edge runtime of a bundle (ONNX Runtime, no "
                       "PyTorch needed) on inputs against a server")
    p.add_argument("model_dir", metavar="BUNDLE",
                   help="a bundle (manifest.json) or a model directory (serve.json)")
    p.add_argument("--server", default=None, help="server URL (omit to answer locally only)")
    p.add_argument("--inputs", default=None, metavar="FILE.npy",
                   help="inputs (N, *input_shape) as a float .npy file; with it, neither the "
                        "data sets nor PyTorch are loaded")
    p.add_argument("--labels", default=None, metavar="FILE.npy",
                   help="with --inputs: one integer label per input, to report accuracy")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="without --inputs: the data set whose test split to run")
    p.add_argument("--limit", type=int, default=1000, help="inputs to run (0 = all)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="concurrent edge callers")
    p.add_argument("--deadline-ms", type=float, default=1000.0)
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--codec", default=None, help="wire codec (default: the bundle's)")
    p.add_argument("--token", default=None, help="bearer token (prefer SPLITEXIT_TOKEN)")
    p.add_argument("--max-failed-fraction", type=float, default=0.5,
                   help="exit with status 1 (and a summary on stderr) when more than this "
                   "fraction of the offloaded inputs, or all of them, got no server answer "
                   "(401, 413, unreachable, deadline...); the answers are written anyway")
    p.add_argument("--out", default=None, help="write one JSON line per answer here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_edge)


def main(argv: list[str] | None = None) -> int:
    """``prepare``, ``serve`` and ``edge`` alone (``python -m splitexit.serve.cli edge ...``):
    the parser imports no PyTorch, so ``edge BUNDLE --inputs x.npy`` runs on a device without
    it."""
    import argparse

    from splitexit.errors import SplitexitError

    parser = argparse.ArgumentParser(prog="splitexit")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SplitexitError as exc:
        print(f"splitexit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
