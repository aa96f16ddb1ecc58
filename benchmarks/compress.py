"""Compression and deployment benchmark (suite ``compress``) on Fashion-MNIST.

Part 1, predefined sparsity and int8: an MLP trained dense and with predefined sparsity at
several densities (plus the published 784-40-40-10 shape with fan-outs 2/9/10), each
optionally quantized to int8 with ONNX Runtime: accuracy, stored bytes (the real files),
effective MACs, and latency / throughput measured in PyTorch and ONNX Runtime in the same run.

Part 2, deployment: a multi-exit ResNet-8 bundled (:func:`splitexit.deploy.bundle`) and run on
ONNX Runtime in the bundle's two forms (the pieces with numpy decisions; the batch-1 exit
graph), against the whole model as one ONNX Runtime graph. Thresholds are chosen
on the calibration split; accuracy on the test split; batch-1 latency interleaved sample by
sample so that load on the machine hits both alike.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from splitexit.calibration import choose_operating_point, sweep
from splitexit.compress.quantize import check_quantized, onnx_weight_bytes, quantize_onnx
from splitexit.compress.sparsity import (
    choose_kernels,
    dense_weight_bytes,
    effective_macs,
    load_sparse,
    save_sparse,
    sparse_layers,
    sparsify,
)
from splitexit.cost import cost_table, count_macs, mean_macs
from splitexit.data import Dataset, load_dataset
from splitexit.deploy import bundle, load_bundle
from splitexit.errors import InputError
from splitexit.export import export_piece
from splitexit.measure import interleaved_latency, interleaved_throughput, torch_threads
from splitexit.multiexit import MultiExitModel
from splitexit.policies import MaxProb
from splitexit.report import plot_pareto, write_report
from splitexit.runtime.loop import ExitResult
from splitexit.runtime.ort import OrtProgram, OrtSession
from splitexit.training import Baseline, JointWeighted, train
from splitexit.zoo import create_model, create_multiexit

__all__ = ["CompressSettings", "run_compress_bench", "register"]

DISK_FORMATS = ("float16", "int8")
DISK_LABELS = {"float16": "fp16", "int8": "int8"}


@dataclass
class CompressSettings:
    """What the suite trains and how it measures.

    Attributes:
        hidden: hidden sizes of the MLP compared dense vs sparse.
        densities: predefined-sparsity densities of its layers with the published (cyclic)
            pattern (the output layer gets the least density that still connects every input
            when this one cannot).
        block_densities: densities run with block patterns (``1 / groups``; layers whose
            shape the groups do not divide, e.g. the 10-unit output layer, stay cyclic).
        published: also run the published 784-40-40-10 MLP with fan-outs 2/9/10.
        epochs: MLP training epochs (same for dense and sparse).
        train_samples: training samples (``None``: the whole training split).
        calib_samples: calibration samples for int8 quantization.
        exit_widths: ResNet-8 channel widths of the early-exit model.
        exit_epochs, exit_train_samples: its training.
        exit_model: load this multi-exit ResNet-8 checkpoint instead of training one (e.g. the
            one ``python -m benchmarks early-exit`` trained on the full training split).
        selection_samples: calibration inputs each candidate exit subset's graph is timed on.
        parts: ``"sparsity"`` (MLPs dense vs sparse vs int8) and/or ``"exits"`` (early exits
            on ONNX Runtime).
        max_drop: accuracy drop allowed when choosing exit thresholds (calibration split).
        latency_samples: test samples timed one at a time.
        throughput_batch: batch size for throughput.
        tolerance: int8 accuracy drop that triggers the collapse warning.
        threads: threads for timing (PyTorch and ONNX Runtime).
    """

    hidden: tuple[int, ...] = (1024, 512)
    densities: tuple[float, ...] = (0.5, 0.25, 0.1)
    block_densities: tuple[float, ...] = (0.25, 0.125)
    published: bool = True
    epochs: int = 6
    lr: float = 2e-3
    train_samples: int | None = None
    calib_samples: int = 2000
    exit_widths: tuple[int, ...] = (16, 32, 64)
    exit_epochs: int = 4
    exit_train_samples: int | None = 20000
    exit_model: str | None = None
    selection_samples: int = 300
    parts: tuple[str, ...] = ("sparsity", "exits")
    max_drop: float = 0.005
    latency_samples: int = 1000
    throughput_batch: int = 256
    throughput_samples: int = 4096
    tolerance: float = 0.01
    threads: int = 1
    seed: int = 0
    progress: bool | None = None
    notes: list[str] = field(default_factory=list)


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _batched(fn: Callable, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i: i + batch]) for i in range(0, len(x), batch)])


# Part 1: sparsity and int8 ---------------------------------------------------------------
def _mlp(ds: Dataset, hidden) -> torch.nn.Module:
    return create_model("mlp", ds.num_classes, ds.input_shape, hidden=tuple(hidden))


def _layer_densities(model: torch.nn.Module, density: float) -> dict[str, float]:
    """``density`` for every Linear layer, raised where the shape needs it to connect all inputs."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            least = math.ceil(m.in_features / m.out_features) / m.in_features
            out[name] = max(density, least)
    return out


