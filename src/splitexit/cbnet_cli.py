"""``splitexit cbnet train|evaluate|export``: thin wrappers over :mod:`splitexit.cbnet`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["register"]


def _command_line() -> str:
    return "splitexit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _train(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .cbnet import CBNetSettings, save_pipeline, train_cbnet
    from .data import load_dataset
    from .measure import torch_threads

    ds = load_dataset(args.dataset, seed=args.seed)
    settings = CBNetSettings(branchy_epochs=args.branchy_epochs, threshold=args.threshold,
                             max_drop=args.max_drop, targets_per_class=args.targets_per_class,
                             converter=args.converter, converter_epochs=args.converter_epochs,
                             converter_hidden=tuple(int(h) for h in args.converter_hidden.split(",")),
                             converter_output=args.converter_output,
                             finetune_epochs=args.finetune_epochs, seed=args.seed)
    with torch_threads(args.threads):
        run = train_cbnet(ds, settings)
    out = Path(args.out)
    save_pipeline(run.pipeline, out, command=_command_line(), train_seconds=run.train_seconds)
    checkpoint.save(run.branchynet, out / "branchynet", dataset=ds.name,
                    strategy="joint", threshold=run.targets.threshold)
    acc = float((run.pipeline.predict(ds.test.x) == ds.test.y).double().mean())
    print(f"CBNet on {ds.name}: entropy threshold {run.targets.threshold:.4g}, hard training "
          f"images {run.targets.hard_fraction:.1%}, {len(run.targets.target_index)} targets, "
          f"test accuracy {acc:.4f}; saved to {out} (B-LeNet in {out / 'branchynet'})")
    for warning in run.targets.warnings:
        print(f"warning: {warning}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .cbnet import OnnxPipeline, load_pipeline
    from .data import load_dataset
    from .measure import latency_batch1, throughput, torch_threads
    from .report import markdown_table, write_report

    pipeline = load_pipeline(args.checkpoint)
    ds = load_dataset(args.dataset or pipeline.info.get("dataset", "fashion-mnist"),
                      seed=args.seed)
    x, y = ds.test.x, ds.test.y
    runners = {"pytorch": lambda t: pipeline(t).argmax(1)}
    if args.onnx:
        session = OnnxPipeline(args.onnx, pipeline.input_shape, threads=args.threads)
        runners["onnxruntime"] = lambda t: torch.from_numpy(session.run(t).argmax(1))
    rows = []
    with torch_threads(args.threads), torch.inference_mode():
        for name, fn in runners.items():
            pred = torch.cat([fn(x[i: i + 1024]) for i in range(0, len(x), 1024)])
            lat = latency_batch1(fn, x, args.latency_samples)
            rows.append({"method": f"CBNet ({name})", "accuracy": float(
                (pred == y).double().mean()), "latency_ms": lat["mean_ms"],
                "latency_p50_ms": lat["median_ms"], "throughput_sps": throughput(fn, x)})
    out = Path(args.out or Path(args.checkpoint) / "evaluation")
    write_report(out, "cbnet-evaluate", rows, dataset=ds.name, model=str(args.checkpoint),
                 command=_command_line(), threshold=pipeline.info.get("threshold"),
                 hard_fraction=pipeline.info.get("hard_fraction"))
    print(markdown_table(rows))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .cbnet import OnnxPipeline, export_onnx, fold_pipeline, load_pipeline

    pipeline = load_pipeline(args.checkpoint)
    if args.fold:
        pipeline = fold_pipeline(pipeline)
    path = export_onnx(pipeline, args.out, pipeline.input_shape)
    path.with_suffix(".json").write_text(json.dumps(
        {"input_shape": list(pipeline.input_shape), "num_classes": pipeline.num_classes,
         "input_range": [0.0, 1.0], "output": "logits"}, indent=2))
    probe = torch.rand(8, *pipeline.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = pipeline(probe).numpy()
    got = OnnxPipeline(path).run(probe)
    diff = float(np.abs(got - expected).max())
    print(f"exported {args.checkpoint} to {path} (+ {path.with_suffix('.json').name}); "
          f"ONNX Runtime vs PyTorch max |logit difference| on 8 random images: {diff:.2e}")
    return 0


def register(subparsers) -> None:
    """Add ``splitexit cbnet train|evaluate|export``."""
    from .cbnet import CBNetSettings

    d = CBNetSettings()
    parser = subparsers.add_parser("cbnet", help="CBNet: converting autoencoder + lightweight "
                                   "classifier (train, evaluate, export to ONNX)")
    sub = parser.add_subparsers(dest="cbnet_command", required=True)

    p = sub.add_parser("train", help="train B-LeNet, pick targets, train the converter; save")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--branchy-epochs", type=int, default=d.branchy_epochs)
    p.add_argument("--threshold", type=float, default=None,
                   help="entropy threshold T (default: chosen on the calibration split)")
    p.add_argument("--max-drop", type=float, default=d.max_drop,
                   help="when choosing T: allowed BranchyNet accuracy drop (fraction)")
    p.add_argument("--targets-per-class", type=int, default=d.targets_per_class,
                   help="1 (CBNet) or k > 1 (k-means targets)")
    p.add_argument("--converter", choices=["fc", "conv"], default=d.converter)
    p.add_argument("--converter-hidden", default=",".join(map(str, d.converter_hidden)),
                   help="hidden sizes, comma-separated (published 512,384,256,64; fast: 64)")
    p.add_argument("--converter-output", choices=["sigmoid", "linear"],
                   default=d.converter_output,
                   help="sigmoid (published) or linear (foldable: see export --fold)")
    p.add_argument("--converter-epochs", type=int, default=d.converter_epochs)
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="fine-tune the light classifier on converted images (0: as published)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared machine more threads only contend)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="test accuracy, batch-1 latency and throughput")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--onnx", default=None, help="also run this exported ONNX file")
    p.add_argument("--latency-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("export", help="export the pipeline to ONNX and check it against PyTorch")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--fold", action="store_true",
                   help="fold the converter's linear output layer into the classifier's first "
                        "convolution (needs a converter trained with --converter-output linear)")
    p.set_defaults(func=_export)
