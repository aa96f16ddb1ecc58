"""Entropy-coded bottleneck codec: integer latents -> range-coded bits, deterministic, no torch.

A learned entropy bottleneck (:func:`splitexit.split.bottleneck.inject_entropy_bottleneck`,
trained by :mod:`splitexit.training.entropy`) sends its latent ``y`` (N, C, H, W) rounded to
integers. Its factorized prior (one distribution per latent element) is frozen at export into
**integer frequency tables** (:class:`EntropyTables`); :class:`EntropyCodec` range-codes the
integers with them through the maintained ``constriction`` library (numpy in, numpy out). The
tables are integers and ``constriction`` is deterministic, so the same latent gives the same
bytes on every machine, whether the device half ran in PyTorch or ONNX Runtime; this module
imports numpy and constriction only, never torch (tensors are accepted, converted lazily).

Encoding: ``q = round_half_even(y)`` in float32; a value outside the tables' range
``[lo, lo + S - 1]`` is **clamped** to it (never wrapped) and counted in
:attr:`EntropyCodec.clamped` (and :attr:`EntropyCodec.last_clamped` for the last message).

Wire format (the "compact message"; all the decoder needs is fixed by the deployed tables)::

    offset size  field
    0      1     tag: 0xE1 one sample (version 1), 0xE9 several samples (version 1, bit 3)
    1      1     codec id: the first byte of the tables' SHA-256
    2      1..5  (0xE9 only) n, the number of samples, unsigned LEB128, 1..2**32-1, minimal
    .      1..5  L, the length of the bitstream in bytes (a multiple of 4), unsigned LEB128,
                 minimal
    .      L     bitstream: the constriction range coder's 32-bit words, little-endian
    .      1     check byte: the low byte of CRC-32 over everything before it, started from
                 the CRC-32 of the tables' SHA-256 digest (a check keyed by the tables)

A one-sample message has a 4-byte overhead (``L < 128``). The decoder reads the header with
bounds checks and validates the tag, the codec id (a message for other tables is refused:
the device's tables do not match the server's; with the keyed check byte, so is one whose
8-bit id collides with probability 255/256), ``n``, minimal varints, ``L`` against the
bytes that follow (truncated or trailing data), the check byte, and the decoded size
``n * C * H * W * 4`` against ``max_bytes`` **before** allocating anything sized by the
message. Every failure raises :class:`~splitexit.errors.PayloadError`.

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
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorruptFileError, InputError, PayloadError
from . import codec as _codec

__all__ = ["ENTROPY_FORMAT", "TAG_ONE", "TAG_MANY", "EntropyTables", "EntropyCodec",
           "register", "registered", "message_overhead", "tables_from_pmf"]

ENTROPY_FORMAT = "splitexit-entropy-tables"
_FILE_VERSION = 1
TAG_ONE = 0xE1
"""First byte of a one-sample message (version 1)."""
TAG_MANY = 0xE9
"""First byte of a message holding several samples (version 1, count field present)."""
MAX_SYMBOLS = 4096
MAX_ELEMENTS = 1 << 20
MAX_PRECISION = 24
_U32_MAX = 2**32 - 1


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModuleNotFoundError(
            "the entropy codec needs the 'constriction' package: pip install "
            "'constriction>=0.4' (it is in requirements/edge.txt)") from e
    return constriction


_varint = _codec._varint  # the wire format's unsigned LEB128, minimal length


def _read_varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    value = 0
    for i in range(5):
        if pos + i >= len(buf):
            raise PayloadError(f"truncated entropy message: {what} is cut off")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and byte == 0:
                raise PayloadError(f"malformed entropy message: {what} is not minimally encoded")
            if value > _U32_MAX:
                raise PayloadError(f"malformed entropy message: {what} exceeds 2**32 - 1")
            return value, pos + i + 1
    raise PayloadError(f"malformed entropy message: {what} is longer than 5 bytes")


def message_overhead(n_samples: int, bitstream_bytes: int) -> int:
    """Header plus check-byte size of a message with ``n_samples`` and that bitstream length."""
    n = len(_varint(n_samples)) if n_samples != 1 else 0
    return 2 + n + len(_varint(bitstream_bytes)) + 1


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


_LITTLE = sys.byteorder == "little"
_REGISTRY: dict[int, EntropyCodec] = {}
_LOCK = threading.Lock()


class EntropyCodec(_codec.Codec):
    """Range-codes integer latents with frozen :class:`EntropyTables` (a :class:`Codec`).

    It is a :class:`~splitexit.split.codec.Codec`, so :func:`~splitexit.split.halves.split_model`,
    ``serve`` and ``edge`` take it unchanged; :func:`register` makes the module-level
    :func:`splitexit.split.codec.decode` (what the server calls) and
    ``Codec.parse("entropy:<id>")`` find it, and ``Codec.parse("entropy:<tables.json>")``
    loads and registers a tables file.

    Attributes:
        tables: The frozen prior.
        clamped: Latent values clamped into the tables' range since creation (counted, never
            wrapped).
        last_clamped: Values clamped in the last :meth:`encode`.
    """

    def __init__(self, tables: EntropyTables, source: str | None = None):
        if not isinstance(tables, EntropyTables):
            raise InputError(f"EntropyCodec needs EntropyTables, got {type(tables).__name__}")
        super().__init__("fp32")  # the base fields are unused; the tables decide everything
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "clamped", 0)
        object.__setattr__(self, "last_clamped", 0)
        object.__setattr__(self, "_probs", tables.probabilities())
        object.__setattr__(self, "_key", zlib.crc32(bytes.fromhex(tables.sha256)))
        object.__setattr__(self, "_lock", threading.Lock())
        c = _constriction()
        for name, value in (("_model", c.stream.model.Categorical(perfect=False)),
                            ("_encoder", c.stream.queue.RangeEncoder),
                            ("_decoder", c.stream.queue.RangeDecoder),
                            ("_id", tables.codec_id), ("_lo", tables.lo), ("_hi", tables.hi),
                            ("_numel", tables.numel), ("_shape", tables.shape),
                            ("_values", np.arange(tables.lo, tables.hi + 1, dtype=np.float32))):
            object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EntropyCodec) and other.tables.sha256 == self.tables.sha256

    def __hash__(self) -> int:
        return hash(("entropy", self.tables.sha256))

    def __repr__(self) -> str:
        return f"EntropyCodec({self.spec()}, shape={self.tables.shape}, symbols={self.tables.symbols})"

    def spec(self) -> str:
        """``"entropy:<tables file>@<16 hex digits of the tables' SHA-256>"`` for a codec read
        from a file (``Codec.parse`` loads it in any process and checks the digest), else
        ``"entropy:<first 8 hex digits of the SHA-256>"`` (found once registered)."""
        if self.source is not None:
            return f"entropy:{self.source}@{self.tables.sha256[:16]}"
        return f"entropy:{self.tables.sha256[:8]}"

    # ------------------------------------------------------------------ encode
    def quantize(self, payload: Any) -> tuple[np.ndarray, int]:
        """Integer symbols ``(N, C*H*W)`` of a float latent, and how many values were clamped."""
        y = _as_array(payload)
        t = self
        if y.ndim != 4 or y.shape[1:] != t._shape or y.shape[0] < 1:
            raise InputError(f"the entropy codec takes latents of shape (N, {', '.join(map(str, t._shape))})"
                             f" with N >= 1, got {tuple(y.shape)}; split at the entropy "
                             "bottleneck's cut")
        q = np.rint(y.astype(np.float32, copy=False).reshape(y.shape[0], -1))  # half to even
        low, high = float(q.min()), float(q.max())
        if not -math.inf < low <= high < math.inf:  # False for NaN too
            raise InputError("the latent holds NaN/inf; the entropy codec sends finite values")
        clamped = 0
        if low < t._lo or high > t._hi:
            clamped = int(np.count_nonzero((q < t._lo) | (q > t._hi)))
            np.clip(q, t._lo, t._hi, out=q)
        sym = q.astype(np.int32)
        sym -= t._lo
        return sym, clamped

    def encode(self, payload: Any) -> bytes:
        """One message for a latent batch ``(N, C, H, W)`` (tensor or array, float).

        Values are rounded half to even; values outside the tables' range are clamped and
        counted (:attr:`clamped`).
        """
        sym, clamped = self.quantize(payload)
        if clamped or self.last_clamped:
            with self._lock:
                object.__setattr__(self, "clamped", self.clamped + clamped)
                object.__setattr__(self, "last_clamped", clamped)
        stream = self._code(sym)
        n = sym.shape[0]
        head = bytes([TAG_ONE if n == 1 else TAG_MANY, self._id])
        if n != 1:
            head += _varint(n)
        body = head + _varint(len(stream)) + stream
        return body + bytes([self._check(body)])

    def _check(self, body: bytes | memoryview) -> int:
        """Low byte of CRC-32 over the tables' digest, then the message (a keyed check)."""
        return zlib.crc32(body, self._key) & 0xFF

    def _code(self, sym: np.ndarray) -> bytes:
        model = self._model
        enc = self._encoder()
        for row in sym:
            enc.encode(row, model, self._probs)
        words = enc.get_compressed()
        return (words if _LITTLE else words.astype("<u4")).tobytes()

    def _words(self, stream: bytes | memoryview) -> np.ndarray:
        if len(stream) % 4:
            raise PayloadError(f"corrupt entropy message: a {len(stream)}-byte bitstream is "
                               "not whole 32-bit words")
        words = np.frombuffer(stream, dtype="<u4")
        return words if _LITTLE else words.astype(np.uint32)

    def _decode_stream(self, stream: bytes, n: int) -> np.ndarray:
        try:
            dec = self._decoder(self._words(stream))
            if n == 1:
                return dec.decode(self._model, self._probs)[None]
            out = np.empty((n, self._numel), np.int32)
            for i in range(n):
                out[i] = dec.decode(self._model, self._probs)
        except Exception as e:  # noqa: BLE001 - constriction raises its own errors
            raise PayloadError(f"corrupt entropy bitstream ({type(e).__name__}: {e})") from e
        return out

    # ------------------------------------------------------------------ decode
    def decode_arrays(self, data: bytes, *, max_bytes: int = _codec.DEFAULT_MAX_BYTES
                      ) -> np.ndarray:
        """The float32 latent ``(N, C, H, W)`` (integers) of a message for these tables.

        Raises:
            PayloadError: malformed, truncated, forged or corrupt message, a message for other
                tables, or one that decodes to more than ``max_bytes``.
        """
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise InputError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise PayloadError(f"an entropy message is bytes, got {type(data).__name__}")
        buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        if len(buf) > max_bytes:
            raise PayloadError(f"entropy message is {len(buf)} bytes, over max_bytes={max_bytes}")
        if len(buf) < 4:
            raise PayloadError(f"truncated entropy message: {len(buf)} bytes, a message has at "
                               "least 4")
        tag = buf[0]
        if tag not in (TAG_ONE, TAG_MANY):
            raise PayloadError(f"not an entropy message (first byte 0x{tag:02x}; expected "
                               f"0x{TAG_ONE:02x} or 0x{TAG_MANY:02x})")
        cid = buf[1]
        if cid != self._id:
            raise PayloadError(
                f"entropy message for codec id {cid:02x}, but these tables are "
                f"{self.tables.codec_id:02x}: the device's CDF tables do not match the "
                "server's; deploy the same export on both sides")
        pos = 2
        n = 1
        if tag == TAG_MANY:
            n, pos = _read_varint(buf, pos, "sample count")
            if n < 1:
                raise PayloadError("entropy message declares 0 samples")
        length, pos = _read_varint(buf, pos, "bitstream length")
        follow = len(buf) - pos - 1
        if length != follow:
            what = "truncated entropy message" if follow < length else "trailing bytes"
            raise PayloadError(f"{what}: the header declares a {length}-byte bitstream, "
                               f"{max(follow, 0)} bytes follow it")
        if self._check(buf[:-1]) != buf[-1]:
            raise PayloadError("corrupt entropy message, or one encoded with other tables: the "
                               "check byte does not match")
        out_bytes = n * self._numel * 4
        if out_bytes > max_bytes:
            raise PayloadError(f"entropy message declares {n} samples, {out_bytes} bytes "
                               f"decoded, over max_bytes={max_bytes}")
        sym = self._decode_stream(buf[pos: pos + length], n)
        # symbol -> value through a float32 table (exact: |lo| <= 2**20, S <= 4096)
        return self._values[sym].reshape(n, *self._shape)

    def decode(self, data: bytes, *, max_bytes: int = _codec.DEFAULT_MAX_BYTES) -> Any:
        """:meth:`decode_arrays` as a torch tensor (needs PyTorch)."""
        torch = _codec._require_torch("EntropyCodec.decode")
        return torch.from_numpy(self.decode_arrays(data, max_bytes=max_bytes))

    def bytes_per_sample(self, payload: Any) -> float:
        """Size of one message holding the whole batch, divided by the batch size."""
        return len(self.encode(payload)) / _as_array(payload).shape[0]

    def error_bound(self, payload: Any) -> float:
        """Largest |decoded - sent| for ``payload``: rounding (0.5) plus any clamping."""
        y = _as_array(payload).astype(np.float64)
        t = self.tables
        return float(max(0.5, np.max(np.maximum(t.lo - y, y - t.hi), initial=0.0)))


