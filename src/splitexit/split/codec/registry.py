"""Codecs defined in other modules (e.g. :mod:`splitexit.split.entropy`): their spec prefix
and the first byte of their messages, so that ``Codec.parse`` and the module-level ``decode``
reach them. A module registers itself on import; known prefixes and first bytes import their
module lazily, so a receiver needs no configuration."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_PARSERS: dict[str, Callable[[str], Any]] = {}
_DECODERS: dict[int, Callable[[memoryview, int], np.ndarray]] = {}
_MODULES = {"entropy:": "splitexit.split.entropy", 0xE1: "splitexit.split.entropy",
            0xE9: "splitexit.split.entropy"}


def register_external(prefix: str, parse: Callable[[str], Any], first_bytes: Sequence[int],
                      decode: Callable[[memoryview, int], np.ndarray]) -> None:
    """Hook for another codec module: ``Codec.parse`` hands specs starting with ``prefix``
    to ``parse``; :func:`decode` hands messages starting with one of ``first_bytes`` to
    ``decode(message, max_bytes)``, which returns one float32 array or raises PayloadError."""
    _PARSERS[prefix] = parse
    for b in first_bytes:
        _DECODERS[b] = decode


def _lookup(key: Any, table: dict) -> Any:
    if key not in table and key in _MODULES:
        importlib.import_module(_MODULES[key])
    return table.get(key)


def external_parser(prefix: str) -> Callable[[str], Any] | None:
    """The parser registered for a spec prefix such as ``"entropy:"``, if any."""
    return _lookup(prefix, _PARSERS)


def external_decoder(first_byte: int) -> Callable[[memoryview, int], np.ndarray] | None:
    """The decoder registered for messages starting with ``first_byte``, if any."""
    return _lookup(first_byte, _DECODERS)
