"""Building a multi-exit segmentation model from a JSON description (backbone settings plus one
dense head per exit, each with its own type), so searched models save and rebuild."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import InputError
from ..multiexit import MultiExitModel
from ..zoo import create_multiexit
from .heads import create_dense_head

__all__ = ["create_segmenter", "segmenter_config", "head_macs"]


def create_segmenter(num_classes: int = 11, input_shape: Sequence[int] = (1, 64, 64),
                     heads: Sequence[Mapping] = (), model: str = "segnet",
                     model_kwargs: Mapping | None = None) -> MultiExitModel:
    """A dense multi-exit model: zoo backbone ``model`` with ``heads``, each
    ``{"cut": ..., "kind": ..., **head_kwargs}`` (kinds of
    :func:`~splitexit.segmentation.list_dense_heads`; types may differ per exit).

    Raises:
        InputError: an unknown cut or head kind, a head whose cut cannot be upsampled to the
            output, or an input size the backbone cannot take.
    """
    base = create_multiexit(model, num_classes, input_shape, exits=[],
                            **dict(model_kwargs or {}))
    shapes = base.backbone.payload_shapes(torch.zeros(1, *input_shape))
    built = {}
    for spec in heads:
        spec = dict(spec)
        try:
            cut, kind = spec.pop("cut"), spec.pop("kind")
        except KeyError:
            raise InputError(f"a head is described as {{'cut': ..., 'kind': ...}}, got "
                             f"{sorted(spec)}") from None
        base.backbone.cut_index(cut)
        spec.setdefault("guide", getattr(base.backbone, "guide", 0))  # a guided backbone's
        built[cut] = create_dense_head(kind, shapes[cut], num_classes,
                                       out_size=tuple(input_shape[1:]), **spec)
    out = MultiExitModel(base.backbone, built, input_shape=input_shape, dense=True)
    out.segmenter = {"num_classes": num_classes, "input_shape": list(input_shape),
                     "model": model, "model_kwargs": dict(model_kwargs or {}),
                     "heads": [dict(h) for h in heads]}
    # what a checkpoint stores: splitexit.checkpoint.load rebuilds it with create_segmenter
    out.spec = {"segmenter": segmenter_config(out)}
    return out


def segmenter_config(model: MultiExitModel) -> dict:
    """The JSON description :func:`create_segmenter` rebuilds ``model`` from."""
    config = getattr(model, "segmenter", None)
    if config is None:
        raise InputError("this model was not built by create_segmenter; describe it yourself")
    return {**config, "heads": [dict(h) for h in config["heads"]]}


def head_macs(head: torch.nn.Module) -> float:
    """MACs of one dense head on one sample (torch's flop counter)."""
    from ..cost import count_macs

    x = torch.zeros(1, *head.in_shape)
    was = head.training
    head.eval()
    with torch.no_grad():
        macs = count_macs(lambda: head(x))
    head.train(was)
    return float(macs)
