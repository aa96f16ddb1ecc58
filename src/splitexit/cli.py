"""The ``splitexit`` command line; every command is a thin wrapper over a public function.

Feature packages add their commands through :data:`COMMAND_MODULES` (each module has
``register(subparsers)``). The benchmark suites that regenerate the README's tables live
outside the package (``python -m benchmarks``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path

from .errors import SplitexitError

# Modules adding top-level commands; each has register(subparsers).
COMMAND_MODULES: list[str] = ["splitexit.serve.cli", "splitexit.split.cli", "splitexit.cbnet_cli",
                              "splitexit.deploy_cli"]


def _command_line() -> str:
    return "splitexit " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _print_rows(report: dict) -> None:
    from .report import markdown_table

    print(markdown_table(report["rows"]))


def calibration_mode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default="auto", choices=["auto", "sweep", "guarded"],
                   help="how thresholds meet an accuracy-drop target: auto (default) uses the "
                        "guarded mode when a plain sweep cannot be shown to hold the target "
                        "and the calibration set can certify it, and warns when it is too "
                        "small for either; sweep; guarded (Learn-then-Test)")
    p.add_argument("--delta", type=float, default=0.05,
                   help="guarded mode: tolerated probability that the drop bound fails "
                        "(default 0.05)")


# train / calibrate / evaluate ------------------------------------------------------------------
MODEL_FILE_HELP = ("your own model as path/to/file.py:function: runs code from that file (it is "
                   "imported from that path only); the function returns an nn.Module and may "
                   "take num_classes= and input_shape=")


def _build_model(args, ds):
    """The model ``train`` starts from: a zoo model by name, or ``--model file.py:fn`` cut at
    ``--cuts`` with ``--head`` exit heads."""
    from .errors import InputError
    from .usermodel import build_backbone, build_multiexit, is_model_file, user_model_source
    from .zoo import create_model, create_multiexit, list_models

    if is_model_file(args.model):
        user_model_source(args.model)  # a missing file or ':function' first (no code runs)
        if args.exits:
            raise InputError("--exits names the exit cuts of a zoo model; with --model "
                             "file.py:function give them as --cuts a,b")
        if args.strategy == "baseline":
            return build_backbone(args.model, args.cuts or [], ds.num_classes, ds.input_shape)
        if not args.cuts:
            raise InputError("--model file.py:function needs --cuts a,b: the cut names where "
                             "exit heads go (splitexit.list_cuts(model) lists them)")
        return build_multiexit(args.model, args.cuts, ds.num_classes, ds.input_shape,
                               head=args.head or "linear")
    if args.model not in list_models():
        raise InputError(f"unknown model {args.model!r}: use a zoo model "
                         f"({', '.join(list_models())}) or {MODEL_FILE_HELP}")
    if args.cuts:
        raise InputError("--cuts goes with --model file.py:function; a zoo model takes its "
                         "exit cuts as --exits a,b")
    if args.strategy == "baseline":
        return create_model(args.model, ds.num_classes, ds.input_shape)
    exits = args.exits.split(",") if args.exits else None
    return create_multiexit(args.model, ds.num_classes, ds.input_shape, exits=exits,
                            head=args.head)


def _load_checkpoint(directory, model_arg: str | None, if_needed: bool = False):
    """A checkpoint's model, rebuilt with ``--model path.py:fn`` for one of user code.

    With ``if_needed``, ``model_arg`` is passed only to a checkpoint that needs one (``--init``
    may name a zoo checkpoint while ``--model`` names a file)."""
    from . import checkpoint

    if if_needed:
        spec = checkpoint.read_meta(directory).get("spec")
        if isinstance(spec, dict) and "model" in spec:
            model_arg = None
    return checkpoint.load(directory, model=model_arg)


def _cmd_train(args) -> int:
    from . import checkpoint
    from .data import load_dataset
    from .errors import InputError
    from .training import Baseline, HeadsOnly, JointWeighted, evaluate_exits, train
    from .usermodel import is_model_file

    if args.method and args.strategy:
        raise InputError("give either --strategy (plain training) or --method (a published "
                         "method's recipe), not both")
    args.strategy = args.strategy or ("joint" if not args.method else None)
    if args.method:
        from .methods import METHODS

        if METHODS.get(args.method).frozen_backbone and not args.init:  # unknown: lists them
            raise InputError(f"method {args.method!r} trains on a frozen backbone: give --init "
                             "CHECKPOINT of a trained baseline (splitexit train --strategy "
                             "baseline --out CHECKPOINT ...)")
    ds = load_dataset(args.dataset, seed=args.seed)
    model = _build_model(args, ds)
    if args.init:
        init = _load_checkpoint(args.init, args.model if is_model_file(args.model) else None,
                                if_needed=True)
        target = model.backbone if hasattr(model, "backbone") else model
        # canonical keys: the initial backbone may be staged at other cuts
        checkpoint.load_canonical_state_dict(
            target, checkpoint.canonical_state_dict(getattr(init, "backbone", init)),
            str(args.init))
    extra: dict = {}
    if args.method:
        from .methods import fit_method

        fitted = fit_method(args.method, model, ds.train, calib=ds.calib, epochs=args.epochs,
                            lr=args.lr, batch_size=args.batch_size, seed=args.seed)
        model, seconds, how = fitted.model, fitted.seconds, args.method
        extra = {"method": args.method, "policy": fitted.policy.config(),
                 "method_info": fitted.info}
    else:
        strategy = {"baseline": Baseline, "joint": JointWeighted, "heads-only": HeadsOnly}[
            args.strategy]()
        history = train(model, ds.train, strategy, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, seed=args.seed)
        seconds, how = history.seconds, args.strategy
        extra = {"strategy": args.strategy}
    if hasattr(model, "heads"):
        accs = evaluate_exits(model, ds.test.x, ds.test.y)
    else:
        accs = [float((model(ds.test.x).argmax(1) == ds.test.y).double().mean())]
    checkpoint.save(model, args.out, dataset=args.dataset, train_seconds=seconds,
                    test_accuracy_per_exit=accs, **extra)
    print(f"trained {args.model} ({how}) in {seconds:.1f} s; test accuracy "
          f"per exit: {', '.join(f'{a:.4f}' for a in accs)}; saved to {args.out}")
    return 0


def _checkpoint_and_data(args):
    """The checkpoint's model and the data set it names (or ``--dataset``)."""
    from . import checkpoint
    from .data import load_dataset

    model = _load_checkpoint(args.checkpoint, args.model)
    meta = checkpoint.read_meta(args.checkpoint)
    return model, load_dataset(args.dataset or meta.get("dataset", "digits"), seed=args.seed)


