"""Benchmark suite ``split``: bytes on the wire vs accuracy for every cut, bottleneck and codec.

On Fashion-MNIST with ResNet-8: plain splits at each cut and BottleFit bottlenecks of 1, 2, 4
and 8 channels (plus the autoencoder baseline), each through every codec, against sending the
raw uint8 image and a PNG of it; then the planner's choice per link profile next to the best
option found by measuring every option under emulated link conditions.

Rate-accuracy curves (accuracy against bytes per one-sample message): the learned entropy
bottleneck (:mod:`splitexit.training.entropy`, range-coded by
:class:`splitexit.split.entropy.EntropyCodec`) at several rate weights beta, next to BottleFit
through int8/int4 (+zstd), the raw image, PNG, JPEG and WebP at several qualities (Pillow), the
unsplit model and the equally trained control (the unsplit model trained as many more epochs
as the bottlenecks, on the same samples and learning rate); those pieces live in
:mod:`benchmarks.split_rate`.

Emulation: each option's device side (device half + encode) and server side (decode + server
half) are timed at batch 1 on this host; the link adds RTT + bytes / bandwidth (with the loss
rate's retransmissions) from the link profile, for the request and the 40-byte answer. The
planner predicts the same figures from MACs (this host's measured GMAC/s) and payload sizes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from splitexit import checkpoint
from splitexit.calibration import paired_drop_ci
from splitexit.cost import count_macs
from splitexit.data import load_dataset
from splitexit.devices import get_link, load_links, measure_host_profile
from splitexit.measure import torch_threads
from splitexit.report import pyplot, write_report
from splitexit.split.bottleneck import (
    BottleneckSpec,
    freeze_tables,
    inject_bottleneck,
    inject_entropy_bottleneck,
)
from splitexit.split.codec import Codec
from splitexit.split.entropy import EntropyCodec, EntropyTables
from splitexit.split.halves import SplitModel, num_params, split_model
from splitexit.split.planner import LOCAL, CutCost, plan
from splitexit.stages import StagedModel
from splitexit.training import Baseline, train
from splitexit.training.bottlefit import autoencoder_baseline, bottlefit
from splitexit.training.entropy import entropic_student
from splitexit.zoo import create_model

from .split_rate import (
    EntropyCurve,
    _curve_rows,
    _entropy_targets,
    _image_codec_rows,
    _ort_identical,
    _ort_session,
    _plot_curves,
    _rounded_session,
    _time_entropy,
)

__all__ = ["SplitBenchSettings", "EntropyCurve", "run_split_bench", "png_bytes", "paired_drop_ci",
           "register"]

DEFAULT_CODECS = ("fp32", "fp16", "int8", "int4", "fp32+zstd", "fp16+zstd", "int8+zstd",
                  "int4+zstd", "int8:v2", "int4:v2")
RESPONSE_BYTES = 40


@dataclass
class SplitBenchSettings:
    """Settings of the split benchmark (defaults: the reduced grid that fits a shared 2-core box).

    Attributes:
        baseline_epochs: Epochs of the unsplit ResNet-8 (trained once, cached in ``cache``).
        cuts: Cuts of the plain (no bottleneck) splits.
        bottleneck_cut: Cut where bottlenecks are injected.
        widths: Bottleneck channels.
        stride: Bottleneck spatial reduction.
        encoder_hidden: Encoder inner width (device side).
        decoder_hidden: Decoder inner width (server side; None: the cut's channels).
        stage1_epochs: BottleFit head-distillation epochs.
        stage2_epochs: BottleFit fine-tuning epochs.
        stage2_codec: Codec the server side is fine-tuned on in stage 2 (None: fp32 tensors).
        stage1_noise: Quantisation levels whose noise is added to the bottleneck in stage 1
            (e.g. 15 for int4; None: no noise).
        lr: Learning rate of both BottleFit stages (AdamW, cosine decay).
        autoencoder_widths: Widths of the autoencoder baseline.
        autoencoder_epochs: Its training epochs.
        train_samples: Training samples used for bottleneck training (None: all).
        codecs: Codecs evaluated on every split.
        latency_samples: Test samples timed at batch 1 per option for the link emulation.
        max_drop_pt: Accuracy drop (points) an option may have to be a planner candidate.
        test_samples: Evaluate on this many test samples (None: all 10k).
        cache: Directory for the baseline checkpoint and trained bottlenecks (not committed).
        seed: Seed.
        teacher: Checkpoint directory of the unsplit model to use instead of training the
            baseline (None: train or reuse the cached baseline).
        entropy_betas: Rate weights of the default entropy curve (one model each; empty: none).
        entropy_width: Latent channels of the default entropy curve.
        entropy_curves: Further entropy curves (:class:`EntropyCurve`: cut, stage-1 objective,
            stride, width, betas); the default curve is the BottleFit cut and stride, head
            distillation, ``entropy_width`` and ``entropy_betas``.
        image_qualities: JPEG and WebP qualities of the input-codec curves (empty: none).
        control: Train the equally trained control (the unsplit model trained
            ``stage1_epochs + stage2_epochs`` more epochs on the same samples).
    """

    baseline_epochs: int = 6
    cuts: tuple[str, ...] = ("stem", "block1", "block2")
    bottleneck_cut: str = "block1"
    widths: tuple[int, ...] = (1, 2, 4, 8)
    stride: int = 4
    encoder_hidden: int = 8
    decoder_hidden: int | None = None
    stage1_epochs: int = 2
    stage2_epochs: int = 2
    stage2_codec: str | None = "int8"
    stage1_noise: int | None = None
    lr: float = 2e-3
    autoencoder_widths: tuple[int, ...] = (2,)
    autoencoder_epochs: int = 2
    train_samples: int | None = 20000
    codecs: tuple[str, ...] = DEFAULT_CODECS
    latency_samples: int = 100
    max_drop_pt: float = 0.5
    test_samples: int | None = None
    cache: str = "reports/split/models"
    seed: int = 0
    teacher: str | None = None
    entropy_betas: tuple[float, ...] = (3e-05, 0.0001, 0.0003, 0.001, 0.003)
    entropy_width: int = 2
    entropy_curves: tuple[EntropyCurve, ...] = ()
    image_qualities: tuple[int, ...] = (5, 10, 25, 50, 75, 90)
    control: bool = True
    notes: list[str] = field(default_factory=list)


def png_bytes(image: np.ndarray) -> bytes:
    """A grayscale 8-bit PNG of ``image`` (H, W uint8), encoded by Pillow with optimize=True."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _png_roundtrip(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _baseline(ds, settings: SplitBenchSettings) -> tuple[StagedModel, float]:
    if settings.teacher:
        model = checkpoint.load(settings.teacher)
        return model.eval(), float(checkpoint.read_meta(settings.teacher).get("train_seconds",
                                                                              0.0))
    path = (Path(settings.cache)
            / f"resnet8-fashion-mnist-e{settings.baseline_epochs}-seed{settings.seed}")
    if (path / checkpoint.WEIGHTS).is_file():
        model = checkpoint.load(path)
        seconds = float(checkpoint.read_meta(path).get("train_seconds", 0.0))
    else:
        model = create_model("resnet8", ds.num_classes, ds.input_shape)
        history = train(model, ds.train, Baseline(), epochs=settings.baseline_epochs,
                        seed=settings.seed)
        seconds = history.seconds
        checkpoint.save(model, path, dataset=ds.name, strategy="baseline",
                        train_seconds=seconds)
    return model.eval(), seconds


@torch.no_grad()
def _evaluate(split: SplitModel, x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> dict:
    """Accuracy through one-sample messages, mean message size and amortised body size.

    The returned ``"correct"`` entry is the per-sample correctness (bool tensor).
    """
    codec = split.codec or Codec("fp32")
    correct, sizes, batched, hits = 0, [], [], []
    for i in range(0, len(x), chunk):
        payload = split.device_half(x[i: i + chunk])
        tensors = payload if isinstance(payload, tuple) else (payload,)
        decoded = []
        for j in range(tensors[0].shape[0]):
            msg = codec.encode(tuple(t[j: j + 1] for t in tensors) if len(tensors) > 1
                               else tensors[0][j: j + 1])
            sizes.append(len(msg))
            decoded.append(split.decode(msg))
        batched.append(codec.bytes_per_sample(payload))
        if isinstance(decoded[0], tuple):
            payload_back = tuple(torch.cat(parts) for parts in zip(*decoded, strict=True))
        else:
            payload_back = torch.cat(decoded)
        hit = split.server_half(payload_back).argmax(1) == y[i: i + chunk]
        hits.append(hit)
        correct += int(hit.sum())
    return {"accuracy": correct / len(x), "bytes_per_sample": statistics.fmean(sizes),
            "batched_bytes_per_sample": statistics.fmean(batched), "correct": torch.cat(hits)}


class _ToPixels(torch.nn.Module):
    """Device side of full offloading: the image as 8-bit pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)


class _FromPixels(torch.nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return p.float() / 255


def _offload_split(teacher: StagedModel, codec: str, example: torch.Tensor) -> SplitModel:
    server = StagedModel([_FromPixels(), *teacher.stages])
    whole = StagedModel([_ToPixels(), server])
    whole.training = server.training = False  # the teacher's shared stages keep their mode
    return split_model(whole, 0, codec=codec, example=example)


def _time_option(split: SplitModel, x: torch.Tensor, n: int) -> tuple[float, float]:
    """Median batch-1 seconds of (device half + encode) and (decode + server half)."""
    device_t, server_t = [], []
    with torch.inference_mode():
        for i in range(min(n, len(x)) + 5):
            xi = x[i % len(x): i % len(x) + 1]
            t0 = time.perf_counter()
            msg = split.encode(xi)
            t1 = time.perf_counter()
            split.serve(msg)
            t2 = time.perf_counter()
            if i >= 5:
                device_t.append(t1 - t0)
                server_t.append(t2 - t1)
    return statistics.median(device_t), statistics.median(server_t)


def _time_local(model: StagedModel, x: torch.Tensor, n: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(min(n, len(x)) + 5):
            t0 = time.perf_counter()
            model(x[i % len(x): i % len(x) + 1])
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bottleneck_model(kind: str, teacher: StagedModel, width: int, ds, train_split,
                      settings: SplitBenchSettings):
    """Train (or load from the cache) a BottleFit or autoencoder bottleneck."""
    spec = BottleneckSpec(width, settings.stride, hidden=settings.encoder_hidden,
                          decoder_hidden=settings.decoder_hidden)
    if kind == "bottlefit":
        key = (f"{kind}-{settings.bottleneck_cut}-c{width}-s{settings.stride}-h"
               f"{settings.encoder_hidden}-d{settings.decoder_hidden}-e{settings.stage1_epochs}"
               f"x{settings.stage2_epochs}-{settings.stage2_codec}-q{settings.stage1_noise}"
               f"-lr{settings.lr:g}-n{settings.train_samples}-b{settings.baseline_epochs}"
               f"-seed{settings.seed}")
    else:
        key = (f"{kind}-{settings.bottleneck_cut}-c{width}-s{settings.stride}-h"
               f"{settings.encoder_hidden}-d{settings.decoder_hidden}-e"
               f"{settings.autoencoder_epochs}-lr{settings.lr:g}-n{settings.train_samples}"
               f"-b{settings.baseline_epochs}-seed{settings.seed}")
    key = (key + _teacher_tag(settings)).replace(":", "_")
    path = Path(settings.cache) / "bottlenecks" / f"{key}.safetensors"
    meta = path.with_suffix(".json")
    if path.is_file():
        model = inject_bottleneck(teacher, settings.bottleneck_cut, spec, ds.test.x[:8])
        model.load_state_dict(load_file(str(path)))
        seconds = json.loads(meta.read_text()).get("train_seconds") if meta.is_file() else None
        return model.eval(), seconds
    t0 = time.perf_counter()
    if kind == "bottlefit":
        codec = Codec.parse(settings.stage2_codec) if settings.stage2_codec else None
        model = bottlefit(teacher, settings.bottleneck_cut, spec, train_split,
                          stage1_epochs=settings.stage1_epochs,
                          stage2_epochs=settings.stage2_epochs, codec=codec,
                          stage1_noise=settings.stage1_noise, lr=settings.lr,
                          seed=settings.seed).model
    else:
        model, _ = autoencoder_baseline(teacher, settings.bottleneck_cut, spec, train_split,
                                        epochs=settings.autoencoder_epochs, lr=settings.lr,
                                        seed=settings.seed)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    os.replace(partial, path)  # atomic: a concurrent run never reads half a file
    meta.write_text(json.dumps({"train_seconds": seconds, "key": key}))
    return model.eval(), seconds


def _teacher_tag(settings: SplitBenchSettings) -> str:
    """Cache-key suffix naming a given teacher checkpoint by its weights' digest."""
    if not settings.teacher:
        return ""
    doc = json.loads((Path(settings.teacher) / "model.json").read_text())
    return f"-t{str(doc.get('weights_sha256', 'unknown'))[:12]}"


def _save_cached(model: torch.nn.Module, path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    os.replace(partial, path)  # atomic: a concurrent run never reads half a file
    path.with_suffix(".json").write_text(json.dumps(meta))


def _entropy_curves(settings: SplitBenchSettings) -> list[EntropyCurve]:
    default = EntropyCurve(settings.bottleneck_cut, "head", settings.stride,
                           settings.entropy_width, settings.entropy_betas)
    return [c for c in (default, *settings.entropy_curves) if c.betas]


def _entropy_model(teacher: StagedModel, curve: EntropyCurve, beta: float, ds, train_split,
                   settings: SplitBenchSettings):
    """Train (or load from the cache) an entropy bottleneck; its frozen tables and seconds."""
    spec = BottleneckSpec(curve.width, curve.stride,
                          hidden=settings.encoder_hidden, decoder_hidden=settings.decoder_hidden)
    e1, e2 = curve.epochs or (settings.stage1_epochs, settings.stage2_epochs)
    key = (f"entropy-{curve.cut}-c{curve.width}-s{curve.stride}-h"
           f"{settings.encoder_hidden}-d{settings.decoder_hidden}-beta{beta:g}-e"
           f"{e1}x{e2}-lr{settings.lr:g}-n"
           f"{settings.train_samples}-b{settings.baseline_epochs}-seed{settings.seed}"
           f"{_teacher_tag(settings)}{'' if curve.stage1 == 'head' else '-' + curve.stage1}")
    path = Path(settings.cache) / "bottlenecks" / f"{key}.safetensors"
    tables_path = path.with_suffix(".tables.json")
    if path.is_file() and tables_path.is_file():
        model = inject_entropy_bottleneck(teacher, curve.cut, spec, ds.test.x[:8])
        model.load_state_dict(load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
        tables = EntropyTables.load(tables_path, expect_sha256=meta.get("tables_sha256"))
        return model.eval(), tables, meta.get("train_seconds")
    t0 = time.perf_counter()
    model = entropic_student(teacher, curve.cut, spec, train_split, beta,
                             stage1=curve.stage1, stage1_epochs=e1, stage2_epochs=e2,
                             lr=settings.lr,
                             seed=settings.seed).model
    seconds = time.perf_counter() - t0
    tables = freeze_tables(model)
    tables.save(tables_path)
    _save_cached(model, path, {"train_seconds": seconds, "key": key,
                               "tables_sha256": tables.sha256})
    return model.eval(), tables, seconds


def _control_model(teacher: StagedModel, ds, train_split, settings: SplitBenchSettings):
    """The equally trained reference: the unsplit model trained ``stage1 + stage2`` more
    epochs (plain cross-entropy, same samples and learning rate as the bottlenecks)."""
    epochs = settings.stage1_epochs + settings.stage2_epochs
    key = (f"control-e{epochs}-lr{settings.lr:g}-n{settings.train_samples}-b"
           f"{settings.baseline_epochs}-seed{settings.seed}{_teacher_tag(settings)}")
    path = Path(settings.cache) / "bottlenecks" / f"{key}.safetensors"
    model = copy.deepcopy(teacher)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
        return model.eval(), meta.get("train_seconds")
    history = train(model, train_split, Baseline(), epochs=epochs, lr=settings.lr,
                    seed=settings.seed + 1)
    _save_cached(model, path, {"train_seconds": history.seconds, "key": key})
    return model.eval(), history.seconds


def run_split_bench(out: str | Path, settings: SplitBenchSettings | None = None,
                    command: str | None = None, progress: bool = True) -> dict:
    """Run the split benchmark and write report.json, report.md and a plot into ``out``.

    Args:
        out: Output directory.
        settings: Grid and training settings.
        command: Command line recorded in the report.
        progress: Print one line per step to stdout.

    Returns:
        The report dict.
    """
    settings = settings or SplitBenchSettings()
    say = print if progress else (lambda *a, **k: None)
    torch.manual_seed(settings.seed)
    ds = load_dataset("fashion-mnist", seed=settings.seed)
    teacher, train_seconds = _baseline(ds, settings)
    test = ds.test.subset(settings.test_samples, seed=settings.seed) \
        if settings.test_samples else ds.test
    x, y = test.x, test.y
    example = ds.calib.x[:64]
    whole_params = num_params(teacher)
    with torch.no_grad():
        unsplit_correct = torch.cat([teacher(x[i: i + 256]).argmax(1) == y[i: i + 256]
                                     for i in range(0, len(x), 256)])
    unsplit_acc = int(unsplit_correct.sum()) / len(x)
    say(f"unsplit resnet8: test accuracy {unsplit_acc:.4f}")

    rows: list[dict] = []
    options: list[tuple[str, SplitModel, dict]] = []

    def add(method: str, split: SplitModel, extra: dict) -> None:
        res = _evaluate(split, x, y)
        _, ci_low, ci_high = paired_drop_ci(unsplit_correct, res.pop("correct"))
        cost = split.cut_cost(example, name=method)
        row = {"method": method, **extra, "codec": split.codec.spec(), **res,
               "accuracy_drop_pt": 100 * (unsplit_acc - res["accuracy"]),
               "accuracy_drop_ci95_pt": [round(ci_low, 3), round(ci_high, 3)],
               "bytes_reduction_vs_raw": 1 - res["bytes_per_sample"] / 784,
               "device_macs": cost.device_macs, "server_macs": cost.server_macs,
               "device_params": split.device_params,
               "device_params_share": split.device_params / (split.device_params
                                                              + split.server_params),
               "device_params_vs_unsplit": split.device_params / whole_params}
        rows.append(row)
        options.append((method, split, row))
        say(f"{method}: acc {res['accuracy']:.4f}, {res['bytes_per_sample']:.1f} B/sample")

    # references: the raw image and a PNG of it -----------------------------------------------
    pixels = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    pngs = [png_bytes(p[0].numpy()) for p in pixels]
    back = torch.stack([torch.from_numpy(_png_roundtrip(b).copy()) for b in pngs])
    lossless = bool(torch.equal(back, pixels[:, 0]))
    with torch.no_grad():
        raw_acc = sum(int((teacher(pixels[i: i + 256].float() / 255).argmax(1)
                           == y[i: i + 256]).sum()) for i in range(0, len(x), 256)) / len(x)
    total_macs = count_macs(lambda: teacher(example)) / len(example)
    references = [
        {"method": "unsplit (local)", "accuracy": unsplit_acc, "bytes_per_sample": 0.0,
         "device_macs": total_macs, "device_params": whole_params, "device_params_share": 1.0},
        {"method": "raw uint8 image", "accuracy": raw_acc, "bytes_per_sample": 784.0,
         "bytes_reduction_vs_raw": 0.0, "device_macs": 0.0, "server_macs": total_macs},
        {"method": "PNG of the image", "accuracy": raw_acc,
         "bytes_per_sample": statistics.fmean(len(b) for b in pngs),
         "bytes_reduction_vs_raw": 1 - statistics.fmean(len(b) for b in pngs) / 784,
         "device_macs": 0.0, "server_macs": total_macs, "png_lossless": lossless},
    ]

    # full offloading through the wire codec (pixels as uint8, so every codec is bitwise) ----
    for spec in ("fp32", "fp32+zstd"):
        add(f"offload uint8 {spec}", _offload_split(teacher, spec, example),
            {"cut": "input", "bottleneck_channels": None})

    # plain splits --------------------------------------------------------------------------
    for cut in settings.cuts:
        for spec in settings.codecs:
            add(f"cut {cut} {spec}", split_model(teacher, cut, codec=spec, example=example),
                {"cut": cut, "bottleneck_channels": None})

    # bottlenecks ---------------------------------------------------------------------------
    train_split = (ds.train.subset(settings.train_samples, seed=settings.seed)
                   if settings.train_samples else ds.train)
    train_times = {}
    kinds = [("bottlefit", w) for w in settings.widths] + \
            [("autoencoder", w) for w in settings.autoencoder_widths]
    for kind, width in kinds:
        say(f"training {kind} C={width} ...")
        model, seconds = _bottleneck_model(kind, teacher, width, ds, train_split, settings)
        if seconds is not None:
            train_times[f"{kind} C={width}"] = seconds
        for spec in settings.codecs:
            split = split_model(model, codec=spec, example=example)
            add(f"{kind} C={width} {spec}", split,
                {"cut": split.cut, "bottleneck_channels": width,
                 "bottleneck_shape": list(split.payload_spec[0].shape)})

    # the equally trained control, entropy bottlenecks, input codecs -------------------------
    control_acc = None
    if settings.control:
        say("training the equally trained control ...")
        control, seconds = _control_model(teacher, ds, train_split, settings)
        if seconds is not None:
            train_times["control"] = seconds
        with torch.no_grad():
            control_correct = torch.cat([control(x[i: i + 256]).argmax(1) == y[i: i + 256]
                                         for i in range(0, len(x), 256)])
        control_acc = int(control_correct.sum()) / len(x)
        references.append({"method": "control: unsplit, trained as long as the bottlenecks",
                           "accuracy": control_acc, "bytes_per_sample": 0.0,
                           "accuracy_drop_pt": 100 * (unsplit_acc - control_acc),
                           "device_macs": total_macs, "device_params": whole_params})
        say(f"control: acc {control_acc:.4f}")
    ort_checks: list[dict] = []
    for curve in _entropy_curves(settings):
        for beta in curve.betas:
            method = f"{curve.name} beta={beta:g}"
            say(f"training {method} ...")
            model, tables, seconds = _entropy_model(teacher, curve, beta, ds, train_split,
                                                    settings)
            if seconds is not None:
                train_times[method] = seconds
            # not registered: the split decodes with its own codec object, and 8-bit codec ids
            # of a dozen tables collide (the registry refuses a second table with the same id)
            codec = EntropyCodec(tables)
            split = split_model(model, codec=codec, example=example)
            before = codec.clamped
            add(method, split,
                {"cut": split.cut, "bottleneck_channels": curve.width, "beta": beta,
                 "curve": curve.name, "stage1": curve.stage1,
                 "bottleneck_shape": list(split.payload_spec[0].shape),
                 "table_symbols": tables.symbols, "table_range": [tables.lo, tables.hi],
                 "tables_sha256": tables.sha256,
                 "device_macs_share_of_unsplit": None})
            row = rows[-1]
            row["device_macs_share_of_unsplit"] = row["device_macs"] / total_macs
            row["clamped_values"] = codec.clamped - before
            with torch.no_grad():
                q = torch.cat([torch.round(split.device_half(x[i: i + 256]))
                               for i in range(0, len(x), 256)]).numpy()
            row["ideal_bytes_per_sample"] = float(tables.bits(q).mean() / 8)
            session = _ort_session(split, x, Path(out))
            rounded = _rounded_session(split, x, Path(out))
            with torch_threads(1):
                row.update(_time_entropy(split, x, settings.latency_samples, session, rounded))
            if not any(c["curve"] == curve.name for c in ort_checks):
                ort_checks.append({"curve": curve.name, "method": method,
                                   **_ort_identical(split, x, session)})
    image_rows = _image_codec_rows(teacher, pixels, y, settings.image_qualities,
                                   unsplit_correct, control_acc)
    if control_acc is not None:
        for r in rows:
            r["drop_vs_control_pt"] = 100 * (control_acc - r["accuracy"])

    # planner vs emulated measurement ---------------------------------------------------------
    say("timing options at batch 1 for the link emulation ...")
    with torch_threads(1):
        host = measure_host_profile(threads=1)
        candidates = [(m, s, r) for m, s, r in options
                      if r["accuracy_drop_pt"] <= settings.max_drop_pt]
        # Neurosurgeon-style profile: each part's batch-1 latency on calibration inputs (a
        # separate pass from the measurement below, which times test inputs)
        profile_x = ds.calib.x
        profiled_local = _time_local(teacher, profile_x, settings.latency_samples)
        profiled = {m: _time_option(s, profile_x, settings.latency_samples)
                    for m, s, _ in candidates}
        local_s = _time_local(teacher, x, settings.latency_samples)
        timed = {m: _time_option(s, x, settings.latency_samples) for m, s, _ in candidates}
    costs = {LOCAL: CutCost(LOCAL, total_macs, 0.0, 0.0, device_latency_s=profiled_local)}
    for m, s, r in candidates:
        dev_s, srv_s = profiled[m]
        costs[m] = CutCost(m, r["device_macs"], r["server_macs"], s.message_bytes(example),
                           device_latency_s=dev_s, server_latency_s=srv_s)
    measured_bytes = {m: r["bytes_per_sample"] for m, _, r in candidates}
    link_rows = []
    for link_name in load_links():
        link = get_link(link_name)
        measured = {LOCAL: local_s}
        for m, (dev_s, srv_s) in timed.items():
            measured[m] = (dev_s + srv_s + link.bytes_time_s(measured_bytes[m], "up")
                           + link.bytes_time_s(RESPONSE_BYTES, "down"))
        for scenario, names in (("local allowed", list(costs)),
                                ("offload only", [n for n in costs if n != LOCAL])):
            if not names:
                continue
            p = plan([costs[n] for n in names], host, host, link, "latency",
                     response_bytes=RESPONSE_BYTES, host=host)
            best = min(names, key=lambda n: measured[n])
            gap = measured[p.choice] / measured[best] - 1
            link_rows.append({
                "link": link_name, "scenario": scenario, "planner_choice": p.choice,
                "predicted_latency_ms": 1e3 * p.best.latency_s,
                "measured_latency_of_choice_ms": 1e3 * measured[p.choice],
                "best_measured": best, "best_measured_latency_ms": 1e3 * measured[best],
                "gap_vs_best": gap, "within_5pct": gap <= 0.05})
    # targets -----------------------------------------------------------------------------------
    bneck = [r for r in rows if r.get("bottleneck_channels") and r["method"].startswith("bottlefit")]
    ok = [r for r in bneck if r["accuracy_drop_pt"] <= 0.5]
    best_b1 = max(ok, key=lambda r: r["bytes_reduction_vs_raw"], default=None)
    best_batched = max(ok, key=lambda r: 1 - r["batched_bytes_per_sample"] / 784, default=None)
    targets = {
        "unsplit_accuracy": unsplit_acc,
        "best_bottlefit_within_0.5pt_batch1": best_b1,
        "bytes_target_met_batch1": bool(best_b1 and best_b1["bytes_reduction_vs_raw"] >= 0.9),
        "best_bottlefit_within_0.5pt_batched": best_batched,
        "bytes_target_met_batched": bool(
            best_batched and 1 - best_batched["batched_bytes_per_sample"] / 784 >= 0.9),
        "max_device_params_share_bottlefit": max((r["device_params_vs_unsplit"] for r in bneck),
                                                 default=None),
        "planner_within_5pct_every_link": all(r["within_5pct"] for r in link_rows),
    }
    ent_targets, ent_notes = _entropy_targets(rows, unsplit_acc, control_acc, ort_checks)
    targets.update(ent_targets)
    plot = _plot(Path(out), rows, references, unsplit_acc)
    curve_plot = _plot_curves(Path(out), rows, references, image_rows, unsplit_acc,
                              control_acc)
    best = targets["best_bottlefit_within_0.5pt_batch1"]
    share = targets["max_device_params_share_bottlefit"]
    target_notes = [
        f"Target >= 90% fewer bytes than 784 B (<= 78.4 B) at <= 0.5 pt loss: "
        f"{'met' if targets['bytes_target_met_batch1'] else 'not met'} with one-sample messages, "
        f"{'met' if targets['bytes_target_met_batched'] else 'not met'} with batched messages"
        + (f" (smallest one-sample message within 0.5 pt: {best['method']}, "
           f"{best['bytes_per_sample']:.1f} B, {best['accuracy_drop_pt']:.2f} pt, 95% CI "
           f"{best['accuracy_drop_ci95_pt'][0]:.2f}..{best['accuracy_drop_ci95_pt'][1]:.2f} pt;"
           " smallest "
           f"batched: {best_batched['method']}, {best_batched['batched_bytes_per_sample']:.1f}"
           f" B, {best_batched['accuracy_drop_pt']:.2f} pt)" if best else
           " (no BottleFit option within 0.5 pt)") + ".",
        "Target device half <= 10% of the unsplit model's parameters: "
        + (f"largest BottleFit share {share:.1%}." if share is not None else
           "no BottleFit model in this run."),
        f"Target planner within 5% of the best measured option at every link: "
        f"{'met' if targets['planner_within_5pct_every_link'] else 'not met'}.",
    ]
    notes = [
        "bytes_per_sample: mean size of a one-sample wire message, header included (wire "
        "format v1: 54-62 B for one tensor; ':v2' codecs use the compact v2 header: 14 B plus "
        "one byte per small dim, plus 8 B of scale and minimum when quantised, i.e. 22 B for "
        "a 1xCx7x7 int8/int4 bottleneck), i.e. what a device sending each sample on its own "
        "transmits; "
        "batched_bytes_per_sample: message size / batch for 256-sample messages (header "
        "amortised). The raw image is counted as 784 B without any header.",
        f"accuracy: test set ({len(x)} samples), every sample sent as its own message through the codec "
        "(quantisation scale per sample). accuracy_drop_ci95_pt: 95% interval of the drop vs "
        "the unsplit model on the same samples (paired normal approximation; one training "
        "seed, so it covers test-set sampling only, not training variance).",
        "device_params_share: device half / (device + server half) of that split; "
        "device_params_vs_unsplit: device half / unsplit ResNet-8 parameters.",
        f"Reduced grid for a shared 2-core machine: baseline {settings.baseline_epochs} epochs "
        f"(full train split, {len(ds.train)} samples); bottlenecks only at cut "
        f"{settings.bottleneck_cut!r}, stride {settings.stride}, encoder width "
        f"{settings.encoder_hidden}, decoder width {settings.decoder_hidden or 'of the cut'}, "
        f"trained on {settings.train_samples or len(ds.train)} training samples for "
        f"{settings.stage1_epochs}+{settings.stage2_epochs} epochs at lr {settings.lr:g} "
        f"(AdamW, cosine decay; BottleFit stage 1 head distillation"
        + (f" with {settings.stage1_noise}-level quantisation noise on the bottleneck"
           if settings.stage1_noise else "")
        + f", stage 2 KD T=1 alpha=0.5 on {settings.stage2_codec or 'fp32'}-decoded bottlenecks"
        f" with the device half frozen, decoder and server half trained); autoencoder baseline "
        f"{settings.autoencoder_epochs} epochs.",
        "Link emulation (no traffic shaping): latency = device half + encode (timed at batch 1 "
        "on this host, 1 thread) + RTT + bytes / bandwidth with loss retransmissions from the "
        "link profile + 40-byte answer + decode + server half (timed on this host). Device and "
        "server are both this host. The planner predicts, Neurosurgeon-style, from each "
        "part's batch-1 latency profiled in a separate pass on calibration inputs (scaled to "
        "the device and server profiles; here both are this host, "
        f"{host.compute_gmacs_per_s:.2f} GMAC/s measured) and mean message sizes of 64 "
        "calibration samples; the measurement times the test inputs. Candidates: local and every option within {settings.max_drop_pt} pt of the "
        "unsplit accuracy; 'offload only' drops the local option.",
        f"PNG: Pillow, optimize=True, lossless round trip verified: {lossless}.",
        "Trained baseline and bottlenecks are cached under --cache, keyed by every training "
        "setting, and reused by later runs with the same settings; bottleneck_train_seconds and "
        "baseline_train_seconds are the wall times of the runs that trained them (1 thread, "
        "shared machine).",
        *target_notes,
        "Rate-accuracy curves: 'entropy CUT STAGE1/STRIDE C=c beta=b' is the learned entropy "
        "bottleneck at that cut (encoder and decoder built as BottleFit's, encoder width "
        f"{settings.encoder_hidden}; factorized prior of a 3-component logistic mixture per "
        "latent element, frozen into 16-bit integer frequency tables and range-coded with "
        "constriction). Stage 1 'head': head distillation + beta x bits per sample with "
        "uniform-noise relaxation, the later stages frozen; stage 1 'task': end to end, every "
        "stage trained on KD from the unsplit model (T=1, alpha=0.5) on the rounded latent "
        "(straight-through) + beta x bits of the noise-relaxed latent. Stage 2 (both): KD on "
        "the integer latent with the device half and encoder frozen. Same epochs, samples and "
        "learning rate as BottleFit and the control. Its message is "
        "the compact entropy message: 4 bytes of header and check byte (tag, 8-bit codec id, "
        "bitstream length, keyed CRC check byte) plus the range-coded bitstream (whole 32-bit "
        "words). ideal_bytes_per_sample: the tables' code "
        "length / 8, without header. clamped_values: latent values outside the tables' range, "
        "clamped (never wrapped). device_macs_share_of_unsplit: the device half's MACs "
        "(encoder included) / the unsplit model's.",
        "JPEG q=N / WEBP q=N: the 8-bit image through Pillow at quality N (grayscale), file "
        "size without any header, classified by the unsplit model; PNG likewise (lossless).",
        "drop_vs_control_pt: accuracy of the equally trained control minus that option's (the "
        "control is the unsplit model trained "
        f"{settings.stage1_epochs + settings.stage2_epochs} more epochs on the bottlenecks' "
        "training samples at the same learning rate, plain cross-entropy)."
        if control_acc is not None else "No control in this run.",
        "Timing of the entropy codec at batch 1, 1 thread, interleaved per sample as deployed: "
        "the device half on ONNX Runtime (ort_device_half_ms_*), the encode of its output in "
        "numpy + constriction (encode_ms_*, as on the torch-free edge) and the decode on the "
        "server (decode_ms_*); the PyTorch device half (device_half_ms_*) in a pass of its "
        "own after it. codec_share_of_ort_device_half_* and codec_share_of_device_half_* are "
        "(encode + decode) / device half.",
        *ent_notes,
    ]
    settings_dict = {k: v for k, v in asdict(settings).items() if k != "notes"}
    return write_report(
        out, "split", references + rows, dataset="fashion-mnist", model="resnet8",
        sections={"rate-accuracy curves": _curve_rows(rows, references, image_rows),
                  "planner vs emulated measurement": link_rows}, notes=notes,
        command=command, plots=[p for p in (curve_plot, plot) if p], settings=settings_dict,
        targets=targets, bottleneck_train_seconds=train_times,
        baseline_train_seconds=train_seconds, host_gmacs_per_s=host.compute_gmacs_per_s,
        image_codec_rows=image_rows, entropy_ort_checks=ort_checks)


def _plot(out: Path, rows: list[dict], references: list[dict], unsplit_acc: float) -> str | None:
    try:
        plt = pyplot()
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["method"].rsplit(" ", 1)[0]  # e.g. "bottlefit C=2"
                          if r.get("bottleneck_channels") else "plain " + r["cut"], []).append(r)
    for name, rs in groups.items():
        ax.scatter([r["bytes_per_sample"] for r in rs], [100 * r["accuracy"] for r in rs],
                   label=name, s=14)
    for ref in references[1:]:
        if not ref["bytes_per_sample"] > 0:
            continue
        ax.axvline(ref["bytes_per_sample"], ls="--", lw=0.8, color="gray")
        ax.text(ref["bytes_per_sample"], 100 * unsplit_acc - 8, ref["method"], rotation=90,
                fontsize=7)
    ax.axhline(100 * unsplit_acc - 0.5, ls=":", color="k", lw=0.8)
    ax.axvline(0.1 * 784, ls=":", color="k", lw=0.8)  # the target: 90% fewer bytes than raw
    ax.text(0.1 * 784, 100 * unsplit_acc - 8, "target 78.4 B", rotation=90, fontsize=7)
    ax.set_xscale("log")
    lowest = min(100 * r["accuracy"] for r in rows)
    ax.set_ylim(max(0, min(lowest, 100 * unsplit_acc - 10) - 2), 100 * unsplit_acc + 2)
    ax.set_xlabel("bytes per sample (one-sample message)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bytes_vs_accuracy.png", dpi=120)
    plt.close(fig)
    return "bytes_vs_accuracy.png"


def register(suites) -> None:
    """Add ``python -m benchmarks split`` to the bench sub-commands."""
    p = suites.add_parser("split", help="split computing: bytes vs accuracy per cut, "
                          "bottleneck and codec; planner vs emulated links")
    d = SplitBenchSettings()
    p.add_argument("--out", default="runs/bench-split", help="output directory")
    p.add_argument("--baseline-epochs", type=int, default=d.baseline_epochs)
    p.add_argument("--cuts", default=",".join(d.cuts),
                   help="cuts of the plain splits, comma-separated (empty: none)")
    p.add_argument("--bottleneck-cut", default=d.bottleneck_cut)
    p.add_argument("--stride", type=int, default=d.stride, help="bottleneck spatial reduction")
    p.add_argument("--widths", default=",".join(map(str, d.widths)),
                   help="bottleneck channels, comma-separated")
    p.add_argument("--encoder-hidden", type=int, default=d.encoder_hidden)
    p.add_argument("--decoder-hidden", type=int, default=0,
                   help="decoder inner width (0: the cut's channels)")
    p.add_argument("--stage1-epochs", type=int, default=d.stage1_epochs)
    p.add_argument("--stage2-epochs", type=int, default=d.stage2_epochs)
    p.add_argument("--stage2-codec", default=d.stage2_codec,
                   help="codec of the bottleneck while fine-tuning in stage 2 ('none': fp32)")
    p.add_argument("--stage1-noise", type=int, default=0,
                   help="quantisation levels of the noise on the bottleneck in stage 1 "
                   "(15: int4, 255: int8; 0: none)")
    p.add_argument("--lr", type=float, default=d.lr, help="BottleFit / autoencoder learning rate")
    p.add_argument("--autoencoder-widths", default=",".join(map(str, d.autoencoder_widths)),
                   help="autoencoder baseline channels, comma-separated (empty: none)")
    p.add_argument("--autoencoder-epochs", type=int, default=d.autoencoder_epochs)
    p.add_argument("--train-samples", type=int, default=d.train_samples,
                   help="training samples for bottleneck training (0: all)")
    p.add_argument("--codecs", default=",".join(d.codecs))
    p.add_argument("--latency-samples", type=int, default=d.latency_samples)
    p.add_argument("--test-samples", type=int, default=0,
                   help="evaluate on this many test samples (0: all 10k)")
    p.add_argument("--cache", default=d.cache, help="where the baseline checkpoint and trained "
                   "bottlenecks are kept (not the report directory)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--teacher", default="", help="checkpoint directory of the unsplit model to "
                   "use instead of training the baseline (empty: train or reuse the cached one)")
    p.add_argument("--entropy-betas", default=",".join(f"{b:g}" for b in d.entropy_betas),
                   help="rate weights of the entropy bottlenecks, comma-separated (empty: none)")
    p.add_argument("--entropy-width", type=int, default=d.entropy_width,
                   help="latent channels of the entropy bottlenecks")
    p.add_argument("--entropy-curve", action="append", default=[],
                   metavar="CUT:STAGE1:STRIDE:WIDTH:BETAS",
                   help="a further entropy curve, e.g. block2:task:4:2:0.001/0.003 (STAGE1 "
                   "'head' or 'task'; repeatable)")
    p.add_argument("--image-qualities", default=",".join(map(str, d.image_qualities)),
                   help="JPEG/WebP qualities, comma-separated (empty: none)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the equally trained control")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from .common import command_line

    stage2_codec = None if args.stage2_codec.lower() in ("", "none") else args.stage2_codec
    settings = SplitBenchSettings(
        baseline_epochs=args.baseline_epochs,
        cuts=tuple(c for c in args.cuts.split(",") if c),
        bottleneck_cut=args.bottleneck_cut, stride=args.stride,
        widths=tuple(int(w) for w in args.widths.split(",") if w),
        encoder_hidden=args.encoder_hidden, decoder_hidden=args.decoder_hidden or None,
        stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
        stage2_codec=stage2_codec, stage1_noise=args.stage1_noise or None, lr=args.lr,
        autoencoder_widths=tuple(int(w) for w in args.autoencoder_widths.split(",") if w),
        autoencoder_epochs=args.autoencoder_epochs,
        train_samples=args.train_samples or None,
        codecs=tuple(c for c in args.codecs.split(",") if c),
        latency_samples=args.latency_samples, test_samples=args.test_samples or None,
        cache=args.cache, seed=args.seed, teacher=args.teacher or None,
        entropy_betas=tuple(float(b) for b in args.entropy_betas.split(",") if b),
        entropy_width=args.entropy_width,
        entropy_curves=tuple(EntropyCurve.parse(c) for c in args.entropy_curve),
        image_qualities=tuple(int(q) for q in args.image_qualities.split(",") if q),
        control=not args.no_control)
    for c in (*settings.codecs, *([stage2_codec] if stage2_codec else [])):
        Codec.parse(c)
    # One thread: on a shared machine the small convolutions train faster without
    # oversubscription, and the batch-1 timings need it anyway.
    with torch_threads(1):
        report = run_split_bench(args.out, settings, command=command_line())
    print(f"wrote {Path(args.out) / 'report.md'}; targets: {report['targets']}")
    return 0
