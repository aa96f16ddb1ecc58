"""Glance and focus (GFNet) on cluttered Fashion-MNIST: the full-resolution backbone against
GFNet's steps as exits, learned (PPO) vs random vs centre patch policies.

Usage:
    python benchmarks/gfnet.py --out reports/gfnet            # train (or load) and report
    python benchmarks/gfnet.py --out reports/gfnet --plots-only  # figures from report.json

Trained models are cached under ``<out>/models/<key>`` (the key hashes every training
setting), so a rerun only evaluates and times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from splitexit import FixedExit, MaxProb
from splitexit.calibration import choose_operating_point, oracle, paired_drop_ci, sweep
from splitexit.cost import cost_table, count_macs
from splitexit.data import load_dataset
from splitexit.glance import (
    GFNet,
    GFNetConfig,
    GFNetSchedule,
    PPOConfig,
    fit_gfnet,
    full_resolution_backbone,
    train_backbone,
)
from splitexit.measure import interleaved_latency, interleaved_throughput, steady_allocator
from splitexit.report import load_report, pyplot, write_report
from splitexit.training.base import seed_everything

SUITE = "gfnet"
POLICIES = ("learned", "random", "centre")


#: bumped when the GFNet's design changes without a change of its configuration
GFNET_DESIGN = "localiser-policy-v4"


def settings(args) -> dict:
    """Every setting that changes the trained models (the cache keys hash them)."""
    if args.quick:
        schedule = GFNetSchedule(classifier_epochs=1, policy_iterations=4, policy_batch=64,
                                 finetune_epochs=2, search_epochs=2, search_samples=64,
                                 rounds=2, inked=0.5, seed=args.seed)
        train_samples = 600
    else:
        schedule = GFNetSchedule(classifier_epochs=args.epochs,
                                 policy_iterations=args.ppo_iterations, policy_batch=256,
                                 finetune_epochs=args.finetune_epochs,
                                 finetune_lr_scale=args.finetune_lr_scale,
                                 search_epochs=args.search_epochs,
                                 search_samples=args.search_samples, rounds=args.rounds,
                                 inked=args.inked, seed=args.seed,
                                 ppo=PPOConfig(lr=args.ppo_lr))
        train_samples = args.train_samples
    return {"dataset": args.dataset, "calib_fraction": args.calib_fraction, "seed": args.seed,
            "train_samples": train_samples, "config": GFNetConfig().to_json(),
            "schedule": schedule.to_json(), "design": GFNET_DESIGN,
            "backbone_epochs": schedule.classifier_epochs + schedule.finetune_epochs}


#: the configuration fields :func:`full_resolution_backbone` depends on
BACKBONE_FIELDS = ("image", "channels", "strides", "num_classes", "in_channels")


def backbone_settings(s: dict) -> dict:
    """The settings the backbone depends on (its cache key): the same data, architecture,
    optimiser, batch, seed and number of epochs as GFNet's classifier stages (not GFNet's
    glance, grid, steps or policy, which do not change the backbone)."""
    return {k: s[k] for k in ("dataset", "calib_fraction", "seed", "train_samples",
                              "backbone_epochs")} | {
        "backbone": {k: s["config"][k] for k in BACKBONE_FIELDS}} | {
        k: s["schedule"][k] for k in ("lr", "batch_size", "seed")}


def _key(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]


def train_or_load(args, ds, s: dict, part: str = "both") -> tuple[GFNet, torch.nn.Module, dict]:
    """The trained GFNet and full-resolution backbone for settings ``s``, each cached under
    ``<out>/models/{gfnet,backbone}-<key>`` (``part`` trains only one of them)."""
    from safetensors.torch import load_model, save_model

    models = Path(args.out) / "models"
    config = GFNetConfig.from_json(s["config"])
    train = ds.train if s["train_samples"] is None else ds.train.subset(s["train_samples"])
    sched = s["schedule"]
    schedule = GFNetSchedule(**{**sched, "ppo": PPOConfig(**sched["ppo"])})
    net, backbone, log = None, full_resolution_backbone(config), {}
    g_dir = models / f"gfnet-{_key(s)}"
    if part in ("both", "gfnet"):
        if (g_dir / "train_log.json").is_file():
            net = GFNet.load(g_dir)
        else:
            t0 = time.perf_counter()
            net = GFNet(config)
            gfnet_log = fit_gfnet(net, train, schedule)
            net.save(g_dir)
            (g_dir / "settings.json").write_text(json.dumps(s, indent=1))
            (g_dir / "train_log.json").write_text(json.dumps(
                {"seconds": time.perf_counter() - t0, "log": gfnet_log}, indent=1))
        log["gfnet"] = json.loads((g_dir / "train_log.json").read_text())
    b_settings = backbone_settings(s)
    b_dir = models / f"backbone-{_key(b_settings)}"
    if part in ("both", "backbone"):
        if not (b_dir / "train_log.json").is_file():
            t0 = time.perf_counter()
            seed_everything(schedule.seed)
            backbone_log = train_backbone(backbone, train, s["backbone_epochs"], lr=schedule.lr,
                                          batch_size=schedule.batch_size, seed=schedule.seed)
            b_dir.mkdir(parents=True, exist_ok=True)
            save_model(backbone, str(b_dir / "backbone.safetensors"))
            (b_dir / "settings.json").write_text(json.dumps(b_settings, indent=1))
            (b_dir / "train_log.json").write_text(json.dumps(
                {"seconds": time.perf_counter() - t0, "log": backbone_log}, indent=1))
        load_model(backbone, str(b_dir / "backbone.safetensors"))
        log["backbone"] = json.loads((b_dir / "train_log.json").read_text())
    return (None if net is None else net.eval()), backbone.eval(), log


@torch.no_grad()
def _infer_batched(model, x: torch.Tensor, policy, batch: int):
    """Real exits over ``x`` in batches: predictions and exit indices."""
    preds, exits = [], []
    for i in range(0, len(x), batch):
        r = model.infer(x[i: i + batch], policy)
        preds.append(r.predictions)
        exits.append(r.exit_index)
    return torch.cat(preds), torch.cat(exits)


def _policy_point(points, ref: float, drop: float):
    """The cheapest calibration point within ``drop`` of ``ref`` (None when none is)."""
    try:
        return choose_operating_point(points, reference_accuracy=ref, max_drop=drop)
    except Exception:  # no threshold meets the target on the calibration split
        return None


def _at_macs(points, budget: float):
    """The most accurate calibration point within ``budget`` mean MACs."""
    return choose_operating_point(points, macs_budget=budget * (1 + 1e-9))


def _row(method: str, model, logits, y, exit_macs, policy, full_macs: float, ref_correct,
         **extra) -> dict:
    """A test row for ``policy`` replayed offline over the test logits."""
    result = model.simulate(logits, policy)
    correct = result.predictions == y
    drop, low, high = paired_drop_ci(ref_correct, correct)
    macs = float(torch.tensor(exit_macs, dtype=torch.float64)[result.exit_index].mean())
    return {"method": method, "accuracy": float(correct.double().mean()),
            "accuracy_drop_pt": drop, "test_drop_ci95_pt": [low, high], "mean_macs": macs,
            "macs_ratio": macs / full_macs,
            "exit_fractions": result.exit_fractions(len(logits)), **extra}


def _timing(args, ds, backbone, model, policies: dict) -> tuple[dict, dict, dict]:
    """Batch-1 latency (interleaved) and batch-256 throughput of the backbone and GFNet at each
    operating point, eager and compiled to TorchScript (both sides alike), one thread, all in
    the same run. Also whether the TorchScript exits equal the eager ones."""
    from splitexit.export.onnx import export_piece
    from splitexit.optimize import trace_for_inference
    from splitexit.program import lower
    from splitexit.runtime.ort import OrtSession

    xs = ds.test.x[: args.latency_samples]
    traced_backbone = trace_for_inference(backbone, xs[:2])
    traced = trace_for_inference(model, xs[:2])
    tmp = tempfile.TemporaryDirectory()
    onnx_backbone = OrtSession(export_piece(backbone, xs[:2], Path(tmp.name) / "backbone.onnx"),
                               threads=1)
    fns = {"backbone": lambda s: backbone(s), "backbone [traced]": lambda s: traced_backbone(s),
           "backbone [onnx]": lambda s: onnx_backbone.run_arrays([s.numpy()])}
    parity = {}
    for j, (name, policy) in enumerate(policies.items()):
        program = lower(model, policy, example=xs[:2]).on_onnx_runtime(
            Path(tmp.name) / f"gfnet{j}", exit_graph=True, threads=1)
        fns[name] = lambda s, p=policy: model.infer(s, p)
        fns[name + " [traced]"] = lambda s, p=policy: traced.infer(s, p)
        fns[name + " [onnx]"] = lambda s, p=policy, g=program: g.infer(s.numpy(), p)
        a, b = model.infer(xs, policy), traced.infer(xs, policy)
        c = program.infer(xs.numpy(), policy)
        one = torch.as_tensor([int(program.infer(xs[i: i + 1].numpy(), policy).exit_index[0])
                               for i in range(min(100, len(xs)))])  # the batch-1 exit graph
        parity[name] = (float((a.exit_index == b.exit_index).double().mean()),
                        float((a.exit_index == torch.as_tensor(c.exit_index)).double().mean()),
                        float((a.exit_index[: len(one)] == one).double().mean()))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            latency = interleaved_latency(fns, xs, warmup=20, chunks=10)
            rates = interleaved_throughput(fns, ds.test.x[:1024], batch=256,
                                           repeats=1 if args.quick else 3)
    finally:
        torch.set_num_threads(old)
        tmp.cleanup()
    return latency, rates, parity


def _timing_fields(name: str, latency: dict, rates: dict) -> dict:
    """The row's timing fields, eager and TorchScript, as ratios to the backbone's."""
    out = {}
    for form, suffix in (("", ""), ("traced_", " [traced]"), ("onnx_", " [onnx]")):
        key, ref = name + suffix, "backbone" + suffix
        if key not in latency:
            continue
        out[f"{form}latency_ms"] = latency[key]["mean_ms"]
        out[f"{form}latency_p50_ms"] = latency[key]["median_ms"]
        out[f"{form}latency_ratio"] = latency[key]["mean_ms"] / latency[ref]["mean_ms"]
        out[f"{form}latency_p50_ratio"] = latency[key]["median_ms"] / latency[ref]["median_ms"]
        out[f"{form}throughput_sps"] = rates[key]
        out[f"{form}throughput_ratio"] = rates[key] / rates[ref]
    return out


def evaluate(args, ds, s: dict, net: GFNet, backbone, log: dict) -> dict:
    """Every row, section and figure input of the report."""
    net.eval()
    backbone.eval()
    models = {p: net.multiexit(p) for p in POLICIES}
    example = ds.test.x[:4]
    exit_macs = {p: cost_table(models[p], example, measure=False).exit_macs for p in POLICIES}
    full_macs = count_macs(lambda: backbone(example[:1]))
    with torch.no_grad():
        bb_calib = torch.cat([backbone(ds.calib.x[i: i + 500]).argmax(1)
                              for i in range(0, len(ds.calib.x), 500)]) == ds.calib.y
        bb_test = torch.cat([backbone(ds.test.x[i: i + 500]).argmax(1)
                             for i in range(0, len(ds.test.x), 500)]) == ds.test.y
    ref_calib = float(bb_calib.double().mean())
    calib_logits = {p: models[p].collect_logits(ds.calib.x, 500) for p in POLICIES}
    test_logits = {p: models[p].collect_logits(ds.test.x, 500) for p in POLICIES}
    threshold = MaxProb(0.9)
    points = {p: sweep(calib_logits[p], ds.calib.y, exit_macs[p], threshold, num=300)
              for p in POLICIES}
    learned = models["learned"]
    y = ds.test.y
    last = net.config.steps
    rows = [{"method": "full-resolution backbone (no exits)", "accuracy":
             float(bb_test.double().mean()), "mean_macs": full_macs, "macs_ratio": 1.0}]
    for p in POLICIES:
        rows.append(_row(f"gfnet-{p}, all {last} steps (no exits; control)", learned,
                         test_logits[p], y, exit_macs[p],
                         FixedExit(last), full_macs, bb_test))
    chosen = {}
    for drop in (0.005, 0.01):
        point = _policy_point(points["learned"], ref_calib, drop)
        tag = f"<= {drop * 100:g} pt"
        if point is None:  # report the most accurate point instead, marked
            point = max(points["learned"], key=lambda q: (q.accuracy, -q.mean_macs))
            tag += " (unreachable on calib: most accurate point)"
        chosen[f"gfnet-learned {tag}"] = point
        rows.append(_row(f"gfnet-learned {tag}", learned, test_logits["learned"], y,
                         exit_macs["learned"], point.policy, full_macs, bb_test,
                         target_drop_pt=drop * 100, threshold=point.policy.threshold,
                         calib_accuracy=point.accuracy, calib_mean_macs=point.mean_macs))
        for p in ("random", "centre"):  # the same mean MACs on the calibration split
            other = _at_macs(points[p], point.mean_macs)
            rows.append(_row(f"gfnet-{p} at the same mean MACs ({tag})", models[p],
                             test_logits[p], y, exit_macs[p], other.policy, full_macs, bb_test,
                             threshold=other.policy.threshold, calib_mean_macs=other.mean_macs))
    orc = oracle(test_logits["learned"], y, exit_macs["learned"])
    rows.append({"method": "gfnet-learned oracle (test)", "accuracy": orc["accuracy"],
                 "mean_macs": orc["mean_macs"], "macs_ratio": orc["mean_macs"] / full_macs,
                 "exit_fractions": orc["exit_fractions"]})
    # real exits against the offline replay, and the timing of each operating point
    parity = []
    for name, point in chosen.items():
        for batch in (1, 256):
            xs = ds.test.x if batch > 1 else ds.test.x[:300]
            preds, exits = _infer_batched(learned, xs, point.policy, batch)
            sim = learned.simulate([lg[: len(xs)] for lg in test_logits["learned"]],
                                   point.policy)
            parity.append({"method": name, "batch": batch, "samples": len(xs),
                           "same_exits": float((exits == sim.exit_index).double().mean()),
                           "same_predictions": float((preds == sim.predictions)
                                                     .double().mean())})
    floor = "gfnet-learned, every sample leaves at the glance (latency floor)"
    latency, rates, traced_parity = _timing(args, ds, backbone, learned, {
        **{n: p.policy for n, p in chosen.items()}, floor: MaxProb(0.0)})
    glance_acc = float((test_logits["learned"][0].argmax(1) == y).double().mean())
    rows.append({"method": floor, "accuracy": glance_acc, "mean_macs": exit_macs["learned"][0],
                 "macs_ratio": exit_macs["learned"][0] / full_macs})
    for entry in parity:
        (entry["same_exits_traced_vs_eager"], entry["same_exits_onnx_vs_eager"],
         entry["same_exits_onnx_exit_graph_batch1_vs_eager"]) = traced_parity[entry["method"]]
    for row in rows:
        name = row["method"]
        row.update(_timing_fields("backbone" if name.startswith("full-resolution") else name,
                                  latency, rates))
    steps = []
    for p in POLICIES:
        for e in range(last + 1):
            acc = float((test_logits[p][e].argmax(1) == y).double().mean())
            steps.append({"method": f"gfnet-{p}", "step": e, "accuracy": acc,
                          "mean_macs": exit_macs[p][e], "macs_ratio": exit_macs[p][e] / full_macs})
    curves = {p: [[q.mean_macs / full_macs, q.accuracy] for q in points[p]] for p in POLICIES}
    example_x = ds.test.x[:4]
    with torch.no_grad():
        _, locations = net.rollout(example_x, "learned")
    ppo = [e for e in log["gfnet"]["log"] if e.get("stage") == "stage2-ppo"]
    targets = _targets(rows)
    report = write_report(
        args.out, SUITE, rows, dataset=f"{args.dataset} (test: {len(y)} canvases, calib: "
        f"{len(ds.calib)})", model=f"GFNet {json.dumps(s['config'])}",
        sections={"steps (every sample stops after step k: the same MACs per policy)": steps,
                  "real exits vs offline replay (and TorchScript, ONNX Runtime vs eager on "
                  "the latency samples, batch of all of them)": parity,
                  "targets": targets},
        notes=[
            "Operating points are chosen on the calibration split against the full-resolution "
            "backbone's calibration accuracy, then evaluated once on the test split; "
            "accuracy_drop_pt and its 95% interval are paired against the backbone on test.",
            "Random and centre policies: the most accurate calibration point within the "
            "learned policy's calibration mean MACs.",
            "Latency: batch 1, one thread, interleaved with the backbone in the same run "
            "(mean and median), in three forms, each against the backbone in the same form: "
            "eager PyTorch, TorchScript (splitexit.optimize.trace_for_inference: BatchNorm "
            "folded, one graph per step) and ONNX Runtime (the exit program's pieces, "
            "splitexit.program.lower(...).on_onnx_runtime with the batch-1 exit graph, as a "
            "bundle runs it: one ONNX Runtime call per sample, the steps and the threshold "
            "tests in one graph; batches run piece by piece); throughput: batches of 256, "
            "one thread.",
            "The backbone is the same CNN on the whole image, trained with the same optimiser, "
            "data and epochs as GFNet's classifier stages (stage 1 + stage 3).",
            "GFNet training (class labels only; the item's place is never used): stage 1 "
            "with half of the patches drawn where the glance has most ink, half at random; "
            "then rounds of (the localiser fitted to a one-step lookahead: the classifier's "
            "true-class log-probability after a focus step at every location of "
            f"{s['schedule']['search_samples']} training images; PPO on the whole policy; "
            "the focus CNN and classifier fine-tuned on the learned policy's patches).",
        ],
        command="python benchmarks/gfnet.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        settings=s, models_key=_key(s), curves=curves,
        example={"images_hex_rows": [[bytes(row).hex() for row in image] for image in
                                     torch.round(example_x.squeeze(1) * 255).to(torch.uint8)
                                     .numpy()],
                 "locations": locations.tolist(),
                 "labels": ds.test.y[:4].tolist(), "class_names": ds.class_names,
                 "corners": net.grid.corners().tolist(), "patch": net.grid.patch},
        training={"backbone_seconds": log["backbone"]["seconds"],
                  "gfnet_seconds": log["gfnet"]["seconds"],
                  "note": "each trained in its own process, 1 thread",
                  "ppo_return_first10": statistics.fmean(e["mean_return"] for e in ppo[:10])
                  if ppo else None,
                  "ppo_return_last10": statistics.fmean(e["mean_return"] for e in ppo[-10:])
                  if ppo else None},
        plots=["accuracy_vs_macs.png", "example_patches.png"])
    return report


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, met or missed, from the rows."""
    out = []
    half = next((r for r in rows if r["method"].startswith("gfnet-learned <= 0.5 pt")), None)
    if half:
        out.append({"target": "accuracy drop vs backbone <= 0.5 pt (test)",
                    "value": half["accuracy_drop_pt"], "met": half["accuracy_drop_pt"] <= 0.5})
        out.append({"target": "mean MACs <= 40% of backbone", "value": half["macs_ratio"],
                    "met": half["macs_ratio"] <= 0.4})
        for form, what in (("", "eager"), ("traced_", "TorchScript"),
                           ("onnx_", "ONNX Runtime")):
            for stat, label in (("latency_ratio", "mean"), ("latency_p50_ratio", "median")):
                if form + stat in half:
                    value = half[form + stat]
                    out.append({"target": f"batch-1 latency <= 0.6x backbone ({what}, {label})",
                                "value": value, "met": value <= 0.6})
        budget = next((r for r in rows if r["method"].startswith("gfnet-learned, all")), None)
        if budget:  # the patch budget without early exits: a fixed policy, no threshold
            out.append({"target": "accuracy drop vs backbone <= 0.5 pt (test) at <= 40% MACs, "
                                  "learned patches, every step (no early exit)",
                        "value": budget["accuracy_drop_pt"], "macs_ratio": budget["macs_ratio"],
                        "met": budget["accuracy_drop_pt"] <= 0.5
                        and budget["macs_ratio"] <= 0.4})
        rnd = next((r for r in rows if r["method"].startswith("gfnet-random at the same")), None)
        if rnd:
            out.append({"target": "learned beats random at the same mean MACs (test)",
                        "value": half["accuracy"] - rnd["accuracy"],
                        "met": half["accuracy"] > rnd["accuracy"]})
    return out