def _cmd_calibrate(args) -> int:
    import warnings

    from . import checkpoint
    from .calibration import CalibrationWarning, calibrate, pareto_front
    from .cost import cost_table
    from .policies import create_policy

    model, ds = _checkpoint_and_data(args)
    costs = cost_table(model, ds.calib.x[:64], measure=False)
    logits = model.collect_logits(ds.calib.x)
    target = ({"macs_budget": args.macs_budget * costs.exit_macs[-1]}
              if args.macs_budget is not None else {"max_drop": args.max_drop})
    with warnings.catch_warnings():  # printed below, once
        warnings.simplefilter("ignore", CalibrationWarning)
        family = (create_policy(args.policy) if args.policy
                  else checkpoint.load_policy(args.checkpoint, default=create_policy("maxprob")))
        cal = calibrate(logits, ds.calib.y, costs.exit_macs, family,
                        mode=args.calibration, delta=args.delta, **target)
    result = {**cal.to_dict(), "calib_accuracy": cal.accuracy,
              "calib_final_exit_accuracy": cal.reference_accuracy,
              "pareto": [p.to_dict() for p in pareto_front(cal.points)]}
    Path(args.checkpoint, "calibration.json").write_text(json.dumps(result, indent=2))
    lo, hi = cal.calib_drop_ci95_pt
    aim = (f"target <= {100 * args.max_drop:g} pt drop" if args.macs_budget is None
           else f"budget {args.macs_budget:g} of the MACs")
    print(f"{cal.mode} ({aim}; {cal.reason}): policy {cal.policy.config()}: calibration "
          f"accuracy {cal.accuracy:.4f} (final exit {cal.reference_accuracy:.4f}; drop "
          f"{cal.calib_drop_pt:.2f} pt, 95% interval {lo:.2f}..{hi:.2f} pt on "
          f"{cal.calib_samples} samples), mean MACs {cal.mean_macs:.0f} "
          f"({cal.mean_macs / costs.exit_macs[-1]:.1%} of running every exit), exit fractions "
          f"{', '.join(f'{f:.3f}' for f in cal.exit_fractions)}")
    if cal.warning:
        print(f"splitexit: warning: {cal.warning}", file=sys.stderr)
    return 0


