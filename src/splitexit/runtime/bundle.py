"""Reading a deployment bundle: a directory that describes itself, checked before anything runs.

A bundle (written by :func:`splitexit.deploy.bundle`)::

    BUNDLE/
      manifest.json      format, version, input spec, classes, exits, cut, policy, codec,
                         payload spec, pieces (file, stages, exit, inputs, outputs, MACs,
                         parameters), latencies measured at bundling, SHA-256 of every file
      device/piece*.onnx the device pieces (a stage run and the exit head at its end)
      device/exits.onnx  the batch-1 exit graph (device-only bundles, policies with a graph
                         form: max-prob, entropy, margin, meanconf, pixelshare)
      server.onnx        the server half (split bundles)
      weights/           safetensors weights and their JSON description, for PyTorch

:func:`load_bundle` checks the manifest (format, version, sizes, dtypes, that every piece and
exit fits together), every file against its checksum, and every ONNX graph's inputs against
the manifest, then hands out ONNX Runtime programs. It never imports user code and never
unpickles; it needs numpy and onnxruntime only (no PyTorch).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ..errors import CorruptFileError, InputError
from ..policies import ExitPolicy, create_policy
from .device import OrtDevice
from .loop import check_policy
from .ort import OrtProgram, OrtSession

__all__ = ["Bundle", "load_bundle", "read_manifest", "sha256_of", "FORMAT", "VERSION",
           "MANIFEST", "DTYPES"]

FORMAT = "splitexit-bundle"
VERSION = 1
MANIFEST = "manifest.json"
#: dtypes a bundle's tensors may have
DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)",
          "int64": "tensor(int64)", "int32": "tensor(int32)", "int8": "tensor(int8)",
          "uint8": "tensor(uint8)", "bool": "tensor(bool)"}
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_MAX_DIM = 1 << 20
_MAX_SAMPLE_ELEMENTS = 1 << 28
_MAX_PIECES = 4096


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bad(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {what}; write the bundle again with splitexit.deploy.bundle "
                            "(or `splitexit bundle`)")


def _relative(path: Path, value, what: str) -> str:
    """A file name inside the bundle (no absolute path, no '..')."""
    if not isinstance(value, str) or not value:
        raise _bad(path, f"{what} is not a file name: {value!r}")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise _bad(path, f"{what} {value!r} points outside the bundle")
    return value


def _shape(path: Path, value, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8:
        raise _bad(path, f"{what} is not a list of at most 8 dimensions: {value!r}")
    dims = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= _MAX_DIM:
            raise _bad(path, f"{what} has an absurd dimension {d!r} (1..{_MAX_DIM})")
        dims.append(d)
    if math.prod(dims) > _MAX_SAMPLE_ELEMENTS:
        raise _bad(path, f"{what} {dims} holds more than {_MAX_SAMPLE_ELEMENTS} elements per "
                   "sample")
    return tuple(dims)


def _tensors(path: Path, value, what: str) -> list[dict]:
    if not isinstance(value, list) or not 1 <= len(value) <= 64:
        raise _bad(path, f"{what} must list 1..64 tensors, got {value!r}")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise _bad(path, f"{what}[{i}] is not an object")
        if t.get("dtype") not in DTYPES:
            raise _bad(path, f"{what}[{i}] has dtype {t.get('dtype')!r}; a bundle's tensors are "
                       f"one of {', '.join(DTYPES)}")
        out.append({"shape": _shape(path, t.get("shape"), f"{what}[{i}].shape"),
                    "dtype": t["dtype"]})
    return out


def read_manifest(directory: str | Path) -> dict:
    """The validated manifest of a bundle (files not yet checked: see :func:`load_bundle`).

    Raises:
        CorruptFileError: no bundle there, unreadable JSON, an unknown format or version, or
            an inconsistent or absurd description.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputError(f"no bundle at {directory} (not a directory); write one with "
                         "`splitexit bundle ... --out DIR`")
    if not path.is_file():
        raise CorruptFileError(f"{directory} is not a splitexit bundle (no {MANIFEST}); write one "
                               "with `splitexit bundle ... --out DIR`")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise _bad(path, f"the manifest is larger than {_MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(path, f"format {doc.get('format') if isinstance(doc, dict) else None!r} is "
                   f"not {FORMAT!r}")
    if doc.get("version") != VERSION:
        raise CorruptFileError(f"{path}: bundle format version {doc.get('version')!r} is not "
                               f"supported (this splitexit reads version {VERSION}); bundle the "
                               "model again with this splitexit, or install the splitexit that "
                               "wrote it")
    try:
        _check(path, doc)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise _bad(path, f"incomplete or malformed manifest ({type(exc).__name__}: {exc})") \
            from exc
    return doc


