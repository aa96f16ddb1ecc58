"""A multi-exit model measured against its baseline, side by side in one run.

:func:`compare_exits` is what ``splitexit bench`` runs on your checkpoint and what the
early-exit benchmark runs on zoo models: thresholds chosen on the calibration split for each
accuracy-drop target (:func:`~splitexit.calibration.calibrate`), then, on the test split and
on every runtime asked for, accuracy with its paired 95% interval, mean MACs, batch-1 latency
(interleaved with the baseline) and batched throughput as ratios to that runtime's baseline,
the cost when no exit fires, the subsets of exits chosen for latency, and the oracle bound.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .calibration import (
    CalibrationWarning,
    calibrate,
    exit_costs,
    oracle,
    paired_drop_ci,
    pareto_front,
    select_exits,
    sweep,
)
from .cost import cost_table
from .data import Dataset
from .errors import InputError
from .measure import (
    interleaved_latency,
    interleaved_throughput,
    measure_exit_latency,
    torch_threads,
)
from .multiexit import MultiExitModel, simulate_exits
from .optimize import trace_for_inference
from .policies import create_policy, leave_at

__all__ = ["CompareSettings", "compare_exits"]


@dataclass
class CompareSettings:
    """How :func:`compare_exits` chooses operating points and measures them.

    Attributes:
        strategy: how the multi-exit model was trained; it labels the rows (``"joint"``).
        policy: the exit policy by name (``"maxprob"``, ``"entropy"``, ``"margin"``).
        drops: accuracy drop targets vs the reference (fractions) to pick operating points for.
        calibration: how each target's threshold is chosen
            (:func:`~splitexit.calibration.calibrate`): ``"auto"`` (the guarded mode when the
            calibration set can certify the target and a plain sweep's margin is too thin, a
            sweep with a warning when it is too small for either), ``"sweep"`` or
            ``"guarded"``. Every row states its target and its test drop with a 95% interval.
        delta: the guarded mode's tolerated probability that its bound fails.
        latency_samples: test samples timed one at a time (``None``: the whole test set).
        throughput_batch: batch size of the throughput measurement.
        threads: torch threads while timing (1 mimics a single edge core and is steadier).
        runtimes: where to time: ``"eager"`` PyTorch and/or ``"torchscript"`` (frozen
            TorchScript graphs, one per stage for the multi-exit model, one for the baseline).
        select_exits: also pick, per accuracy target and runtime, the subset of exit heads and
            threshold with the lowest expected batch-1 latency, from the latency of leaving at
            each exit measured on that runtime (``selection_samples`` calibration inputs).
        max_overhead: with ``select_exits``, also the best subset whose no-exit latency is at
            most this times the baseline's (``None``: no such row).
        timing_chunks: interleaving groups of the latency measurement.
        seed: shuffles the interleaving order.
    """

    strategy: str = "joint"
    policy: str = "maxprob"
    drops: tuple[float, ...] = (0.005, 0.01)
    calibration: str = "auto"
    delta: float = 0.05
    latency_samples: int | None = None
    throughput_batch: int = 256
    threads: int | None = 1
    runtimes: tuple[str, ...] = ("eager", "torchscript")
    select_exits: bool = True
    max_overhead: float | None = 1.10
    selection_samples: int = 300
    timing_chunks: int = 20
    seed: int = 0


def _never_fires(policy, heads: int):
    """The suite's policy over ``heads`` exit heads with every decision still computed but
    none able to fire (:func:`~splitexit.policies.leave_at` the final exit)."""
    return leave_at(policy, heads, heads + 1)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


@torch.no_grad()
def compare_exits(ds: Dataset, model_name: str, baseline: torch.nn.Module,
                  multi: MultiExitModel, s: CompareSettings | None = None,
                  control: torch.nn.Module | None = None) -> tuple[list[dict], dict]:
    """Rows for one backbone: baseline, operating points, no-exit overhead, oracle.

    Every runtime in ``s.runtimes`` (eager PyTorch, TorchScript) times its own baseline and
    its own early-exit rows, so each ratio compares like with like. With a ``control`` (the
    baseline trained as long as the multi-exit model, for example ``benchmarks/early_exit.py``'s ``train_control``), operating
    points are chosen against the more accurate of the two and rows carry their drop vs it.
    """
    s = s or CompareSettings()
    baseline.eval()
    multi.eval()
    example = ds.calib.x[:64]
    costs = cost_table(multi, example, measure=False)
    base_macs = cost_table(baseline, example, measure=False).backbone_macs
    calib_logits = multi.collect_logits(ds.calib.x)
    test_x, test_y = ds.test.x, ds.test.y

    def correct(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample correctness on the calibration and test splits."""
        model.eval()
        test = torch.cat([model(test_x[i: i + 1024]) for i in range(0, len(test_x), 1024)])
        return model(ds.calib.x).argmax(1) == ds.calib.y, test.argmax(1) == test_y

    def mean(c: torch.Tensor) -> float:
        return float(c.double().mean())

    ref_calib, base_test = correct(baseline)
    ref_calib_acc, base_test_acc = mean(ref_calib), mean(base_test)
    ref_test, ref_name = base_test, "baseline"  # the reference operating points aim at
    control_rows: list[dict] = []
    subsets: list[dict] = []  # every subset of exits the latency selection tried
    control_test_acc = None
    if control is not None:
        control_calib, control_test = correct(control)
        control_calib_acc, control_test_acc = mean(control_calib), mean(control_test)
        control_rows.append({"method": "control: baseline trained as long, no exits",
                             "model": model_name, "accuracy": control_test_acc,
                             "accuracy_drop_pt": 100 * (base_test_acc - control_test_acc),
                             "calib_accuracy": control_calib_acc})
        if control_calib_acc > ref_calib_acc:  # the stricter reference
            ref_calib, ref_calib_acc, ref_test, ref_name = (control_calib, control_calib_acc,
                                                            control_test, "control")
    policy = create_policy(s.policy)
    points = sweep(calib_logits, ds.calib.y, costs.exit_macs, policy)
    test_logits = multi.collect_logits(test_x)
    stage_macs = [p.macs for p in costs.stages]
    head_macs = [p.macs for p in costs.heads]

    # operating points: (method, kept exits, policy, extra columns)
    chosen: list[tuple[str, list[int], object, dict]] = []
    notes: list[dict] = []
    all_exits = list(range(len(multi.heads)))
    for drop in s.drops:
        label = f"{s.strategy} (target <= {100 * drop:g} pt drop)"
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CalibrationWarning)
                cal = calibrate(calib_logits, ds.calib.y, costs.exit_macs, policy,
                                max_drop=drop, reference_correct=ref_calib, mode=s.calibration,
                                delta=s.delta)
        except InputError as exc:
            notes.append({"method": label, "model": model_name, "note": str(exc)})
            continue
        label = f"{s.strategy} ({cal.mode}, target <= {100 * drop:g} pt drop)"
        chosen.append((label, all_exits, cal.policy,
                       {"calib_accuracy": cal.accuracy, "max_drop": drop,
                        "target_drop_pt": 100 * drop, "calib_mode": cal.mode,
                        "calib_drop_ci95_pt": cal.calib_drop_ci95_pt,
                        "calib_reference_accuracy": ref_calib_acc}))
        notes += [{"method": label, "model": model_name, "note": str(w.message)}
                  for w in caught if issubclass(w.category, CalibrationWarning)]
    # how each runtime compiles a model (the baseline and the multi-exit model alike)
    runtimes = {"eager": lambda m: m,
                "torchscript": lambda m: trace_for_inference(m, example, fuse=False)}

    def runtime_rows(runtime: str) -> list[dict]:
        if runtime not in runtimes:
            raise InputError(f"unknown runtime {runtime!r}: use eager or torchscript")
        compile_model = runtimes[runtime]
        compiled: dict[tuple[int, ...], object] = {}

        def fast_for(keep: list[int]):
            if tuple(keep) not in compiled:
                compiled[tuple(keep)] = compile_model(
                    multi.keep_exits(keep) if keep != all_exits else multi)
            return compiled[tuple(keep)]

        base_fn = compile_model(baseline)
        measured: dict[tuple[int, ...], list[float]] = {}

        def latency_for(keep: list[int]) -> list[float]:
            if tuple(keep) not in measured:
                with torch_threads(s.threads):
                    # ratios to the baseline timed alongside: subsets measured at different
                    # times compare, and the no-exit bound is a plain ratio
                    measured[tuple(keep)] = measure_exit_latency(
                        fast_for(keep).infer, ds.calib.x, len(keep) + 1, s.selection_samples,
                        policy=policy, reference=base_fn)
            return measured[tuple(keep)]

        def selected(method: str, extra: dict, bound: float | None):
            """The latency-chosen subset for one operating point (no-exit cost <= ``bound``
            when given), as a plan, or ``None`` (with a note) when no subset meets it."""
            # the subset and threshold come from a sweep, whatever mode chose ``method``
            base = f"{s.strategy} (sweep, target <= {100 * extra['max_drop']:g} pt drop"
            label = (f"{base}, exits chosen for latency)" if bound is None else
                     f"{base}, exits chosen for latency, no-exit cost <= {s.max_overhead:g}x)")
            try:
                sel = select_exits(calib_logits, ds.calib.y, latency_for, policy,
                                   reference_accuracy=ref_calib_acc, max_drop=extra["max_drop"],
                                   max_final_cost=bound)
            except InputError as exc:
                notes.append({"method": label, "model": model_name, "runtime": runtime,
                              "note": str(exc)})
                return None
            if bound is None:  # every subset tried: mean latency against the worst case
                subsets.extend(
                    {"model": model_name, "runtime": runtime, "max_drop_pt": 100 * extra["max_drop"],
                     "exits": [multi.exit_names[e] for e in c["exits"]] + ["final"],
                     "calib_accuracy": c["accuracy"],
                     "predicted_latency_ratio": c["expected_cost"],
                     "predicted_no_exit_ratio": c["exit_costs"][-1],
                     "chosen": c["exits"] == sel.exits} for c in sel.candidates)
            kept = [calib_logits[e] for e in sel.exits] + [calib_logits[-1]]
            _, lo, hi = paired_drop_ci(ref_calib, simulate_exits(kept, sel.point.policy)
                                       .predictions == ds.calib.y)
            return (label, sel.exits, sel.point.policy,
                    {"calib_accuracy": sel.point.accuracy, "max_drop": extra["max_drop"],
                     "target_drop_pt": extra["target_drop_pt"], "calib_mode": "sweep",
                     "calib_drop_ci95_pt": [lo, hi],
                     "calib_reference_accuracy": ref_calib_acc,
                     "exits": [multi.exit_names[e] for e in sel.exits] + ["final"],
                     "predicted_latency_ratio": sel.point.mean_macs,
                     "predicted_no_exit_ratio": latency_for(sel.exits)[-1]})

        plans = []  # (method, kept exits, policy, extra columns)
        for method, keep, pol, extra in chosen:
            plans.append((method, keep, pol, extra))
            if s.select_exits:
                # the lowest mean latency, and (a bound on the worst case) the lowest mean
                # latency among the subsets whose no-exit cost stays within max_overhead
                bounds = [None] + ([s.max_overhead] if s.max_overhead else [])
                plans += [p for p in (selected(method, extra, b) for b in bounds) if p]
        plans.append(("no exit fires (overhead)", all_exits,
                      _never_fires(policy, len(all_exits)), {}))
        # and what a deployment of a latency-chosen subset pays when nothing leaves early
        kept_subsets = dict.fromkeys(tuple(keep) for m, keep, _, _ in plans
                                     if "chosen for latency" in m and keep != all_exits)
        for keep in kept_subsets:
            names = ", ".join(multi.exit_names[e] for e in keep) or "no heads"
            plans.append((f"no exit fires (overhead), exits {names} only", list(keep),
                          _never_fires(policy, len(keep)), {}))
        fns = {"baseline": base_fn}
        for method, keep, pol, _ in plans:
            fns[method] = (lambda f, p: lambda x: f.infer(x, p))(fast_for(keep), pol)
        # every method timed on the same samples, interleaved, so load hits all alike
        with torch_threads(s.threads):
            lat = interleaved_latency(fns, test_x[: s.latency_samples], chunks=s.timing_chunks,
                                      seed=s.seed)
            thr = interleaved_throughput(fns, test_x, s.throughput_batch, repeats=5,
                                         seed=s.seed)
        base_lat, base_thr = lat["baseline"], thr["baseline"]
        common = {"model": model_name, "runtime": runtime}
        rows = [{"method": "baseline", **common, "accuracy": base_test_acc,
                 "mean_macs": base_macs, "macs_ratio": 1.0,
                 "latency_ms": base_lat["mean_ms"], "latency_p50_ms": base_lat["median_ms"],
                 "latency_ratio": 1.0, "throughput_sps": base_thr, "throughput_ratio": 1.0}]
        for method, keep, pol, extra in plans:
            model = multi.keep_exits(keep) if keep != all_exits else multi
            result = fast_for(keep).infer(test_x, pol)
            replay = model.simulate([test_logits[e] for e in keep] + [test_logits[-1]], pol)
            exit_macs = exit_costs(stage_macs, head_macs, multi.exit_stages, keep)
            macs = float(torch.tensor(exit_macs, dtype=torch.float64)[result.exit_index].mean())
            acc = result.accuracy(test_y)
            right = result.predictions == test_y
            honest = {}  # a target, the test drop vs its reference and the 95% interval
            if "target_drop_pt" in extra:
                drop, lo, hi = paired_drop_ci(ref_test, right)
                honest = {"target_drop_pt": extra["target_drop_pt"], "target_reference": ref_name,
                          "test_drop_vs_reference_pt": drop,
                          "test_drop_ci95_pt": [lo, hi],
                          "target_met_on_test": drop <= extra["target_drop_pt"] + 1e-9}
            row = {"method": method, **common, "accuracy": acc,
                   "accuracy_drop_pt": 100 * (base_test_acc - acc),
                   "accuracy_drop_ci95_pt": list(paired_drop_ci(base_test, right)[1:]),
                   **({"drop_vs_control_pt": 100 * (control_test_acc - acc)}
                      if control_test_acc is not None else {}),
                   **honest,
                   "mean_macs": macs,
                   "macs_ratio": macs / base_macs, "latency_ms": lat[method]["mean_ms"],
                   "latency_p50_ms": lat[method]["median_ms"],
                   "latency_ratio": lat[method]["mean_ms"] / base_lat["mean_ms"],
                   "throughput_sps": thr[method], "throughput_ratio": thr[method] / base_thr,
                   "exit_fractions": result.exit_fractions(model.num_exits),
                   "policy": pol.config(),
                   "infer_matches_simulate": bool(
                       torch.equal(result.predictions, replay.predictions)
                       and torch.equal(result.exit_index, replay.exit_index)),
                   **{k: v for k, v in extra.items()
                      if k not in ("max_drop", "target_drop_pt")}}
            if method.startswith("no exit fires (overhead)"):
                row["overhead_batch1"] = row.pop("latency_ratio")
                row["overhead_batched"] = 1 / row.pop("throughput_ratio")
            rows.append(row)
        return rows

    rows = [row for runtime in s.runtimes for row in runtime_rows(runtime)]
    rows += control_rows + notes
    orc = oracle(test_logits, test_y, costs.exit_macs)
    rows.append({"method": "oracle (bound)", "model": model_name, "accuracy": orc["accuracy"],
                 "accuracy_drop_pt": 100 * (base_test_acc - orc["accuracy"]),
                 "mean_macs": orc["mean_macs"], "macs_ratio": orc["mean_macs"] / base_macs,
                 "exit_fractions": orc["exit_fractions"]})
    anytime = [{"model": model_name, "exit": name, "accuracy": _accuracy(lg, test_y),
                "macs": costs.exit_macs[e], "macs_ratio": costs.exit_macs[e] / base_macs,
                "latency_b1_ms": (1e3 * costs.exit_latency_b1_s[e]
                                  if costs.exit_latency_b1_s else None)}
               for e, (name, lg) in enumerate(zip(multi.exit_names, test_logits))]
    curves = {f"{model_name} {s.strategy} (calibration sweep)":
              [(p.mean_macs / base_macs, p.accuracy) for p in pareto_front(points)],
              f"{model_name} {s.strategy} (test sweep)":
              [(p.mean_macs / base_macs, p.accuracy) for p in
               pareto_front(sweep(test_logits, test_y, costs.exit_macs, policy))]}
    marks = {f"{model_name} baseline": (1.0, base_test_acc),
             f"{model_name} oracle": (orc["mean_macs"] / base_macs, orc["accuracy"])}
    return rows, {"anytime": anytime, "curves": curves, "points": marks, "subsets": subsets}