def _cmd_evaluate(args) -> int:
    from . import checkpoint
    from .cost import cost_table, mean_macs
    from .measure import latency_batch1, torch_threads
    from .report import write_report

    model, ds = _checkpoint_and_data(args)
    policy = checkpoint.load_policy(args.checkpoint, args.policy)
    costs = cost_table(model, ds.calib.x[:64], measure=False)
    result = model.infer(ds.test.x, policy)
    with torch_threads(1):
        lat = latency_batch1(lambda x: model.infer(x, policy), ds.test.x, args.latency_samples)
    row = {"method": policy.name, "accuracy": result.accuracy(ds.test.y),
           "mean_macs": mean_macs(result.exit_index, costs.exit_macs),
           "macs_ratio": mean_macs(result.exit_index, costs.exit_macs) / costs.backbone_macs,
           "latency_ms": lat["mean_ms"], "exit_fractions": result.exit_fractions(model.num_exits),
           "policy": policy.config()}
    out = args.out or Path(args.checkpoint) / "evaluation"
    report = write_report(out, "evaluate", [row], dataset=ds.name, model=str(args.checkpoint),
                          command=_command_line())
    _print_rows(report)
    return 0


def _cmd_bench(args) -> int:
    """Your multi-exit checkpoint against its baseline, measured side by side."""
    import copy

    from .compare import CompareSettings, compare_exits
    from .errors import InputError
    from .measure import torch_threads
    from .multiexit import MultiExitModel
    from .optimize import fuse_for_inference
    from .report import plot_pareto, write_report

    model, ds = _checkpoint_and_data(args)
    if not isinstance(model, MultiExitModel):
        raise InputError(f"{args.checkpoint} holds a {type(model).__name__} without exits; "
                         "`splitexit bench` measures a multi-exit checkpoint (`splitexit train "
                         "--strategy joint` saves one)")
    if args.baseline:
        baseline = _load_checkpoint(args.baseline, args.baseline_model)
        if isinstance(baseline, MultiExitModel):
            raise InputError(f"--baseline {args.baseline} has exits; give a checkpoint of the "
                             "network without them (`splitexit train --strategy baseline`)")
        reference = f"the baseline checkpoint {args.baseline}"
    else:
        baseline = copy.deepcopy(model.backbone)
        reference = "the same network without its exit heads (its backbone, same weights)"
    try:
        drops = tuple(float(d) / 100 for d in args.drops.split(","))
    except ValueError:
        raise InputError(f"--drops takes accuracy-drop targets in points, comma-separated "
                         f"(e.g. 0.5,1), got {args.drops!r}") from None
    s = CompareSettings(policy=args.policy, drops=drops, calibration=args.calibration,
                        delta=args.delta, latency_samples=args.latency_samples,
                        threads=args.threads, runtimes=tuple(args.runtimes.split(",")),
                        select_exits=not args.no_select_exits,
                        max_overhead=args.max_overhead or None, seed=args.seed,
                        strategy=args.label)
    baseline, model = fuse_for_inference(baseline.eval()), fuse_for_inference(model.eval())
    name = Path(args.checkpoint).name
    with torch_threads(args.threads):
        rows, extra = compare_exits(ds, name, baseline, model, s)
    out = Path(args.out or Path(args.checkpoint) / "bench")
    plot = plot_pareto(out / "pareto.png", extra["curves"], extra["points"],
                       xlabel="mean MACs / baseline MACs", title=f"{name}: accuracy vs compute")
    notes = [f"baseline: {reference}; BatchNorm folded into convolutions in both alike.",
             "Thresholds come from the calibration split; every figure is measured on the "
             "test split in this run. 'target <= x pt drop' is what the threshold aimed at; "
             "test_drop_vs_reference_pt is the result, test_drop_ci95_pt its paired 95% "
             "interval. Every method of a runtime is timed on the same samples, interleaved "
             "with its baseline; ratios are to that runtime's baseline.",
             "no exit fires: every head and decision runs and nothing leaves (the overhead).",
             "oracle: each sample leaves at the earliest correct exit (a bound, not runnable)."]
    report = write_report(out, "bench", rows, dataset=ds.name, model=str(args.checkpoint),
                          sections={"anytime (stop at exit k)": extra["anytime"],
                                    "exit subsets (latency selection, calibration split)":
                                    extra["subsets"]},
                          notes=notes, command=_command_line(),
                          settings=vars(s), test_samples=len(ds.test),
                          calib_samples=len(ds.calib), plots=[plot.name])
    _print_rows(report)
    print(f"wrote {out / 'report.md'}, report.json and {plot.name}")
    return 0


def _cmd_list(args) -> int:
    from .stages import list_cuts
    from .zoo import create_model, list_models

    if args.what == "models":
        print("\n".join(list_models()))
    elif args.what == "methods":
        from .methods import METHODS

        for name in METHODS.list():
            print(f"{name:18s} {METHODS.get(name).paper}: {METHODS.get(name).summary}")
    else:
        shape = tuple(int(v) for v in args.input_shape.split(","))
        print("\n".join(list_cuts(create_model(args.model, input_shape=shape))))
    return 0


