"""MESS benchmark: multi-exit segmentation on generated canvases, against the backbone without
exits and the equally trained control.

    python benchmarks/mess.py --out reports/mess             # train (or reuse) and measure
    python benchmarks/mess.py --out reports/mess --plot-only # figures again from report.json

The suite (public splitexit API only):

1. trains, or reuses from ``OUT/models`` (safetensors keyed by the settings), the ``segnet``
   backbone (guided by the image, blocks at 1/8 resolution; ``E`` epochs), the control (the same backbone, ``E + H`` epochs), candidate dense
   heads at every cut on the frozen backbone (``H`` epochs: MESS's second stage), and the
   jointly trained model with the searched heads (``E + H`` epochs);
2. searches the number, placement and type of heads and the policy (pixel share at several
   pixel thresholds, mean confidence; each reading every pixel or one per 8x8 block) on the
   calibration split within a head MAC budget (the fewest mean MACs: MESS's rule) and,
   latency-aware, on a one-shot joint bank (a fresh backbone trained with every
   candidate at the early cuts, ``E + H`` epochs): the configuration and policy of the lowest
   expected batch-1 latency (a table of every piece's ONNX Runtime time in DenseSteps' form,
   measured once and cached in ``OUT/models``) within 1 pt of the control on calibration,
   the head MAC budget and 50% mean MACs; the chosen heads are also trained jointly alone;
3. chooses each model's policy on the calibration split by the search's rule, picks operating
   points there at <= 0.5 and <= 1 pt mIoU below the control's calibration mIoU, and applies
   them once on the test split;
4. reports mIoU, pixel accuracy, mean MACs, the oracle bound, the agreement of real exits with
   the offline replay, batch-1 latency and batched throughput (1 thread, interleaved, ratios to
   the backbone measured in the same run; eager PyTorch and ONNX Runtime, the bundle's
   runtime) and plots mIoU against MACs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from splitexit.calibration import pareto_front
from splitexit.cost import cost_table
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.measure import interleaved_latency, interleaved_throughput, torch_threads
from splitexit.optimize import fuse_for_inference
from splitexit.report import load_report, plot_pareto, write_report
from splitexit.runtime.arrays import NUMPY, TORCH
from splitexit.segmentation import (
    CandidateBank,
    LatencyTable,
    MeanConfidence,
    PixelShare,
    assemble,
    choose_point,
    choose_policy,
    create_segmenter,
    dense_oracle,
    dense_sweep,
    fit_candidates,
    head_label,
    measure_latency_table,
    search_heads,
    summarize_candidates,
    summarize_exits,
    train_joint,
)
from splitexit.training import Baseline, TrainConfig, train

ONNX = " [onnx]"  # the timing of a method on ONNX Runtime
STEPS = " [onnx steps]"  # ONNX Runtime, the pieces in DenseSteps' lean batch-1 loop


@dataclass
class MessSettings:
    """What the suite trains and measures (every field is part of the model cache key but
    the measurement ones)."""

    dataset: str = "fashion-canvas"
    train_samples: int = 5000
    backbone_epochs: int = 6
    head_epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    widths: tuple[int, ...] = (8, 24, 64)
    dilations: tuple[int, ...] = (1, 2, 1, 2)
    guided: bool = True  # the image guides every upsampling (segnet(guided=True))
    reduction: int = 8  # blocks at 1/8 resolution
    # the backbone's final classifier as a dense head, e.g. (("kind", "conv"), ("depth", 2),
    # ("dilation", 2), ("channels", 32)); empty: the guided 1x1 classifier (measured better:
    # 66.1 / 69.0 % test mIoU for backbone / control against 63.5 / 67.4 % with that head)
    classifier: tuple[tuple[str, object], ...] = ()
    search_cuts: tuple[str, ...] = ("down", "block1", "block2")
    candidates: tuple[dict, ...] = (
        {"kind": "pointwise"},
        {"kind": "conv", "depth": 1},
        {"kind": "conv", "depth": 2, "dilation": 2, "channels": 32},
        {"kind": "depthwise", "depth": 2, "dilation": 2},
    )
    # the latency-aware search's candidates, judged as jointly trained heads: a one-shot bank
    # (backbone and every candidate trained together, E + H epochs) at the cuts whose exit
    # piece can answer in a fraction of the backbone's batch-1 time (a piece reaching block2
    # already costs ~0.75x; see the parts table); not part of the older models' cache keys
    joint_candidates: tuple[dict, ...] = (
        {"cut": "down", "kind": "pointwise"},
        {"cut": "down", "kind": "conv", "depth": 1, "channels": 32},
        {"cut": "down", "kind": "conv", "depth": 2, "dilation": 2, "channels": 32},
        {"cut": "down", "kind": "conv", "depth": 2, "dilation": 2, "channels": 64},
        {"cut": "down", "kind": "conv", "depth": 3, "dilation": 2, "channels": 32},
        {"cut": "down", "kind": "depthwise", "depth": 2, "dilation": 2},
        {"cut": "block1", "kind": "pointwise"},
        {"cut": "block1", "kind": "conv", "depth": 1, "channels": 32},
        {"cut": "block1", "kind": "conv", "depth": 2, "dilation": 2, "channels": 32},
    )
    head_budget_share: float = 0.25
    macs_budget_share: float = 0.5  # the latency-aware search's mean MACs budget
    pixel_thresholds: tuple[float, ...] = (0.8, 0.9, 0.95, 0.99)
    # every policy at these pixel grid steps: 1 reads every pixel, 8 one per 8x8 block (the
    # resolution of a head at 1/8); the search and the calibration choose among them
    policy_strides: tuple[int, ...] = (1, 8)
    max_drops: tuple[float, ...] = (0.005, 0.01)
    seed: int = 0
    train_threads: int = 1
    latency_samples: int = 200
    latency_table_samples: int = 1000  # calibration canvases the search's latency table uses
    profile_runs: int = 500  # runs of each graph under ONNX Runtime's profiler
    throughput_samples: int = 256
    throughput_batch: int = 64
    parity_samples: int = 256
    eval_samples: int | None = None  # calibration and test canvases used (None: all)

    def training_key(self) -> dict:
        keys = ("dataset", "train_samples", "backbone_epochs", "head_epochs", "batch_size", "lr",
                "widths", "dilations", "guided", "reduction", "classifier", "search_cuts",
                "candidates", "seed")
        key = {k: getattr(self, k) for k in keys}
        if not self.classifier:  # the 1x1 classifier: keys from before the option stay valid
            del key["classifier"]
        return key


def _digest(name: str, settings: dict) -> str:
    blob = json.dumps(settings, sort_keys=True, default=list).encode()
    return f"{name}-{hashlib.sha1(blob).hexdigest()[:12]}"


def _cached(models: Path, key: str, module: torch.nn.Module, fit) -> float | None:
    """Load ``module``'s weights from ``models/key.safetensors``, or ``fit`` it and save them;
    returns the training seconds (``None`` when loaded)."""
    file = models / f"{key}.safetensors"
    if file.is_file():
        module.load_state_dict(load_file(str(file)))
        module.eval()
        return None
    t0 = time.perf_counter()
    fit(module)
    seconds = time.perf_counter() - t0
    models.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()},
              str(file))
    module.eval()
    return seconds


def _joint_bank(s: MessSettings, models: Path, segmenter, trainset, config
                ) -> tuple[torch.nn.Module, CandidateBank, float | None]:
    """The one-shot joint bank (a fresh backbone and every joint candidate trained together,
    ``E + H`` epochs, as the control), trained or loaded from ``models``: the backbone, the
    bank and the training seconds (``None`` when cached)."""
    model = segmenter()
    bank = CandidateBank(model, s.joint_candidates, joint=True)
    key = {**s.training_key(), "joint_candidates": list(s.joint_candidates)}
    seconds = _cached(models, _digest("jointbank", key), bank, lambda b: fit_candidates(
        b, trainset, config, epochs=s.backbone_epochs + s.head_epochs))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return model, bank, seconds


def _policies(s: MessSettings) -> list:
    """Every policy family searched. Where several give the same calibration point (the same
    exits), the search keeps the first: the sparser pixel grid (search.policy_score), then
    mean confidence, the statistic with fewer operations (no per-pixel comparison)."""
    return [policy for stride in s.policy_strides for policy in (
        MeanConfidence(0.5, stride=stride),
        *(PixelShare(0.5, pixel_threshold=p, stride=stride) for p in s.pixel_thresholds))]


def _evaluate(model, data, classes: int, policies, batch: int = 100):
    return summarize_exits(model, data.x, data.y, classes, policies, batch_size=batch)


def _at(summary, exit_macs, policy) -> dict:
    """The test figures of one chosen policy (its threshold applied once)."""
    point = dense_sweep(summary, exit_macs, policy, thresholds=[policy.threshold])[0]
    return {"miou": point.accuracy, "pixel_accuracy": point.pixel_accuracy,
            "mean_macs": point.mean_macs, "exit_fractions": point.exit_fractions}


def _curve(summary, exit_macs, policy) -> list[list[float]]:
    return [[p.mean_macs, p.accuracy] for p in pareto_front(dense_sweep(summary, exit_macs,
                                                                        policy))]


def run(s: MessSettings, out: Path, command: str, other_run: Path | None = None) -> dict:
    """Train (or reuse), search, calibrate and measure; write the report and plots.

    ``other_run``: the ``report.json`` of another run of the same command; the latency targets
    are then judged on both runs (met on one only: "on the boundary")."""
    other = None
    if other_run is not None:
        other = json.loads(Path(other_run).read_text())
        if other.get("settings", {}).get("policy_strides") != list(s.policy_strides) or \
                other.get("suite") != "mess":
            raise InputError(f"{other_run} is not a MESS report of these settings; give the "
                             "report.json of another run of the same command")
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    ds = load_dataset(s.dataset, seed=s.seed)
    if s.eval_samples:  # a quick run: the first canvases of the calibration and test splits
        ds = replace(ds, calib=ds.calib.subset(s.eval_samples, s.seed),
                     test=ds.test.subset(s.eval_samples, s.seed))
    trainset = ds.train if s.train_samples >= len(ds.train) else ds.train.subset(
        s.train_samples, seed=s.seed)
    classes, shape = ds.num_classes, ds.input_shape
    kwargs = {"widths": list(s.widths), "dilations": list(s.dilations), "guided": s.guided,
              "reduction": s.reduction, "classifier": dict(s.classifier) or None}
    key = s.training_key()
    config = TrainConfig(lr=s.lr, batch_size=s.batch_size, seed=s.seed, progress=None)
    policies = _policies(s)
    seconds: dict[str, float | None] = {}

    def segmenter(heads=()):
        torch.manual_seed(s.seed)
        return create_segmenter(classes, shape, list(heads), model_kwargs=kwargs)

    with torch_threads(s.train_threads):
        backbone = segmenter()
        seconds["backbone"] = _cached(models, _digest("backbone", key), backbone, lambda m: train(
            m, trainset, Baseline(), config, epochs=s.backbone_epochs))
        control = segmenter()
        seconds["control"] = _cached(models, _digest("control", key), control, lambda m: train(
            m, trainset, Baseline(), config, epochs=s.backbone_epochs + s.head_epochs))
        candidates = [{"cut": cut, **c} for cut in s.search_cuts for c in s.candidates]
        bank = CandidateBank(backbone, candidates)
        seconds["candidate heads"] = _cached(
            models, _digest("heads", key), bank,
            lambda b: fit_candidates(b, trainset, config, epochs=s.head_epochs))
        for p in backbone.backbone.parameters():
            p.requires_grad_(False)

        # search on calibration, against the control's calibration mIoU, or the backbone's
        # own when it is lower (no configuration could then come within the drop of the
        # control: the search still finds the cheapest one within the drop of its backbone)
        reference = _evaluate(control, ds.calib, classes, []).exit_miou()[-1]
        own = _evaluate(backbone, ds.calib, classes, []).exit_miou()[-1]
        stage_macs = [c.macs for c in cost_table(backbone.backbone, ds.calib.x[:2],
                                                 measure=False).stages]
        backbone_macs = sum(stage_macs)
        t0 = time.perf_counter()
        head_sums, final_sum = summarize_candidates(bank, backbone, ds.calib.x, ds.calib.y,
                                                    classes, policies)
        found = search_heads(bank, head_sums, final_sum, stage_macs, policies,
                             min(reference, own),
                             max_drop=max(s.max_drops),
                             head_budget=s.head_budget_share * backbone_macs)
        seconds["search"] = time.perf_counter() - t0
        mess = assemble(bank, backbone, found.heads)
        default_heads = [{"cut": c, "kind": "conv", "depth": 1} for c in s.search_cuts[:3]]
        default = assemble(bank, backbone, default_heads)
        joint = segmenter(found.heads)
        seconds["joint"] = _cached(
            models, _digest("joint", {**key, "heads": found.heads}), joint,
            lambda m: train_joint(m, trainset, s.backbone_epochs + s.head_epochs, config=config))

        # the latency-aware search: candidates judged as jointly trained heads (the one-shot
        # joint bank) and scored by the measured batch-1 latency of the pieces they run (a
        # table measured once per settings, cached beside the models: every run searches the
        # same figures), against the control's calibration mIoU, within the head MAC budget
        # and at <= macs_budget_share mean MACs
        jmodel, jbank, seconds["joint candidate bank"] = _joint_bank(s, models, segmenter,
                                                                      trainset, config)
        table, table_info = _latency_table(s, models, jbank, jmodel, policies, ds.calib.x)
        macs_budget = s.macs_budget_share * backbone_macs
        t0 = time.perf_counter()
        joint_sums, joint_final = summarize_candidates(jbank, jmodel, ds.calib.x, ds.calib.y,
                                                       classes, policies)
        fast_found = search_heads(jbank, joint_sums, joint_final, stage_macs, policies,
                                  reference, max_drop=max(s.max_drops),
                                  head_budget=s.head_budget_share * backbone_macs,
                                  latency=table, macs_budget=macs_budget)
        seconds["latency-aware search"] = time.perf_counter() - t0
        oneshot = assemble(jbank, jmodel, fast_found.heads)
        fast_joint = segmenter(fast_found.heads)
        if fast_found.heads != found.heads:
            seconds["joint, latency-searched heads"] = _cached(
                models, _digest("joint", {**key, "heads": fast_found.heads}), fast_joint,
                lambda m: train_joint(m, trainset, s.backbone_epochs + s.head_epochs,
                                      config=config))
        else:
            fast_joint = joint

    test_control = _evaluate(control, ds.test, classes, [])
    test_backbone = _evaluate(backbone, ds.test, classes, [])
    control_miou = test_control.exit_miou()[-1]
    rows = [
        {"method": "backbone (no exits)", "miou": test_backbone.exit_miou()[-1],
         "pixel_accuracy": test_backbone.exit_pixel_accuracy()[-1], "mean_macs": backbone_macs,
         "epochs": s.backbone_epochs},
        {"method": "control (equally trained backbone)", "miou": control_miou,
         "pixel_accuracy": test_control.exit_pixel_accuracy()[-1], "mean_macs": backbone_macs,
         "epochs": s.backbone_epochs + s.head_epochs},
    ]
    def latency(heads):  # the table's expected batch-1 latency of a point of these heads
        return lambda p: table.expected(heads, p.policy, p.exit_fractions)

    # name: (model, the cost its points minimise (None: mean MACs), its mean MACs budget)
    variants = {"MESS two-stage, searched heads": (mess, None, None),
                "two-stage, default conv heads": (default, None, None),
                "joint, searched heads": (joint, None, None),
                "joint one-shot bank, latency-searched heads": (
                    oneshot, latency(fast_found.heads), macs_budget)}
    if fast_joint is not joint:
        variants["joint, latency-searched heads"] = (fast_joint, latency(fast_found.heads),
                                                     macs_budget)
    curves, anytime, chosen, notes_extra, families = {}, [], {}, [], []
    for name, (model, cost, budget) in variants.items():
        exit_macs = cost_table(model, ds.calib.x[:2], measure=False).exit_macs
        calib = _evaluate(model, ds.calib, classes, policies)
        own_final = calib.exit_miou()[-1]
        # the policy (statistic and grid) of this model's exits, chosen on calibration by the
        # search's rule against the same reference (the control's, or its own final exit's
        # when that is lower); its thresholds are then chosen per target below
        family = choose_policy(calib, exit_macs, policies, min(reference, own_final),
                               max(s.max_drops), cost=cost, macs_budget=budget).policy
        families.append({"method": name, "policy": json.dumps(
            {k: v for k, v in family.config().items() if k != "threshold"})})
        test = _evaluate(model, ds.test, classes, [family])
        anytime.append({"method": name, "exits": model.exit_names, "exit_macs": exit_macs,
                        "exit_miou": test.exit_miou()})
        curves[name] = _curve(test, exit_macs, family)
        points = dense_sweep(calib, exit_macs, family)
        targets = [(f"{name} @ <= {100 * d:g} pt", reference, d) for d in s.max_drops]
        targets.append((f"{name} @ <= {100 * max(s.max_drops):g} pt of its own final exit",
                        own_final, max(s.max_drops)))
        for label, ref, drop in targets:
            try:
                point = choose_point(points, ref, drop, cost, budget)
            except InputError:
                rows.append({"method": label, "note": "no threshold meets the drop on "
                             "calibration"})
                continue
            got = _at(test, exit_macs, point.policy)
            chosen[label] = (model, point.policy)
            rows.append({"method": label, **got, "threshold": point.policy.threshold,
                         "calib_reference_miou": ref, "calib_miou": point.accuracy,
                         "calib_mean_macs": point.mean_macs})
            if cost is not None:  # what the search expects of it, from the latency table
                rows[-1]["calib_latency_ratio_expected"] = cost(point)
        if name.startswith("MESS"):
            rows.append({"method": f"{name}: oracle bound", **{
                k: v for k, v in dense_oracle(test, exit_macs).items()}})
    for row in rows:
        if "miou" in row:
            row["miou_drop_pt"] = 100 * (control_miou - row["miou"])
            row["macs_ratio"] = row["mean_macs"] / backbone_macs

    parity = _parity(chosen, ds.test, s)
    timing = _timing(backbone, chosen, ds.test.x, s)
    parts = timing.pop("_parts")
    profile = timing.pop("_profile")
    for row in rows:
        if row["method"] in timing:
            row.update(timing[row["method"]])
    # the targets, for MESS's two-stage training and for joint training: judged on the point
    # within 1 pt of the control on calibration or, when there is none, within 1 pt of the
    # model's own final exit (then the mIoU target shows the gap)
    targets = []
    for name in ("MESS two-stage, searched heads", "joint, searched heads",
                 "joint one-shot bank, latency-searched heads",
                 *(["joint, latency-searched heads"] if fast_joint is not joint else [])):
        main = f"{name} @ <= {100 * max(s.max_drops):g} pt"
        target = next((r for r in rows if r["method"] == main and "miou" in r), None) or next(
            (r for r in rows if r["method"].startswith(main) and "miou" in r), None)
        targets += _targets(target, name, other)
    report = {
        "curves": curves,
        "points": {r["method"]: [r["mean_macs"], r["miou"]] for r in rows
                   if "miou" in r and "@" not in r["method"]},
        "operating_points": {r["method"]: [r["mean_macs"], r["miou"]] for r in rows
                             if "miou" in r and "@" in r["method"]},
    }
    sections = {
        "targets": targets,
        "search (best 10 of the configurations tried on calibration)": _tried(
            found.tried, "calib_mean_macs"),
        "latency-aware search on the one-shot joint bank (best 10 by expected batch-1 "
        "latency on calibration)": _tried(fast_found.tried, "calib_latency_ratio"),
        "latency table of the latency-aware search (batch-1 ONNX Runtime time of each piece "
        "in DenseSteps' form, ratio to the backbone's batch-1 graph with its class map; the "
        "search uses the medians)": [
            {"piece": k, "median_ratio": v, "mean_ratio": table.mean_segments.get(k)}
            for k, v in sorted(table.segments.items(), key=lambda kv: kv[1])],
        "policy of each model (chosen on calibration; thresholds per operating point)":
            families,
        "anytime (every sample stops at one exit, test mIoU)": anytime,
        "real exits vs offline replay (test samples)": parity,
        "ONNX Runtime batch-1 cost of an exit at the first piece, by part (same run, one "
        "thread; ratios to the backbone's batch-1 graph with its class map in the graph, "
        "DenseSteps' reference)": parts,
        "ONNX Runtime profile of the first piece, by part (median microseconds per run, one "
        "thread, batch 1; share of the reference's whole run)": profile,
        "training": [{"part": k, "seconds": v if v is not None else "cached"}
                     for k, v in seconds.items()],
    }
    base_row = rows[0]
    if "onnx_steps_dynamic_ref_latency_ratio" in base_row:
        notes_extra.append(
            "The backbone's graph exported for batch 1 (static shapes) with its class map in "
            f"the graph answers in {base_row['onnx_steps_dynamic_ref_latency_ratio']:.3f}x "
            "(mean) the time of its dynamic-batch graph with a numpy class map (the onnx_* "
            "reference; with static shapes its Resize takes ONNX Runtime's blocked layout). "
            "DenseSteps' pieces are batch-1 graphs too, so their onnx_steps_latency_ratio and "
            "the DenseSteps target are against that form; onnx_steps_dynamic_ref_* keep the "
            "comparison with the onnx_* reference.")
    notes_extra.append(
        "Latency-aware search: the candidates at "
        f"{', '.join(dict.fromkeys(c['cut'] for c in s.joint_candidates))} are trained at once "
        f"with a fresh backbone ({s.backbone_epochs + s.head_epochs} epochs, as the control: "
        "the one-shot joint bank; per batch the final exit's loss and each cut's mean "
        "candidate loss, averaged), so each is judged as a jointly trained head; every "
        "configuration and policy is scored on calibration by its expected batch-1 latency "
        "(each exit's fraction times the median time of the pieces up to it, from the latency "
        "table, plus each policy's exit test over the one the pieces were built with), within "
        "1 pt "
        "of the control's calibration mIoU, the head MAC budget and "
        f"{s.macs_budget_share:.0%} mean MACs. Chosen: "
        f"{' + '.join(head_label(h) for h in fast_found.heads)}, "
        f"{json.dumps(fast_found.policy.config())}, expected "
        f"{fast_found.calib_latency_ratio:.3f}x at {100 * fast_found.calib_miou:.2f} % "
        f"calibration mIoU and {fast_found.calib_mean_macs / backbone_macs:.1%} MACs. The "
        f"table was measured once ({table_info['utc']} UTC, "
        f"{table.samples} calibration canvases interleaved, one thread) and is cached in "
        f"{Path(table_info['file']).name}, so every run searches the same figures. "
        "'joint one-shot bank, latency-searched heads' is the bank's own backbone with the "
        "chosen heads; 'joint, latency-searched heads' trains them alone with a fresh "
        "backbone (as 'joint, searched heads')"
        + (" (the same heads as 'joint, searched heads': not trained again)."
           if fast_joint is joint else "."))
    notes_extra += _profile_notes(profile)
    for a in anytime:
        if a["exit_miou"][0] > a["exit_miou"][-1]:
            notes_extra.append(
                f"{a['method']}: its first exit ({a['exits'][0]}, {100 * a['exit_miou'][0]:.2f} "
                f"% test mIoU alone) beats its own final exit ({100 * a['exit_miou'][-1]:.2f} "
                "%), so the cheapest operating points send (nearly) every sample there: the "
                "saving comes from skipping blocks that do not help at this training budget, "
                "not from telling easy canvases from hard ones.")
    notes = [*notes_extra,
        f"mIoU over {classes} classes (background included) on the {len(ds.test)} test canvases "
        f"of {s.dataset}; operating points chosen on the {len(ds.calib)} calibration canvases "
        f"against the control's calibration mIoU ({100 * reference:.2f} %; the backbone's: "
        f"{100 * own:.2f} %), or the model's own final exit where stated, then applied once "
        "to the test split.",
        f"Searched: {len(found.tried)} configurations (heads at {', '.join(s.search_cuts)}, "
        f"{len(s.candidates)} head types each, {len(policies)} policies) within a head "
        f"budget of {s.head_budget_share:.0%} of the backbone's MACs; chosen policy "
        f"{found.policy.config()}. Each model's policy (statistic and pixel grid) is then "
        "chosen on calibration by the same rule (see 'policy of each model'); a stride-s "
        "policy reads one pixel per s x s block.",
        "MACs count convolutions (torch's flop counter); upsampling and BatchNorm are not "
        "counted, alike for every model. Latency: batch 1, 1 thread, interleaved, mean over "
        f"{s.latency_samples} test samples, BatchNorm folded into convolutions for every model; "
        f"throughput: batches of {s.throughput_batch}. Eager PyTorch (infer) and ONNX Runtime "
        "(onnx_* fields: the backbone as one dynamic-batch graph with a numpy class map; a "
        "MESS model as a bundle runs it: at batch 1 its exit graph (the pieces, the "
        "policy's pixel statistic and threshold in If nodes, and its int64 class map, one "
        "ONNX Runtime call per sample), for batches its pieces with the policy on numpy "
        "between them through the shared exit loop; onnx_batch1_ref_*: the exit graph "
        "against the backbone in the same form, its batch-1 graph with its class map in the "
        "graph; onnx_steps_* fields: splitexit.segmentation.DenseSteps, the same pieces in a "
        "lean batch-1 loop, each piece's graph answering its exit test, its uint8 class map "
        "and the payload in one call, against the backbone in the same form: its graph "
        "exported for batch 1 (static shapes, as DenseSteps' pieces are) with its uint8 class "
        "map in the graph; onnx_steps_dynamic_ref_*: the same against the onnx_* reference, "
        "the dynamic-batch graph with a numpy class map; onnx_steps_same_exits / "
        "_same_class_maps: agreement with eager PyTorch on the latency samples); every "
        "method answers with its class map.",
        "Guided segnet: every cut carries the image (space-to-depth'd, lossless) and every "
        "head, the backbone's classifier included, adds a per-pixel 1x1 map of the "
        "full-resolution image to its upsampled scores, so an exit at 1/8 resolution keeps "
        "pixel-exact boundaries; exits differ in how well they recognise the items.",
        f"Training used {s.train_samples} of the {len(ds.train)} training canvases "
        f"({s.train_threads} threads).",
    ]
    written = write_report(out, "mess", rows, dataset=s.dataset,
                           model=f"segnet widths={list(s.widths)} dilations={list(s.dilations)} "
                           f"guided={s.guided} reduction={s.reduction}"
                           + (f" classifier={dict(s.classifier)}" if s.classifier else ""),
                           sections=sections, notes=notes, command=command,
                           settings=asdict(s), plots=["miou_vs_macs.png"], figures=report)
    plot(out)
    return written


def _profile_notes(profile: list[dict]) -> list[str]:
    """One sentence per profiled graph: its whole run, its fixed kernels and ONNX Runtime's
    overhead as shares of the reference's run (from the profile section)."""
    graphs: dict[str, dict[str, float]] = {}
    for r in profile:
        graphs.setdefault(r["graph"], {})[r["part"]] = r["share_of_reference"]
    return [f"Profile of {graph}: the run takes {parts['whole run']:.3f} of the reference's; "
            f"{parts.get(_FIXED_LABEL, 0.0):.3f} is the fixed work any exit repeats (stem and "
            f"down {parts.get(_FIXED[0], 0.0):.3f}, full resolution "
            f"{parts.get(_FIXED[1], 0.0):.3f}, class map {parts.get(_FIXED[2], 0.0):.3f}), "
            f"{parts.get(_OVERHEAD, 0.0):.3f} ONNX Runtime's per-run and per-node overhead"
            + (f", {parts[_PARTS[2][0]]:.3f} the exit test" if _PARTS[2][0] in parts else "")
            + " (ONNX Runtime's profiler, medians; every part in the profile section)."
            for graph, parts in graphs.items()]


