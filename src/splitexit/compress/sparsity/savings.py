"""What predefined sparsity saves: MACs counting only kept connections
(:func:`effective_macs`) and the bytes of a model stored dense (:func:`dense_weight_bytes`)."""

from __future__ import annotations

from torch import nn

from ...cost import count_macs
from .layers import sparse_layers

__all__ = ["dense_weight_bytes", "effective_macs"]


def effective_macs(module: nn.Module, example: object) -> float:
    """MACs of one call on ``example`` counting only kept connections of sparse layers.

    Dense MACs come from torch's flop counter; each sparse layer's share is scaled by its
    density (its MACs are exactly proportional to the kept weights). The example's batch is
    counted whole: pass one sample for per-sample MACs.
    """
    layers = sparse_layers(module)
    saved: list[float] = []

    def hook(m, args, out):
        per_output = m.weight[0].numel()  # in_features, or in_channels * kernel size
        saved.append(out.numel() * per_output * (1 - m.density))

    handles = [layer.register_forward_hook(hook) for layer in layers.values()]
    kernels = {n: layer.kernel for n, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_kernel("dense")
        total = count_macs(lambda: module(example))
    finally:
        for h in handles:
            h.remove()
        for n, layer in layers.items():
            layer.set_kernel(kernels[n])
    return total - sum(saved)


def dense_weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers stored dense (masks excluded)."""
    masks = {id(layer.mask) for layer in sparse_layers(module).values()}
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]
               if id(t) not in masks)
