"""The early-exit method catalogue on one harness: every method, same backbones, same data.

For each (data set, backbone) configuration one baseline backbone is trained and shared: the
methods that keep the backbone frozen (SDN IC-only, ZTW, E2CM, binary heads, PABEE, the exit
gate, online caching) use it as is, the joint methods (BranchyNet, SDN weight ramp,
self-distillation, BoostNet, QuickNets, T-RECX) start from it and fine-tune. Then, per method:

- anytime table: test accuracy when every sample stops at exit ``k`` (ensembles: the ensemble
  formed up to ``k``);
- budgeted table (ZTW's protocol): thresholds chosen on the calibration split for the best
  accuracy with mean MACs at most 25/50/75/100% of the baseline's, measured on the test split;
- the oracle bound, a Pareto plot of every method's test sweep, and the 50%-budget point run on
  the real per-sample path (``infer``), checked against the offline replay and timed at batch 1.

Each configuration's results are cached under ``<out>/parts`` so a run can be split across
processes and resumed; the report is assembled from the parts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from splitexit.calibration import (
    choose_operating_point,
    guarded_threshold,
    oracle,
    pareto_front,
    sweep,
)
from splitexit.cost import cost_table
from splitexit.data import Dataset, load_dataset
from splitexit.errors import InputError
from splitexit.measure import latency_batch1, torch_threads
from splitexit.methods import (
    METHODS,
    Fitted,
    GatedMultiExitModel,
    OnlineCache,
    calibrate_gate,
    fit_gate,
    fit_method,
)
from splitexit.multiexit import MultiExitModel, simulate_exits
from splitexit.policies import (
    ExitPolicy,
    GeometricEnsemble,
    Patience,
    ThresholdPolicy,
    ensemble_logits,
)
from splitexit.report import plot_pareto, write_report
from splitexit.training import (
    Baseline,
    train,
)
from splitexit.zoo import create_model, create_multiexit

__all__ = ["CatalogueSettings", "run_catalogue", "MAIN", "EXTRA", "DEFAULT_CONFIGS", "register"]

DEFAULT_CONFIGS = ["fashion-mnist:resnet8", "fashion-mnist:b-lenet", "mnist5k:b-lenet",
                   "signals:cnn1d"]
# T-RECX's single early exit: the cut closest to a third of the backbone's MACs.
TRECX_CUT = {"resnet8": "block1", "b-lenet": "conv1", "lenet": "conv1", "cnn1d": "block1",
             "mobilenet": "block1"}


@dataclass
class CatalogueSettings:
    """What the catalogue trains and measures.

    Attributes:
        configs: ``"dataset:model"`` pairs.
        methods: method names to run (all of :data:`MAIN` and :data:`EXTRA` when ``None``).
        train_subset: train on this many (stratified) training samples when the training
            split is larger (``None``: all). Calibration and test splits are always whole.
        baseline_epochs: epochs of the shared baseline backbone.
        head_epochs: epochs of head training on the frozen backbone.
        finetune_epochs: epochs of the joint methods (started from the baseline).
        budgets: MACs budgets as fractions of the baseline's MACs.
        latency_samples: test samples timed one at a time per method.
        joint_head: head type of BranchyNet, self-distillation, BoostNet and QuickNets (the
            model's default when ``None``; ``"sdn"`` compares them with SDN/ZTW head for head).
    """

    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    methods: list[str] | None = None
    train_subset: int | None = 12000
    baseline_epochs: int = 4
    head_epochs: int = 3
    finetune_epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 128
    budgets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    latency_samples: int = 200
    joint_head: str | None = None
    threads: int | None = 1
    seed: int = 0
    progress: bool | None = None


@dataclass
class Context:
    """Shared by every method of one configuration."""

    ds: Dataset
    train: object
    model_name: str
    baseline: torch.nn.Module
    settings: CatalogueSettings

    def multi(self, head: str | None = None, head_kwargs: dict | None = None,
              init: bool = True) -> MultiExitModel:
        model = create_multiexit(self.model_name, self.ds.num_classes, self.ds.input_shape,
                                 head=head, head_kwargs=head_kwargs)
        if init:
            model.backbone.load_state_dict(self.baseline.state_dict())
        return model

    def fit(self, name: str) -> Fitted:
        """The library's recipe for method ``name`` on the default multi-exit model built
        from the shared baseline (heads-only methods train ``head_epochs``, the joint ones
        ``finetune_epochs`` with ``joint_head`` heads where the method keeps the model's)."""
        s = self.settings
        frozen = METHODS.get(name).frozen_backbone
        return fit_method(name, self.multi(), self.train, calib=self.ds.calib,
                          epochs=s.head_epochs if frozen else s.finetune_epochs, lr=s.lr,
                          batch_size=s.batch_size, seed=s.seed + 1,
                          head=None if frozen else s.joint_head,
                          cut=TRECX_CUT.get(self.model_name) if name == "t-recx" else None,
                          progress=s.progress)


#: the methods trained and evaluated one by one, in report order (library recipes)
MAIN = ["sdn", "ztw", "e2cm", "binary-heads", "branchynet", "sdn-ramp", "self-distillation",
        "boostnet", "quicknets", "t-recx"]
EXTRA = ["pabee", "gate", "online-caching", "guarded"]  # built on the sdn model / baseline


def _pabee(sdn: Fitted) -> Fitted:
    """PABEE's patience rule on the sdn model (the pabee recipe trains the same heads)."""
    return Fitted("pabee", sdn.model, Patience(), 0.0, {"training": "the sdn model, patience "
                                                                    "exit rule"})


# evaluation ---------------------------------------------------------------------------------
def decision_logits(policy: ExitPolicy, logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """What the method predicts from when stopped at each exit (ensembles combine)."""
    if isinstance(policy, GeometricEnsemble):
        return ensemble_logits(policy, logits)
    return list(logits)


def thresholds_for(policy: ExitPolicy, calib_logits: Sequence[torch.Tensor], num: int = 80
                   ) -> list:
    """Candidate thresholds: quantiles of the policy's statistic on the calibration split."""
    if isinstance(policy, Patience):
        return list(range(1, len(calib_logits)))
    assert isinstance(policy, ThresholdPolicy)
    decisions = decision_logits(policy, calib_logits)[:-1]
    stats = torch.cat([policy.statistic(d) for d in decisions]).double()
    values = torch.quantile(stats, torch.linspace(0, 1, num, dtype=torch.float64)).tolist()
    lo, hi = policy.valid_range
    extreme = [hi] if policy.higher_is_confident and hi != float("inf") else [lo]
    return sorted({min(max(v, lo), hi) for v in values} | set(extreme))


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _infer_batched(model, x: torch.Tensor, policy: ExitPolicy, batch_size: int = 256):
    parts = [model.infer(x[i: i + batch_size], policy) for i in range(0, len(x), batch_size)]
    return (torch.cat([p.predictions for p in parts]), torch.cat([p.exit_index for p in parts]))


def evaluate_method(name: str, built: Fitted, ctx: Context, base: dict,
                    logits: tuple | None = None) -> dict:
    """Anytime, budgeted, oracle, Pareto and real-path figures of one trained method.

    ``logits``: the calibration and test logits of the same model, when already collected.
    """
    s, ds = ctx.settings, ctx.ds
    model = built.model.eval()
    costs = cost_table(model, ds.calib.x[:8], measure=False)
    exit_macs, base_macs = costs.exit_macs, base["macs"]
    if logits is None:
        logits = (model.collect_logits(ds.calib.x), model.collect_logits(ds.test.x))
    calib_logits, test_logits = logits
    thresholds = thresholds_for(built.policy, calib_logits)
    calib_points = sweep(calib_logits, ds.calib.y, exit_macs, built.policy, thresholds)
    test_points = sweep(test_logits, ds.test.y, exit_macs, built.policy, thresholds)
    decisions = decision_logits(built.policy, test_logits)
    anytime = [{"method": name, "exit": ename, "accuracy": _acc(d, ds.test.y),
                "macs_ratio": exit_macs[e] / base_macs}
               for e, (ename, d) in enumerate(zip(model.exit_names, decisions))]
    orc = oracle(decisions, ds.test.y, exit_macs)
    budgeted = []
    for b in s.budgets:
        row = {"method": name, "budget": b}
        try:
            op = choose_operating_point(calib_points, macs_budget=b * base_macs)
        except InputError as exc:
            budgeted.append({**row, "note": str(exc)})
            continue
        r = simulate_exits(test_logits, op.policy)
        macs = float(torch.tensor(exit_macs, dtype=torch.float64)[r.exit_index].mean())
        budgeted.append({**row, "accuracy": r.accuracy(ds.test.y),
                         "accuracy_drop_pt": 100 * (base["accuracy"] - r.accuracy(ds.test.y)),
                         "macs_ratio": macs / base_macs, "calib_accuracy": op.accuracy,
                         "calib_macs_ratio": op.mean_macs / base_macs,
                         "exit_fractions": r.exit_fractions(model.num_exits),
                         "policy": op.policy.config()})
    main: dict = {"method": name}
    try:
        op = choose_operating_point(calib_points, macs_budget=0.5 * base_macs)
        preds, exits = _infer_batched(model, ds.test.x, op.policy)
        replay = simulate_exits(test_logits, op.policy)
        with torch_threads(s.threads):
            lat = latency_batch1(lambda x: model.infer(x, op.policy), ds.test.x,
                                 s.latency_samples)
        macs = float(torch.tensor(exit_macs, dtype=torch.float64)[exits].mean())
        acc = float((preds == ds.test.y).double().mean())
        main.update({"budget": 0.5, "accuracy": acc,
                     "accuracy_drop_pt": 100 * (base["accuracy"] - acc), "mean_macs": macs,
                     "macs_ratio": macs / base_macs, "latency_ms": lat["mean_ms"],
                     "latency_p50_ms": lat["median_ms"],
                     "latency_ratio": lat["mean_ms"] / base["latency_ms"],
                     "exit_fractions": torch.bincount(exits, minlength=model.num_exits).div(
                         len(exits)).tolist(),
                     "infer_matches_simulate": bool(torch.equal(preds, replay.predictions)
                                                    and torch.equal(exits, replay.exit_index))})
    except InputError as exc:
        main["note"] = f"no point within 50% of the baseline's MACs: {exc}"
    main.update({"train_s": built.seconds, "heads_macs_ratio":
                 sum(h.macs for h in costs.heads) / base_macs})
    return {"main": main, "anytime": anytime, "budgeted": budgeted,
            "info": {"method": name, "train_s": built.seconds, **built.info},
            "oracle": {"method": name, "accuracy": orc["accuracy"],
                       "macs_ratio": orc["mean_macs"] / base_macs,
                       "exit_fractions": orc["exit_fractions"]},
            "curve": [(p.mean_macs / base_macs, p.accuracy) for p in pareto_front(test_points)],
            "_logits": (calib_logits, test_logits, exit_macs, calib_points)}


def _gate_rows(sdn: Fitted, ctx: Context, base: dict, calib_points) -> list[dict]:
    """The exit gate on the sdn model at its 50%-budget policy: with and without the gate."""
    ds, s = ctx.ds, ctx.settings
    gated = GatedMultiExitModel.from_multiexit(sdn.model.eval())
    costs = cost_table(gated, ds.calib.x[:8], measure=False)
    op = choose_operating_point(calib_points, macs_budget=0.5 * base["macs"])
    t0 = time.perf_counter()
    info = fit_gate(gated, ctx.train, op.policy, epochs=10, seed=s.seed)
    cal = calibrate_gate(gated, ds.calib, op.policy, costs.exit_macs, costs.backbone_macs)
    secs = time.perf_counter() - t0
    test_logits = gated.collect_logits(ds.test.x)
    hard = gated.is_hard(gated.hard_probability(ds.test.x))
    plain = simulate_exits(test_logits, op.policy)
    plain_macs = torch.tensor(costs.exit_macs, dtype=torch.float64)[plain.exit_index]
    gated_result = gated.simulate_gated(test_logits, hard, op.policy)
    gated_macs = gated.sample_macs(gated_result.exit_index, hard, costs.exit_macs,
                                   costs.backbone_macs)
    rows = [{"method": "sdn @50% budget, no gate", "accuracy": plain.accuracy(ds.test.y),
             "macs_ratio": float(plain_macs.mean()) / base["macs"]},
            {"method": "sdn @50% budget + exit gate", "accuracy": gated_result.accuracy(ds.test.y),
             "macs_ratio": float(gated_macs.mean()) / base["macs"],
             "gated_fraction": float(hard.double().mean())}]
    preds, exits = _infer_batched(gated, ds.test.x, op.policy)
    ref = gated.simulate_gated(test_logits, hard, op.policy)
    rows[-1].update({"gate_macs_ratio": gated.gate_macs() / base["macs"],
                     "gate_threshold": gated.gate_threshold, "train_s": secs,
                     "gate_balanced_accuracy_train": info["balanced_accuracy"],
                     "calib_accuracy": cal["accuracy"],
                     "infer_matches_simulate": bool(torch.equal(preds, ref.predictions)
                                                    and torch.equal(exits, ref.exit_index))})
    return rows


def _online_rows(ctx: Context, base: dict) -> list[dict]:
    """Online caching: fresh sdn caches on the frozen baseline, learned from unlabelled traffic."""
    ds = ctx.ds
    model = ctx.multi("sdn").eval()
    cache = OnlineCache(model, threshold=0.9, probe_fraction=0.5, target_agreement=0.98,
                        window=400, min_confident=200, lr=5e-3, seed=ctx.settings.seed)
    t0 = time.perf_counter()
    traffic = ctx.train.x
    for i in range(0, len(traffic), 64):
        cache.process(traffic[i: i + 64])
    secs = time.perf_counter() - t0
    stats = cache.stats.to_dict()
    preds, exits = _infer_batched(model, ds.test.x, cache.policy)
    costs = cost_table(model, ds.calib.x[:8], measure=False)
    macs = float(torch.tensor(costs.exit_macs, dtype=torch.float64)[exits].mean())
    own = torch.cat([ctx.baseline(ds.test.x[i: i + 1024]).argmax(1)
                     for i in range(0, len(ds.test.x), 1024)])
    return [{"method": "online caching (after the traffic)", "accuracy":
             float((preds == ds.test.y).double().mean()),
             "agreement_with_model": float((preds == own).double().mean()),
             "macs_ratio": macs / base["macs"],
             "exit_fractions": torch.bincount(exits, minlength=model.num_exits).div(
                 len(exits)).tolist(),
             "enabled_exits": list(cache.enabled), "traffic_samples": stats["samples"],
             "served_agreement_during_traffic": stats["served_agreement"],
             "served_macs_ratio_during_traffic": stats["mean_served_macs"] / base["macs"],
             "macs_ratio_with_probes_during_traffic": stats["mean_macs_with_probes"]
             / base["macs"], "seconds": secs}]


def _guarded_rows(results: dict, ctx: Context, base: dict) -> list[dict]:
    rows = []
    for name in ("sdn", "ztw", "boostnet"):
        if name not in results:
            continue
        calib_logits, test_logits, exit_macs, _ = results[name]["_logits"]
        policy = results[name]["policy"]
        for eps in (0.005, 0.01, 0.02):
            row = {"method": name, "epsilon": eps, "delta": 0.1}
            try:
                g = guarded_threshold(calib_logits, ctx.ds.calib.y, exit_macs, policy, eps, 0.1)
            except InputError as exc:
                rows.append({**row, "note": str(exc)})
                continue
            r = simulate_exits(test_logits, g.policy)
            final = decision_logits(policy, test_logits)[-1]
            macs = float(torch.tensor(exit_macs, dtype=torch.float64)[r.exit_index].mean())
            rows.append({**row, "accuracy": r.accuracy(ctx.ds.test.y),
                         "drop_vs_final_exit_pt": 100 * (_acc(final, ctx.ds.test.y)
                                                         - r.accuracy(ctx.ds.test.y)),
                         "macs_ratio": macs / base["macs"], "certified": g.certified,
                         "policy": g.policy.config()})
    return rows


def run_config(config: str, s: CatalogueSettings) -> dict:
    """Train and evaluate every method on one ``dataset:model`` configuration."""
    dataset, _, model_name = config.partition(":")
    if not model_name:
        raise InputError(f"configs are 'dataset:model', got {config!r}")
    ds = load_dataset(dataset, seed=s.seed)
    train_split = ds.train
    if s.train_subset and len(ds.train) > s.train_subset:
        train_split = ds.train.subset(s.train_subset, seed=s.seed)
    baseline = create_model(model_name, ds.num_classes, ds.input_shape)
    h = train(baseline, train_split, Baseline(), epochs=s.baseline_epochs, lr=s.lr,
              batch_size=s.batch_size, seed=s.seed, progress=s.progress)
    baseline.eval()
    ctx = Context(ds, train_split, model_name, baseline, s)
    base_costs = cost_table(baseline, ds.calib.x[:8], measure=False)
    base_logits = torch.cat([baseline(ds.test.x[i: i + 1024])
                             for i in range(0, len(ds.test.x), 1024)])
    with torch_threads(s.threads):
        base_lat = latency_batch1(baseline, ds.test.x, s.latency_samples)
    base = {"macs": base_costs.backbone_macs, "accuracy": _acc(base_logits, ds.test.y),
            "latency_ms": base_lat["mean_ms"]}
    wanted = s.methods or [*MAIN, *EXTRA]
    unknown = [m for m in wanted if m not in MAIN and m not in EXTRA]
    if unknown:
        raise InputError(f"unknown methods {unknown}; known: {', '.join([*MAIN, *EXTRA])}")
    if any(m in ("pabee", "gate") for m in wanted) and "sdn" not in wanted:
        wanted = ["sdn", *wanted]
    results: dict[str, dict] = {}
    built_sdn = None
    for name in wanted:
        if name not in MAIN:
            continue
        t0 = time.perf_counter()
        built = ctx.fit(name)
        results[name] = evaluate_method(name, built, ctx, base)
        results[name]["policy"] = built.policy
        if name == "sdn":
            built_sdn = built
            if "pabee" in wanted:
                results["pabee"] = evaluate_method("pabee", _pabee(built), ctx, base,
                                                   results["sdn"]["_logits"][:2])
                results["pabee"]["policy"] = Patience()
        print(f"[{config}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    sections: dict[str, list] = {}
    if "gate" in wanted and built_sdn is not None:
        sections["exit gate"] = _gate_rows(built_sdn, ctx, base, results["sdn"]["_logits"][3])
    if "online-caching" in wanted:
        sections["online caching"] = _online_rows(ctx, base)
    if "guarded" in wanted:
        sections["guarded calibration"] = _guarded_rows(results, ctx, base)
    baseline_row = {"method": "baseline", "accuracy": base["accuracy"],
                    "mean_macs": base["macs"], "macs_ratio": 1.0,
                    "latency_ms": base["latency_ms"], "latency_ratio": 1.0,
                    "train_s": h.seconds}
    tag = {"dataset": dataset, "model": model_name}
    return {
        "config": config, "train_samples": len(train_split), "test_samples": len(ds.test),
        "calib_samples": len(ds.calib),
        "main": [{**tag, **baseline_row}] + [{**tag, **r["main"]} for r in results.values()],
        "anytime": [{**tag, **row} for r in results.values() for row in r["anytime"]],
        "budgeted": [{**tag, **row} for r in results.values() for row in r["budgeted"]],
        "oracle": [{**tag, **r["oracle"]} for r in results.values()],
        "methods": [{**tag, **r["info"]} for r in results.values()],
        "curves": {name: r["curve"] for name, r in results.items()},
        "sections": {k: [{**tag, **row} for row in v] for k, v in sections.items()},
        "baseline": base,
    }


def _targets(parts: dict[str, dict]) -> list[dict]:
    """The issue's targets on Fashion-MNIST ResNet-8, and ZTW / BoostNet vs SDN per budget."""
    rows = []
    for config, part in parts.items():
        base_acc = part["baseline"]["accuracy"]
        by_budget: dict[float, dict[str, float]] = {}
        for row in part["budgeted"]:
            if "accuracy" in row:
                by_budget.setdefault(row["budget"], {})[row["method"]] = row["accuracy"]
        for budget, accs in sorted(by_budget.items()):
            best = max(accs, key=accs.get)
            row = {"config": config, "budget": budget, "best_method": best,
                   "best_accuracy": accs[best], "baseline_accuracy": base_acc,
                   "best_drop_pt": 100 * (base_acc - accs[best])}
            if config == "fashion-mnist:resnet8" and budget in (0.25, 0.5):
                limit = 2.0 if budget == 0.25 else 0.3
                row["target_drop_pt"] = limit
                row["target_met"] = row["best_drop_pt"] <= limit
            for other in ("ztw", "boostnet"):
                if other in accs and "sdn" in accs:
                    row[f"{other}_beats_sdn"] = accs[other] > accs["sdn"]
                    row[f"{other}_minus_sdn_pt"] = 100 * (accs[other] - accs["sdn"])
            rows.append(row)
    return rows


def run_catalogue(out: str | Path, settings: CatalogueSettings | None = None,
                  command: str | None = None, reuse_parts: bool = True,
                  write: bool = True) -> dict | None:
    """Run (or reuse) every configuration and write report.json, report.md and Pareto plots.

    Args:
        out: output directory; per-configuration results are cached in ``out/parts``.
        reuse_parts: use a configuration's cached part when its settings match.
        write: assemble the report (set False to only compute parts, e.g. in a parallel run).
    """
    s = settings or CatalogueSettings()
    out = Path(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    parts: dict[str, dict] = {}
    for config in s.configs:
        path = out / "parts" / (config.replace(":", "_") + ".json")
        key = {k: v for k, v in asdict(s).items() if k != "configs"}
        if reuse_parts and path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("settings") == json.loads(json.dumps(key)):
                parts[config] = cached
                continue
        t0 = time.perf_counter()
        part = run_config(config, s)
        part["seconds"] = time.perf_counter() - t0
        part["settings"] = key
        path.write_text(json.dumps(part, indent=1))
        parts[config] = part
    if not write:
        return None
    plots = []
    for config, part in parts.items():
        name = f"pareto_{config.replace(':', '_')}.png"
        plot_pareto(out / name, {m: [tuple(p) for p in c] for m, c in part["curves"].items()},
                    {"baseline": (1.0, part["baseline"]["accuracy"])},
                    xlabel="mean MACs / baseline MACs",
                    title=f"{config}: test accuracy vs compute (every method)")
        plots.append(name)
    sections = {"targets (Fashion-MNIST ResNet-8) and ZTW/BoostNet vs SDN": _targets(parts),
                "budgeted (thresholds chosen on calibration, measured on test)":
                    [r for p in parts.values() for r in p["budgeted"]],
                "anytime (stop at exit k)": [r for p in parts.values() for r in p["anytime"]],
                "oracle (bound)": [r for p in parts.values() for r in p["oracle"]],
                "methods (how each was fitted)": [r for p in parts.values()
                                                  for r in p["methods"]]}
    for p in parts.values():
        for k, v in p["sections"].items():
            sections.setdefault(k, []).extend(v)
    notes = [
        "One baseline backbone per configuration is trained and shared: frozen-backbone "
        "methods use it as is, joint methods fine-tune a copy of it.",
        f"Training uses a stratified subset of {s.train_subset} training samples where the "
        "split is larger (Fashion-MNIST); calibration (thresholds) and test splits are whole. "
        "Few epochs (baseline "
        f"{s.baseline_epochs}, heads {s.head_epochs}, fine-tuning {s.finetune_epochs}): "
        "figures are for this short schedule on a shared 2-core machine, not the papers' "
        "full training.",
        "Main table: the 50%-budget operating point of each method run on the real per-sample "
        "path (MultiExitModel.infer, batch 256) over the whole test split; "
        "infer_matches_simulate compares it with the offline replay; latency_ms is the mean "
        "batch-1 latency over the first test samples, 1 thread, ratio to the baseline timed in "
        "the same run.",
        "macs_ratio counts every head evaluated (and the gate) against the baseline backbone's "
        "MACs; running all heads costs more than 1.0.",
        "Budgeted table (ZTW's protocol): the most accurate calibration-split threshold whose "
        "calibration mean MACs fit the budget, then measured on test (its test MACs can "
        "differ slightly from the budget).",
        "E2CM heads are fitted without gradient steps in one pass over the training subset "
        "(gradient_steps 0, passes 1).",
        "ZTW uses the geometric ensemble and BoostNet the additive ensemble of the exits so far "
        "as decision logits (anytime rows too).",
        f"Joint methods (BranchyNet, self-distillation, BoostNet, QuickNets) use "
        f"{s.joint_head or 'each model default'} heads; SDN, PABEE and ZTW use sdn heads.",
        "PABEE, the exit gate and guarded calibration reuse the sdn model; online caching "
        "starts fresh sdn heads on the frozen baseline and learns from the training subset "
        "as unlabelled traffic (labels unused).",
        "Binary backbones (compress.binary.binarize) are tested in tests/test_methods.py but "
        "not benchmarked here: training one from scratch does not fit this run's budget.",
    ]
    rows = [r for p in parts.values() for r in p["main"]]
    return write_report(out, "early-exit-methods", rows,
                        dataset=", ".join(sorted({c.split(':')[0] for c in parts})),
                        model=", ".join(sorted({c.split(':')[1] for c in parts})),
                        sections=sections, notes=notes, command=command,
                        settings=asdict(s), plots=plots,
                        seconds={c: p.get("seconds") for c, p in parts.items()},
                        train_samples={c: p["train_samples"] for c, p in parts.items()})


def register(suites) -> None:
    """Add ``python -m benchmarks early-exit-methods`` to the CLI."""
    p = suites.add_parser("early-exit-methods", help="every early-exit method on the same "
                          "backbones and data: anytime, budgeted, Pareto, oracle, latency")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="comma-separated dataset:model pairs")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join([*MAIN, *EXTRA])}")
    p.add_argument("--out", default="runs/bench-early-exit-methods")
    p.add_argument("--train-subset", type=int, default=12000,
                   help="train on this many samples where the split is larger (0: all)")
    p.add_argument("--baseline-epochs", type=int, default=4)
    p.add_argument("--head-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--latency-samples", type=int, default=200)
    p.add_argument("--joint-head", default=None,
                   help="head type of the joint methods (default: the model's own)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts-only", action="store_true",
                   help="compute the configurations' parts without writing the report")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from .common import command_line, print_rows

    settings = CatalogueSettings(
        configs=args.configs.split(","),
        methods=args.methods.split(",") if args.methods else None,
        train_subset=args.train_subset or None, baseline_epochs=args.baseline_epochs,
        head_epochs=args.head_epochs, finetune_epochs=args.finetune_epochs,
        latency_samples=args.latency_samples, joint_head=args.joint_head,
        threads=args.threads, seed=args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_catalogue(args.out, settings, command=command_line(),
                           write=not args.parts_only)
    if report is not None:
        print_rows(report)
        print(f"wrote {Path(args.out) / 'report.md'} and report.json")
    return 0
