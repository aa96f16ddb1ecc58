"""Command ``splitexit bundle``: a deployment bundle from a trained checkpoint.

Wraps :func:`splitexit.deploy.bundle`: the checkpoint's model (zoo, or your own architecture
with ``--model path.py:fn``), its calibrated policy (or ``--policy``), samples of its data
set's calibration split for shapes and timing, and the cut (none: device only; a cut name:
split; ``input``: full offload). Serve the result with ``splitexit serve BUNDLE`` and run the
device side with ``splitexit edge BUNDLE --server URL``.
"""

from __future__ import annotations

import json
import sys

__all__ = ["register", "bundle_checkpoint"]


def bundle_checkpoint(checkpoint_dir, out, *, cut: str | None = None, policy: str | None = None,
                      codec: str = "fp32", max_overhead: float | None = None,
                      model: str | None = None, dataset: str | None = None, samples: int = 256,
                      measure: bool = True, threads: int | None = 1,
                      max_drop: float | None = None):
    """Bundle a checkpoint; returns ``(bundle directory, manifest)``.

    Args:
        checkpoint_dir: a checkpoint written by ``splitexit train`` (or ``checkpoint.save``).
        out: the bundle directory.
        cut: ``None`` (device only), a cut name (split) or ``"input"`` (full offload).
        policy: a policy name or JSON; the checkpoint's ``calibration.json`` when ``None``.
        model: ``path/to/file.py:function`` for a checkpoint of your own architecture (runs
            code from that file).
        dataset: data set whose calibration split gives the example inputs (the checkpoint's
            when ``None``).
        samples: how many calibration samples to take (for export and timing).
        max_drop: choose the exits (with ``max_overhead``) and one threshold per exit for
            the lowest batch-1 latency on ONNX Runtime, within this calibration accuracy drop
            of the model's final exit, on the data set's whole calibration split; the policy
            then gives only its statistic and temperature.

    Raises:
        InputError: no policy for a model with exits, an unknown cut or data set, a
            checkpoint of your own code without ``model``.
    """
    from splitexit import checkpoint
    from splitexit.data import load_dataset
    from splitexit.deploy import bundle
    from splitexit.errors import InputError
    from splitexit.policies import NeverExit

    if samples < 2:
        raise InputError(f"--samples must be at least 2, got {samples}")
    meta = checkpoint.read_meta(checkpoint_dir)
    net = checkpoint.load(checkpoint_dir, model=model)
    heads = len(getattr(net, "heads", ()) or ())
    from splitexit.policies import MaxProb

    fallback = NeverExit() if not heads else MaxProb() if max_drop is not None else None
    chosen = checkpoint.load_policy(checkpoint_dir, policy, default=fallback)
    name = dataset or meta.get("dataset")
    example = classes = None
    if name:
        ds = load_dataset(name)
        example = ds.calib.x[:samples]
        classes = list(ds.class_names)
    else:
        print(f"note: {checkpoint_dir} names no data set and no --dataset was given: the "
              "bundle is exported and timed on zero inputs (where samples exit decides the "
              "latency; pass --dataset NAME)", file=sys.stderr)
    cut_name = None if cut in (None, "", "none") else cut
    calibration = None
    if max_drop is not None:
        if not name:
            raise InputError("--max-drop chooses thresholds on a calibration split: pass "
                             "--dataset NAME (the checkpoint names none)")
        calibration = (ds.calib.x, ds.calib.y)
    path = bundle(net, out, cut=cut_name, policy=chosen, codec=codec, example=example,
                  classes=classes, max_overhead=max_overhead, measure=measure,
                  threads=threads, calibration=calibration, max_drop=max_drop)
    manifest = json.loads((path / "manifest.json").read_text())
    return path, manifest


def _cmd_bundle(args) -> int:
    out, manifest = bundle_checkpoint(
        args.checkpoint, args.out, cut=args.cut, policy=args.policy, codec=args.codec,
        max_overhead=args.max_overhead, model=args.model, dataset=args.dataset,
        samples=args.samples, measure=not args.no_measure, threads=args.threads,
        max_drop=None if args.max_drop is None else args.max_drop / 100)
    cut = manifest.get("cut")
    where = ("device only" if cut is None else "full offload" if cut == "input"
             else f"split at {cut}")
    exits = ", ".join(e["name"] for e in manifest["exits"])
    print(f"wrote bundle {out} ({where}; exits {exits}; policy "
          f"{json.dumps(manifest['policy'])}"
          f"{'; codec ' + manifest['codec'] if manifest.get('codec') else ''})")
    lat = manifest.get("latency")
    if lat:
        print(f"batch-1 latency on ONNX Runtime ({lat['threads']} thread(s), "
              f"{lat['samples']} samples, {lat['form']}): bundle "
              f"{lat['bundle']['mean_ms']:.3f} ms mean / {lat['bundle']['p50_ms']:.3f} ms p50, "
              f"full model {lat['full_model']['mean_ms']:.3f} ms mean: "
              f"{lat['speedup_mean']:.2f}x; no exit firing {lat['no_exit_ratio']:.2f}x the "
              "full model")
    if cut is not None:
        print(f"serve it with `splitexit serve {out}`; run the device with "
              f"`splitexit edge {out} --server URL`")
    else:
        print(f"run it with splitexit.load_bundle({str(out)!r}).program().infer(x, policy)")
    return 0


def register(sub) -> None:
    """Add ``bundle`` to the ``splitexit`` command line."""
    p = sub.add_parser("bundle", help="write a deployment bundle (ONNX pieces, manifest, "
                       "weights) from a trained checkpoint; serve and edge take it")
    p.add_argument("checkpoint", help="checkpoint directory (splitexit train)")
    p.add_argument("--out", required=True, help="bundle directory to write (replaced if it "
                   "is a bundle)")
    p.add_argument("--cut", default=None, help="cut name (splitexit list cuts) to split the "
                   "model between device and server, or 'input' for full offload (default: "
                   "the whole model on the device)")
    p.add_argument("--policy", default=None, help="exit policy name or JSON (default: the "
                   "checkpoint's calibration.json, from splitexit calibrate)")
    p.add_argument("--codec", default="fp32", help="wire codec of a split bundle, e.g. fp32, "
                   "fp16, int8, int8-ch+zstd")
    p.add_argument("--max-overhead", type=float, default=None, help="device bundles: keep "
                   "the fastest exit subset whose no-exit latency is at most this times the "
                   "full model's (e.g. 1.1)")
    p.add_argument("--model", default=None, metavar="PATH.py:FUNCTION",
                   help="needed for a checkpoint of your own architecture: the file and "
                        "function that build it (RUNS CODE FROM THAT FILE)")
    p.add_argument("--dataset", default=None, help="data set whose calibration split gives "
                   "the example inputs for shapes and timing (default: the checkpoint's)")
    p.add_argument("--max-drop", type=float, default=None, metavar="PT",
                   help="device bundles: choose one threshold per exit (and, with "
                        "--max-overhead, the exits) for the lowest batch-1 latency on ONNX "
                        "Runtime, within PT points of the final exit's accuracy on the data "
                        "set's calibration split")
    p.add_argument("--samples", type=int, default=256, help="calibration samples to take")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for timing")
    p.add_argument("--no-measure", action="store_true",
                   help="skip timing batch-1 latency at bundling")
    p.set_defaults(func=_cmd_bundle)
