"""Kernel autotuning: time each kernel a sparse layer supports on its real input and keep the
fastest (:func:`choose_kernels`)."""

from __future__ import annotations

import torch
from torch import nn

from ...measure import measure_latency
from .layers import KERNELS, sparse_layers

__all__ = ["choose_kernels"]


@torch.inference_mode()
def choose_kernels(module: nn.Module, example: object, repeats: int = 30,
                   min_speedup: float = 1.1) -> dict[str, dict]:
    """Time every kernel a sparse layer supports (dense, CSR, grouped for block patterns) on
    its real input; keep the fastest.

    A sparse kernel is kept only when it is at least ``min_speedup`` times faster than dense,
    so noise does not pick it. Measure at the batch size you deploy at (1 for latency).

    Args:
        module: a model containing sparse layers (run in eval mode).
        example: an input batch for ``module``.
        repeats: timed calls per kernel (median).
        min_speedup: how much faster CSR must be to be chosen.

    Returns:
        ``{layer: {"dense_us", "kernel", and "csr_us" / "grouped_us" where supported}}``.
    """
    layers = sparse_layers(module)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, name=name: inputs.setdefault(name, args[0].clone()))
        for name, layer in layers.items()]
    was_training = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        module(example)
    finally:
        for h in hooks:
            h.remove()
    chosen = {}
    for name, layer in layers.items():
        if name not in inputs:
            continue
        x = inputs[name]
        timings = {}
        for kernel in KERNELS:
            if not layer._supports(kernel):
                continue
            layer.set_kernel(kernel)
            timings[kernel] = measure_latency(lambda layer=layer, x=x: layer(x), repeats, warmup=1)
        fastest = min(timings, key=timings.get)
        best = fastest if timings[fastest] * min_speedup < timings["dense"] else "dense"
        layer.set_kernel(best)
        chosen[name] = {"kernel": best, **{f"{k}_us": 1e6 * v for k, v in timings.items()}}
    for m, mode in was_training:
        m.training = mode
    return chosen
