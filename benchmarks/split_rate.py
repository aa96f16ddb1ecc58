"""The split benchmark's rate-accuracy part: entropy-bottleneck curves, input codecs (JPEG,
WebP through Pillow), the codec's timing in the deployed pipeline, the ONNX Runtime vs PyTorch
message check and the rate-accuracy targets and plot. :mod:`benchmarks.split` runs them."""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitexit.calibration import paired_drop_ci
from splitexit.errors import InputError
from splitexit.report import pyplot
from splitexit.split.halves import SplitModel
from splitexit.stages import StagedModel
from splitexit.training.entropy import STAGE1_LOSSES

__all__ = ["EntropyCurve", "image_codec_bytes"]


@dataclass(frozen=True)
class EntropyCurve:
    """One rate-accuracy curve of the learned entropy bottleneck: a model per beta.

    Attributes:
        cut: Cut of the unsplit model where the bottleneck goes.
        stage1: ``"head"`` (feature distillation + rate) or ``"task"`` (end to end: KD + rate).
        stride: Spatial reduction of the encoder.
        width: Latent channels.
        betas: Rate weights.
        epochs: ``(stage 1, stage 2)`` epochs; None: the settings' (BottleFit's). The control
            is trained as many epochs as BottleFit, so a curve's total should equal that.
    """

    cut: str = "block1"
    stage1: str = "head"
    stride: int = 4
    width: int = 2
    betas: tuple[float, ...] = ()
    epochs: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        """The curve's label, e.g. ``"entropy block2 task/4 C=2"``."""
        epochs = f" {self.epochs[0]}+{self.epochs[1]}ep" if self.epochs else ""
        return f"entropy {self.cut} {self.stage1}/{self.stride} C={self.width}{epochs}"

    @classmethod
    def parse(cls, text: str) -> EntropyCurve:
        """``CUT:STAGE1:STRIDE:WIDTH:BETA/BETA/...[:E1xE2]``, e.g.
        ``block2:task:4:2:0.001/0.003`` or ``block2:task:4:2:0.001:4x0``."""
        parts = text.split(":")
        if len(parts) not in (5, 6) or parts[1] not in STAGE1_LOSSES:
            raise InputError(f"entropy curve {text!r}: expected CUT:STAGE1:STRIDE:WIDTH:BETAS"
                             f"[:E1xE2] with STAGE1 one of {STAGE1_LOSSES} and BETAS separated "
                             "by '/', e.g. block2:task:4:2:0.001/0.003:4x0")
        try:
            epochs = tuple(int(e) for e in parts[5].split("x")) if len(parts) == 6 else None
            if epochs is not None and (len(epochs) != 2 or min(epochs) < 0):
                raise ValueError("epochs are E1xE2, two counts >= 0")
            return cls(parts[0], parts[1], int(parts[2]), int(parts[3]),
                       tuple(float(b) for b in parts[4].split("/") if b), epochs)
        except ValueError as e:
            raise InputError(f"entropy curve {text!r}: {e}") from e


def _gray_roundtrip(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("L"))  # WebP decodes to RGB


