"""CBNet benchmark: LeNet, BranchyNet (B-LeNet, real exits), truncated B-LeNet and CBNet.

Per data set, in one run: test accuracy; whole-test-set latency at batch 1 and batched
throughput, in PyTorch and in ONNX Runtime (timed interleaved, chunk by chunk, so load on a
shared machine hits every method alike); Raspberry Pi 4 latency and energy **estimates**
(host latency scaled by the ratio of MAC rates, power x time); the share of hard samples.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import cbnet
from ..cost import count_macs, param_bytes
from ..data import Dataset, load_dataset
from ..devices import DeviceProfile, get_device, measure_host_profile
from ..multiexit import MultiExitModel
from ..policies import Entropy
from ..report import write_report
from ..runtime.ort import OrtSession
from ..training import Baseline, train
from ..zoo import create_model
from .measure import interleaved_latency, throughput, torch_threads

__all__ = ["CBNetBenchSettings", "run_cbnet_bench", "onnx_branchynet", "register"]


@dataclass
class CBNetBenchSettings:
    """What the suite trains and how it measures.

    Attributes:
        datasets: data sets to run, each end to end.
        lenet_epochs: LeNet baseline epochs.
        branchy_epochs: B-LeNet epochs (BranchyNet joint loss, weights 1.0 / 0.3).
        branchy_from_lenet: start B-LeNet's main path from the trained LeNet (saves epochs).
        max_drop: BranchyNet's entropy threshold is the cheapest within this accuracy drop of
            its final exit on the calibration split; the same ``T`` labels easy / hard.
        converter_epochs: converting autoencoder epochs, raised on small training sets to
            reach ``converter_min_steps`` optimiser steps (it first learns the mean target and
            only then separates the classes).
        converters: converter kinds to train (``"fc"`` published, ``"conv"``).
        finetune_epochs: epochs of the extra "fine-tuned classifier" CBNet row (0: no row).
        train_limit: use only this many training images per data set (``None``: all).
        latency_samples: test images timed at batch 1 (``None``: the whole test set).
        threads: torch and ONNX Runtime threads while timing.
    """

    datasets: tuple[str, ...] = ("fashion-mnist", "mnist5k")
    lenet_epochs: int = 3
    branchy_epochs: int = 2
    branchy_from_lenet: bool = True
    lr: float = 2e-3
    max_drop: float = 0.01
    converter_epochs: int = 6
    converter_min_steps: int = 2000
    converter_lr: float = 2e-3
    converters: tuple[str, ...] = ("fc",)
    targets_per_class: int = 1
    finetune_epochs: int = 1
    train_limit: int | None = None
    latency_samples: int | None = None
    latency_chunks: int = 20
    throughput_batch: int = 256
    threads: int = 1
    batch_size: int = 128
    seed: int = 0
    progress: bool | None = None


def onnx_branchynet(model: MultiExitModel, policy: Entropy, directory: Path,
                    example: torch.Tensor, threads: int = 1) -> Callable:
    """B-LeNet with real early exits on ONNX Runtime: its bundle's pieces (up to exit 0 with
    the branch; the rest) run by :class:`~splitexit.runtime.OrtProgram`, the policy's entropy
    statistic on numpy between them; only hard samples run the second piece.

    Returns:
        numpy images in, predicted class per image out.
    """
    from ..deploy import bundle, load_bundle

    b = load_bundle(bundle(model, directory, policy=policy, example=example, measure=False))
    program = b.program(threads, exit_graph=False)
    return lambda x: program.infer(x, b.policy).predictions


def _accuracy(pred, y: torch.Tensor) -> float:
    pred = torch.as_tensor(pred)
    return float((pred == y).double().mean())


def _batched(fn: Callable, x: torch.Tensor, size: int = 1024) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.as_tensor(fn(x[i: i + size])) for i in range(0, len(x), size)])


def _dataset_rows(ds: Dataset, s: CBNetBenchSettings, host: DeviceProfile, rpi: DeviceProfile,
                  work: Path) -> tuple[list[dict], dict]:
    """Train everything on one data set and measure every method; rows plus facts."""
    train_split = ds.train if s.train_limit is None else ds.train.subset(
        min(s.train_limit, len(ds.train)), seed=s.seed)
    facts: dict = {"dataset": ds.name, "train_images": len(train_split),
                   "test_images": len(ds.test)}
    torch.manual_seed(s.seed)
    lenet = create_model("lenet", ds.num_classes, ds.input_shape)
    h = train(lenet, train_split, Baseline(), epochs=s.lenet_epochs, lr=s.lr,
              batch_size=s.batch_size, seed=s.seed, progress=s.progress)
    facts["lenet_train_s"] = h.seconds
    branchy, h = cbnet.train_branchynet(
        train_split, ds.num_classes, ds.input_shape, epochs=s.branchy_epochs, lr=s.lr / 2
        if s.branchy_from_lenet else s.lr, batch_size=s.batch_size, seed=s.seed + 1,
        init=lenet if s.branchy_from_lenet else None, progress=s.progress)
    facts["branchynet_train_s"] = h.seconds
    threshold = cbnet.choose_threshold(branchy, ds.calib, s.max_drop)
    entropy, predictions = cbnet.first_exit_entropy(branchy, train_split.x)
    targets = cbnet.select_targets(train_split.x, train_split.y, entropy, threshold,
                                   ds.num_classes, predictions=predictions,
                                   per_class=s.targets_per_class, seed=s.seed)
    facts.update(threshold=threshold, train_hard_share=targets.hard_fraction,
                 target_index=targets.target_index.tolist(),
                 fallback_classes=targets.fallback_classes)
    light = cbnet.light_classifier(branchy)
    policy = Entropy(threshold)

    # name -> (torch fn on a tensor batch -> predictions, onnx fn on numpy -> predictions, macs)
    methods: dict[str, dict] = {}
    example = torch.full((1, *ds.input_shape), 0.5)
    lenet.eval()
    methods["LeNet"] = {"torch": lenet, "macs": count_macs(lambda: lenet(example)),
                        "bytes": param_bytes(lenet)}
    methods["BranchyNet (B-LeNet, entropy exits)"] = {
        "torch": lambda x: branchy.infer(x, policy).predictions, "branchy": True,
        "bytes": param_bytes(branchy)}
    methods["B-LeNet truncated after exit 0"] = {
        "torch": light, "macs": count_macs(lambda: light(example)), "bytes": param_bytes(light)}
    pipelines: dict[str, cbnet.CBNetPipeline] = {}
    steps_per_epoch = math.ceil(len(train_split) / s.batch_size)
    converter_epochs = max(s.converter_epochs, math.ceil(s.converter_min_steps / steps_per_epoch))
    facts["converter_epochs"] = converter_epochs
    for kind in s.converters:
        torch.manual_seed(s.seed)
        converter = cbnet.ConvertingAutoencoder(ds.input_shape, kind)
        h = cbnet.train_converter(converter, train_split.x, targets, epochs=converter_epochs,
                                  lr=s.converter_lr, batch_size=s.batch_size, seed=s.seed,
                                  progress=s.progress)
        facts[f"converter_{kind}_train_s"] = h.seconds
        facts[f"converter_{kind}_loss"] = h.loss
        pipelines[f"CBNet ({kind} converter)"] = cbnet.CBNetPipeline(
            converter, light, ds.num_classes).eval()
        if s.finetune_epochs:
            tuned = copy.deepcopy(light)
            h = cbnet.finetune_classifier(tuned, converter, train_split,
                                          epochs=s.finetune_epochs, batch_size=s.batch_size,
                                          seed=s.seed, progress=s.progress)
            facts[f"finetune_{kind}_train_s"] = h.seconds
            pipelines[f"CBNet ({kind} converter, fine-tuned classifier)"] = cbnet.CBNetPipeline(
                converter, tuned, ds.num_classes).eval()
    for name, pipe in pipelines.items():
        methods[name] = {"torch": pipe, "macs": pipe.macs(), "bytes": param_bytes(pipe)}

    # ONNX exports
    onnx_dir = work / ds.name
    for i, m in enumerate(methods.values()):
        if m.get("branchy"):
            m["onnx"] = onnx_branchynet(branchy, policy, onnx_dir / "branchynet",
                                        ds.calib.x[:2], s.threads)
        else:
            session = OrtSession(cbnet.export_onnx(
                m["torch"], onnx_dir / f"method{i}.onnx", ds.input_shape), s.threads)
            m["onnx"] = (lambda sess: lambda x: sess.run_arrays([x])[0].argmax(1))(session)

    x, y = ds.test.x, ds.test.y
    x_np = x.numpy()
    result = branchy.infer(x, policy)
    branchy_fracs = result.exit_fractions(2)
    first_macs = count_macs(lambda: light(example))
    full_macs = count_macs(lambda: branchy(example))  # backbone and branch: a hard sample
    methods["BranchyNet (B-LeNet, entropy exits)"]["macs"] = (
        branchy_fracs[0] * first_macs + branchy_fracs[1] * full_macs)
    facts["test_hard_share"] = branchy_fracs[1]

    def torch_pred(m):
        fn = m["torch"]
        return lambda t: fn(t).argmax(1) if not m.get("branchy") else fn(t)

    limit = s.latency_samples or len(x)
    with torch_threads(s.threads):
        lat_torch = interleaved_latency({n: torch_pred(m) for n, m in methods.items()},
                                        x[:limit], warmup=10, chunks=s.latency_chunks)
        lat_onnx = interleaved_latency(
            {n: (lambda f: lambda t: f(t.numpy()))(m["onnx"]) for n, m in methods.items()},
            x[:limit], warmup=10, chunks=s.latency_chunks)
        thr_torch = {n: throughput(torch_pred(m), x, s.throughput_batch)
                     for n, m in methods.items()}
        thr_onnx = {n: throughput(lambda t, f=m["onnx"]: f(t.numpy()), x, s.throughput_batch)
                    for n, m in methods.items()}

    rows = []
    for name, m in methods.items():
        pred = _batched(torch_pred(m), x)
        pred_onnx = np.concatenate([m["onnx"](x_np[i: i + 1024])
                                    for i in range(0, len(x_np), 1024)])
        lt, lo = lat_torch[name], lat_onnx[name]
        rpi_s = rpi.scale_latency(lt["mean_ms"] / 1e3, host)
        rpi_onnx_s = rpi.scale_latency(lo["mean_ms"] / 1e3, host)
        row = {"dataset": ds.name, "method": name, "accuracy": _accuracy(pred, y),
               "onnx_accuracy": _accuracy(pred_onnx, y),
               "onnx_agreement": float((torch.as_tensor(pred_onnx) == pred).double().mean()),
               "mean_macs": m["macs"], "weight_bytes": m["bytes"],
               "latency_ms": lt["mean_ms"], "latency_p50_ms": lt["median_ms"],
               "test_set_latency_s": lt["total_s"], "throughput_sps": thr_torch[name],
               "onnx_latency_ms": lo["mean_ms"], "onnx_latency_p50_ms": lo["median_ms"],
               "onnx_test_set_latency_s": lo["total_s"], "onnx_throughput_sps": thr_onnx[name],
               "rpi4_latency_ms_est": 1e3 * rpi_s,
               "rpi4_energy_mj_est": rpi.energy_mj(rpi_s),
               "rpi4_test_set_energy_j_est": rpi.energy_mj(rpi_s) * len(x) / 1e3,
               "rpi4_latency_ms_from_macs_est": 1e3 * rpi.compute_time_s(m["macs"]),
               "rpi4_onnx_latency_ms_est": 1e3 * rpi_onnx_s,
               "rpi4_onnx_energy_mj_est": rpi.energy_mj(rpi_onnx_s)}
        if m.get("branchy"):
            row.update(exit_fractions=branchy_fracs, hard_share=branchy_fracs[1],
                       threshold=threshold)
        rows.append(row)
    facts["latency_samples"] = limit
    return rows, facts


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's targets per data set and CBNet variant: met or not, with the figures."""
    out = []
    by = {(r["dataset"], r["method"]): r for r in rows}
    for r in rows:
        if not r["method"].startswith("CBNet"):
            continue
        lenet = by[(r["dataset"], "LeNet")]
        branchy = by[(r["dataset"], "BranchyNet (B-LeNet, entropy exits)")]
        entry = {"dataset": r["dataset"], "method": r["method"],
                 "accuracy_minus_branchynet_pt": 100 * (r["accuracy"] - branchy["accuracy"]),
                 "accuracy_target_met": r["accuracy"] >= branchy["accuracy"]}
        for prefix, label in (("", "torch"), ("onnx_", "onnx")):
            vs_b = branchy[f"{prefix}latency_ms"] / r[f"{prefix}latency_ms"]
            vs_l = lenet[f"{prefix}latency_ms"] / r[f"{prefix}latency_ms"]
            entry.update({f"{label}_speedup_vs_branchynet": vs_b,
                          f"{label}_speedup_vs_lenet": vs_l,
                          f"{label}_speedup_target_met": vs_b >= 3.8 and vs_l >= 5.0,
                          f"{label}_p50_speedup_vs_branchynet":
                              branchy[f"{prefix}latency_p50_ms"] / r[f"{prefix}latency_p50_ms"],
                          f"{label}_p50_speedup_vs_lenet":
                              lenet[f"{prefix}latency_p50_ms"] / r[f"{prefix}latency_p50_ms"]})
        entry["macs_ratio_vs_branchynet"] = r["mean_macs"] / branchy["mean_macs"]
        entry["macs_ratio_vs_lenet"] = r["mean_macs"] / lenet["mean_macs"]
        out.append(entry)
    return out


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.6), dpi=110,
                             squeeze=False)
    for ax, name in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == name]
        pos = np.arange(len(sub))
        ax.bar(pos - 0.2, [r["latency_ms"] for r in sub], 0.4, label="PyTorch")
        ax.bar(pos + 0.2, [r["onnx_latency_ms"] for r in sub], 0.4, label="ONNX Runtime")
        ax.set_xticks(pos)
        ax.set_xticklabels([r["method"].replace(" (", "\n(").replace(", ", ",\n")
                            for r in sub], fontsize=6)
        ax.set_ylabel("batch-1 latency per image (ms, this host, 1 thread)")
        ax.set_title(name)
        for p, r in zip(pos, sub):
            ax.text(p, max(r["latency_ms"], r["onnx_latency_ms"]), f"{r['accuracy']:.3f}",
                    ha="center", va="bottom", fontsize=7)
        ax.legend(fontsize=8)
    fig.suptitle("batch-1 latency (bars) and accuracy (numbers)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_cbnet_bench(out_dir: str | Path, settings: CBNetBenchSettings | None = None,
                    command: str | None = None) -> dict:
    """Run the suite and write ``report.json``, ``report.md`` and ``latency.png``.

    Args:
        out_dir: output directory (no model weights are written there).
        settings: what to train and measure.
        command: the command line, recorded in the report.

    Returns:
        The report dict.
    """
    s = settings or CBNetBenchSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    host = measure_host_profile(threads=s.threads)
    rpi = get_device("rpi4")
    rows, facts = [], []
    with tempfile.TemporaryDirectory(prefix="splitexit-cbnet-") as work:
        for name in s.datasets:
            ds = load_dataset(name, seed=s.seed)
            # Training too runs on s.threads threads: on a shared machine more only contend.
            with torch_threads(s.threads):
                r, f = _dataset_rows(ds, s, host, rpi, Path(work))
            rows += r
            facts.append(f)
    targets = _targets(rows)
    _plot(out / "latency.png", rows)
    notes = [
        "Latency: whole test set (or latency_samples) one image at a time, mean per image, "
        f"{s.threads} thread(s), methods interleaved chunk by chunk in one run on a shared "
        "machine; throughput: batches of throughput_batch.",
        "PyTorch CBNet and BranchyNet validate their input on every call (CBNetPipeline's "
        "range check, MultiExitModel.infer's check_input); LeNet and the truncated B-LeNet "
        "do not. In ONNX Runtime no method validates.",
        "BranchyNet in ONNX Runtime: its bundle's two pieces (up to exit 0 with the branch; "
        "the rest) run by splitexit.runtime.OrtProgram, the Entropy policy's statistic in "
        "NumPy between them; only hard samples run the second piece.",
        "rpi4_* are ESTIMATES, not measurements: host latency x (host GMAC/s / Raspberry Pi 4 "
        "GMAC/s) from splitexit.devices (host rate measured by measure_host_profile, Pi rate "
        "an estimate), energy = Pi active power x estimated time; rpi4_latency_ms_from_macs_est "
        "= MACs / the Pi's estimated MAC rate (compute only, no framework overhead).",
        "Speedups use mean latency (the whole test set's time, as published); the *_p50_* "
        "ones use medians, which load spikes on a shared machine disturb less.",
        "Targets (TECHNIQUES.md section 3): Fashion-MNIST CBNet accuracy >= BranchyNet's "
        "(published 89.59 vs 87.8 %), batch-1 latency >= 3.8x lower than BranchyNet's and "
        ">= 5x lower than LeNet's (published on a Pi 4 with the authors' Keras/Chainer "
        "code: 3.83x and 6.9x). See the 'targets' table.",
        "mean_macs: MACs per image (BranchyNet: averaged over its real exits on the test set); "
        "weight_bytes: fp32 parameters a batch-1 pass reads (the fc converter's 3 MB make it "
        "memory-bound at batch 1).",
        f"Training was reduced to fit a shared 2-core machine: LeNet {s.lenet_epochs} epochs, "
        f"B-LeNet {s.branchy_epochs} epochs"
        + (" started from the trained LeNet" if s.branchy_from_lenet else "")
        + f", converter >= {s.converter_epochs} epochs and >= {s.converter_min_steps} steps "
        "(per data set in 'per data set'), classifier fine-tuning "
        f"{s.finetune_epochs} epoch(s)"
        + (f", {s.train_limit} training images" if s.train_limit else ", all training images")
        + ".",
    ]
    return write_report(out, "cbnet", rows, dataset=",".join(s.datasets),
                        model="lenet / b-lenet / cbnet",
                        sections={"targets": targets, "per data set": facts},
                        notes=notes, command=command, plots=["latency.png"],
                        settings=asdict(s), host_profile=host.to_dict(),
                        device_profile=rpi.to_dict(),
                        wall_seconds=time.perf_counter() - t0)