def _tried(tried: list[dict], by: str) -> list[dict]:
    """The 10 best configurations a search tried (those within the drop first, then by
    ``by``), one row each."""
    return [{"heads": " + ".join(head_label(h) for h in r["heads"]),
             "policy": json.dumps(r["policy"]), "calib_miou": r["calib_miou"],
             "calib_mean_macs": r["calib_mean_macs"], "head_macs": r["head_macs"],
             **({"calib_latency_ratio": r[by]} if by == "calib_latency_ratio" else {}),
             "meets_drop": r["meets_drop"]}
            for r in sorted(tried, key=lambda r: (not r["meets_drop"], r[by]))[:10]]


def _latency_table(s: MessSettings, models: Path, bank: CandidateBank, model, policies,
                   x: torch.Tensor) -> tuple[LatencyTable, dict]:
    """The latency-aware search's table for ``bank``'s candidates: loaded from
    ``models/latency-*.json`` (keyed by the settings), or measured over the first
    ``latency_table_samples`` calibration canvases and saved there, with when and where it
    was measured, so every later run searches the same figures."""
    key = {**s.training_key(), "joint_candidates": list(s.joint_candidates),
           "policies": [p.config() for p in policies], "samples": s.latency_table_samples}
    file = models / f"{_digest('latency', key)}.json"
    if file.is_file():
        saved = json.loads(file.read_text())
        return LatencyTable.from_dict(saved["table"]), saved["measured"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        table = measure_latency_table(bank, model, policies, x[: s.latency_table_samples],
                                      tmp, threads=1, chunks=20)
    measured = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "seconds": time.perf_counter() - t0, "file": str(file)}
    models.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"table": table.to_dict(), "measured": measured}, indent=1))
    return table, measured