def image_codec_bytes(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """A grayscale JPEG or WebP (lossy) of ``image`` (H, W uint8) through Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format=fmt, quality=quality)
    return buf.getvalue()


@torch.no_grad()
def _image_codec_rows(teacher: StagedModel, pixels: torch.Tensor, y: torch.Tensor,
                      qualities: tuple[int, ...], unsplit_correct: torch.Tensor,
                      control_acc: float | None) -> list[dict]:
    rows = []
    for fmt in ("JPEG", "WEBP"):
        for q in qualities:
            blobs = [image_codec_bytes(p[0].numpy(), fmt, q) for p in pixels]
            back = torch.stack([torch.from_numpy(_gray_roundtrip(b)) for b in blobs])
            imgs = back[:, None].float() / 255
            correct = torch.cat([teacher(imgs[i: i + 256]).argmax(1) == y[i: i + 256]
                                 for i in range(0, len(imgs), 256)])
            acc = int(correct.sum()) / len(y)
            _, lo, hi = paired_drop_ci(unsplit_correct, correct)
            rows.append({"method": f"{fmt} q={q}", "curve": fmt, "quality": q,
                         "accuracy": acc,
                         "accuracy_drop_pt": 100 * (float(unsplit_correct.double().mean())
                                                    - acc),
                         "accuracy_drop_ci95_pt": [round(lo, 3), round(hi, 3)],
                         "drop_vs_control_pt": (100 * (control_acc - acc)
                                                if control_acc is not None else None),
                         "bytes_per_sample": statistics.fmean(len(b) for b in blobs),
                         "device_macs": 0.0})
    return rows


class _RoundedDeviceHalf(torch.nn.Module):
    """The device half with the codec's rounding, range check and offset lowered into its ONNX
    graph: ``(symbols int32 (1, numel), all in range)``. Measured against the deployed form
    (rounding in numpy after the graph), never deployed: it moves work into the graph."""

    def __init__(self, half: torch.nn.Module, lo: int, hi: int):
        super().__init__()
        self.device, self.lo, self.hi = half, lo, hi

    def forward(self, x):
        r = torch.round(self.device(x)).flatten(1)  # half to even, as the codec
        ok = ((r >= self.lo) & (r <= self.hi)).all()  # False for NaN too
        return (r.clamp(self.lo, self.hi) - self.lo).to(torch.int32), ok


_BLOCK = 55
"""Samples per block when two forms take turns (the first 5 of each warm up, untimed)."""


def _rounded_session(split: SplitModel, x: torch.Tensor, out: Path):
    from splitexit.export.onnx import export_piece
    from splitexit.runtime.ort import OrtSession

    t = split.codec.tables
    module = _RoundedDeviceHalf(split.device_half, t.lo, t.hi).eval()
    return OrtSession(export_piece(module, x[:2], out / "work" / "entropy_device_rounded.onnx"),
                      threads=1)


def _time_entropy(split: SplitModel, x: torch.Tensor, n: int, session,
                  rounded=None) -> dict:
    """Batch-1 medians/means of the deployed pipeline, interleaved per sample: the device half
    on ONNX Runtime (as the torch-free edge runs it), the entropy encode of its output (numpy +
    constriction, as on the edge) and the decode on the server (to a tensor, as the server half
    takes it). The PyTorch device half is timed in a pass of its own afterwards (running it
    inside the loop would evict the codec's and ONNX Runtime's caches, which a device that
    runs only ONNX Runtime never does).

    With ``rounded`` (:func:`_rounded_session`), the alternative with rounding in the graph
    (that graph, then only constriction and the framing on its symbols; ``rounded_*`` fields)
    takes turns with the deployed form in blocks; 200 of its messages are compared with the
    deployed form's, outside the timing."""
    import constriction

    from splitexit.split.entropy.message import check_key, frame

    times: dict[str, list[float]] = {"ort": [], "encode": [], "decode": [], "torch": [],
                                     "coder": [], "rounded_ort": [], "rounded_encode": []}
    codec = split.codec
    key, codec_id, same = check_key(codec.tables.sha256), codec.tables.codec_id, 0
    # the floor of any wrapper around the maintained coder: its two calls alone, on the
    # same symbols and tables (constriction's range coder, one categorical per element)
    model = constriction.stream.model.Categorical(perfect=False)
    probs = codec.tables.probabilities()

    def deployed(i: int, keep: bool) -> None:
        xa = x[i % len(x): i % len(x) + 1].numpy()
        t0 = time.perf_counter()
        z = session.run_arrays([xa])[0]
        t1 = time.perf_counter()
        msg = codec.encode(z)
        t2 = time.perf_counter()
        codec.decode(msg)
        t3 = time.perf_counter()
        sym = codec.quantize(z)[0][0]
        t4 = time.perf_counter()
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(sym, model, probs)
        constriction.stream.queue.RangeDecoder(enc.get_compressed()).decode(model, probs)
        t5 = time.perf_counter()
        if keep:
            times["ort"].append(t1 - t0)
            times["encode"].append(t2 - t1)
            times["decode"].append(t3 - t2)
            times["coder"].append(t5 - t4)

    def in_graph(i: int, keep: bool) -> None:
        xa = x[i % len(x): i % len(x) + 1].numpy()
        t0 = time.perf_counter()
        symbols, ok = rounded.run_arrays([xa])
        t1 = time.perf_counter()
        if ok:
            enc = constriction.stream.queue.RangeEncoder()
            enc.encode(symbols[0], model, probs)
            frame(codec_id, 1, enc.get_compressed().tobytes(), key)
        t2 = time.perf_counter()
        if keep:
            times["rounded_ort"].append(t1 - t0)
            times["rounded_encode"].append(t2 - t1)

    # without the alternative: one pass, 5 warm-up samples. With it: blocks of BLOCK samples
    # taking turns (interleaved in time, so host drift cancels), 5 warm-up samples after each
    # switch (alternating per sample would evict each path's caches for the other)
    block = n + 5 if rounded is None else _BLOCK
    for b in range(-(-(n + 5) // (block - 5)) if rounded is not None else 1):
        for path in (deployed,) if rounded is None else (deployed, in_graph):
            for i in range(block):
                path(b * block + i, i >= 5)
    for i in range(min(n + 5, 200) if rounded is not None else 0):
        xa = x[i % len(x): i % len(x) + 1].numpy()
        symbols, ok = rounded.run_arrays([xa])
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(symbols[0], model, probs)
        alt = frame(codec_id, 1, enc.get_compressed().tobytes(), key)
        same += bool(ok) and alt == codec.encode(session.run_arrays([xa])[0])
    with torch.inference_mode():
        for i in range(n + 5):
            xi = x[i % len(x): i % len(x) + 1]
            t0 = time.perf_counter()
            split.device_half(xi)
            if i >= 5:
                times["torch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    mean = {k: statistics.fmean(v) for k, v in times.items() if v}
    codec_med, codec_mean = med["encode"] + med["decode"], mean["encode"] + mean["decode"]
    alt = {} if rounded is None else {
        "rounded_ort_device_half_ms_median": 1e3 * med["rounded_ort"],
        "rounded_encode_ms_median": 1e3 * med["rounded_encode"],
        "rounded_codec_share_of_ort_device_half_median":
            (med["rounded_encode"] + med["decode"]) / med["rounded_ort"],
        # what the device spends per message, graph plus encode: rounded over deployed
        "rounded_device_time_ratio_median":
            (med["rounded_ort"] + med["rounded_encode"]) / (med["ort"] + med["encode"]),
        "rounded_same_messages": same, "rounded_samples": min(n + 5, 200)}
    return alt | {"ort_device_half_ms_median": 1e3 * med["ort"],
            "device_half_ms_median": 1e3 * med["torch"],
            "encode_ms_median": 1e3 * med["encode"], "decode_ms_median": 1e3 * med["decode"],
            "ort_device_half_ms_mean": 1e3 * mean["ort"],
            "device_half_ms_mean": 1e3 * mean["torch"],
            "encode_ms_mean": 1e3 * mean["encode"], "decode_ms_mean": 1e3 * mean["decode"],
            "codec_share_of_ort_device_half_median": codec_med / med["ort"],
            "codec_share_of_ort_device_half_mean": codec_mean / mean["ort"],
            "codec_share_of_device_half_median": codec_med / med["torch"],
            "coder_calls_ms_median": 1e3 * med["coder"],
            "coder_calls_share_of_ort_device_half_median": med["coder"] / med["ort"],
            "codec_share_of_device_half_mean": codec_mean / mean["torch"]}


def _ort_session(split: SplitModel, x: torch.Tensor, out: Path):
    from splitexit.export.onnx import export_piece
    from splitexit.runtime.ort import OrtSession

    path = export_piece(split.device_half, x[:2], out / "work" / "entropy_device.onnx")
    return OrtSession(path, threads=1)


def _ort_identical(split: SplitModel, x: torch.Tensor, session) -> dict:
    """Messages from the device half on ONNX Runtime vs PyTorch, sample by sample."""
    same = 0
    with torch.inference_mode():
        for i in range(0, len(x), 256):
            zt = split.device_half(x[i: i + 256]).numpy()
            zo = session.run_arrays([x[i: i + 256].numpy()])[0]
            for j in range(len(zt)):
                same += split.codec.encode(zt[j: j + 1]) == split.codec.encode(zo[j: j + 1])
    return {"samples": len(x), "identical_messages": int(same)}


def _curve_rows(rows: list[dict], references: list[dict], image_rows: list[dict]) -> list[dict]:
    """One row per point of the rate-accuracy curves (the plot's data)."""
    out = []
    for r in references[1:]:
        if r["bytes_per_sample"] > 0:
            out.append({"curve": r["method"], "method": r["method"],
                        "bytes_per_sample": r["bytes_per_sample"], "accuracy": r["accuracy"]})
    for r in image_rows:
        out.append({k: r.get(k) for k in ("curve", "method", "bytes_per_sample", "accuracy",
                                          "accuracy_drop_pt", "drop_vs_control_pt")})
    for r in rows:
        m = r["method"]
        if m.startswith("entropy") or (m.startswith("bottlefit") and r["codec"] in _CURVE_CODECS):
            out.append({"curve": r["curve"] if m.startswith("entropy")
                        else f"{m.rsplit(' ', 1)[0]} {r['codec']}", "method": m,
                        "bytes_per_sample": r["bytes_per_sample"],
                        "batched_bytes_per_sample": r["batched_bytes_per_sample"],
                        "accuracy": r["accuracy"], "accuracy_drop_pt": r["accuracy_drop_pt"],
                        "drop_vs_control_pt": r.get("drop_vs_control_pt")})
    return out


_CURVE_CODECS = ("int8", "int4", "int8+zstd", "int4+zstd", "int8:v2", "int4:v2")


def _entropy_targets(rows: list[dict], unsplit_acc: float, control_acc: float | None,
                     ort_checks: list[dict]) -> tuple[dict, list[str]]:
    ent = [r for r in rows if r["method"].startswith("entropy")]
    if not ent:
        return {}, ["No entropy bottleneck in this run."]
    ref_acc = control_acc if control_acc is not None else unsplit_acc
    ref_name = "the equally trained control" if control_acc is not None else "the unsplit model"
    within = [r for r in ent if 100 * (ref_acc - r["accuracy"]) <= 0.5]
    small = min(within, key=lambda r: r["bytes_per_sample"], default=None)
    bf = [r for r in rows if r["method"].startswith("bottlefit") and r["codec"] == "int4:v2"]
    bf = min(bf, key=lambda r: abs(r["bytes_per_sample"] - 71.0), default=None)
    at = [r for r in ent if bf is not None and r["bytes_per_sample"] <= bf["bytes_per_sample"]]
    best_at = max(at, key=lambda r: r["accuracy"], default=None)
    gain = 100 * (best_at["accuracy"] - bf["accuracy"]) if best_at and bf else None
    timed = small or min(ent, key=lambda r: r["bytes_per_sample"])
    share = timed["codec_share_of_ort_device_half_median"]
    # the smallest message within 0.5 pt on each curve (each cut and training): what each
    # choice of cut costs on the device
    per_curve = {}
    for r in within:
        if r["curve"] not in per_curve or r["bytes_per_sample"] < \
                per_curve[r["curve"]]["bytes_per_sample"]:
            per_curve[r["curve"]] = r
    keys = ("method", "cut", "bytes_per_sample", "batched_bytes_per_sample", "accuracy",
            "accuracy_drop_pt", "device_macs", "device_macs_share_of_unsplit",
            "ort_device_half_ms_median", "codec_share_of_ort_device_half_median")
    t = {
        "entropy_reference": ref_name, "entropy_reference_accuracy": ref_acc,
        "entropy_smallest_within_0.5pt": small and {k: small[k] for k in keys}
        | {"drop_vs_reference_pt": 100 * (ref_acc - small["accuracy"])},
        "entropy_smallest_within_0.5pt_per_curve": {
            c: {k: r[k] for k in keys} for c, r in per_curve.items()},
        "entropy_24B_within_0.5pt_met": bool(small and small["bytes_per_sample"] <= 24),
        "bottlefit_comparison_row": bf and bf["method"],
        "entropy_best_at_bottlefit_bytes": best_at and best_at["method"],
        "entropy_gain_at_bottlefit_bytes_pt": gain,
        "entropy_gain_0.3pt_met": bool(gain is not None and gain >= 0.3),
        "entropy_codec_timed_row": timed["method"],
        "entropy_codec_share_of_ort_device_half_median": share,
        "entropy_codec_share_of_torch_device_half_median":
            timed["codec_share_of_device_half_median"],
        "entropy_codec_share_met": bool(share <= 0.10),
        "entropy_coder_calls_share_of_ort_device_half_median":
            timed.get("coder_calls_share_of_ort_device_half_median"),
        "entropy_ort_identical_messages": ort_checks,
        "entropy_rounding_in_graph": {k: timed[k] for k in (
            "rounded_ort_device_half_ms_median", "rounded_encode_ms_median",
            "rounded_codec_share_of_ort_device_half_median", "rounded_device_time_ratio_median",
            "rounded_same_messages", "rounded_samples") if k in timed} or None,
    }
    notes = [
        "Target <= 24 B per one-sample message within 0.5 pt of " + ref_name + ": "
        + ("met" if t["entropy_24B_within_0.5pt_met"] else "not met")
        + (f" (smallest within 0.5 pt: {small['method']}, {small['bytes_per_sample']:.1f} B, "
           f"{100 * (ref_acc - small['accuracy']):.2f} pt below it, "
           f"{small['batched_bytes_per_sample']:.1f} B per sample batched; cut "
           f"{small['cut']!r}, device half {small['device_macs'] / 1e6:.2f} MMAC = "
           f"{small['device_macs_share_of_unsplit']:.0%} of the unsplit model's MACs)" if small
           else " (no entropy bottleneck within 0.5 pt)") + ".",
        *(f"Smallest within 0.5 pt of {ref_name} on curve '{c}': {r['method']}, "
          f"{r['bytes_per_sample']:.1f} B, device half {r['device_macs'] / 1e6:.2f} MMAC "
          f"({r['device_macs_share_of_unsplit']:.0%} of the unsplit model)."
          for c, r in per_curve.items()),
        "Target >= 0.3 pt more accurate than BottleFit at its bytes: "
        + ("met" if t["entropy_gain_0.3pt_met"] else "not met")
        + (f" ({best_at['method']}, {best_at['bytes_per_sample']:.1f} B, "
           f"{100 * best_at['accuracy']:.2f}% vs {bf['method']}, {bf['bytes_per_sample']:.1f} B, "
           f"{100 * bf['accuracy']:.2f}%: {gain:+.2f} pt)" if gain is not None
           else " (no comparable rows)") + ".",
        "Target entropy encode + decode <= 10% of the device half's batch-1 latency (the "
        "device half on ONNX Runtime, as the edge runs it): "
        + ("met" if t["entropy_codec_share_met"] else "not met")
        + f" ({timed['method']}: encode {timed['encode_ms_median']:.4f} ms + decode "
          f"{timed['decode_ms_median']:.4f} ms vs device half "
          f"{timed['ort_device_half_ms_median']:.3f} ms on ONNX Runtime, medians: {share:.1%}; "
          f"against the device half in PyTorch, {timed['device_half_ms_median']:.3f} ms: "
          f"{timed['codec_share_of_device_half_median']:.1%}). Of it, constriction's encode "
          f"and decode calls alone take {timed['coder_calls_ms_median']:.4f} ms = "
          f"{timed['coder_calls_share_of_ort_device_half_median']:.1%} of the ONNX Runtime "
          "device half (the floor of any Python wrapper around the maintained coder; the rest "
          "is rounding, the range check, framing, CRC and the tensor on the server).",
        *([] if "rounded_ort_device_half_ms_median" not in timed else [
            "Rounding, range check and offset lowered into the device graph instead (measured, "
            f"not deployed): the graph takes {timed['rounded_ort_device_half_ms_median']:.4f} ms "
            f"against {timed['ort_device_half_ms_median']:.4f} ms, the encode of its symbols "
            f"{timed['rounded_encode_ms_median']:.4f} ms against "
            f"{timed['encode_ms_median']:.4f} ms; the share would read "
            f"{timed['rounded_codec_share_of_ort_device_half_median']:.1%}, but the device's "
            f"time per message (graph + encode) is {timed['rounded_device_time_ratio_median']:.3f}"
            "x the deployed form's (the two take turns in blocks of 55 samples, so the ratio "
            "is interleaved in time): the rounding moves into the graph, it does not go away "
            f"({timed['rounded_same_messages']} of {timed['rounded_samples']} messages "
            "identical)."]),
        *(f"ONNX Runtime vs PyTorch device half ({c['method']}): identical messages for "
          f"{c['identical_messages']} of {c['samples']} test samples." for c in ort_checks),
    ]
    return t, notes


def _plot_curves(out: Path, rows: list[dict], references: list[dict], image_rows: list[dict],
                 unsplit_acc: float, control_acc: float | None) -> str | None:
    """Accuracy against bytes per one-sample message: one line per method family."""
    try:
        plt = pyplot()
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    curves = _curve_rows(rows, references, image_rows)
    groups: dict[str, list[dict]] = {}
    for r in curves:
        groups.setdefault(r["curve"], []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_sample"])
        style = "o-" if name.startswith("entropy") else ("s--" if name in ("JPEG", "WEBP")
                                                        else "^")
        ax.plot([r["bytes_per_sample"] for r in rs], [100 * r["accuracy"] for r in rs], style,
                label=name, ms=4, lw=1.5 if name.startswith("entropy") else 0.8)
    ax.axhline(100 * unsplit_acc, ls=":", color="k", lw=0.8, label="unsplit")
    if control_acc is not None:
        ax.axhline(100 * control_acc, ls="-.", color="gray", lw=0.8, label="control")
        ax.axhline(100 * control_acc - 0.5, ls=":", color="gray", lw=0.6)
    for b, text in ((24, "24 B"), (51, "LoRaWAN 51 B")):
        ax.axvline(b, ls=":", color="r", lw=0.6)
        ax.text(b, 100 * unsplit_acc - 9, text, rotation=90, fontsize=7)
    ax.set_xscale("log")
    lowest = min((100 * r["accuracy"] for r in curves), default=100 * unsplit_acc)
    ax.set_ylim(max(0, min(lowest, 100 * unsplit_acc - 10) - 1), 100 * unsplit_acc + 1.5)
    ax.set_xlabel("bytes per one-sample message (header included)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "rate_accuracy.png", dpi=120)
    plt.close(fig)
    return "rate_accuracy.png"