def _check(path: Path, doc: dict) -> None:
    """Consistency and sanity of every field the runtimes read."""
    spec = doc["input"]
    if spec["dtype"] != "float32":
        raise _bad(path, f"input dtype {spec['dtype']!r}; bundles take float32 inputs")
    _shape(path, spec["shape"], "input.shape")
    norm = spec.get("normalisation")
    if norm is not None and not (isinstance(norm, dict) and {"mean", "std"} <= set(norm)):
        raise _bad(path, "input.normalisation must be null or {mean, std}")
    pieces = doc["pieces"]
    if not isinstance(pieces, list) or not 1 <= len(pieces) <= _MAX_PIECES:
        raise _bad(path, f"pieces must list 1..{_MAX_PIECES} pieces")
    files = doc["files"]
    if not isinstance(files, dict) or not files:
        raise _bad(path, "files must map every file to its SHA-256")
    for name, digest in files.items():
        _relative(path, name, "a file")
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise _bad(path, f"the checksum of {name!r} is not a SHA-256 hex digest")
    previous_out = [{"shape": _shape(path, spec["shape"], "input.shape"), "dtype": "float32"}]
    for j, p in enumerate(pieces):
        where = f"pieces[{j}]"
        name = _relative(path, p["file"], f"{where}.file")
        if name not in files:
            raise _bad(path, f"{where}.file {name!r} has no checksum in files")
        if p["part"] not in ("device", "server"):
            raise _bad(path, f"{where}.part must be device or server")
        inputs = _tensors(path, p["inputs"], f"{where}.inputs")
        outputs = _tensors(path, p["outputs"], f"{where}.outputs")
        if inputs != previous_out:
            raise _bad(path, f"{where} takes {inputs} but the piece before gives {previous_out}")
        previous_out = outputs
        if not isinstance(p.get("takes_previous", False), bool):
            raise _bad(path, f"{where}.takes_previous must be true or false")
        for key in ("macs", "params"):
            v = p.get(key, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e15:
                raise _bad(path, f"{where}.{key} is not a plausible count: {v!r}")
    exits = doc["exits"]
    if not isinstance(exits, list) or not exits:
        raise _bad(path, "exits must list at least the final exit")
    at = [e["piece"] for e in exits]
    if any(isinstance(k, bool) or not isinstance(k, int) for k in at) or at != sorted(set(at)) \
            or at[-1] != len(pieces) - 1 or at[0] < 0:
        raise _bad(path, f"exit pieces {at} must increase and end at the last piece "
                   f"({len(pieces) - 1})")
    for e, k in enumerate(at[:-1]):
        if pieces[k].get("exit") != e:
            raise _bad(path, f"exit {e} sits at piece {k}, whose exit is {pieces[k].get('exit')}")
    classes = doc["classes"]
    if not isinstance(classes, list) or not 2 <= len(classes) <= 1_000_000:
        raise _bad(path, "classes must list the class names (at least 2)")
    last = pieces[-1]["outputs"]
    # logits (classes,), or a dense map (classes, H, W) of a segmentation model
    if len(last) != 1 or not last[0]["shape"] or last[0]["shape"][0] != len(classes):
        raise _bad(path, f"the last piece gives {last}, not the logits of {len(classes)} classes")
    device = doc["device"]
    n_dev = device["pieces"]
    if isinstance(n_dev, bool) or not isinstance(n_dev, int) or not 0 <= n_dev <= len(pieces):
        raise _bad(path, f"device.pieces {n_dev!r} is not a piece count")
    if any(p["part"] != ("device" if j < n_dev else "server") for j, p in enumerate(pieces)):
        raise _bad(path, "the device pieces must come first, then the server's")
    server = doc.get("server")
    if (server is None) != (n_dev == len(pieces)):
        raise _bad(path, "a bundle has a server half exactly when some piece is the server's")
    if server is not None and _relative(path, server["file"], "server.file") != pieces[-1]["file"]:
        raise _bad(path, "server.file must be the last piece's file")
    graph = device.get("exit_graph")
    if graph is not None:
        if _relative(path, graph, "device.exit_graph") not in files:
            raise _bad(path, f"device.exit_graph {graph!r} has no checksum in files")
        if server is not None:
            raise _bad(path, "the exit graph covers a whole model; a split bundle has none")
    if not isinstance(doc["policy"], dict) or "name" not in doc["policy"]:
        raise _bad(path, "policy must be an object with a name")
    policy = create_policy(doc["policy"])  # a bad field is an InputError naming it
    try:
        check_policy(policy, len(exits))
    except InputError as exc:
        raise _bad(path, f"its policy does not fit its {len(exits)} exits ({exc})") from exc
    codec = doc.get("codec")
    if server is not None and not isinstance(codec, str):
        raise _bad(path, "a split bundle names its wire codec")
    tables = _entropy_tables_file(codec)
    if tables is not None and (PurePosixPath(tables).is_absolute() or ".." in
                               PurePosixPath(tables).parts or tables not in doc["files"]):
        raise _bad(path, f"its entropy codec names the tables {tables!r}, which is not a file "
                   "of the bundle under the manifest's checksums; bundle the model again")


def _entropy_tables_file(codec) -> str | None:
    """The tables file an ``entropy:<file>@<digest>`` codec spec names, relative to the
    bundle (``None`` for any other codec)."""
    if not isinstance(codec, str) or not codec.startswith("entropy:") or "@" not in codec:
        return None
    return codec[len("entropy:"):].rpartition("@")[0]


class Bundle:
    """A checked bundle, and the ONNX Runtime programs that run it.

    Attributes:
        directory: where it lies.
        manifest: the validated manifest.
        policy: the exit policy it was bundled with.
        input_shape: per-sample input shape.
        classes: class names.
        cut: the split's cut (``"input"`` for full offload, ``None`` for device only).
        codec: the wire codec spelling (split bundles).
    """

    def __init__(self, directory: str | Path, verify: bool = True):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if verify:
            self.verify()
        m = self.manifest
        self.policy: ExitPolicy = create_policy(m["policy"])
        self.input_shape = tuple(m["input"]["shape"])
        self.normalisation = m["input"].get("normalisation")
        self.classes = list(m["classes"])
        self.cut = m.get("cut")
        self.codec = m.get("codec")
        tables = _entropy_tables_file(self.codec)
        if tables is not None:  # the bundle's own copy of the tables, wherever it now lies
            self.codec = f"entropy:{self.directory / tables}@{self.codec.rpartition('@')[2]}"
        self.exit_names = [e["name"] for e in m["exits"]]
        self.exit_stages = [e["piece"] for e in m["exits"]]

    def __repr__(self) -> str:
        return (f"Bundle({str(self.directory)!r}, exits={self.exit_names}, cut={self.cut!r}, "
                f"policy={self.policy.config()})")

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def has_server(self) -> bool:
        return self.manifest.get("server") is not None

    @property
    def device_pieces(self) -> int:
        return int(self.manifest["device"]["pieces"])

    @property
    def payload(self) -> list[dict] | None:
        """What crosses the cut, per sample (``None`` without a server)."""
        if not self.has_server:
            return None
        return self.manifest["pieces"][self.device_pieces]["inputs"]

    def verify(self) -> None:
        """Check every file against its SHA-256 (and that no listed file is missing).

        Raises:
            CorruptFileError: a missing, truncated or altered file.
        """
        for name, digest in self.manifest["files"].items():
            path = self.directory / name
            if not path.is_file():
                raise CorruptFileError(f"bundle {self.directory}: {name} is missing; copy the "
                                       "whole bundle directory, or write it again")
            if sha256_of(path) != digest:
                raise CorruptFileError(f"bundle {self.directory}: {name} does not match its "
                                       "checksum in manifest.json (truncated or altered); copy "
                                       "the bundle again from where it was written")

    def _session(self, name: str, piece: dict | None, threads: int | None) -> OrtSession:
        session = OrtSession(self.directory / name, threads)
        if piece is not None:
            want = piece["inputs"] + ([{"dtype": "float32", "shape": None}]
                                      if piece.get("takes_previous") else [])
            _match(self.directory / name, session, want)
        return session

    def sessions(self, start: int = 0, end: int | None = None, threads: int | None = 1
                 ) -> list[OrtSession]:
        """ONNX Runtime sessions of pieces ``start .. end - 1``, their inputs checked."""
        pieces = self.manifest["pieces"][start:end]
        return [self._session(p["file"], p, threads) for p in pieces]

    def program(self, threads: int | None = 1, exit_graph: bool = True) -> OrtProgram:
        """The whole exit program on ONNX Runtime (device pieces, then the server's)."""
        pieces = self.manifest["pieces"]
        graph = self.manifest["device"].get("exit_graph") if exit_graph else None
        graph_session = None
        if graph is not None:
            graph_session = OrtSession(self.directory / graph, threads)
            _match(self.directory / graph, graph_session,
                   [{"dtype": "float32", "shape": list(self.input_shape)}], batch=1)
        return OrtProgram(self.sessions(0, None, threads), self.exit_stages, self.exit_names,
                          [bool(p.get("takes_previous")) for p in pieces], self.input_shape,
                          graph_session, self.manifest["policy"] if graph else None)

    def device(self, threads: int | None = 1) -> OrtDevice:
        """The device part (pieces up to the cut, local exits) as an edge device runtime."""
        program = self.program(threads, exit_graph=False)
        return OrtDevice(program, self.device_pieces, self.num_exits)

    def server(self, threads: int | None = 1) -> OrtSession:
        """The server half as one ONNX Runtime session: payload in, final logits out."""
        if not self.has_server:
            raise InputError(f"bundle {self.directory} has no server half (bundled without a "
                             "cut); bundle it with --cut")
        return self.sessions(self.device_pieces, None, threads)[0]


def _match(path: Path, session: OrtSession, want: Sequence[dict], batch: int | None = None
           ) -> None:
    """Raise unless the graph's inputs are the manifest's (count, dtype, per-sample shape)."""
    got = session.inputs
    if len(got) != len(want):
        raise CorruptFileError(f"{path}: the graph takes {len(got)} input(s) but the manifest "
                               f"says {len(want)}; write the bundle again")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.type != DTYPES[w["dtype"]]:
            raise CorruptFileError(f"{path}: input {i} is {g.type} but the manifest says "
                                   f"{w['dtype']}; write the bundle again")
        if w["shape"] is None:
            continue
        dims = list(g.shape[1:])
        if dims != list(w["shape"]) or (batch is not None and g.shape[0] != batch):
            raise CorruptFileError(f"{path}: input {i} has shape {g.shape} but the manifest "
                                   f"says (N, {', '.join(map(str, w['shape']))}); write the "
                                   "bundle again")


def load_bundle(directory: str | Path, verify: bool = True) -> Bundle:
    """Open and check a bundle (see the module docstring).

    Raises:
        InputError: no directory there.
        CorruptFileError: a missing, truncated or altered file, an unknown format version,
            an inconsistent manifest, or a graph whose inputs do not match it.
    """
    return Bundle(directory, verify)