def _parity(chosen: dict, test, s: MessSettings) -> list[dict]:
    """Real exits (``infer``, the batch shrinking) against the offline replay of the same
    policy over ``forward``'s logits, at batch 1 and batched."""
    from splitexit.multiexit import simulate_exits

    rows = []
    x = test.x[: s.parity_samples]
    for name, (model, policy) in chosen.items():
        with torch.inference_mode():
            logits = model(x)
            replay = simulate_exits(logits, policy)
            batched = model.infer(x, policy)
            single = [model.infer(x[i: i + 1], policy) for i in range(min(64, len(x)))]
        exits1 = torch.cat([r.exit_index for r in single])
        preds1 = torch.cat([r.predictions for r in single])
        n1 = len(single)
        rows.append({
            "method": name, "samples": len(x),
            "same_exit_batched": float((batched.exit_index == replay.exit_index).double().mean()),
            "same_pixels_batched": float((batched.predictions == replay.predictions).double()
                                         .mean()),
            "same_exit_batch1": float((exits1 == replay.exit_index[:n1]).double().mean()),
            "same_pixels_batch1": float((preds1 == replay.predictions[:n1]).double().mean()),
        })
    return rows


def _timing(backbone, chosen: dict, x: torch.Tensor, s: MessSettings) -> dict:
    """Batch-1 latency and batched throughput, 1 thread, interleaved, ratios to the backbone
    measured in the same run: eager PyTorch (BatchNorm folded) and ONNX Runtime (the runtime
    a bundle uses: the backbone as one graph, a MESS model as its exit program's pieces)."""
    from splitexit.export.onnx import export_piece
    from splitexit.program import export_pieces, lower
    from splitexit.runtime.ort import OrtSession
    from splitexit.segmentation.onnx_steps import DenseSteps, exit_test_graph

    base = "backbone (no exits)"
    fused = fuse_for_inference(backbone)
    # the backbone answers with its class map, as every exit does
    fns = {base: lambda b: TORCH.classes(fused.backbone(b))}
    parity, aliases, seen, profiled = {}, {}, {}, {}
    # points of the same model and threshold (e.g. within 0.5 and 1 pt) are timed once,
    # under the first name
    canonical = {name: seen.setdefault((id(model), json.dumps(policy.config(), sort_keys=True)),
                                       name) for name, (model, policy) in chosen.items()}
    # the point whose parts are timed: the latency-searched heads' within 1 pt, jointly
    # trained alone, else from the one-shot bank, else joint training's (else the first)
    within = [n for n in chosen if n.endswith("<= 1 pt")]
    parts_of = next((n for prefix in ("joint, latency", "joint one-shot", "joint")
                     for n in within if n.startswith(prefix)), next(iter(chosen), None))
    parts_of = canonical.get(parts_of, parts_of)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_piece(fused.backbone, x[:2], Path(tmp) / "backbone.onnx")
        session = OrtSession(path, threads=1)
        fns[base + ONNX] = lambda b: NUMPY.classes(session.run_arrays([b.numpy()])[0])
        classes = OrtSession(_with_class_map(path, Path(tmp) / "backbone_classes.onnx"),
                             threads=1)
        fns["part: the backbone's graph (dynamic batch) with an ArgMax for its class map "
            "(uint8)"] = (lambda b, r=classes._sess_run, i=classes.input_names[0]:
                          r(["classes"], {i: b.numpy()}, None))
        # DenseSteps' reference, the backbone in the same form as its pieces: a batch-1 graph
        # (static shapes: its Resize gets ONNX Runtime's blocked layout, as theirs does) with
        # its uint8 class map in the graph
        batch1 = OrtSession(_with_class_map(
            export_piece(fused.backbone, x[:1], Path(tmp) / "backbone_batch1.onnx",
                         dynamic_batch=False), Path(tmp) / "backbone_batch1_classes.onnx"),
            threads=1)
        fns[base + STEPS] = (lambda b, r=batch1._sess_run, i=batch1.input_names[0]:
                             r(["classes"], {i: b.numpy()}, None))
        profiled["the backbone's batch-1 graph with its uint8 class map (the reference)"] = (
            Path(tmp) / "backbone_batch1_classes.onnx")
        for j, (name, (model, policy)) in enumerate(chosen.items()):
            if canonical[name] != name:  # the same model and threshold as a timed point
                aliases[name] = canonical[name]
                continue
            fast = fuse_for_inference(model)
            fns[name] = lambda b, m=fast, p=policy: m.infer(b, p)
            program = lower(fast, policy, example=x[:2]).on_onnx_runtime(
                Path(tmp) / f"mess{j}", exit_graph=True, threads=1)  # as a bundle runs
            fns[name + ONNX] = lambda b, g=program, p=policy: g.infer(b.numpy(), p)
            steps = DenseSteps(fast, policy, Path(tmp) / f"steps{j}", example=x[:2])
            fns[name + STEPS] = lambda b, g=steps: g.infer(b.numpy())
            label = next((a for a, c in canonical.items() if c == name
                          and a.startswith("joint") and a.endswith("<= 1 pt")), None)
            if label:  # the first piece of a jointly trained point within 1 pt
                profiled[f"{label}: its first piece in DenseSteps' form"] = (
                    Path(tmp) / f"steps{j}" / "piece0.onnx")
            xs = x[: s.latency_samples]
            ref = fast.infer(xs, policy)
            got = [steps.infer(xs[i: i + 1].numpy()) for i in range(len(xs))]
            parity[name] = (
                float((torch.as_tensor([e for _, e in got]) == ref.exit_index).double().mean()),
                float(sum(bool((torch.from_numpy(c[0]) == ref.predictions[i]).all())
                          for i, (c, _) in enumerate(got)) / len(xs)))
            if name == parts_of:  # where the time of an exit at the first piece goes
                one = xs[:1].numpy()
                raw = OrtSession(export_pieces(lower(fast, policy, example=x[:2]),
                                               Path(tmp) / "raw", dynamic_batch=False)[0],
                                 threads=1)
                feed = {raw.input_names[0]: one}
                logits = raw._sess_run(["logits"], feed, None)[0]
                test = OrtSession(exit_test_graph(policy, 0, logits.shape,
                                                  Path(tmp) / "test.onnx"), threads=1)
                in_numpy = DenseSteps(fast, policy, Path(tmp) / "steps_numpy", example=x[:2],
                                      class_map="numpy")
                every_pixel = replace(policy, stride=1)
                parts = {
                    "the first piece alone (image -> the first exit's logits and the payload)":
                    lambda r=raw._sess_run, o=raw.output_names, f=feed: r(o, f, None),
                    "the first piece with its exit test and uint8 class map inside (DenseSteps' "
                    "graph: exit, class map, payload)": steps.step_calls(one)[0],
                    "the first piece with its exit test inside, the logit map out "
                    "(DenseSteps(class_map='numpy')' graph)": in_numpy.step_calls(one)[0],
                    "the exit test and class map as graph nodes (their own graph on the logit "
                    "map)":
                    lambda r=test._sess_run, o=test.output_names, f={"logits": logits}: r(
                        o, f, None),
                    f"numpy: the policy's statistic on the logit map (stride {policy.stride})":
                    lambda p=policy, z=logits: p.statistic(z),
                    "numpy: the same statistic reading every pixel (stride 1)":
                    lambda p=every_pixel, z=logits: p.statistic(z),
                    "numpy: the class map of the logit map (NumpyOps.classes)":
                    lambda z=logits: NUMPY.classes(z)}
                for part, call in parts.items():
                    fns[f"part: {part}"] = lambda b, c=call: c()
                fns["part: DenseSteps(class_map='numpy'): the whole batch-1 answer, the class "
                    "map of the exit that answers in numpy"] = (
                    lambda b, g=in_numpy: g.infer(b.numpy()))
        with torch_threads(1):
            lat = interleaved_latency(fns, x[: s.latency_samples], chunks=10)
            tput = interleaved_throughput({k: f for k, f in fns.items()
                                           if not k.endswith(STEPS)
                                           and not k.startswith("part: ")},
                                          x[: s.throughput_samples], s.throughput_batch)
        # where each graph's time goes, node by node (ONNX Runtime's profiler, one thread)
        profile = _profile_parts(profiled, x[:1].numpy(), s.profile_runs)
    out: dict[str, dict] = {"_profile": profile}
    reference = lat[base + STEPS]
    parts = {**{k.removeprefix("part: "): v for k, v in lat.items() if k.startswith("part: ")},
             "the backbone's graph (dynamic batch) and its numpy class map (the onnx_* "
             "reference)": lat[base + ONNX],
             "the backbone's batch-1 graph with its uint8 class map in the graph (the "
             "onnx_steps_* reference)": reference}
    out["_parts"] = [{"part": k, "of": "" if "backbone" in k else parts_of,
                      "median_ms": v["median_ms"], "mean_ms": v["mean_ms"],
                      "median_ratio": v["median_ms"] / reference["median_ms"],
                      "mean_ratio": v["mean_ms"] / reference["mean_ms"]}
                     for k, v in parts.items()]
    for name in fns:
        if name.endswith(ONNX) or name.endswith(STEPS) or name.startswith("part: "):
            continue
        row = out[name] = {}
        for suffix, prefix in (("", ""), (ONNX, "onnx_"), (STEPS, "onnx_steps_")):
            if name + suffix not in lat:
                continue
            v, ref = lat[name + suffix], lat[base + suffix]
            row.update({f"{prefix}latency_ms": v["mean_ms"],
                        f"{prefix}latency_median_ms": v["median_ms"],
                        f"{prefix}latency_ratio": v["mean_ms"] / ref["mean_ms"],
                        f"{prefix}latency_median_ratio": v["median_ms"] / ref["median_ms"]})
            if suffix == ONNX:  # the exit graph against the backbone in the same form
                same_form = lat[base + STEPS]
                row.update({"onnx_batch1_ref_latency_ratio": v["mean_ms"]
                            / same_form["mean_ms"],
                            "onnx_batch1_ref_latency_median_ratio": v["median_ms"]
                            / same_form["median_ms"]})
            if suffix == STEPS:  # also against the onnx_* reference (dynamic batch, numpy map)
                other = lat[base + ONNX]
                row.update({"onnx_steps_dynamic_ref_latency_ratio": v["mean_ms"]
                            / other["mean_ms"],
                            "onnx_steps_dynamic_ref_latency_median_ratio": v["median_ms"]
                            / other["median_ms"]})
            if name + suffix in tput:
                row.update({f"{prefix}throughput_sps": tput[name + suffix],
                            f"{prefix}throughput_ratio": tput[name + suffix]
                            / tput[base + suffix]})
        if name in parity:
            row["onnx_steps_same_exits"], row["onnx_steps_same_class_maps"] = parity[name]
    for name, same in aliases.items():  # measured once, under the first name
        out[name] = {**out[same], "timed_as": same}
    return out