def _as_array(payload: Any) -> np.ndarray:
    if isinstance(payload, tuple):
        if len(payload) != 1:
            raise InputError("the entropy codec sends one latent tensor, got a tuple of "
                             f"{len(payload)}")
        payload = payload[0]
    if hasattr(payload, "detach"):  # a torch tensor (torch is not imported here)
        payload = payload.detach().cpu().float().numpy()
    if not isinstance(payload, np.ndarray):
        raise InputError(f"the entropy codec takes a tensor or numpy array, got "
                         f"{type(payload).__name__}")
    return payload


def register(codec_or_tables: EntropyCodec | EntropyTables) -> EntropyCodec:
    """Make a codec known to ``Codec.parse(spec)`` and the module-level ``decode``.

    Two different tables with the same 16-bit id cannot be registered at once (the second is
    refused with :class:`InputError`).
    """
    c = codec_or_tables if isinstance(codec_or_tables, EntropyCodec) \
        else EntropyCodec(codec_or_tables)
    with _LOCK:
        have = _REGISTRY.get(c.tables.codec_id)
        if have is not None and have != c:
            raise InputError(f"another entropy codec with id {c.tables.codec_id:02x} is "
                             "registered in this process; unregister it first")
        _REGISTRY[c.tables.codec_id] = c  # the same tables: the newer object (e.g. its source)
        return c