def _run(args: argparse.Namespace) -> int:
    from ..report import markdown_table

    settings = CBNetBenchSettings(
        datasets=tuple(args.datasets.split(",")), lenet_epochs=args.lenet_epochs,
        branchy_epochs=args.branchy_epochs, converter_epochs=args.converter_epochs,
        converters=tuple(args.converters.split(",")), finetune_epochs=args.finetune_epochs,
        targets_per_class=args.targets_per_class, train_limit=args.train_limit,
        latency_samples=args.latency_samples, threads=args.threads, seed=args.seed,
        max_drop=args.max_drop, progress=True if args.progress else None)
    command = "splitexit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_cbnet_bench(args.out, settings, command)
    print(markdown_table(report["rows"], ["dataset", "method", "accuracy", "latency_ms",
                                          "onnx_latency_ms", "rpi4_energy_mj_est"]))
    print(markdown_table(report["sections"]["targets"]))
    print(f"wrote {Path(args.out) / 'report.md'}, report.json and latency.png")
    return 0


def register(subparsers) -> None:
    """Add ``splitexit bench cbnet``."""
    d = CBNetBenchSettings()
    p = subparsers.add_parser("cbnet", help="LeNet vs BranchyNet vs CBNet: accuracy, latency "
                              "(PyTorch and ONNX Runtime), Raspberry Pi 4 energy estimate")
    p.add_argument("--out", default="runs/bench-cbnet", help="output directory")
    p.add_argument("--datasets", default=",".join(d.datasets))
    p.add_argument("--lenet-epochs", type=int, default=d.lenet_epochs)
    p.add_argument("--branchy-epochs", type=int, default=d.branchy_epochs)
    p.add_argument("--converter-epochs", type=int, default=d.converter_epochs)
    p.add_argument("--converters", default=",".join(d.converters),
                   help="comma-separated converter kinds: fc (published), conv")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--targets-per-class", type=int, default=d.targets_per_class)
    p.add_argument("--max-drop", type=float, default=d.max_drop)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--latency-samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--progress", action="store_true", help="always show progress bars")
    p.set_defaults(func=_run)

