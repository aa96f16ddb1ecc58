"""Early-exit benchmark: a backbone trained without exits vs the same backbone with exits.

Thresholds are chosen on the calibration split for a maximum accuracy drop vs the baseline;
accuracy, mean MACs, batch-1 latency and batched throughput are then measured on the test
split in the same run, with ratios to the baseline. The demo is this suite on a small data set.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from splitexit import checkpoint
from splitexit.cli import calibration_mode_args
from splitexit.compare import CompareSettings, compare_exits
from splitexit.data import Dataset, load_dataset
from splitexit.errors import InputError
from splitexit.measure import torch_threads
from splitexit.multiexit import MultiExitModel
from splitexit.optimize import fuse_for_inference
from splitexit.report import plot_pareto, write_report
from splitexit.training import Baseline, HeadsOnly, JointWeighted, train
from splitexit.zoo import create_model, create_multiexit

from .common import command_line, print_rows

__all__ = ["EarlyExitSettings", "run_early_exit", "train_pair", "train_control"]


@dataclass
class EarlyExitSettings(CompareSettings):
    """What the suite trains, on top of how :func:`splitexit.compare.compare_exits` measures.

    Attributes:
        strategy: ``"joint"`` (BranchyNet: backbone initialised from the trained baseline,
            then every exit trained jointly) or ``"heads-only"`` (SDN IC-only: frozen baseline).
        train_samples: train on a stratified subset of this size (quicker runs; the report
            says so). Calibration and test splits are always whole.
        reuse_models: load ``out/models/<model>-{baseline,multiexit}`` when present instead of
            training again (delete them to retrain).
        fuse: fold BatchNorm into convolutions before timing, in both models alike.
        control: also fine-tune the baseline, without exits, for as many epochs and at the
            same learning rate as the multi-exit model's joint training (saved as
            ``<model>-control``). The multi-exit model has then had the same training as this
            control, so operating points are chosen against the more accurate of the two
            references and every row reports its drop against both. Joint strategy only
            (heads-only training leaves the baseline's backbone as it is).
    """

    epochs: int = 12
    finetune_epochs: int | None = None
    lr: float = 2e-3
    batch_size: int = 128
    head: str | None = None
    progress: bool | None = None
    train_samples: int | None = None
    save_models: bool = True
    reuse_models: bool = True
    fuse: bool = True
    control: bool = False
    extra_notes: list[str] = field(default_factory=list)


def train_pair(ds: Dataset, model_name: str, s: EarlyExitSettings,
               baseline: torch.nn.Module | None = None
               ) -> tuple[torch.nn.Module, MultiExitModel, dict]:
    """Train the baseline backbone (unless given), then the multi-exit model initialised
    from it."""
    base_seconds = None
    if baseline is None:
        baseline = create_model(model_name, ds.num_classes, ds.input_shape)
        base_seconds = train(baseline, ds.train, Baseline(), epochs=s.epochs, lr=s.lr,
                             batch_size=s.batch_size, seed=s.seed, progress=s.progress).seconds
    multi = create_multiexit(model_name, ds.num_classes, ds.input_shape,
                             head=_head_for(model_name, s.head))
    multi.backbone.load_state_dict(baseline.state_dict())
    strategy, lr = _finetune_schedule(s)
    h_multi = train(multi, ds.train, strategy, epochs=s.finetune_epochs or s.epochs, lr=lr,
                    batch_size=s.batch_size, seed=s.seed + 1, progress=s.progress)
    return baseline, multi, {"baseline_train_s": base_seconds,
                             "multiexit_train_s": h_multi.seconds}


def _finetune_schedule(s: EarlyExitSettings):
    """The multi-exit model's training strategy and learning rate."""
    if s.strategy == "joint":
        return JointWeighted(), s.lr / 2
    if s.strategy == "heads-only":
        return HeadsOnly(), s.lr
    raise InputError(f"unknown strategy {s.strategy!r}: use 'joint' or 'heads-only'")


def train_control(ds: Dataset, baseline: torch.nn.Module, s: EarlyExitSettings
                  ) -> tuple[torch.nn.Module, float]:
    """A copy of the baseline trained further, without exits, on the multi-exit model's
    schedule (same epochs, learning rate and data order): the equally trained reference."""
    control = copy.deepcopy(baseline)
    _, lr = _finetune_schedule(s)
    h = train(control, ds.train, Baseline(), epochs=s.finetune_epochs or s.epochs, lr=lr,
              batch_size=s.batch_size, seed=s.seed + 1, progress=s.progress)
    return control, h.seconds


def _head_for(model_name: str, spec: str | None) -> str | None:
    """``"sdn"`` for every model, or ``"resnet8=sdn,b-lenet=published"`` per model."""
    if not spec or "=" not in spec:
        return spec
    pairs = dict(part.split("=", 1) for part in spec.split(","))
    return pairs.get(model_name)


def run_early_exit(dataset: str, models: list[str], out: str | Path,
                   settings: EarlyExitSettings | None = None, suite: str = "early-exit",
                   command: str | None = None) -> dict:
    """Train, calibrate and measure every model; write report.json, report.md and a plot."""
    s = settings or EarlyExitSettings()
    out = Path(out)
    ds = load_dataset(dataset, seed=s.seed)
    if s.train_samples and s.train_samples < len(ds.train):
        ds = replace(ds, train=ds.train.subset(s.train_samples, seed=s.seed))
    rows, anytime, subsets, curves, points, timings = [], [], [], {}, {}, {}
    for name in models:
        saved = [out / "models" / f"{name}-{kind}" for kind in ("baseline", "multiexit")]
        have = [s.reuse_models and (p / "model.json").is_file() for p in saved]
        if all(have):
            baseline, multi = (checkpoint.load(p) for p in saved)
            timings[name] = {"reused": [str(p) for p in saved]}
        else:  # a saved baseline alone is reused; the multi-exit model is trained from it
            baseline = checkpoint.load(saved[0]) if have[0] else None
            baseline, multi, timings[name] = train_pair(ds, name, s, baseline)
            if have[0]:
                timings[name]["reused"] = [str(saved[0])]
            if s.save_models:
                for model, path in zip((baseline, multi), saved):
                    checkpoint.save(model, path, dataset=dataset, settings=vars(s))
        control = None
        if s.control and s.strategy == "joint":
            path = out / "models" / f"{name}-control"
            if s.reuse_models and (path / "model.json").is_file():
                control = checkpoint.load(path)
                timings[name].setdefault("reused", []).append(str(path))
            else:
                control, timings[name]["control_train_s"] = train_control(ds, baseline, s)
                if s.save_models:
                    checkpoint.save(control, path, dataset=dataset, settings=vars(s))
        if s.fuse:
            baseline, multi = fuse_for_inference(baseline), fuse_for_inference(multi)
        with torch_threads(s.threads):  # small tensors: extra threads only contend
            r, extra = compare_exits(ds, name, baseline, multi, s, control=control)
        for row in r:  # how long the control trained
            if row["method"].startswith("control"):
                row["epochs"] = s.epochs + (s.finetune_epochs or s.epochs)
        rows += r
        anytime += extra["anytime"]
        subsets += extra["subsets"]
        curves.update(extra["curves"])
        points.update(extra["points"])
    plot = plot_pareto(out / "pareto.png", curves, points, xlabel="mean MACs / baseline MACs",
                       title=f"{dataset}: accuracy vs compute")
    notes = ["Thresholds were chosen on the calibration split (carved from training data; "
             f"{len(ds.calib)} samples); every figure is measured on the test split in this "
             "run.",
             "Operating points: 'target <= x pt drop' is what the threshold aimed at, not a "
             "result. target_drop_pt is the target; test_drop_vs_reference_pt the test accuracy "
             "drop against the reference it aimed at (target_reference: the baseline, or the "
             "control when more accurate on the calibration split), test_drop_ci95_pt its 95% "
             "interval (paired over test samples, splitexit.calibration.paired_drop_ci), "
             "target_met_on_test whether the test drop is within the target; "
             "accuracy_drop_ci95_pt is the same interval for accuracy_drop_pt (vs the "
             "baseline). calib_mode (splitexit.calibration.calibrate, mode "
             f"{s.calibration!r}): 'guarded' (Learn-then-Test: the drop is within the target "
             f"with probability >= {1 - s.delta:g}) when the calibration set can certify the "
             "target and a plain sweep's calibration interval reaches past it; 'sweep' "
             "otherwise, with a note when the calibration set is too small for the target "
             "(then nothing bounds the test drop). Rows 'exits chosen for latency' are sweeps.",
             "latency_ms is the mean batch-1 latency over the timed test samples; every method "
             "of a runtime (and its baseline) is timed on the same samples, interleaved in "
             f"{s.timing_chunks} groups with the methods' order shuffled per group, and "
             "ratios are to that runtime's baseline. torchscript = frozen TorchScript graphs "
             "(splitexit.optimize.trace_for_inference): one for the baseline, one per stage "
             "and head for the multi-exit model.",
             "'exits chosen for latency': the subset of exit heads and threshold with the "
             "lowest expected batch-1 latency on the calibration split "
             "(splitexit.calibration.select_exits), from the measured latency of leaving at "
             "each exit on that runtime (the policy's statistic computed at every exit on "
             "the way), timed interleaved with the baseline on calibration inputs; "
             "predicted_latency_ratio is that expectation over the baseline's latency, "
             "predicted_no_exit_ratio the measured no-exit latency over the baseline's."
             + ("" if not s.select_exits or s.max_overhead is None else
                f" 'no-exit cost <= {s.max_overhead:g}x': the same among the subsets whose "
                f"predicted_no_exit_ratio is at most {s.max_overhead:g}: a bound on what a "
                "sample pays when no exit fires."),
             "no exit fires: every head and every exit decision runs (the policy with "
             "thresholds it cannot reach), nothing leaves; overhead_batch1 = its batch-1 "
             "latency / the baseline's; overhead_batched = the baseline's batched throughput "
             "/ its own.",
             "oracle: each sample leaves at the earliest correct exit (a bound, not runnable).",
             *([f"control: the baseline trained {s.finetune_epochs or s.epochs} more epochs "
                "without exits on the multi-exit model's schedule; operating points are chosen "
                "against the more accurate of baseline and control on the calibration split, "
                "and drop_vs_control_pt is each row's test accuracy drop against the control "
                "(same architecture as the baseline, so the latency ratios apply to it too)."]
               if s.control else []),
             *s.extra_notes]
    return write_report(out, suite, rows, dataset=dataset, model=", ".join(models),
                        sections={"anytime (stop at exit k)": anytime,
                                  "exit subsets (latency selection, calibration split)": subsets},
                        notes=notes,
                        command=command, settings={k: v for k, v in vars(s).items()},
                        train_seconds=timings, train_samples=len(ds.train),
                        calib_samples=len(ds.calib), test_samples=len(ds.test),
                        plots=[plot.name])


def _early_exit_args(p: argparse.ArgumentParser, dataset: str, models: str, out: str,
                     epochs: int) -> None:
    p.add_argument("--dataset", default=dataset, help=f"data set (default {dataset})")
    p.add_argument("--models", default=models, help=f"comma-separated zoo models ({models})")
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--epochs", type=int, default=epochs, help="baseline training epochs")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="multi-exit training epochs (default: --epochs)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="train on a stratified subset of this many samples (quicker)")
    p.add_argument("--no-reuse", action="store_true",
                   help="retrain even if OUT/models holds trained checkpoints")
    p.add_argument("--strategy", default="joint", choices=["joint", "heads-only"])
    p.add_argument("--policy", default="maxprob", choices=["maxprob", "entropy", "margin"])
    p.add_argument("--head", default="resnet8=sdn",
                   help="exit head type for every model, or per model as 'resnet8=sdn,mlp=linear' "
                        "(models not named use their default; default: resnet8=sdn)")
    p.add_argument("--latency-samples", type=int, default=None,
                   help="test samples timed at batch 1 (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    p.add_argument("--runtimes", default="eager,torchscript",
                   help="where to time, comma-separated: eager (PyTorch) and/or torchscript "
                        "(frozen graphs; each runtime has its own baseline)")
    p.add_argument("--no-select-exits", action="store_true",
                   help="skip choosing the subset of exit heads with the lowest predicted latency")
    p.add_argument("--max-overhead", type=float, default=1.10,
                   help="when choosing exit heads for latency, keep only subsets whose measured "
                        "no-exit latency is at most this times the baseline's (default 1.10; "
                        "0 = no bound)")
    p.add_argument("--control", action="store_true",
                   help="also train the baseline as long as the multi-exit model, without exits, "
                        "and choose operating points against the better of the two")
    calibration_mode_args(p)
    p.add_argument("--seed", type=int, default=0)