#: ONNX Runtime's nodes grouped by what they do (the first rule that matches); unnamed
#: layout reorders go with the node before them unless they reorder a full-resolution map
_PARTS = (
    ("class map: ArgMax over the classes, cast to uint8",
     lambda op, name, full, out: op == "ArgMax" or (op == "Cast" and "uint8" in out)),
    ("full resolution: bilinear Resize of the class scores, the guide's DepthToSpace, "
     "gain (Mul) and 1x1 refine, and their layout reorder",
     lambda op, name, full, out: op in ("Upsample", "Resize", "DepthToSpace") or "refine" in name
     or (full and (op == "Mul" or op.startswith("Reorder")))),
    ("exit test (the policy's statistic and threshold)",
     lambda op, name, full, out: not name.startswith("/") and not op.startswith("Reorder")),
    ("the guide image carried through the cuts (space-to-depth, Concat, Split)",
     lambda op, name, full, out: op in ("Reshape", "Transpose", "Concat", "Split")),
    ("stem and down: five convolutions to 1/8 resolution",
     lambda op, name, full, out: "/stages.0/" in name),
    ("exit head or final classifier at 1/8 resolution",
     lambda op, name, full, out: "/head/" in name or "/body/" in name),
    ("residual blocks at 1/8 resolution (convolutions, Add, Relu)",
     lambda op, name, full, out: "/stages." in name),
)
_OVERHEAD = "ONNX Runtime's per-run and per-node overhead (the run's time in no kernel)"
#: the kernels any exit's piece runs, whatever its cut and head: the convolutions to 1/8
#: resolution, the full-resolution work of the guided head and the class map
_FIXED = (_PARTS[4][0], _PARTS[1][0], _PARTS[0][0])
_FIXED_LABEL = ("the fixed kernels of any exit (stem and down, full resolution, class map; "
                "the median of their sum)")