def plots(out: Path, report: dict) -> None:
    """accuracy_vs_macs.png and example_patches.png, from the report alone."""
    from splitexit.report import plot_pareto

    curves = {f"GFNet, {p} patches (calib sweep)": [tuple(pt) for pt in report["curves"][p]]
              for p in report["curves"]}
    points = {}
    for row in report["rows"]:
        if "macs_ratio" in row and ("<=" in row["method"] or "backbone" in row["method"]
                                    or "oracle" in row["method"]):
            if "same mean MACs" not in row["method"]:
                name = row["method"] if "(test)" in row["method"] else row["method"] + " (test)"
                points[name] = (row["macs_ratio"], row["accuracy"])
    plot_pareto(out / "accuracy_vs_macs.png", curves, points,
                xlabel="mean MACs / full-resolution backbone's", ylabel="accuracy",
                title=report.get("dataset", ""))
    ex = report["example"]
    plt = pyplot()
    images = [[[v / 255 for v in bytes.fromhex(row)] for row in image]
              for image in ex["images_hex_rows"]]
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.7), dpi=110)
    colours = ["#e41a1c", "#ff7f00", "#4daf4a", "#377eb8", "#984ea3", "#a65628"]
    for ax, image, locs, label in zip(axes, images, ex["locations"], ex["labels"]):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        for t, g in enumerate(locs):
            r, c = ex["corners"][g]
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), ex["patch"], ex["patch"], fill=False,
                                       lw=1.6, ec=colours[t % len(colours)]))
            ax.text(c + 1, r + 6, str(t + 1), color=colours[t % len(colours)], fontsize=8)
        names = ex.get("class_names")
        ax.set_title(names[label] if names else f"class {label}", fontsize=8)
        ax.axis("off")
    fig.suptitle("learned patch policy: patches in the order chosen (1 = first focus step)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "example_patches.png")
    plt.close(fig)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/gfnet")
    parser.add_argument("--dataset", default="cluttered-fashion")
    parser.add_argument("--calib-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4, help="stage-1 epochs")
    parser.add_argument("--finetune-epochs", type=int, default=9, help="stage-3 epochs")
    parser.add_argument("--finetune-lr-scale", type=float, default=1.0,
                        help="stage-3 peak learning rate / stage 1's")
    parser.add_argument("--search-epochs", type=int, default=30,
                        help="epochs of the policy's warm start on the one-step lookahead")
    parser.add_argument("--search-samples", type=int, default=1500,
                        help="training images the one-step lookahead covers")
    parser.add_argument("--ppo-iterations", type=int, default=60)
    parser.add_argument("--ppo-lr", type=float, default=2e-4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (lookahead warm start, PPO, fine-tuning)")
    parser.add_argument("--inked", type=float, default=0.5,
                        help="stage 1's share of patches drawn where the glance has most ink")
    parser.add_argument("--train-samples", type=int, default=8000,
                        help="canvases of the train split used for training (stratified)")
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="tiny training (smoke test)")
    parser.add_argument("--train-only", choices=["both", "gfnet", "backbone"],
                        help="train (or load) only, one of the models or both")
    parser.add_argument("--plots-only", action="store_true",
                        help="redraw the figures from <out>/report.json")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    steady_allocator()
    if args.plots_only:
        plots(Path(args.out), load_report(args.out))
        return 0
    ds = load_dataset(args.dataset, calib_fraction=args.calib_fraction, seed=args.seed)
    if args.quick:  # a smoke test: small evaluation splits too
        ds = replace(ds, calib=ds.calib.subset(300), test=ds.test.subset(300))
        args.latency_samples = min(args.latency_samples, 40)
    s = settings(args)
    net, backbone, log = train_or_load(args, ds, s, args.train_only or "both")
    if args.train_only:
        return 0
    report = evaluate(args, ds, s, net, backbone, log)
    plots(Path(args.out), report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
