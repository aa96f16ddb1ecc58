"""Connectivity masks of predefined sparsity: fixed fan-in, balanced fan-out, cyclic or block
patterns (see :mod:`splitexit.compress.sparsity`), and recognising a block pattern."""

from __future__ import annotations

import math

import torch

from ...errors import InputError

__all__ = ["PATTERNS", "block_structure", "fixed_fan_mask"]

PATTERNS = ("cyclic", "block", "auto")


def fixed_fan_mask(out_units: int, in_units: int, density: float | None = None,
                   fan_in: int | None = None, seed: int = 0, pattern: str = "cyclic"
                   ) -> torch.Tensor:
    """A ``(out_units, in_units)`` connectivity mask with fixed fan-in and balanced fan-out.

    Every row has exactly ``fan_in`` ones; every column has ``floor`` or ``ceil`` of
    ``out_units * fan_in / in_units`` ones (all equal when that is an integer).

    Args:
        out_units: output units (rows).
        in_units: input units (columns).
        density: fraction of connections kept; ``fan_in = round(density * in_units)``.
        fan_in: connections per output unit (instead of ``density``).
        seed: seed of the random permutations of inputs and outputs.
        pattern: ``"cyclic"``, ``"block"`` (see the module docstring) or ``"auto"`` (block
            where the shape allows it, else cyclic).

    Raises:
        InputError: neither or both of ``density`` / ``fan_in``, a density the shape
            cannot meet (no input per output unit, or some input unit left unconnected), or
            a block pattern whose group count does not divide the layer's shape.
    """
    if pattern not in PATTERNS:
        raise InputError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if (density is None) == (fan_in is None):
        raise InputError("give exactly one of density= or fan_in=")
    if out_units < 1 or in_units < 1:
        raise InputError(f"a layer needs at least one input and output unit, got "
                         f"{out_units}x{in_units}")
    if density is not None:
        if not 0 < density <= 1:
            raise InputError(f"density must be in (0, 1], got {density}")
        fan_in = round(density * in_units)
        if fan_in < 1:
            raise InputError(
                f"density {density} keeps no connection per output unit of a layer with "
                f"{in_units} inputs (fan-in rounds to 0); use density >= {0.5 / in_units:.4g}")
    fan_in = int(fan_in)
    if not 1 <= fan_in <= in_units:
        raise InputError(f"fan-in must be in 1..{in_units}, got {fan_in}")
    if out_units * fan_in < in_units:
        need = math.ceil(in_units / out_units)
        raise InputError(
            f"a {out_units}x{in_units} layer with fan-in {fan_in} leaves "
            f"{in_units - out_units * fan_in} input units unconnected (every input needs "
            f"fan-out >= 1); use fan-in >= {need} (density >= {need / in_units:.4g})")
    g = torch.Generator().manual_seed(seed)
    perm_in = torch.randperm(in_units, generator=g)
    if pattern != "cyclic":
        groups = in_units // fan_in
        if in_units % fan_in == 0 and out_units % groups == 0:
            k, o = fan_in, out_units // groups
            mask = torch.zeros(out_units, in_units, dtype=torch.bool)
            rows = torch.arange(out_units)[:, None]
            mask[rows, perm_in.view(groups, k).repeat_interleave(o, 0)] = True
            return mask
        if pattern == "block":
            options = [f"{1 / d:.4g} (fan-in {in_units // d})" for d in range(1, in_units + 1)
                       if in_units % d == 0 and out_units % d == 0][1:6]
            raise InputError(
                f"a block pattern splits a {out_units}x{in_units} layer into 1/density equal "
                f"groups of inputs and outputs; fan-in {fan_in} makes "
                f"{in_units / fan_in:.4g} groups, which does not divide both. Densities that "
                f"work: {', '.join(options) or 'none below 1'}; or use pattern='cyclic'")
    perm_out = torch.randperm(out_units, generator=g)
    # Row r takes the fan_in consecutive positions r*fan_in ... (mod in): all distinct within
    # a row, and every input is visited floor or ceil(out*fan_in/in) times in total.
    positions = (torch.arange(out_units)[:, None] * fan_in + torch.arange(fan_in)) % in_units
    mask = torch.zeros(out_units, in_units, dtype=torch.bool)
    mask[perm_out[:, None], perm_in[positions]] = True
    return mask


def block_structure(mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(input permutation, groups)`` of a block-pattern mask, or ``None``."""
    out_units, in_units = mask.shape
    fan_in = int(mask[0].sum())
    if fan_in == 0 or in_units % fan_in:
        return None
    groups = in_units // fan_in
    if groups == 1 or out_units % groups:
        return None
    blocks = mask.view(groups, out_units // groups, in_units)
    heads = blocks[:, 0]
    if not bool((blocks == heads[:, None]).all()) or not bool((heads.sum(0) == 1).all()):
        return None
    return heads.nonzero()[:, 1].contiguous(), groups