def _profile_parts(graphs: dict[str, Path], x, runs: int) -> list[dict]:
    """Per graph, the median microseconds per run of each part (:data:`_PARTS`) at batch 1,
    one thread, from ONNX Runtime's profiler, and each part's share of the reference graph's
    whole run (the first graph). The graphs run in turns of a tenth of the runs each (a
    shuffled order per round, as the interleaved timings run), so a shared machine's slow
    phases hit them alike and each runs warm; the first fifth of the runs are warm-up."""
    import bisect
    import random
    import statistics

    import onnxruntime as ort

    sessions = {}
    for label, path in graphs.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(path.with_suffix("")) + "-profile"
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[label] = (session, {session.get_inputs()[0].name: x},
                           [o.name for o in session.get_outputs()])
    order, shuffle, turn = list(sessions), random.Random(0).shuffle, max(1, runs // 10)
    for _ in range(0, runs, turn):
        shuffle(order)
        for label in order:
            session, feed, names = sessions[label]
            for _ in range(turn):
                session.run(names, feed)
    rows, whole = [], None
    for label, (session, _, _) in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("cat") == "Session" and e["name"] == "model_run")
        starts = [a for a, _ in spans]
        per_run: list[dict[str, float]] = [{} for _ in spans]
        last = _OVERHEAD
        for e in sorted((e for e in events if e.get("cat") == "Node"
                         and e["name"].endswith("_kernel_time")), key=lambda e: e["ts"]):
            i = bisect.bisect_right(starts, e["ts"]) - 1
            if i < 0 or e["ts"] > spans[i][1]:
                continue
            args = e["args"]
            op, name = args.get("op_name", ""), e["name"].removesuffix("_kernel_time")
            out = args.get("output_type_shape") or [{}]
            shape = next(iter(out[0].values()), [])
            full = list(shape[-2:]) == list(x.shape[-2:])
            part = last if op.startswith("Reorder") and not full else next(
                (p for p, rule in _PARTS if rule(op, name, full, str(out[0]))), "other")
            last = part
            per_run[i][part] = per_run[i].get(part, 0.0) + e["dur"]
        warm = per_run[len(spans) // 5:]
        durations = [b - a for a, b in spans][len(spans) // 5:]
        for run, d in zip(warm, durations):
            run[_OVERHEAD] = d - sum(run.values())
        total = statistics.median(durations)
        whole = whole or total
        parts = sorted({k for run in warm for k in run}, key=lambda k: [p for p, _ in _PARTS]
                       .index(k) if k in dict(_PARTS) else len(_PARTS))
        fixed = statistics.median(sum(run.get(p, 0.0) for p in _FIXED) for run in warm)
        for part in [*parts, "whole run", _FIXED_LABEL]:
            median = {"whole run": total, _FIXED_LABEL: fixed}.get(part) or statistics.median(
                run.get(part, 0.0) for run in warm)
            rows.append({"graph": label, "part": part, "median_us": median,
                         "share_of_reference": median / whole})
    return rows


def _with_class_map(path: Path, to: Path) -> Path:
    """The backbone's graph answering with its class map too (an ArgMax over the classes cast
    to uint8, in the graph, as DenseSteps' pieces answer): the parts table compares it with
    the numpy class map."""
    import onnx
    from onnx import TensorProto, helper

    from splitexit.export.exit_graph import class_map_nodes

    graph = onnx.load(str(path))
    logits = graph.graph.output[0].name
    graph.graph.node.extend(class_map_nodes(logits, "classes", "uint8"))
    graph.graph.output.append(helper.make_tensor_value_info("classes", TensorProto.UINT8,
                                                            ["N", "H", "W"]))
    onnx.save(graph, str(to))
    return to


def _latency(row: dict, field: str, other: dict | None) -> dict:
    """A latency target's measured ratio and verdict, on this run and ``other``'s same row
    (met on one run only: "on the boundary")."""
    ratio = row.get(field, float("nan"))
    if other is None:
        return {"measured": f"{ratio:.3f}x", "met": bool(ratio <= 0.6)}
    same = next((r for r in other.get("rows", []) if r["method"] == row["method"]), None)
    earlier = (same or {}).get(field)
    if earlier is None:  # the other run did not measure it: this run alone
        return {"measured": f"{ratio:.3f}x (other run: not measured)",
                "met": bool(ratio <= 0.6)}
    met = [bool(ratio <= 0.6), bool(earlier <= 0.6)]
    return {"measured": f"{ratio:.3f}x (other run: {earlier:.3f}x)",
            "met": all(met) or ("on the boundary" if any(met) else False)}


def _targets(row: dict | None, name: str, other: dict | None = None) -> list[dict]:
    """Issue 18's MESS targets, met or not, from one operating point's measurements (the
    latency ones on this run and ``other``, another run's report, when given)."""
    if row is None:
        return [{"judged on": name, "target": "an operating point within 1 pt on calibration",
                 "met": False}]
    judged = {"judged on": row["method"]}
    fractions = row.get("exit_fractions") or [0.0]
    return [
        {**judged, "target": "mIoU at most 1 pt below the equally trained backbone",
         "measured": f"{row['miou_drop_pt']:.2f} pt", "met": row["miou_drop_pt"] <= 1.0},
        {**judged, "target": "<= 50% mean MACs",
         "measured": f"{100 * row['macs_ratio']:.1f} % (exit shares "
                     f"{', '.join(f'{f:.3f}' for f in fractions)})",
         "met": row["macs_ratio"] <= 0.5},
        {**judged, "target": "<= 0.6x batch-1 latency (mean, eager PyTorch)",
         **_latency(row, "latency_ratio", other)},
        {**judged, "target": "<= 0.6x batch-1 latency (mean, ONNX Runtime as a bundle runs: "
                             "the exit graph, one call per sample; against the backbone in "
                             "the same form: its batch-1 graph with its class map in the "
                             "graph)",
         **_latency(row, "onnx_batch1_ref_latency_ratio", other)},
        {**judged, "target": "<= 0.6x batch-1 latency (mean, ONNX Runtime as a bundle runs; "
                             "against the onnx_* reference: the backbone's dynamic-batch "
                             "graph with a numpy class map, slower than its batch-1 graph)",
         **_latency(row, "onnx_latency_ratio", other)},
        {**judged, "target": "<= 0.6x batch-1 latency (mean, ONNX Runtime, the pieces in a lean "
                             "batch-1 loop, each answering its exit test and class map: "
                             "DenseSteps; against the backbone in the same form)",
         **_latency(row, "onnx_steps_latency_ratio", other)},
    ]


def plot(out: Path) -> Path:
    """mIoU against mean MACs from ``out/report.json`` alone."""
    report = load_report(out)
    figures = report["figures"]
    points = {**{k: tuple(v) for k, v in figures["points"].items()},
              **{k: tuple(v) for k, v in figures["operating_points"].items()}}
    return plot_pareto(out / "miou_vs_macs.png", {k: [tuple(p) for p in v]
                                                  for k, v in figures["curves"].items()},
                       points, xlabel="mean MACs per sample", ylabel="test mIoU",
                       title=f"MESS on {report['dataset']}")


def main(argv: list[str] | None = None) -> int:
    d = MessSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/mess")
    p.add_argument("--plot-only", action="store_true",
                   help="only redraw the figures from OUT/report.json")
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--train-samples", type=int, default=d.train_samples)
    p.add_argument("--backbone-epochs", type=int, default=d.backbone_epochs)
    p.add_argument("--head-epochs", type=int, default=d.head_epochs)
    p.add_argument("--head-budget-share", type=float, default=d.head_budget_share)
    p.add_argument("--latency-samples", type=int, default=d.latency_samples)
    p.add_argument("--train-threads", type=int, default=d.train_threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--other-run", type=Path, default=None,
                   help="report.json of another run of the same command: the latency targets "
                        "are judged on both runs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds: 100 training canvases, 1 + 1 epochs, "
                        "100 calibration and test canvases, 2 cuts searched (not the "
                        "targets' run)")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.plot_only:
        print(plot(out))
        return 0
    s = MessSettings(dataset=a.dataset, train_samples=a.train_samples,
                     backbone_epochs=a.backbone_epochs, head_epochs=a.head_epochs,
                     head_budget_share=a.head_budget_share, latency_samples=a.latency_samples,
                     train_threads=a.train_threads, seed=a.seed)
    if a.quick:
        s = replace(s, train_samples=100, backbone_epochs=1, head_epochs=1, eval_samples=100,
                    latency_samples=20, throughput_samples=64, parity_samples=16,
                    search_cuts=("down", "block1"), pixel_thresholds=(0.9,))
    command = "python benchmarks/mess.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(s, out, command.strip(), a.other_run)
    for row in report["rows"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
               if k not in ("exit_fractions",)})
    for t in report["sections"]["targets"]:
        print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