def _published_densities(model: torch.nn.Module) -> dict[str, float]:
    """Fan-outs 2 / 9 / 10 of the published 800-40-40-10 MLP, as densities of our layers."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    fan_outs = (2, 9, 10)
    return {n: fo / m.out_features for (n, m), fo in zip(layers, fan_outs)}


def _dense_file_bytes(model: torch.nn.Module, path: Path) -> int:
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(path))
    return path.stat().st_size


def _train_mlp(ds: Dataset, hidden, densities: Mapping[str, float] | None,
               s: CompressSettings, pattern: str = "cyclic", cache: Path | None = None
               ) -> tuple[torch.nn.Module, float | None]:
    """Train one MLP, or load it from ``cache`` (a directory keyed by every training setting)
    when an earlier run saved it there."""
    file = None if cache is None else cache / "weights.safetensors"
    if file is not None and file.is_file():
        model = _mlp(ds, hidden)
        if densities:
            load_sparse(model, file)
        else:
            model.load_state_dict(load_file(str(file)))
        return model.eval(), None
    torch.manual_seed(s.seed)
    model = _mlp(ds, hidden)
    if densities:
        sparsify(model, densities, seed=s.seed, pattern=pattern)
    data = ds.train if s.train_samples is None else ds.train.subset(s.train_samples, s.seed)
    history = train(model, data, Baseline(), epochs=s.epochs, lr=s.lr, seed=s.seed,
                    progress=s.progress)
    model.eval()
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        if densities:
            save_sparse(model, file)
        else:
            _dense_file_bytes(model, file)
    return model, history.seconds


def _sparsity_rows(ds: Dataset, s: CompressSettings, work: Path, models: Path | None = None
                   ) -> tuple[list[dict], list]:
    test_x, test_y = ds.test.x, ds.test.y
    calib_x = ds.calib.x[: s.calib_samples]
    example = test_x[:1]
    variants: list[tuple[str, torch.nn.Module, dict]] = []
    train_seconds = {}
    shapes = [("mlp " + "-".join(map(str, (784, *s.hidden, 10))), s.hidden,
               [None, *s.densities, *((d, "auto") for d in s.block_densities)])]
    if s.published:
        shapes.append(("mlp 784-40-40-10", (40, 40), [None, "published"]))
    for label, hidden, dens_list in shapes:
        for d in dens_list:
            probe = _mlp(ds, hidden)
            pattern = "cyclic"
            if isinstance(d, tuple):
                d, pattern = d
            if d is None:
                densities, method = None, "dense"
            elif d == "published":
                densities, method = _published_densities(probe), "predefined fan-out 2/9/10"
            else:
                densities = _layer_densities(probe, d)
                method = f"predefined {100 * d:g}%" + (" block" if pattern != "cyclic" else "")
            slug = "-".join(f"{label} {method}".split()).replace("/", "_").replace("%", "pct")
            cache = None if models is None else models / (
                f"{slug}-e{s.epochs}-n{s.train_samples or 'all'}-lr{s.lr:g}-s{s.seed}")
            model, seconds = _train_mlp(ds, hidden, densities, s, pattern, cache)
            train_seconds[f"{label} {method}"] = seconds
            variants.append((label, model, {"method": method, "densities": densities,
                                            "hidden": hidden}))
    rows: list[dict] = []
    torch_fns, ort_fns, torch_fns_b, ort_fns_b = {}, {}, {}, {}
    infos = {}
    for k, (label, model, info) in enumerate(variants):
        key = f"{label} | {info['method']}"
        sparse = bool(sparse_layers(model))
        path = work / f"v{k}"
        path.mkdir(parents=True, exist_ok=True)
        acc = _accuracy(_batched(model, test_x), test_y)
        dense_macs = count_macs(lambda model=model: model(example))
        macs = effective_macs(model, example) if sparse else dense_macs
        stored = (save_sparse(model, path / "weights.safetensors") if sparse
                  else _dense_file_bytes(model, path / "weights.safetensors"))
        with torch_threads(s.threads):  # before the export, which traces the chosen kernels
            kernels_b1 = choose_kernels(model, example) if sparse else {}
        fp32 = export_piece(model, test_x[:2], path / "model.onnx")
        int8 = quantize_onnx(fp32, calib_x, path / "model.int8.onnx")
        q = check_quantized(fp32, int8, test_x, test_y, tolerance=s.tolerance,
                            on_collapse="warn")
        infos[key] = {"label": label, "method": info["method"], "accuracy": acc,
                      "macs": macs, "dense_macs": dense_macs, "stored": stored,
                      "ort_int8_stored": onnx_weight_bytes(int8), "quant": q.to_dict(),
                      "sparse": sparse,
                      "kernels_b1": {n: v["kernel"] for n, v in kernels_b1.items()},
                      "model": model, "densities": info["densities"]}
        ort32, ort8 = OrtSession(fp32, s.threads), OrtSession(int8, s.threads)
        torch_fns[key] = model
        ort_fns[key] = ort32
        ort_fns[key + " | int8"] = ort8
        torch_fns_b[key], ort_fns_b[key], ort_fns_b[key + " | int8"] = model, ort32, ort8
        infos[key]["disk"] = {}
        for values in (DISK_FORMATS if sparse else ()):
            # fp16 / int8 weights on disk, converted back to float32 when loaded: what a
            # device would ship, loaded and run like the float model
            disk = path / f"weights.{values}.safetensors"
            stored_bytes = save_sparse(model, disk, values=values)
            # the file records each layer's kernel (chosen above); load_sparse restores it
            reloaded = load_sparse(_mlp(ds, info["hidden"]), disk).eval()
            infos[key]["disk"][values] = {
                "stored": stored_bytes, "model": reloaded,
                "accuracy": _accuracy(_batched(reloaded, test_x), test_y)}
            torch_fns[f"{key} | {values} disk"] = reloaded
            torch_fns_b[f"{key} | {values} disk"] = reloaded
    lat_x = test_x[: s.latency_samples]
    with torch_threads(s.threads):
        torch_lat = interleaved_latency(torch_fns, lat_x)
        ort_lat = interleaved_latency(ort_fns, lat_x)
        # batched kernels are chosen again at the throughput batch size
        kernels_batched = {key: ({n: v["kernel"] for n, v in
                                  choose_kernels(infos[key]["model"],
                                                 test_x[: s.throughput_batch]).items()}
                                 if infos[key]["sparse"] else {}) for key in infos}
        for key, info in infos.items():  # the reloaded copies run the same kernels
            for disk in info["disk"].values():
                for name, layer in sparse_layers(disk["model"]).items():
                    layer.set_kernel(kernels_batched[key][name])
        thr_x = test_x[: s.throughput_samples]
        torch_thr = interleaved_throughput(torch_fns_b, thr_x, s.throughput_batch)
        ort_thr = interleaved_throughput(ort_fns_b, thr_x, s.throughput_batch)
    for key, info in infos.items():
        base_key = next(k for k in infos if infos[k]["label"] == info["label"]
                        and infos[k]["method"] == "dense")
        base = infos[base_key]
        common = {"model": info["label"], "mean_macs": info["macs"],
                  "macs_ratio": info["macs"] / base["dense_macs"]}
        rows.append({"method": info["method"], **common, "accuracy": info["accuracy"],
                     "accuracy_drop_pt": 100 * (base["accuracy"] - info["accuracy"]),
                     "stored_bytes": info["stored"],
                     "bytes_ratio": info["stored"] / base["stored"],
                     "latency_ms": torch_lat[key]["mean_ms"],
                     "latency_p50_ms": torch_lat[key]["median_ms"],
                     "latency_ratio": torch_lat[key]["mean_ms"] / torch_lat[base_key]["mean_ms"],
                     "throughput_sps": torch_thr[key],
                     "throughput_ratio": torch_thr[key] / torch_thr[base_key],
                     "ort_latency_ms": ort_lat[key]["mean_ms"],
                     "ort_latency_ratio": ort_lat[key]["mean_ms"] / ort_lat[base_key]["mean_ms"],
                     "ort_throughput_sps": ort_thr[key],
                     "kernels_batch1": info["kernels_b1"],
                     "kernels_batched": kernels_batched[key],
                     "dense_weight_bytes_in_memory": dense_weight_bytes(info["model"])})
        for values, disk in info["disk"].items():
            disk_key = f"{key} | {values} disk"
            rows.append({"method": f"{info['method']} + {DISK_LABELS[values]} weights on disk",
                         **common, "accuracy": disk["accuracy"],
                         "accuracy_drop_pt": 100 * (base["accuracy"] - disk["accuracy"]),
                         "stored_bytes": disk["stored"],
                         "bytes_ratio": disk["stored"] / base["stored"],
                         "latency_ms": torch_lat[disk_key]["mean_ms"],
                         "latency_p50_ms": torch_lat[disk_key]["median_ms"],
                         "latency_ratio": torch_lat[disk_key]["mean_ms"]
                         / torch_lat[base_key]["mean_ms"],
                         "throughput_sps": torch_thr[disk_key],
                         "throughput_ratio": torch_thr[disk_key] / torch_thr[base_key]})
        q = info["quant"]
        int8_key = key + " | int8"
        rows.append({"method": f"{info['method']} + int8 (ORT static)", **common,
                     "accuracy": q["int8_accuracy"],
                     "accuracy_drop_pt": 100 * (base["accuracy"] - q["int8_accuracy"]),
                     "int8_vs_fp32_drop_pt": 100 * q["accuracy_drop"],
                     "stored_bytes": info["ort_int8_stored"],
                     "bytes_ratio": info["ort_int8_stored"] / base["stored"],
                     "ort_latency_ms": ort_lat[int8_key]["mean_ms"],
                     "ort_latency_ratio": ort_lat[int8_key]["mean_ms"]
                     / ort_lat[base_key]["mean_ms"],
                     "ort_throughput_sps": ort_thr[int8_key],
                     "collapse": q["accuracy_drop"] > s.tolerance})
    summary = [{"model": infos[k]["label"], "method": infos[k]["method"],
                "train_s": train_seconds[f"{infos[k]['label']} {infos[k]['method']}"],
                "layer_densities": infos[k]["densities"]} for k in infos]
    return rows, summary


# Part 2: early exits on ONNX Runtime -------------------------------------------------------
def _exit_model(ds: Dataset, s: CompressSettings) -> tuple[MultiExitModel, float | None]:
    """The early-exit ResNet-8: loaded from ``s.exit_model`` or trained here."""
    if s.exit_model:
        from splitexit.checkpoint import load_multiexit

        model = load_multiexit(s.exit_model, ds.name)
        return model, None
    torch.manual_seed(s.seed)
    model = create_multiexit("resnet8", ds.num_classes, ds.input_shape,
                             widths=tuple(s.exit_widths))
    data = (ds.train if s.exit_train_samples is None
            else ds.train.subset(s.exit_train_samples, s.seed))
    history = train(model, data, JointWeighted(), epochs=s.exit_epochs, lr=s.lr, seed=s.seed,
                    progress=s.progress)
    return model, history.seconds


FORMS = ("exit graph", "pieces")


def _bundled(model: MultiExitModel, policy, directory: Path, example: torch.Tensor,
             threads: int) -> tuple[dict[str, OrtProgram], object]:
    """The bundle of ``model`` with ``policy`` in its two ONNX Runtime forms: ``"exit graph"``
    (the batch-1 exit graph: pieces and threshold test in one graph with If nodes) and
    ``"pieces"`` (one graph per piece, the decisions in numpy between them); and the policy
    as the bundle records it."""
    b = load_bundle(bundle(model, directory, policy=policy, example=example, measure=False))
    return ({"exit graph": b.program(threads, exit_graph=True),
             "pieces": b.program(threads, exit_graph=False)}, b.policy)


def _numpy_fn(program: OrtProgram, policy) -> Callable:
    """Batch-1 early exit on a program, as a deployed device calls it (numpy in)."""
    return lambda x: program.infer(x.numpy(), policy)


def _one_by_one(program: OrtProgram, policy, x: torch.Tensor) -> ExitResult:
    """Every sample of ``x`` run alone (batch 1: the exit graph's form), results joined."""
    results = [program.infer(x[i: i + 1].numpy(), policy) for i in range(len(x))]
    return ExitResult(torch.from_numpy(np.concatenate([r.predictions for r in results])),
                      torch.from_numpy(np.concatenate([r.exit_index for r in results])),
                      torch.from_numpy(np.concatenate([r.logits for r in results])))


def _batched_result(program: OrtProgram, policy, x: torch.Tensor, batch: int = 1000
                    ) -> ExitResult:
    results = [program.infer(x[i: i + batch].numpy(), policy) for i in range(0, len(x), batch)]
    return ExitResult(torch.from_numpy(np.concatenate([r.predictions for r in results])),
                      torch.from_numpy(np.concatenate([r.exit_index for r in results])),
                      torch.from_numpy(np.concatenate([r.logits for r in results])))


def _fastest_graph(model: MultiExitModel, calib_logits: list[torch.Tensor], calib_x, calib_y,
                   reference: float, s: CompressSettings, work: Path
                   ) -> tuple[list[int], object, str, list[dict]]:
    """Per subset of exit heads: the cheapest threshold within the drop, bundled and timed in
    both batch-1 forms (the exit graph; the pieces with numpy decisions) on calibration
    inputs; the fastest (subset, form) wins."""
    heads = model.num_exits - 1
    tried = []
    best = None
    xs = calib_x[: s.selection_samples]
    for mask in range(1, 2 ** heads):
        keep = [e for e in range(heads) if mask >> e & 1]
        # eval(): keep_exits' wrapper starts in train mode, and a forward pass in train mode
        # (cost_table) would update the shared BatchNorm statistics
        sub = model.keep_exits(keep).eval()
        costs = cost_table(sub, calib_x[:2], measure=False)
        logits = [calib_logits[e] for e in keep] + [calib_logits[-1]]
        try:
            op = choose_operating_point(sweep(logits, calib_y, costs.exit_macs, MaxProb()),
                                        reference_accuracy=reference, max_drop=s.max_drop)
        except InputError:
            continue
        forms, policy = _bundled(sub, op.policy, work / f"subset{mask}", calib_x[:2],
                                 s.threads)
        lats = interleaved_latency({f: _numpy_fn(p, policy) for f, p in forms.items()}, xs)
        for form, lat in lats.items():
            tried.append({"exits": [model.exit_names[e] for e in keep], "form": form,
                          "calib_latency_ms": lat["mean_ms"], "calib_accuracy": op.accuracy})
            if best is None or lat["mean_ms"] < best[0]:
                best = (lat["mean_ms"], keep, op.policy, form)
    if best is None:
        raise InputError("no subset of exits meets the accuracy target on calibration data")
    return best[1], best[2], best[3], tried


def _exit_rows(ds: Dataset, s: CompressSettings, work: Path) -> tuple[list[dict], dict]:
    model, train_seconds = _exit_model(ds, s)
    model.eval()
    costs = cost_table(model, ds.calib.x[:2], measure=False)
    calib_logits = model.collect_logits(ds.calib.x)
    reference = _accuracy(calib_logits[-1], ds.calib.y)
    points = sweep(calib_logits, ds.calib.y, costs.exit_macs, MaxProb())
    op = choose_operating_point(points, reference_accuracy=reference, max_drop=s.max_drop)
    test_x, test_y = ds.test.x, ds.test.y
    forms, policy = _bundled(model, op.policy, work / "exits", ds.calib.x[:2], s.threads)
    graph, pieces = forms["exit graph"], forms["pieces"]
    full = OrtSession(export_piece(model.backbone, test_x[:2], work / "full.onnx"), s.threads)
    full_logits = torch.cat([full(test_x[i: i + 1000]) for i in range(0, len(test_x), 1000)])
    full_acc = _accuracy(full_logits, test_y)
    pieces_result = _batched_result(pieces, policy, test_x)
    torch_result = model.infer(test_x, policy)
    graph_result = _one_by_one(graph, policy, test_x)
    keep, sel_policy, form, tried = _fastest_graph(model, calib_logits, ds.calib.x,
                                                   ds.calib.y, reference, s, work)
    chosen = model.keep_exits(keep).eval()
    sel_forms, sel_policy = _bundled(chosen, sel_policy, work / "chosen", ds.calib.x[:2],
                                     s.threads)
    sel_program = sel_forms[form]
    sel_result = _one_by_one(sel_program, sel_policy, test_x)
    sel_macs = mean_macs(sel_result.exit_index,
                         cost_table(chosen, ds.calib.x[:2], measure=False).exit_macs)
    lat_x = test_x[: s.latency_samples]
    with torch_threads(s.threads):
        lat = interleaved_latency({
            "ort full": lambda x: full.run_arrays([x.numpy()]),
            "ort pieces": _numpy_fn(pieces, policy),
            "ort exit graph": _numpy_fn(graph, policy),
            "ort chosen exits": _numpy_fn(sel_program, sel_policy),
            "torch full": model.backbone, "torch early-exit": lambda x: model.infer(x, policy)},
            lat_x, chunks=20)
    full_macs = costs.backbone_macs
    exit_macs = mean_macs(pieces_result.exit_index, costs.exit_macs)
    base = lat["ort full"]

    def timing(name: str) -> dict:
        t = lat[name]
        return {"latency_ms": t["mean_ms"], "latency_p50_ms": t["median_ms"],
                "latency_ratio": t["mean_ms"] / base["mean_ms"],
                "speedup": base["mean_ms"] / t["mean_ms"],
                "speedup_p50": base["median_ms"] / t["median_ms"]}

    def form_row(method: str, result, name: str) -> dict:
        """An ONNX Runtime form's row, compared with PyTorch's exits sample by sample."""
        macs = mean_macs(result.exit_index, costs.exit_macs)
        return {"method": method, "model": "resnet8", "accuracy": result.accuracy(test_y),
                "accuracy_drop_pt": 100 * (full_acc - result.accuracy(test_y)),
                "mean_macs": macs, "macs_ratio": macs / full_macs, **timing(name),
                "exit_fractions": result.exit_fractions(model.num_exits),
                "policy": policy.config(),
                "same_predictions_as_pytorch": float(
                    (result.predictions == torch_result.predictions).double().mean()),
                "same_exits_as_pytorch": float(
                    (result.exit_index == torch_result.exit_index).double().mean())}

    rows = [{"method": "ONNX Runtime: full model (one graph)", "model": "resnet8",
             "accuracy": full_acc, "mean_macs": full_macs, "macs_ratio": 1.0,
             "latency_ms": base["mean_ms"], "latency_p50_ms": base["median_ms"],
             "latency_ratio": 1.0, "speedup": 1.0},
            form_row("ONNX Runtime: early-exit pieces (a graph per piece, numpy decisions)",
                     pieces_result, "ort pieces"),
            form_row("ONNX Runtime: exit graph (If nodes, batch 1)", graph_result,
                     "ort exit graph"),
            {"method": "ONNX Runtime: exits and form chosen for latency",
             "model": "resnet8", "form": form, "accuracy": sel_result.accuracy(test_y),
             "accuracy_drop_pt": 100 * (full_acc - sel_result.accuracy(test_y)),
             "mean_macs": sel_macs, "macs_ratio": sel_macs / full_macs,
             **timing("ort chosen exits"),
             "exit_fractions": sel_result.exit_fractions(chosen.num_exits),
             "exits": [model.exit_names[e] for e in keep] + ["final"],
             "policy": sel_policy.config()},
            {"method": "PyTorch: full model", "model": "resnet8",
             "accuracy": _accuracy(_batched(model.backbone, test_x), test_y),
             "mean_macs": full_macs, "latency_ms": lat["torch full"]["mean_ms"],
             "latency_p50_ms": lat["torch full"]["median_ms"],
             "latency_ratio": lat["torch full"]["mean_ms"] / base["mean_ms"]},
            {"method": "PyTorch: early-exit infer", "model": "resnet8",
             "accuracy": torch_result.accuracy(test_y), "mean_macs": exit_macs,
             "latency_ms": lat["torch early-exit"]["mean_ms"],
             "latency_p50_ms": lat["torch early-exit"]["median_ms"],
             "latency_ratio": lat["torch early-exit"]["mean_ms"] / base["mean_ms"],
             "exit_fractions": torch_result.exit_fractions(model.num_exits)}]
    extra = {"calib_accuracy": op.accuracy, "calib_final_accuracy": reference,
             "exit_train_s": train_seconds, "exit_macs": costs.exit_macs,
             "exit_model": s.exit_model, "exit_subsets_tried": tried,
             "curve": [(p.mean_macs / full_macs, p.accuracy) for p in points]}
    return rows, extra


def run_compress_bench(out: str | Path, settings: CompressSettings | None = None,
                       command: str | None = None, dataset: str = "fashion-mnist") -> dict:
    """Run both parts and write report.json, report.md and a plot into ``out``.

    Raises:
        DatasetMissingError: Fashion-MNIST is not installed (the message says how).
    """
    s = settings or CompressSettings()
    if not s.densities or any(not 0 < d <= 1 for d in s.densities):
        raise InputError(f"densities must be in (0, 1], got {s.densities}")
    out = Path(out)
    ds = load_dataset(dataset, seed=s.seed)
    work = Path(tempfile.mkdtemp(prefix="splitexit-compress-"))
    try:
        unknown = set(s.parts) - {"sparsity", "exits"}
        if unknown or not s.parts:
            raise InputError(f"parts must be among sparsity, exits; got {s.parts}")
        rows, summary, exit_rows, extra = [], [], [], {}
        with torch_threads(s.threads):
            if "sparsity" in s.parts:
                rows, summary = _sparsity_rows(ds, s, work, out / "models")
            if "exits" in s.parts:
                exit_rows, extra = _exit_rows(ds, s, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = _targets(rows, exit_rows, s)
    plots = []
    if exit_rows:
        plots.append(plot_pareto(
            out / "early_exit_ort.png", {"calibration sweep (MaxProb)": extra.pop("curve")},
            {"chosen (test, ORT)": (exit_rows[1]["macs_ratio"], exit_rows[1]["accuracy"]),
             "full model (test, ORT)": (1.0, exit_rows[0]["accuracy"])},
            xlabel="mean MACs / full-model MACs",
            title=f"{dataset}: ResNet-8 early exits on ONNX Runtime").name)
    notes = [
        "Stored bytes are the sizes of real files: dense = safetensors of the state dict; "
        "sparse = ELLPACK safetensors (uint8/int16 input indices + kept values, no mask, no "
        "zeros; a block pattern stores one input permutation instead of the index table); "
        "'+ fp16 / int8 weights on disk' = the same with float16 values, or int8 values and one "
        "scale per output unit, loaded back (to float32) and run in PyTorch: accuracy and "
        "timings are the reloaded model's; '+ int8 (ORT static)' = initializer bytes of the statically "
        "quantized ONNX graph (activations int8 too), with that graph's accuracy.",
        "mean_macs of sparse rows count only kept connections (effective MACs).",
        "PyTorch latency uses, per layer, the kernel (dense on the masked weight, CSR, or the "
        "grouped kernel of block patterns: one gather + a batched matmul) that was fastest at "
        "batch 1 on this machine (kernels_batch1); throughput re-chooses at the throughput "
        "batch size (kernels_batched). The ONNX graphs are exported with the batch-1 kernels: "
        "block layers as Gather + batched MatMul, cyclic layers as dense MatMuls on the masked "
        "weights (ONNX Runtime has no sparse MatMul kernel on CPU).",
        "Latencies are batch-1 means over the timed test samples with one thread, every method "
        "on the same samples in a shuffled order: sample by sample for the MLPs, in 20 groups "
        "for the early-exit part (a method runs warm within a group, as a deployed model "
        "does); ratios are to the dense model / the full model timed in the same loop.",
        "The early-exit pieces are the bundle's (splitexit.deploy.bundle): one ONNX graph "
        "per piece (stages up to an exit, with its head) and the policy's statistic in numpy "
        "between them (splitexit.runtime.OrtProgram), with per-sample exits that shrink the "
        "batch; the exit graph is the bundle's batch-1 form, the same pieces and the same "
        "statistic (lowered to ONNX from its one definition) composed with If nodes, one call "
        "per sample. Both are timed at batch 1 on numpy inputs, as a device runs them. 'exits "
        "and form chosen for latency': the subset of exits and the form (exit graph or "
        "pieces) fastest on calibration inputs (report.json 'exit_subsets_tried').",
        "Early-exit thresholds are chosen on the calibration split (max drop "
        f"{100 * s.max_drop:g} pt vs the final exit's calibration accuracy); accuracy and "
        "latency on the test split.",
        *s.notes]
    return write_report(out, "compress", rows + exit_rows, dataset=dataset,
                        model=f"mlp {s.hidden}, mlp 40-40, resnet8 {s.exit_widths}",
                        sections={"training": summary}, notes=notes, command=command,
                        settings=asdict(s), targets=targets, plots=plots, **extra)


def _targets(rows: list[dict], exit_rows: list[dict], s: CompressSettings) -> dict:
    """The issue's targets, checked on this run's rows."""
    best = None
    for r in rows:
        if r.get("bytes_ratio") is None or r["method"].startswith("dense"):
            continue
        meets = (r["bytes_ratio"] <= 0.25 and r["macs_ratio"] <= 0.25
                 and r["accuracy_drop_pt"] <= 0.3 + 1e-9)  # float rounding of 30 in 10,000
        # a speed-up of >= 10% measured in this run (less is within this machine's noise):
        # PyTorch batch 1 or batched, or ONNX Runtime batch 1
        sped = (r.get("latency_ratio", 2) <= 1 / 1.1 or r.get("throughput_ratio", 0) >= 1.1
                or r.get("ort_latency_ratio", 2) <= 1 / 1.1)
        if meets and sped and (best is None or r["bytes_ratio"] < best["bytes_ratio"]):
            best = r
    out: dict = {}
    if rows:
        out["sparsity_4x_at_0.3pt_with_speedup"] = best is not None
        out["sparsity_row"] = None if best is None else f"{best['model']} | {best['method']}"
    if not exit_rows:
        return out
    by = {r["method"].split(" (")[0]: r for r in exit_rows}
    forms = {"pieces": "early-exit pieces", "exit_graph": "exit graph",
             "chosen_exits": "exits and form chosen for latency"}
    for key, method in forms.items():
        row = by[f"ONNX Runtime: {method}"]
        out[f"early_exit_{key}_speedup"] = row["speedup"]
        out[f"early_exit_{key}_accuracy_drop_pt"] = row["accuracy_drop_pt"]
        out[f"early_exit_{key}_1.8x_at_0.5pt"] = (row["speedup"] >= 1.8
                                                  and row["accuracy_drop_pt"] <= 0.5)
    return out


def register(suites) -> None:
    """Add ``python -m benchmarks compress`` to the bench sub-commands."""
    d = CompressSettings()
    p = suites.add_parser("compress", help="predefined sparsity and int8 vs dense; early-exit "
                          "bundle on ONNX Runtime vs the full model")
    p.add_argument("--out", default="reports/compress", help="output directory")
    p.add_argument("--hidden", default=",".join(map(str, d.hidden)))
    p.add_argument("--densities", default=",".join(map(str, d.densities)),
                   help="densities with the published (cyclic) pattern")
    p.add_argument("--block-densities", default=",".join(map(str, d.block_densities)),
                   help="densities with block patterns (1/groups; fast grouped kernel)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--train-samples", type=int, default=0, help="0: the whole training split")
    p.add_argument("--exit-widths", default=",".join(map(str, d.exit_widths)))
    p.add_argument("--exit-epochs", type=int, default=d.exit_epochs)
    p.add_argument("--exit-train-samples", type=int, default=d.exit_train_samples,
                   help="0: the whole training split")
    p.add_argument("--exit-model", default=None,
                   help="multi-exit ResNet-8 checkpoint to load instead of training one, e.g. "
                        "reports/early-exit/models/resnet8-multiexit")
    p.add_argument("--parts", default=",".join(d.parts),
                   help="which parts to run: sparsity, exits (comma-separated)")
    p.add_argument("--max-drop", type=float, default=d.max_drop)
    p.add_argument("--latency-samples", type=int, default=d.latency_samples)
    p.add_argument("--no-published", action="store_true",
                   help="skip the published 784-40-40-10 MLP")
    p.add_argument("--seed", type=int, default=d.seed)
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from splitexit.report import markdown_table

    from .common import command_line

    s = CompressSettings(
        hidden=tuple(int(v) for v in args.hidden.split(",") if v),
        densities=tuple(float(v) for v in args.densities.split(",") if v),
        block_densities=tuple(float(v) for v in args.block_densities.split(",") if v),
        epochs=args.epochs, train_samples=args.train_samples or None,
        exit_widths=tuple(int(v) for v in args.exit_widths.split(",") if v),
        exit_epochs=args.exit_epochs, exit_train_samples=args.exit_train_samples or None,
        max_drop=args.max_drop, latency_samples=args.latency_samples,
        exit_model=args.exit_model, parts=tuple(p for p in args.parts.split(",") if p),
        published=not args.no_published, seed=args.seed)
    report = run_compress_bench(args.out, s, command=command_line())
    print(markdown_table(report["rows"]))
    print(f"targets: {report['targets']}")
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0
