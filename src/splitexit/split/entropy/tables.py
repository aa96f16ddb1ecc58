"""The frozen prior of an entropy bottleneck: integer frequency tables and their JSON file.

Tables file (JSON, no pickle; :meth:`EntropyTables.save` / :meth:`EntropyTables.load`)::

    {"format": "splitexit-entropy-tables", "version": 1, "shape": [C, H, W], "lo": int,
     "symbols": S, "precision": P, "freqs": base64 of u32 little-endian (C*H*W, S) array,
     "sha256": hex digest of the canonical table bytes}

Each row of ``freqs`` holds positive integers that sum to exactly ``2**P``; a file whose
digest, sums or sizes disagree (or whose digest differs from the one a manifest expects) is
refused with :class:`~splitexit.errors.CorruptFileError`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CorruptFileError, InputError

__all__ = ["ENTROPY_FORMAT", "MAX_SYMBOLS", "MAX_ELEMENTS", "MAX_PRECISION", "EntropyTables",
           "tables_from_pmf"]

ENTROPY_FORMAT = "splitexit-entropy-tables"
_FILE_VERSION = 1
MAX_SYMBOLS = 4096
MAX_ELEMENTS = 1 << 20
MAX_PRECISION = 24


@dataclass(frozen=True, eq=False)
class EntropyTables:
    """The frozen prior: one integer frequency table per latent element.

    Attributes:
        shape: Latent shape of one sample, ``(C, H, W)``.
        lo: The integer that symbol 0 stands for; symbol ``s`` is the value ``lo + s``.
        freqs: uint32 array ``(C*H*W, S)``; each row positive, summing to ``2**precision``.
        precision: Bits of the frequencies (at most 24).
    """

    shape: tuple[int, ...]
    lo: int
    freqs: np.ndarray
    precision: int = 16

    def __post_init__(self) -> None:
        _check_tables(self.shape, self.lo, self.freqs, self.precision, InputError)
        freqs = np.ascontiguousarray(self.freqs, dtype=np.uint32)
        freqs.setflags(write=False)
        object.__setattr__(self, "freqs", freqs)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "lo", int(self.lo))
        object.__setattr__(self, "_digest", hashlib.sha256(self.canonical_bytes()).hexdigest())

    @property
    def symbols(self) -> int:
        """Alphabet size S."""
        return int(self.freqs.shape[1])

    @property
    def hi(self) -> int:
        """Largest value the tables can code."""
        return self.lo + self.symbols - 1

    @property
    def numel(self) -> int:
        """Latent elements of one sample."""
        return math.prod(self.shape)

    def canonical_bytes(self) -> bytes:
        """What the digest covers: a fixed header (version, shape, lo, S, P) and the table."""
        head = json.dumps({"v": _FILE_VERSION, "shape": list(self.shape), "lo": self.lo,
                           "S": self.symbols, "P": self.precision}, sort_keys=True).encode()
        return head + b"\0" + self.freqs.astype("<u4").tobytes()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of :meth:`canonical_bytes` (what a manifest records)."""
        return self._digest

    @property
    def codec_id(self) -> int:
        """The byte every message carries: the first byte of the digest."""
        return int(self._digest[:2], 16)

    def probabilities(self) -> np.ndarray:
        """float64 ``(C*H*W, S)``: ``freqs / 2**precision`` (exact in float64)."""
        return self.freqs.astype(np.float64) / float(1 << self.precision)

    def bits(self, q: np.ndarray) -> np.ndarray:
        """Ideal code length in bits of each sample of integer latents ``q`` (N, C, H, W)."""
        sym = np.clip(np.asarray(q, np.int64).reshape(len(q), -1) - self.lo, 0,
                      self.symbols - 1)
        logp = np.log2(self.probabilities())
        return -logp[np.arange(self.numel)[None, :], sym].sum(1)

    def to_json(self) -> dict:
        """The JSON document of the tables file."""
        return {"format": ENTROPY_FORMAT, "version": _FILE_VERSION, "shape": list(self.shape),
                "lo": self.lo, "symbols": self.symbols, "precision": self.precision,
                "freqs": base64.b64encode(self.freqs.astype("<u4").tobytes()).decode("ascii"),
                "sha256": self.sha256}

    def save(self, path: str | Path) -> Path:
        """Write the tables file (JSON)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def from_json(cls, doc: Any, where: str = "entropy tables",
                  expect_sha256: str | None = None) -> EntropyTables:
        """Tables from a parsed tables document, every field checked.

        Raises:
            CorruptFileError: a missing or malformed field, a table that is not normalised,
                a digest that does not match the table, or a digest other than
                ``expect_sha256`` (the one the manifest recorded).
        """
        def bad(msg: str) -> CorruptFileError:
            return CorruptFileError(f"{where}: {msg}; re-export the entropy tables with the "
                                    "model (splitexit.split.bottleneck.freeze_tables)")

        if not isinstance(doc, dict) or doc.get("format") != ENTROPY_FORMAT:
            raise bad(f"not a {ENTROPY_FORMAT} document")
        if doc.get("version") != _FILE_VERSION:
            raise bad(f"unsupported version {doc.get('version')!r} (this splitexit reads "
                      f"{_FILE_VERSION})")
        try:
            shape = tuple(doc["shape"])
            lo, symbols, precision = doc["lo"], doc["symbols"], doc["precision"]
            digest = doc["sha256"]
            ints = (*shape, lo, symbols, precision)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                raise bad("shape, lo, symbols and precision must be integers")
            if not isinstance(digest, str) or not isinstance(doc["freqs"], str):
                raise bad("sha256 and freqs must be strings")
            if len(shape) != 3 or min(shape) < 1 or math.prod(shape) > MAX_ELEMENTS:
                raise bad(f"shape {list(shape)} is not (C, H, W) with at most "
                          f"{MAX_ELEMENTS} elements")
            if not 2 <= symbols <= MAX_SYMBOLS:
                raise bad(f"symbols {symbols} outside 2..{MAX_SYMBOLS}")
            want = 4 * math.prod(shape) * symbols
            if len(doc["freqs"]) > 4 * (want // 3 + 3):  # bound before decoding base64
                raise bad("freqs is longer than shape and symbols allow")
            raw = base64.b64decode(doc["freqs"], validate=True)
        except KeyError as e:
            raise bad(f"missing field {e}") from e
        except (TypeError, ValueError) as e:
            raise bad(f"malformed field ({e})") from e
        if len(raw) != want:
            raise bad(f"freqs holds {len(raw)} bytes, shape {list(shape)} with {symbols} "
                      f"symbols needs {want}")
        freqs = np.frombuffer(raw, dtype="<u4").reshape(math.prod(shape), symbols)
        _check_tables(shape, lo, freqs, precision, lambda m: bad(m))
        tables = cls(shape, lo, freqs.astype(np.uint32), precision)
        if tables.sha256 != digest:
            raise bad("the sha256 recorded in the file does not match its table (corrupt or "
                      "edited table)")
        if expect_sha256 is not None and tables.sha256 != expect_sha256:
            raise CorruptFileError(
                f"{where}: the tables' sha256 {tables.sha256[:16]}... does not match the "
                f"{expect_sha256[:16]}... the manifest records: these tables belong to another "
                "model; export the bundle again")
        return tables

    @classmethod
    def load(cls, path: str | Path, expect_sha256: str | None = None) -> EntropyTables:
        """Read a tables file (see :meth:`from_json`)."""
        path = Path(path)
        try:
            text = path.read_text()
            if len(text) > 64 * MAX_ELEMENTS:
                raise CorruptFileError(f"{path}: entropy tables file too large")
            doc = json.loads(text)
        except OSError as e:
            raise InputError(f"cannot read entropy tables {path}: {e}") from e
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{path}: not JSON ({e}); re-export the entropy tables") from e
        return cls.from_json(doc, str(path), expect_sha256)


def _check_tables(shape, lo, freqs, precision, error) -> None:
    if (not isinstance(precision, int) or isinstance(precision, bool)
            or not 1 <= precision <= MAX_PRECISION):
        raise error(f"precision must be an int in 1..{MAX_PRECISION}, got {precision!r}")
    if isinstance(lo, bool) or not isinstance(lo, (int, np.integer)) or abs(int(lo)) > 2**20:
        raise error(f"lo must be an int of magnitude <= 2**20, got {lo!r}")
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise error(f"shape must be (C, H, W) with positive sizes, got {shape!r}")
    freqs = np.asarray(freqs)
    n = math.prod(int(s) for s in shape)
    if freqs.ndim != 2 or freqs.shape[0] != n or not 2 <= freqs.shape[1] <= MAX_SYMBOLS:
        raise error(f"freqs must have shape ({n}, S) with 2 <= S <= {MAX_SYMBOLS}, got "
                    f"{freqs.shape}")
    if not np.issubdtype(freqs.dtype, np.integer):
        raise error(f"freqs must be integers, got {freqs.dtype}")
    f = freqs.astype(np.int64)
    if (f < 1).any():
        raise error("every frequency must be >= 1 (each symbol codable)")
    if (f.sum(1) != 1 << precision).any():
        raise error(f"every row of freqs must sum to 2**precision = {1 << precision}")


def tables_from_pmf(pmf: np.ndarray, shape: tuple[int, ...], lo: int,
                    precision: int = 16) -> EntropyTables:
    """Integer tables from a float pmf ``(C*H*W, S)`` (rows need not be normalised).

    Each symbol gets at least frequency 1; the rounding remainder goes to each row's most
    probable symbol. Computed in float64 with exact integer fix-up, so the same pmf always
    gives the same tables.
    """
    p = np.asarray(pmf, np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or (p < 0).any():
        raise InputError("pmf must be a finite, non-negative (elements, symbols) array")
    total = 1 << precision
    s = p.shape[1]
    if s > total // 2:
        raise InputError(f"{s} symbols need more than {precision} bits of precision")
    rows = p.sum(1, keepdims=True)
    p = np.where(rows > 0, p / np.where(rows > 0, rows, 1), 1.0 / s)
    freqs = np.floor(p * (total - s)).astype(np.int64) + 1
    short = total - freqs.sum(1)
    freqs[np.arange(len(freqs)), p.argmax(1)] += short
    return EntropyTables(tuple(shape), int(lo), freqs.astype(np.uint32), precision)