def _run(args, suite: str) -> int:
    settings = EarlyExitSettings(epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                                 reuse_models=not args.no_reuse,
                                 train_samples=args.train_samples,
                                 strategy=args.strategy, policy=args.policy,
                                 head=args.head, latency_samples=args.latency_samples,
                                 threads=args.threads, seed=args.seed,
                                 runtimes=tuple(args.runtimes.split(",")),
                                 select_exits=not args.no_select_exits,
                                 max_overhead=args.max_overhead or None,
                                 control=args.control, calibration=args.calibration,
                                 delta=args.delta)
    report = run_early_exit(args.dataset, args.models.split(","), args.out, settings,
                            suite=suite, command=command_line())
    print_rows(report)
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and pareto.png")
    return 0


def register(suites) -> None:
    """Add ``python -m benchmarks early-exit`` and ``demo`` (the suite on the embedded digits)."""
    p = suites.add_parser("early-exit", help="baseline vs multi-exit at chosen accuracy drops")
    _early_exit_args(p, "fashion-mnist", "resnet8,b-lenet", "reports/early-exit", 6)
    p.set_defaults(func=lambda a: _run(a, "early-exit"))
    p = suites.add_parser("demo", help="train, calibrate and measure multi-exit models on the "
                          "embedded digits data set (a few minutes on 2 cores)")
    _early_exit_args(p, "digits", "resnet8,b-lenet", "runs/demo", 30)
    p.set_defaults(func=lambda a: _run(a, "demo"))
