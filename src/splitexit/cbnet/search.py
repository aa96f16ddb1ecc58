"""Converter search for speed at a fixed accuracy.

Candidates (:data:`SEARCH_SPACE`) are narrower fully connected autoencoders, a small
convolutional one and converters distilled from the published one (:data:`PUBLISHED`), all
with a linear output so they fold into the classifier (:func:`~splitexit.cbnet.fold_pipeline`).
:func:`select_fastest` keeps the candidates whose calibration accuracy reaches a floor (e.g.
BranchyNet's) and picks the one with the lowest batch-1 latency measured on ONNX Runtime, the
deployment runtime, timed interleaved on calibration images (never the test split).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import Split
from ..errors import InputError
from ..training import Baseline, train
from ..training.base import TrainHistory
from .converter import ConvertingAutoencoder

__all__ = ["ConverterSpec", "PUBLISHED", "SEARCH_SPACE", "Selection", "finetune_joint",
           "onnx_latency", "select_fastest"]


@dataclass(frozen=True)
class ConverterSpec:
    """One converter to try.

    Attributes:
        name: label in reports.
        kind, hidden, channels, output: :class:`ConvertingAutoencoder` arguments.
        distilled: trained on the published converter's outputs instead of the targets.
    """

    name: str
    kind: str = "fc"
    hidden: tuple[int, ...] = (64,)
    channels: tuple[int, ...] = (16, 32)
    output: str = "linear"
    distilled: bool = False

    def build(self, input_shape: Sequence[int]) -> ConvertingAutoencoder:
        return ConvertingAutoencoder(input_shape, self.kind, self.hidden, self.channels,
                                     self.output)

    def key(self) -> str:
        """A file-name-safe key of every setting."""
        parts = [self.kind, "h" + "-".join(map(str, self.hidden)), self.output]
        if self.kind == "conv":
            parts.append("c" + "-".join(map(str, self.channels)))
        if self.distilled:
            parts.append("distilled")
        return "_".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


#: the published converter (Dogra et al.): 784-512-384-256-64-784, sigmoid output
PUBLISHED = ConverterSpec("fc 784-512-384-256-64-784 (published)", hidden=(512, 384, 256, 64),
                          output="sigmoid")

SEARCH_SPACE: tuple[ConverterSpec, ...] = (
    ConverterSpec("fc 784-64-784", hidden=(64,)),
    ConverterSpec("fc 784-32-784", hidden=(32,)),
    ConverterSpec("fc 784-64-784 distilled", hidden=(64,), distilled=True),
    ConverterSpec("fc 784-32-784 distilled", hidden=(32,), distilled=True),
    ConverterSpec("conv 4-8 code 32", kind="conv", hidden=(32,), channels=(4, 8)),
    ConverterSpec("fc 784-128-64-784", hidden=(128, 64)),
    ConverterSpec("fc 784-256-64-784 distilled", hidden=(256, 64), distilled=True),
)


def finetune_joint(pipeline: nn.Module, data: Split, *, epochs: int = 2, lr: float = 5e-4,
                   batch_size: int = 128, seed: int = 0, progress: bool | None = None
                   ) -> TrainHistory:
    """Fine-tune converter and classifier together on the labels (cross-entropy).

    The converter then no longer aims at the target images: it learns whatever code the light
    classifier reads best. Reports must label such pipelines as jointly fine-tuned.
    """
    return train(pipeline, data, Baseline(), epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, progress=progress)


def onnx_latency(modules: Mapping[str, nn.Module], x: torch.Tensor, directory: str | Path,
                 threads: int = 1, warmup: int = 10) -> dict[str, dict]:
    """Batch-1 latency of each module exported to ONNX and run by ONNX Runtime, interleaved
    over the samples ``x`` (``{name: {"mean_ms", "median_ms", ...}}``)."""
    from ..measure import interleaved_latency
    from ..runtime.ort import OrtSession
    from .pipeline import export_onnx

    directory = Path(directory)
    fns = {}
    for i, (name, module) in enumerate(modules.items()):
        session = OrtSession(export_onnx(module.eval(), directory / f"candidate{i}.onnx",
                                         tuple(x.shape[1:])), threads)
        fns[name] = (lambda s: lambda t: s.run_arrays([t.numpy()])[0])(session)
    return interleaved_latency(fns, x, warmup=warmup)


@dataclass
class Selection:
    """What :func:`select_fastest` measured and chose.

    Attributes:
        chosen: the fastest candidate at the accuracy floor (``None``: none reached it).
        min_accuracy: the floor.
        table: per candidate: calibration accuracy, ONNX Runtime batch-1 mean and median
            latency (ms), whether it reached the floor.
    """

    chosen: str | None
    min_accuracy: float
    table: list[dict] = field(default_factory=list)


@torch.no_grad()
def select_fastest(pipelines: Mapping[str, nn.Module], calib: Split, min_accuracy: float, *,
                   samples: int = 2000, threads: int = 1,
                   directory: str | Path | None = None) -> Selection:
    """The fastest pipeline on ONNX Runtime (batch 1) among those whose calibration accuracy
    is at least ``min_accuracy``.

    Args:
        pipelines: ``{name: pipeline}`` (any modules mapping images to logits).
        calib: the calibration split (accuracy on all of it; latency on ``samples`` of it).
        min_accuracy: the accuracy floor, a fraction (e.g. BranchyNet's calibration accuracy).
        samples: calibration images timed one at a time.
        threads: ONNX Runtime threads.
        directory: where the ONNX files go (a temporary directory when ``None``).

    Raises:
        InputError: no pipelines, or ``min_accuracy`` outside [0, 1].
    """
    if not pipelines:
        raise InputError("no candidate pipelines to select from")
    if not 0.0 <= min_accuracy <= 1.0:
        raise InputError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy!r}")
    accuracy = {}
    for name, module in pipelines.items():
        module.eval()
        pred = torch.cat([module(calib.x[i: i + 1024]).argmax(1)
                          for i in range(0, len(calib.x), 1024)])
        accuracy[name] = float((pred == calib.y).double().mean())
    with tempfile.TemporaryDirectory(prefix="splitexit-search-") as tmp:
        latency = onnx_latency(pipelines, calib.x[:samples], directory or tmp, threads)
    table = [{"candidate": n, "calib_accuracy": accuracy[n],
              "onnx_latency_ms": latency[n]["mean_ms"],
              "onnx_latency_p50_ms": latency[n]["median_ms"],
              "meets_accuracy": accuracy[n] >= min_accuracy} for n in pipelines]
    ok = [r for r in table if r["meets_accuracy"]]
    chosen = min(ok, key=lambda r: r["onnx_latency_ms"])["candidate"] if ok else None
    for r in table:
        r["chosen"] = r["candidate"] == chosen
    return Selection(chosen, min_accuracy, table)