def unregister(codec: EntropyCodec) -> None:
    """Forget a registered codec."""
    with _LOCK:
        if _REGISTRY.get(codec.tables.codec_id) == codec:
            del _REGISTRY[codec.tables.codec_id]


def registered() -> list[EntropyCodec]:
    """The registered entropy codecs."""
    with _LOCK:
        return list(_REGISTRY.values())


def _parse(spec: str) -> EntropyCodec:
    rest = spec.strip()[len("entropy:"):]
    if len(rest) == 8 and all(ch in "0123456789abcdef" for ch in rest.lower()):
        with _LOCK:
            c = _REGISTRY.get(int(rest[:2], 16))
        if c is None or c.tables.sha256[:8] != rest.lower():
            raise InputError(f"codec {spec!r}: no entropy tables with id {rest} are registered "
                             "in this process; load them with Codec.parse('entropy:<tables."
                             "json>') or splitexit.split.entropy.register")
        return c
    path, _, digest = rest.rpartition("@") if "@" in rest else (rest, "", "")
    tables = EntropyTables.load(path)
    if digest and not tables.sha256.startswith(digest.lower()):
        raise CorruptFileError(
            f"{path}: the entropy tables' sha256 {tables.sha256[:16]} does not match the "
            f"{digest} the codec spec (manifest) records: these tables belong to another "
            "model; export them again with the model")
    return register(EntropyCodec(tables, source=path))


def _decode_any(data: memoryview, max_bytes: int) -> np.ndarray:
    if len(data) < 2:
        raise PayloadError(f"truncated entropy message: {len(data)} bytes")
    cid = data[1]
    with _LOCK:
        c = _REGISTRY.get(cid)
    if c is None:
        raise PayloadError(f"entropy message for codec id {cid:02x}, which this process does "
                           "not know: load the model's entropy tables on the server")
    return c.decode_arrays(data, max_bytes=max_bytes)


_codec.register_external("entropy:", _parse, (TAG_ONE, TAG_MANY), _decode_any)
