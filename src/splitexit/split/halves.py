"""Device and server halves of a split model, the wire between them, and the cost of every cut.

:func:`split_model` cuts a :class:`~splitexit.stages.StagedModel` (optionally after injecting a
bottleneck) into a :class:`SplitModel`: the device half turns an input into bytes
(:meth:`SplitModel.encode`), the server half turns those bytes into logits
(:meth:`SplitModel.serve`), and ``split(x) == server(decode(encode(device(x))))``. Each half is
an ordinary StagedModel that runs and exports to ONNX on its own. :func:`cut_costs` lists, for
every cut, device MACs, bytes after the codec and server MACs as
:class:`~splitexit.split.planner.CutCost` rows for the planner.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..cost import cost_table, count_macs
from ..errors import InputError
from ..payload import PayloadSpec
from ..stages import Payload, StagedModel
from .bottleneck import BottleneckedModel, BottleneckSpec, eval_mode, inject_bottleneck
from .codec import DEFAULT_MAX_BYTES, Codec
from .planner import LOCAL, OFFLOAD, CutCost

__all__ = ["SplitModel", "split_model", "cut_costs", "input_message_bytes",
           "num_params"]


def num_params(module: nn.Module) -> int:
    """Number of parameters of ``module``, counting shared ones once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _example_input(model: StagedModel, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
            raise InputError("example must be an input batch tensor with at least one sample, "
                             f"got {type(example).__name__}")
        return example
    shape = (getattr(model, "spec", None) or {}).get("input_shape")
    if shape is None:
        raise InputError("pass example= (an input batch, e.g. dataset.test.x[:8]) so the split "
                         "knows the payload shape at the cut")
    return torch.rand(2, *shape)


class SplitModel(nn.Module):
    """A model cut into a device half and a server half with a codec between them.

    ``forward(x)`` runs ``server(decode(encode(device(x))))``; without a codec it runs
    ``server(device(x))`` with no bytes in between (bit-for-bit the unsplit model).

    Attributes:
        device_half: Stages up to the cut (StagedModel; exportable on its own).
        server_half: Stages after the cut.
        cut: Name of the cut.
        codec: Wire codec, or None for no serialisation.
        payload_spec: What the server accepts (:class:`~splitexit.payload.PayloadSpec`).
        max_bytes: Largest message the server decodes.
    """

    def __init__(self, device_half: StagedModel, server_half: StagedModel, cut: str,
                 codec: Codec | None, payload_spec: PayloadSpec,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__()
        if codec is not None and not isinstance(codec, Codec):
            raise InputError(f"codec must be a splitexit.split.codec.Codec or None, got "
                             f"{type(codec).__name__}; e.g. Codec.parse('int8+zstd')")
        self.device_half = device_half
        self.server_half = server_half
        self.cut = cut
        self.codec = codec
        self.payload_spec = payload_spec
        self.max_bytes = max_bytes

    # the wire ------------------------------------------------------------------------------
    def _wire_codec(self) -> Codec:
        return self.codec if self.codec is not None else Codec("fp32")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> bytes:
        """Device side: run the device half on ``x`` and serialise the payload."""
        return self._wire_codec().encode(self.device_half(x))

    def decode(self, data: bytes) -> Payload:
        """Server side: parse a message and check it against :attr:`payload_spec`.

        Raises:
            PayloadError: Malformed message, another codec than this split's, or tensors whose
                count, per-sample shape, dtype or batch size do not match the cut's payload.
        """
        payload = self._wire_codec().decode(data, max_bytes=self.max_bytes)
        self.check_payload(payload)
        return payload

    def check_payload(self, payload: Payload) -> None:
        """Raise PayloadError unless ``payload`` matches :attr:`payload_spec`."""
        self.payload_spec.check(payload, f"the server half at cut {self.cut!r}")

    @torch.no_grad()
    def serve(self, data: bytes) -> Payload:
        """Server side: decode a message and run the server half on it."""
        return self.server_half(self.decode(data))

    def forward(self, x: torch.Tensor) -> Payload:
        if self.codec is None:
            return self.server_half(self.device_half(x))
        return self.serve(self.encode(x))

    # sizes and costs -----------------------------------------------------------------------
    @property
    def device_params(self) -> int:
        """Parameters held by the device half."""
        return num_params(self.device_half)

    @property
    def server_params(self) -> int:
        """Parameters held by the server half."""
        return num_params(self.server_half)

    @torch.no_grad()
    def message_bytes(self, x: torch.Tensor, limit: int = 64) -> float:
        """Mean size of a one-sample message over the first ``limit`` samples of ``x``."""
        n = min(limit, x.shape[0])
        payload = self.device_half(x[:n])
        codec = self._wire_codec()
        sizes = [len(codec.encode(_row(payload, i))) for i in range(n)]
        return sum(sizes) / n

    @torch.no_grad()
    def cut_cost(self, example: torch.Tensor, name: str | None = None,
                 exit_fraction: float = 0.0) -> CutCost:
        """This split's per-sample cost for the planner.

        Args:
            example: An input batch; MACs are counted on it and divided by its size; bytes are
                the mean one-sample message size (header included) over up to 64 samples.
            name: Row name (default: the cut name).
            exit_fraction: Fraction of samples leaving at a device-side exit.

        Returns:
            A :class:`~splitexit.split.planner.CutCost`.
        """
        n = example.shape[0]
        with eval_mode(self):
            payload = self.device_half(example)
            device_macs = count_macs(lambda: self.device_half(example)) / n
            server_macs = count_macs(lambda: self.server_half(payload)) / n
            payload_bytes = self.message_bytes(example)
        return CutCost(
            name=name or self.cut,
            device_macs=device_macs,
            server_macs=server_macs,
            payload_bytes=payload_bytes,
            exit_fraction=exit_fraction,
        )

    # export --------------------------------------------------------------------------------
    def export(self, directory: str | Path, example: torch.Tensor) -> dict[str, Path]:
        """Export each half to its own ONNX file (``device.onnx``, ``server.onnx``).

        Args:
            directory: Output directory (created).
            example: An input batch used for tracing.

        Returns:
            ``{"device": path, "server": path}``.
        """
        from ..export.onnx import export_piece

        directory = Path(directory)
        with torch.no_grad():
            payload = self.device_half(example)
        return {"device": export_piece(self.device_half, example, directory / "device.onnx"),
                "server": export_piece(self.server_half, payload, directory / "server.onnx")}


def _row(payload: Payload, i: int) -> Payload:
    if isinstance(payload, tuple):
        return tuple(t[i: i + 1] for t in payload)
    return payload[i: i + 1]


def split_model(model: StagedModel, cut: str | int | None = None, codec: Codec | str | None = None,
                bottleneck: BottleneckSpec | None = None, example: torch.Tensor | None = None,
                max_bytes: int = DEFAULT_MAX_BYTES) -> SplitModel:
    """Cut ``model`` into a device half and a server half.

    Args:
        model: A StagedModel (a :class:`BottleneckedModel` splits at its bottleneck when
            ``cut`` is None).
        cut: Cut name or index. With ``bottleneck``, the cut where it is injected.
        codec: Wire codec (a Codec or its spelling, e.g. ``"int8+zstd"``); None runs the
            halves back to back without serialising.
        bottleneck: Inject a fresh, untrained bottleneck at ``cut`` first (train it with
            :mod:`splitexit.training.bottlefit`), and split between encoder and decoder.
        example: An input batch, to fix the payload's shapes; taken from a zoo model's
            ``spec["input_shape"]`` when omitted.
        max_bytes: Largest message the server half decodes.

    Returns:
        The :class:`SplitModel`; its halves share weights with ``model`` (or with the new
        bottlenecked copy).

    Raises:
        CutError: Unknown cut; the message lists the valid ones.
        InputError: Bad codec spelling, bottleneck at a cut that is not one 4-D tensor.

    Example:
        >>> split = split_model(resnet, "block1", codec="int8")
        >>> logits = split.serve(split.encode(x))
    """
    if not isinstance(model, StagedModel):
        raise InputError(f"split_model needs a StagedModel, got {type(model).__name__}; build "
                         "one with StagedModel.from_module(module, cuts) or zoo.create_model")
    if isinstance(codec, str):
        codec = Codec.parse(codec)
    x = _example_input(model, example)
    if bottleneck is not None:
        if cut is None:
            raise InputError("give the cut where the bottleneck goes, e.g. cut='block1'")
        model = inject_bottleneck(model, cut, bottleneck, x)
        cut = model.bottleneck_cut
    elif cut is None:
        if not isinstance(model, BottleneckedModel):
            raise InputError(f"give a cut; valid cuts: {model.cut_names}")
        cut = model.bottleneck_cut
    index = model.cut_index(cut)
    name = model.cut_names[index]
    device_half, server_half = model.split(index)
    with eval_mode(model), torch.no_grad():
        payload = device_half(x)
    spec = PayloadSpec.of(payload)
    return SplitModel(device_half, server_half, name, codec, spec, max_bytes)


def input_message_bytes(example: torch.Tensor, codec: Codec | None = None) -> float:
    """Size of a one-sample message carrying the raw input as uint8 (full offloading).

    Inputs in [0, 1] are sent as 8-bit pixels (``round(x * 255)``), as a camera would.
    """
    codec = codec or Codec("fp32")
    pixels = (example[:1].clamp(0, 1) * 255).round().to(torch.uint8)
    return float(len(codec.encode(pixels)))


@torch.no_grad()
def cut_costs(model: StagedModel, example: torch.Tensor, codec: Codec | str | None = None,
              cuts: Sequence[str] | None = None, local: bool = True, offload: bool = True
              ) -> list[CutCost]:
    """Per-cut cost of ``model``: device MACs, bytes after the codec, server MACs.

    Args:
        model: The staged model.
        example: An input batch (MACs are per sample; bytes are the mean one-sample message
            size, header included, over up to 64 samples).
        codec: Wire codec or its spelling (default fp32).
        cuts: Cuts to list (default: all of ``model.cut_names``).
        local: Add the ``"local"`` row (everything on the device).
        offload: Add the ``"offload"`` row (the raw input sent as uint8).

    Returns:
        CutCost rows in the order local, the cuts, offload.
    """
    if isinstance(codec, str):
        codec = Codec.parse(codec)
    wire = codec if codec is not None else Codec("fp32")
    if not isinstance(model, StagedModel):
        raise InputError(f"cut_costs takes a StagedModel (a multi-exit model's .backbone), got "
                         f"{type(model).__name__}")
    wanted = list(model.cut_names if cuts is None else cuts)
    at = [model.cut_index(cut) for cut in wanted]
    sample = example[:64]
    with eval_mode(model):  # every module's own mode comes back afterwards
        table = cost_table(model, example, measure=False)  # MACs: not counted again per cut
        payloads = model.forward_intermediates(sample)  # one pass: the payload at every cut
    reached = list(itertools.accumulate(stage.macs for stage in table.stages))
    total = reached[-1]
    rows = [CutCost(LOCAL, total, 0.0, 0.0)] if local else []
    for cut, k in zip(wanted, at):
        sizes = [len(wire.encode(_row(payloads[k], i))) for i in range(len(sample))]
        rows.append(CutCost(cut, reached[k], total - reached[k], sum(sizes) / len(sizes)))
    if offload:
        rows.append(CutCost(OFFLOAD, 0.0, total, input_message_bytes(example)))
    return rows
