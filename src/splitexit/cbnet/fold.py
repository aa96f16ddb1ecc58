"""Folding the converter into the classifier: two linear layers in a row are one linear map.

A converter whose output layer is linear (``ConvertingAutoencoder(..., output="linear")``) feeds
the light classifier's first convolution, which is linear too. Their composition, applied to
the converter's hidden code ``z`` (the output of its last non-linearity), is one affine map
``W z + b``: :func:`fold_linear` computes it by pushing the basis of the code through both
layers in float64, and :func:`fold_pipeline` replaces the two layers with that one dense layer.
At batch 1 the folded pipeline runs one ``Gemm`` where the unfolded one ran ``Gemm``, a reshape
and a ``Conv`` (the fold trades MACs for operators: ``code x conv-output`` multiply-adds
against ``code x image + conv``; the benchmark measures which is faster).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..stages import Stage, StagedModel
from .pipeline import CBNetPipeline

__all__ = ["FoldedPipeline", "fold_linear", "fold_pipeline", "LINEAR_LAYERS"]

#: layers that are affine maps of their input (in eval mode), so a run of them folds
LINEAR_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                 nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Flatten, nn.Unflatten, nn.Identity)


def _describe(module: nn.Module) -> str:
    return type(module).__name__


@torch.no_grad()
def fold_linear(layers: Sequence[nn.Module], in_shape: Sequence[int]) -> nn.Sequential:
    """One dense layer equal to the affine layers ``layers`` applied in order.

    Args:
        layers: affine layers (:data:`LINEAR_LAYERS`), e.g. the converter's output ``Linear``
            and ``Unflatten`` followed by the classifier's first ``Conv2d``.
        in_shape: per-sample shape of their input (the converter's hidden code).

    Returns:
        ``nn.Sequential(nn.Linear(prod(in_shape), prod(out_shape)), nn.Unflatten(1, out_shape))``
        (just the ``Linear`` when the output is flat), in float32, computing the same map.

    Raises:
        InputError: a layer that is not affine (a fold across a non-linear layer), no layers,
            or an input shape the layers cannot take.
    """
    layers = list(layers)
    if not layers:
        raise InputError("nothing to fold: give at least one linear layer")
    for layer in layers:
        if not isinstance(layer, LINEAR_LAYERS):
            raise InputError(
                f"cannot fold across the non-linear layer {_describe(layer)}: only a run of "
                f"linear layers ({', '.join(t.__name__ for t in LINEAR_LAYERS)}) composes into "
                "one linear map; train the converter with output='linear' (no sigmoid) and fold "
                "it into the classifier's first convolution")
    in_shape = tuple(int(d) for d in in_shape)
    chain = nn.Sequential(*layers)
    was_training = chain.training
    chain.eval()
    size = math.prod(in_shape)
    # Row 0: the zero code (the bias); rows 1..size: the basis vectors.
    basis = torch.cat([torch.zeros(1, size, dtype=torch.float64),
                       torch.eye(size, dtype=torch.float64)]).reshape(size + 1, *in_shape)
    try:
        out = chain.double()(basis)
    except RuntimeError as exc:
        raise InputError(f"the layers to fold cannot take a code of shape {in_shape}: "
                         f"{exc}") from exc
    finally:
        chain.float()
        chain.train(was_training)
    out_shape = tuple(out.shape[1:])
    flat = out.reshape(size + 1, -1)
    bias = flat[0]
    weight = (flat[1:] - bias).T  # (out, in)
    dense = nn.Linear(size, flat.shape[1])
    dense.weight.copy_(weight.float())
    dense.bias.copy_(bias.float())
    parts: list[nn.Module] = [] if len(in_shape) == 1 else [nn.Flatten()]
    parts.append(dense)
    if len(out_shape) > 1:
        parts.append(nn.Unflatten(1, out_shape))
    return nn.Sequential(*parts)


def _trailing_linear(net: nn.Sequential) -> int:
    """Index of the first layer of the run of linear layers that ends ``net``."""
    k = len(net)
    while k > 0 and isinstance(net[k - 1], LINEAR_LAYERS):
        k -= 1
    return k


def _first_layers(classifier: nn.Module) -> tuple[list[nn.Module], list[nn.Module], str]:
    """The classifier split as (its first stage's leading layer, the rest of that stage) plus
    that stage's name; the classifier is a :class:`StagedModel` or an ``nn.Sequential``."""
    if isinstance(classifier, StagedModel):
        first, name = classifier.stages[0].module, classifier.stages[0].name
    elif isinstance(classifier, nn.Sequential):
        first, name = classifier, "folded"
    else:
        raise InputError(f"the classifier must be a StagedModel or nn.Sequential to fold into, "
                         f"got {type(classifier).__name__}")
    layers = list(first) if isinstance(first, nn.Sequential) else [first]
    return layers[:1], layers[1:], name


class FoldedPipeline(CBNetPipeline):
    """A CBNet pipeline whose converter output layer and classifier input layer are one dense
    layer (:func:`fold_pipeline`); same logits as the unfolded pipeline within float error.

    Attributes:
        converter: the converter up to its hidden code (its last non-linearity).
        classifier: the folded layer, then the rest of the light classifier.
    """

    def __init__(self, converter: nn.Module, classifier: nn.Module,
                 input_shape: Sequence[int], num_classes: int, info: dict | None = None):
        nn.Module.__init__(self)  # the unfolded pipeline's fit checks do not apply here
        self.converter = converter
        self.classifier = classifier
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.info = dict(info or {})


def fold_pipeline(pipeline: nn.Module) -> FoldedPipeline:
    """Fold a CBNet pipeline's converter output layer(s) into its classifier's first layer.

    Args:
        pipeline: a :class:`~splitexit.cbnet.CBNetPipeline` whose converter ends in linear
            layers (``output="linear"``) and whose classifier starts with a linear layer.

    Returns:
        A :class:`FoldedPipeline` (new modules; the pipeline is not changed).

    Raises:
        InputError: the converter ends with a non-linear layer (e.g. the published sigmoid)
            or the classifier starts with one: a fold across a non-linear layer.
    """
    converter = pipeline.converter
    net = getattr(converter, "net", converter)
    if not isinstance(net, nn.Sequential):
        raise InputError(f"the converter must be an nn.Sequential (or have one as .net) to fold, "
                         f"got {type(net).__name__}")
    k = _trailing_linear(net)
    if k == len(net) or not any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                               nn.ConvTranspose1d, nn.ConvTranspose2d,
                                               nn.ConvTranspose3d)) for m in net[k:]):
        raise InputError(
            f"cannot fold across the non-linear layer {_describe(net[max(k - 1, 0)])} that "
            "ends the converter: its output is not a linear map of its hidden code; train the converter "
            "with output='linear' (ConvertingAutoencoder(..., output='linear'))")
    head, rest, name = _first_layers(pipeline.classifier)
    if not isinstance(head[0], LINEAR_LAYERS):
        raise InputError(f"cannot fold across the non-linear layer {_describe(head[0])} that "
                         "starts the classifier; folding needs a linear first layer (a conv)")
    encoder = copy.deepcopy(nn.Sequential(*net[:k]))
    input_shape = tuple(pipeline.input_shape)
    with torch.no_grad():
        code_shape = tuple(encoder.eval()(torch.full((1, *input_shape), 0.5)).shape[1:])
    folded = fold_linear([*net[k:], *head], code_shape)
    first = nn.Sequential(*folded, *copy.deepcopy(rest))
    classifier = pipeline.classifier
    if isinstance(classifier, StagedModel):
        stages = [Stage(first, name), *copy.deepcopy(list(classifier.stages[1:]))]
        new_classifier: nn.Module = StagedModel(stages, list(classifier.cut_names))
    else:
        new_classifier = first
    info = {**getattr(pipeline, "info", {}), "folded": True}
    return FoldedPipeline(encoder, new_classifier, input_shape, pipeline.num_classes,
                          info).eval()