def _checkpoint_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="for a checkpoint trained from your own code: the model again as "
                        "path/to/file.py:function; runs code from that file (a checkpoint "
                        "never imports code by itself)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitexit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a zoo model or your own and save a checkpoint")
    p.add_argument("--model", required=True,
                   help=f"a zoo model (`splitexit list models`), or {MODEL_FILE_HELP}")
    p.add_argument("--cuts", default=None,
                   help="with --model file.py:function: comma-separated cut names where exit "
                        "heads go (splitexit.list_cuts(model) lists them); with --strategy "
                        "baseline, where the model is staged (optional)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--strategy", default=None, choices=["baseline", "joint", "heads-only"],
                   help="plain training: baseline (no exits), joint (default) or heads-only")
    # no choices=: listing them would import torch and every method whenever the CLI starts
    # (the torch-free edge runs this parser too); an unknown name gets the list in its error
    p.add_argument("--method", default=None,
                   help="instead of --strategy: a published method's recipe (heads, training, "
                        "policy and fit step; `splitexit list methods`). Methods that keep the "
                        "backbone frozen need --init with a trained baseline")
    p.add_argument("--exits", default=None,
                   help="zoo model: comma-separated cut names for exit heads (default: the "
                        "model's own)")
    p.add_argument("--head", default=None,
                   help="exit head type (linear, sdn, conv, depthwise, ...; default: the zoo "
                        "model's own, linear for your own model)")
    p.add_argument("--init", default=None, help="checkpoint whose backbone initialises this one")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="choose exit thresholds on the calibration split")
    p.add_argument("checkpoint")
    _checkpoint_model_arg(p)
    p.add_argument("--dataset", default=None)
    p.add_argument("--policy", default=None, choices=["maxprob", "entropy", "margin",
                                                      "patience"],
                   help="the policy family whose thresholds are chosen (default: the one the "
                        "checkpoint's --method fitted, e.g. ZTW's ensemble, else maxprob)")
    p.add_argument("--max-drop", type=float, default=0.01,
                   help="maximum accuracy drop vs the final exit, as a fraction (0.01 = 1 pt)")
    p.add_argument("--macs-budget", type=float, default=None,
                   help="instead: mean MACs as a fraction of running every exit")
    calibration_mode_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("evaluate", help="real early-exit inference on the test split")
    p.add_argument("checkpoint")
    _checkpoint_model_arg(p)
    p.add_argument("--dataset", default=None)
    p.add_argument("--policy", default=None, help="policy name or JSON (default: calibrated)")
    p.add_argument("--latency-samples", type=int, default=500)
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="your multi-exit checkpoint against its baseline: accuracy "
                       "at drop targets, MACs, batch-1 latency, throughput, no-exit overhead "
                       "(report.json/.md and a plot)")
    p.add_argument("checkpoint", help="a multi-exit checkpoint (splitexit train --out DIR)")
    _checkpoint_model_arg(p)
    p.add_argument("--baseline", default=None,
                   help="a checkpoint of the network without exits to compare with (default: "
                        "the checkpoint's own backbone without its exit heads)")
    p.add_argument("--baseline-model", default=None,
                   help="--model for a --baseline trained from your own code")
    p.add_argument("--dataset", default=None, help="default: the one the checkpoint records")
    p.add_argument("--drops", default="0.5,1", help="accuracy-drop targets in points (0.5,1)")
    p.add_argument("--policy", default="maxprob", choices=["maxprob", "entropy", "margin"])
    calibration_mode_args(p)
    p.add_argument("--latency-samples", type=int, default=1000,
                   help="test samples timed at batch 1 (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    p.add_argument("--runtimes", default="eager",
                   help="eager and/or torchscript, comma-separated (each its own baseline)")
    p.add_argument("--no-select-exits", action="store_true",
                   help="skip choosing the subset of exit heads with the lowest latency")
    p.add_argument("--max-overhead", type=float, default=1.10,
                   help="also the best exit subset whose no-exit cost is at most this times "
                        "the baseline's (0 = no bound)")
    p.add_argument("--label", default="exits", help="how the rows name the model's training")
    p.add_argument("--out", default=None, help="output directory (default CHECKPOINT/bench)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("list", help="list zoo models, a model's cuts, or the published methods")
    p.add_argument("what", choices=["models", "cuts", "methods"])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--input-shape", default="1,28,28")
    p.set_defaults(func=_cmd_list)

    for name in COMMAND_MODULES:
        _register(name, sub)
    return parser


def _register(module: str, subparsers) -> None:
    """Add a module's commands; on a device without PyTorch (the edge install) the commands
    that need it are left out and the others (``edge``) still work."""
    try:
        importlib.import_module(module).register(subparsers)
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":  # every method timed in the same allocator state
        from .measure import steady_allocator

        steady_allocator()
    try:
        return args.func(args)
    except SplitexitError as exc:
        print(f"splitexit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
