"""``python -m benchmarks deploy``: bundles of a zoo model and of a user's own model, measured.

For the early-exit suite's Fashion-MNIST ResNet-8 (SDN heads, 6 + 10 epochs, with the
equally trained control) and for a residual network that is not in the zoo (a user's file,
loaded from the path the settings name), the suite:

1. trains (or reuses, from ``OUT/models``) the baseline, the multi-exit model and the control;
2. calibrates a max-prob threshold on the calibration split within ``max_drop`` of the better
   of baseline and control;
3. writes a bundle (``OUT/bundles/<model>``), with ``--max-overhead`` when given; then (unless
   ``--one-threshold``) chooses one threshold per kept exit on the calibration split, again
   within ``max_drop``, for the cost of leaving at each exit measured on ONNX Runtime
   (:func:`splitexit.calibration.per_exit_thresholds`), and bundles again with them;
4. checks on every test sample that the bundle on ONNX Runtime gives the PyTorch model's exits
   and predictions (batched through the pieces, and one sample at a time through the exit
   graph);
5. times batch 1 on ONNX Runtime, interleaved: the full model as one graph, the bundle, and
   the bundle with no exit firing;
6. for the ResNet-8 split bundle, starts the edge as a process without PyTorch and today's
   edge with PyTorch (a model directory) and compares cold start (process start to first
   answer) and peak resident memory, and reports the install size of each.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitexit import checkpoint
from splitexit.calibration import choose_operating_point, sweep
from splitexit.cost import cost_table
from splitexit.data import load_dataset
from splitexit.deploy import bundle, load_bundle
from splitexit.errors import InputError
from splitexit.export.exit_graph import export_exit_graph
from splitexit.export.onnx import export_piece
from splitexit.measure import interleaved_seconds, steady_allocator, torch_threads
from splitexit.policies import MaxProb, leave_at
from splitexit.program import lower
from splitexit.report import write_report
from splitexit.runtime.ort import OrtSession
from splitexit.training import Baseline, JointWeighted, train
from splitexit.usermodel import build_backbone, build_multiexit
from splitexit.zoo import create_model, create_multiexit

__all__ = ["DeployBenchSettings", "run_deploy", "register"]

USER_MODEL = "benchmarks/models/usernet.py:usernet"


@dataclass
class DeployBenchSettings:
    """What ``bench deploy`` trains, bundles and measures (see the module docstring)."""

    epochs: int = 6
    finetune_epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 128
    max_drop: float = 0.005
    max_overhead: float | None = None
    latency_samples: int | None = 2000
    bundle_samples: int = 500
    threads: int = 1
    seed: int = 0
    user_model: str = USER_MODEL
    user_cuts: tuple[str, ...] = ("stem", "stage1", "stage2")
    user_head: str = "pool"
    zoo_head: str = "sdn"
    edge_cut: str = "block1"
    edge_codec: str = "int8"
    edge_runs: int = 5
    models: tuple[str, ...] = ("resnet8", "usernet")
    progress: bool | None = None
    per_exit: bool = True
    notes: list[str] = field(default_factory=list)


def _build(name: str, ds, s: DeployBenchSettings, multi: bool):
    if name == "usernet":
        if multi:
            return build_multiexit(s.user_model, list(s.user_cuts), ds.num_classes,
                                   ds.input_shape, head=s.user_head)
        return build_backbone(s.user_model, [], ds.num_classes, ds.input_shape)
    if multi:
        return create_multiexit(name, ds.num_classes, ds.input_shape, head=s.zoo_head)
    return create_model(name, ds.num_classes, ds.input_shape)


def _load(path: Path, name: str, s: DeployBenchSettings):
    return checkpoint.load(path, model=s.user_model if name == "usernet" else None)


def _train(ds, name: str, s: DeployBenchSettings, models: Path) -> tuple:
    """Baseline, multi-exit model (initialised from it, joint training) and control."""
    paths = [models / f"{name}-{kind}" for kind in ("baseline", "multiexit", "control")]
    have = [(p / "model.json").is_file() for p in paths]
    seconds: dict = {"reused": [str(p) for p, h in zip(paths, have) if h]}
    if have[0]:
        baseline = _load(paths[0], name, s)
    else:
        baseline = _build(name, ds, s, multi=False)
        seconds["baseline_train_s"] = train(baseline, ds.train, Baseline(), epochs=s.epochs,
                                            lr=s.lr, batch_size=s.batch_size, seed=s.seed,
                                            progress=s.progress).seconds
        checkpoint.save(baseline, paths[0], dataset=ds.name)
    if have[1]:
        multi = _load(paths[1], name, s)
    else:
        multi = _build(name, ds, s, multi=True)
        checkpoint.load_canonical_state_dict(multi.backbone, checkpoint.canonical_state_dict(
            baseline), source="the baseline")
        seconds["multiexit_train_s"] = train(multi, ds.train, JointWeighted(),
                                             epochs=s.finetune_epochs, lr=s.lr / 2,
                                             batch_size=s.batch_size, seed=s.seed + 1,
                                             progress=s.progress).seconds
        checkpoint.save(multi, paths[1], dataset=ds.name)
    if have[2]:
        control = _load(paths[2], name, s)
    else:  # the equally trained reference: the baseline trained on the multi-exit schedule
        control = _build(name, ds, s, multi=False)
        control.load_state_dict(baseline.state_dict())
        seconds["control_train_s"] = train(control, ds.train, Baseline(),
                                           epochs=s.finetune_epochs, lr=s.lr / 2,
                                           batch_size=s.batch_size, seed=s.seed + 1,
                                           progress=s.progress).seconds
        checkpoint.save(control, paths[2], dataset=ds.name)
    return baseline.eval(), multi.eval(), control.eval(), seconds


def _accuracy(model, x, y) -> float:
    with torch.inference_mode():
        out = torch.cat([model(x[i: i + 1024]) for i in range(0, len(x), 1024)])
    return float((out.argmax(1) == y).double().mean())


def _summary(times: list[float]) -> dict:
    ms = [1e3 * t for t in times]
    return {"latency_ms": statistics.fmean(ms), "latency_p50_ms": statistics.median(ms)}


def _one_threshold_row(name: str, one: dict, lat: dict, x, y, base_test: float,
                       control_test: float) -> dict:
    """Every exit with the single threshold calibrated over all of them (the bundle before
    exits and thresholds were chosen for the runtime), timed in the same interleaved run."""
    result = one["program"].infer(x.numpy(), one["policy"])
    accuracy = float((result.predictions == y.numpy()).mean())
    fractions = np.bincount(result.exit_index, minlength=one["program"].num_exits) / len(x)
    return {"method": "bundle, one threshold for every exit", "model": name,
            "accuracy": accuracy, "accuracy_drop_pt": 100 * (base_test - accuracy),
            "drop_vs_control_pt": 100 * (control_test - accuracy), **lat["one_threshold"],
            "speedup_mean": lat["full"]["latency_ms"] / lat["one_threshold"]["latency_ms"],
            "speedup_p50": lat["full"]["latency_p50_ms"] / lat["one_threshold"]["latency_p50_ms"],
            "exit_fractions": fractions.tolist(), "policy": one["policy"].config()}


def _model_rows(ds, name: str, s: DeployBenchSettings, out: Path, models: tuple
                ) -> tuple[list, list, dict]:
    baseline, multi, control, trained = models
    for m in (baseline, multi, control):
        m.eval()
    base_calib, control_calib = (_accuracy(m, ds.calib.x, ds.calib.y) for m in (baseline,
                                                                                  control))
    base_test, control_test = (_accuracy(m, ds.test.x, ds.test.y) for m in (baseline, control))
    reference = max(base_calib, control_calib)
    costs = cost_table(multi, ds.calib.x[:64], measure=False)
    with torch.inference_mode():
        calib_logits = multi.collect_logits(ds.calib.x)
    points = sweep(calib_logits, ds.calib.y, costs.exit_macs, MaxProb())
    op = choose_operating_point(points, reference_accuracy=reference, max_drop=s.max_drop)
    example = ds.calib.x[: s.bundle_samples]
    work = out / "work" / name
    work.mkdir(parents=True, exist_ok=True)
    extra_fns, one_threshold = {}, None
    if s.per_exit:
        # the exit subset and one threshold per kept exit, chosen at bundling for the latency
        # of leaving at each exit on ONNX Runtime; the single threshold over every exit is
        # bundled beside it and timed in the same run
        directory = bundle(multi, out / "bundles" / name, policy=MaxProb(), example=example,
                           calibration=(ds.calib.x, ds.calib.y), max_drop=s.max_drop,
                           reference_accuracy=reference, max_overhead=s.max_overhead,
                           threads=s.threads, classes=getattr(ds, "classes", None))
        first = load_bundle(bundle(multi, work / "one-threshold", policy=op.policy,
                                   example=example, threads=s.threads, measure=False))
        one_threshold = {"policy": op.policy, "program": first.program(threads=s.threads)}
        extra_fns["one_threshold"] = (lambda p, pol: lambda a: p.infer(a, pol))(
            one_threshold["program"], one_threshold["policy"])
    else:
        directory = bundle(multi, out / "bundles" / name, policy=op.policy, example=example,
                           max_overhead=s.max_overhead, threads=s.threads,
                           classes=getattr(ds, "classes", None))
    b = load_bundle(directory)
    # the kept exits by name (a manifest's model_exit counts the bundled model's exits)
    keep = [multi.exit_names.index(e["name"]) for e in b.manifest["exits"][:-1]]
    deployed = multi.keep_exits(keep)
    program = b.program(threads=s.threads)
    policy = b.policy
    x, y = ds.test.x, ds.test.y
    with torch.inference_mode():
        ref = deployed.infer(x, policy)
    batched = program.infer(x.numpy(), policy)
    singles = [program.infer(x[i: i + 1].numpy(), policy) for i in range(len(x))]
    single_exits = np.concatenate([r.exit_index for r in singles])
    single_preds = np.concatenate([r.predictions for r in singles])
    parity = {
        "same_exits_batched": float((batched.exit_index == ref.exit_index.numpy()).mean()),
        "same_predictions_batched": float((batched.predictions == ref.predictions.numpy())
                                          .mean()),
        "same_exits_batch1": float((single_exits == ref.exit_index.numpy()).mean()),
        "same_predictions_batch1": float((single_preds == ref.predictions.numpy()).mean()),
        "samples": len(x)}
    accuracy = float((single_preds == y.numpy()).mean())
    # batch-1 timing on ONNX Runtime, interleaved, on test samples
    full = OrtSession(export_piece(deployed.backbone, x[:2], work / "full.onnx"), s.threads)
    never = leave_at(policy, deployed.num_exits - 1, deployed.num_exits)
    never_graph = OrtSession(export_exit_graph(lower(deployed, never), never,
                                               work / "never.onnx"), s.threads)
    xs = x[: s.latency_samples].numpy() if s.latency_samples else x.numpy()
    fns = {"full": lambda a: full.run_arrays([a]),
           "bundle": lambda a: program.infer(a, policy),
           "no_exit": lambda a: never_graph.run_arrays([a]), **extra_fns}
    times = interleaved_seconds(fns, xs, warmup=50, chunks=20)
    lat = {k: _summary(v) for k, v in times.items()}
    fractions = np.bincount(single_exits, minlength=deployed.num_exits) / len(single_exits)
    macs = [e["macs"] for e in b.manifest["exits"]]
    mean_macs = float(np.dot(fractions, macs))
    rows = [
        {"method": "full model (ONNX Runtime)", "model": name, "accuracy": base_test,
         "macs_ratio": 1.0, **lat["full"], "latency_ratio": 1.0},
        {"method": "bundle (ONNX Runtime)", "model": name, "accuracy": accuracy,
         "accuracy_drop_pt": 100 * (base_test - accuracy),
         "drop_vs_control_pt": 100 * (control_test - accuracy),
         "macs_ratio": mean_macs / macs[-1], **lat["bundle"],
         "latency_ratio": lat["bundle"]["latency_ms"] / lat["full"]["latency_ms"],
         "speedup_mean": lat["full"]["latency_ms"] / lat["bundle"]["latency_ms"],
         "speedup_p50": lat["full"]["latency_p50_ms"] / lat["bundle"]["latency_p50_ms"],
         "form": b.manifest["latency"]["form"], "exits": b.exit_names,
         "exit_fractions": fractions.tolist(), **parity},
        {"method": "bundle, no exit fires", "model": name, **lat["no_exit"],
         "latency_ratio": lat["no_exit"]["latency_ms"] / lat["full"]["latency_ms"]},
        *([_one_threshold_row(name, one_threshold, lat, x, y, base_test, control_test)]
          if one_threshold else []),
        {"method": "control: baseline trained as long, no exits", "model": name,
         "accuracy": control_test, "accuracy_drop_pt": 100 * (base_test - control_test)},
    ]
    selection = [{"model": name, **row} for row in
                 b.manifest.get("selection", {}).get("subsets", [])]
    info = {"trained": trained, "policy": policy.config(), "calib_reference": reference,
            "one_threshold_calib_accuracy": op.accuracy,
            "selection": b.manifest.get("selection"),
            "bundle": str(directory), "bundle_latency": b.manifest["latency"]}
    return rows, selection, info


# the edge as a process ---------------------------------------------------------------------
_EDGE_PROGRAM = textwrap.dedent("""
    import sys, time, json
    t_start = float(sys.argv[1])
    if sys.argv[2] == "bundle":
        sys.modules["torch"] = None  # a device without PyTorch
    import numpy as np
    x = np.load(sys.argv[4])[:1]
    if sys.argv[2] == "bundle":
        from splitexit.runtime.bundle import load_bundle
        from splitexit.serve.edge import EdgeRuntime
        b = load_bundle(sys.argv[3])
        edge = EdgeRuntime(b.device(), b.policy, None, b.codec)
    else:
        import torch
        from splitexit.serve import EdgeRuntime, load_device
        device, policy, cfg = load_device(sys.argv[3])
        edge = EdgeRuntime(device, policy, None, cfg.codec)
        x = torch.from_numpy(x)
    answers = edge.classify(x)
    first = time.time() - t_start
    edge.close()
    # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:"))
    print(json.dumps({"cold_start_ms": 1e3 * first, "prediction": int(answers[0].prediction),
                      "peak_rss_mb": hwm / 1024, "torch_loaded": bool(sys.modules.get("torch"))}))
