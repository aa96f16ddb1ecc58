"""Predefined sparsity: connectivity fixed before training, stored and run sparse for real.

Every output unit gets the same fan-in and every input unit a fan-out as equal as the shape
allows (exactly equal when ``out * fan_in`` is a multiple of ``in``); for convolutions the
pattern is over (output channel, input channel) pairs and keeps whole kernels. The pattern is
chosen once, before training, as a randomly permuted cyclic ("clash-free") pattern, and kept
by reparametrisation: layers compute with ``weight * mask``, so no optimiser step can grow a
pruned connection, and the stored weights of pruned connections stay exactly zero.

Two patterns (``pattern=``):

- ``"cyclic"`` (default): a randomly permuted cyclic pattern, as in the published work; any
  density the shape allows.
- ``"block"``: inputs randomly permuted, then cut into ``g = 1 / density`` equal groups, and
  the outputs into ``g`` contiguous groups; output group ``j`` sees input group ``j`` only.
  Fan-in and fan-out are exactly fixed, as the published patterns require, and the next
  layer's own input permutation mixes the groups. Its point is speed: the layer runs as one
  gather plus ``g`` dense products (a batched matmul, or a grouped convolution), with
  ``1 / g`` of the dense work and none of a sparse format's indexing. It needs ``g`` to
  divide both the input and the output count.

Because the fan-in is fixed, the weights are stored in ELLPACK form, with no row pointers:
one ``(out, fan_in)`` table of input indices in the smallest integer type that fits plus the
values (:func:`save_sparse`); a block pattern stores only its input permutation instead of
the table. At inference a layer runs the dense kernel on its masked weight, a CSR sparse
kernel (``torch.sparse``) or, for block patterns, the grouped kernel; :func:`choose_kernels`
times them on the layer's real input and keeps the fastest, per layer.

Modules: :mod:`.masks` (connectivity patterns), :mod:`.layers` (the sparse layers and their
kernels), :mod:`.surgery` (:func:`sparsify` a model in place), :mod:`.kernels` (kernel
autotuning), :mod:`.savings` (effective MACs, dense bytes), :mod:`.storage` (ELLPACK files).
"""

from __future__ import annotations

from .kernels import choose_kernels
from .layers import KERNELS, SparseConv1d, SparseConv2d, SparseLayer, SparseLinear, sparse_layers
from .masks import PATTERNS, fixed_fan_mask
from .savings import dense_weight_bytes, effective_macs
from .storage import load_sparse, save_sparse
from .surgery import apply_masks_, sparsify

__all__ = ["PATTERNS", "fixed_fan_mask", "SparseLinear", "SparseConv1d", "SparseConv2d", "sparsify",
           "sparse_layers", "apply_masks_", "choose_kernels", "effective_macs", "save_sparse",
           "load_sparse", "dense_weight_bytes", "KERNELS", "SparseLayer"]