""")


def _edge_run(kind: str, path: Path, inputs: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _EDGE_PROGRAM, repr(time.time()), kind,
                           str(path), str(inputs)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise InputError(f"the {kind} edge process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dist_size(names: list[str]) -> tuple[float, list[str]]:
    """Installed MB of splitexit's own files plus distributions ``names`` and everything they
    require (splitexit's own requirements are what ``names`` says, not its metadata's)."""
    import importlib.metadata as md
    import re

    seen: set[str] = {"splitexit"}
    todo = list(names)
    total = 0
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or []:
            try:
                total += f.locate().stat().st_size
            except OSError:
                pass
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(req)
    for f in md.distribution("splitexit").files or []:
        try:
            total += f.locate().stat().st_size
        except OSError:
            pass
    return total / 2 ** 20, sorted(seen)


def _edge_rows(ds, s: DeployBenchSettings, out: Path) -> list[dict]:
    from splitexit.serve import export_model_dir

    multi = _load(out / "models" / "resnet8-multiexit", "resnet8", s)
    # every exit with the single threshold on both sides (a model directory, today's edge,
    # rebuilds zoo models with all their exits only)
    one = out / "work" / "resnet8" / "one-threshold"
    policy = load_bundle(one if one.is_dir() else out / "bundles" / "resnet8").policy
    split = bundle(multi, out / "bundles" / "resnet8-split", cut=s.edge_cut, policy=policy,
                   codec=s.edge_codec, measure=False)
    model_dir = export_model_dir(multi, s.edge_cut, out / "work" / "resnet8-modeldir",
                                 codec=s.edge_codec, policy=policy)
    inputs = out / "work" / "edge-inputs.npy"
    np.save(inputs, ds.test.x[:8].numpy())
    runs: dict[str, list[dict]] = {"bundle": [], "modeldir": []}
    for _ in range(s.edge_runs):  # interleaved
        runs["bundle"].append(_edge_run("bundle", split, inputs))
        runs["modeldir"].append(_edge_run("modeldir", model_dir, inputs))
    if any(r["torch_loaded"] for r in runs["bundle"]):
        raise InputError("the bundle edge process loaded torch")
    import importlib.metadata as md

    edge_mb, edge_dists = _dist_size(["numpy", "onnxruntime", "httpx", "zstandard",
                                       "constriction"])
    full_mb, _ = _dist_size([r for r in md.distribution("splitexit").requires or []
                             if "extra ==" not in r])

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    rows = []
    for kind, label, size in (("modeldir", "edge with PyTorch (model directory)", full_mb),
                              ("bundle", "edge without PyTorch (bundle)", edge_mb)):
        rows.append({"method": label, "model": "resnet8", "cut": s.edge_cut,
                     "codec": s.edge_codec, "cold_start_ms": med(kind, "cold_start_ms"),
                     "peak_rss_mb": med(kind, "peak_rss_mb"), "install_mb": size,
                     "runs": s.edge_runs,
                     "same_first_answer": len({r["prediction"] for k in runs
                                               for r in runs[k]}) == 1})
    base = rows[0]
    for row in rows:
        row["cold_start_ratio"] = row["cold_start_ms"] / base["cold_start_ms"]
        row["rss_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["install_ratio"] = row["install_mb"] / base["install_mb"]
    rows[1]["edge_install_dists"] = edge_dists
    return rows


def run_deploy(dataset: str, out: str | Path, s: DeployBenchSettings | None = None,
               command: str | None = None) -> dict:
    """Run the suite (see the module docstring); writes ``OUT/report.json`` and ``report.md``."""
    s = s or DeployBenchSettings()
    out = Path(out)
    steady_allocator()
    ds = load_dataset(dataset, seed=s.seed)
    rows, selection, info = [], [], {}
    # train (or reuse) every model first, on every core; then measure on s.threads
    models = {name: _train(ds, name, s, out / "models") for name in s.models}
    with torch_threads(s.threads):
        for name in s.models:
            r, sel, i = _model_rows(ds, name, s, out, models[name])
            rows += r
            selection += sel
            info[name] = i
        edge = _edge_rows(ds, s, out) if "resnet8" in s.models else []
    notes = [
        "Latency: batch 1 on ONNX Runtime (CPU, "
        f"{s.threads} thread), every method timed on the same {s.latency_samples or 'all'} "
        "test samples, interleaved in 20 chunks; speed-ups are ratios to the full model as "
        "one ONNX graph measured alongside.",
        "Parity: the bundle's exits and predictions against the PyTorch model's `infer` on "
        "every test sample, batched (pieces, decisions in numpy) and one sample at a time "
        "(the exit graph).",
        f"Operating point: max-prob threshold on the calibration split within "
        f"{100 * s.max_drop:g} pt of the better of baseline and control; the control is the "
        "baseline trained as long as the multi-exit model, without exits."
        + (" The bundle itself chooses its exits and one threshold per kept exit "
           "(splitexit.deploy.bundle with calibration=): for every exit subset, thresholds "
           f"within the same {100 * s.max_drop:g} pt on the calibration split that minimise "
           "the mean of the batch-1 latency of leaving at each exit, measured on ONNX Runtime "
           "(splitexit.calibration.per_exit_thresholds); the fastest subset within "
           "--max-overhead is bundled (every subset tried: the selection section). 'bundle, "
           "one threshold for every exit' keeps every exit with the single threshold, timed "
           "in the same run." if s.per_exit else ""),
        "Edge: a fresh process from start to the first answer of one sample (no server: the "
        "local answer), median of the runs, interleaved; peak RSS from getrusage. Install "
        "size: installed files of the distributions each side needs, with their "
        "requirements, measured in this environment.",
        *s.notes]
    sections = {"edge process": edge} if edge else {}
    if selection:
        sections["exit subsets (max overhead)"] = selection
    settings = {k: v for k, v in vars(s).items() if k != "notes"}
    return write_report(out, "deploy", rows, dataset=dataset, model=",".join(s.models),
                        sections=sections, notes=notes, command=command, settings=settings,
                        models=info, readme_sections=["edge process"] if edge else [])


def _cmd(args) -> int:
    from .common import command_line, print_rows

    s = DeployBenchSettings(epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                            max_drop=args.max_drop, max_overhead=args.max_overhead,
                            latency_samples=args.latency_samples or None, threads=args.threads,
                            seed=args.seed, user_model=args.user_model,
                            models=tuple(args.models.split(",")), edge_runs=args.edge_runs,
                            per_exit=not args.one_threshold)
    report = run_deploy(args.dataset, args.out, s, command=command_line())
    print_rows(report)
    print(f"wrote {Path(args.out) / 'report.md'} and report.json")
    return 0


def register(suites) -> None:
    """Add ``python -m benchmarks deploy``."""
    d = DeployBenchSettings()
    p = suites.add_parser("deploy", help="bundles of ResNet-8 and of a user's own residual "
                          "network: ONNX Runtime speed-up, parity with PyTorch, edge process "
                          "without PyTorch")
    p.add_argument("--out", default="reports/deploy")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--models", default=",".join(d.models),
                   help="resnet8 (zoo) and/or usernet (the --user-model file)")
    p.add_argument("--user-model", default=d.user_model,
                   help="path/file.py:function of the user's network (runs code from that file)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--max-drop", type=float, default=d.max_drop)
    p.add_argument("--max-overhead", type=float, default=None,
                   help="bundle only exit subsets whose no-exit latency is at most this times "
                        "the full model's")
    p.add_argument("--latency-samples", type=int, default=d.latency_samples)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--one-threshold", action="store_true",
                   help="keep one threshold for every exit (skip the per-exit thresholds)")
    p.add_argument("--edge-runs", type=int, default=d.edge_runs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd)
