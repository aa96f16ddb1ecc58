"""The device side of splitexit on a machine without PyTorch: run it in the edge venv.

    .venv-edge/bin/python scripts/edge_smoke.py BUNDLE_DIR [BUNDLE_DIR ...]

For each bundle: load and verify it, run its exit program (``program().infer``) and the edge
runtime with no server (``EdgeRuntime(bundle.device(), policy, None)``: undecided samples get the
local fallback answer) on random inputs of the bundle's input shape, and encode the device's
payload with the bundle's codec (decoding it back to numpy). Torch must never be imported.
Exits non-zero on the first failure. ``make test-edge`` runs it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from splitexit import policies  # noqa: F401  (part of the torch-free surface)
from splitexit.runtime.bundle import load_bundle
from splitexit.serve.edge import FAILED, EdgeRuntime
from splitexit.split.codec import Codec, decode_arrays

BATCH = 7


def _no_torch(where: str) -> None:
    assert "torch" not in sys.modules, f"torch was imported ({where})"


def check(directory: str, rng: np.random.Generator) -> None:
    t0 = time.perf_counter()
    bundle = load_bundle(directory)
    _no_torch(f"loading {directory}")
    x = rng.standard_normal((BATCH, *bundle.input_shape)).astype(np.float32)

    result = bundle.program().infer(x, bundle.policy)
    pred = np.asarray(result.predictions)
    exits = np.asarray(result.exit_index)
    assert isinstance(result.predictions, np.ndarray), type(result.predictions)
    assert pred.shape == (BATCH,), pred.shape
    assert ((pred >= 0) & (pred < len(bundle.classes))).all(), pred
    assert ((exits >= 0) & (exits < bundle.num_exits)).all(), exits
    _no_torch(f"program().infer on {directory}")

    with EdgeRuntime(bundle.device(), bundle.policy, None) as edge:
        answers = edge.classify(x)
    assert [a.index for a in answers] == list(range(BATCH)), [a.index for a in answers]
    sources = sorted({a.source for a in answers})
    if bundle.device().has_exits or not bundle.has_server:
        assert FAILED not in sources, [(a.source, a.error) for a in answers]
        assert all(0 <= a.prediction < len(bundle.classes) for a in answers), answers
    _no_torch(f"EdgeRuntime on {directory}")

    payload = bundle.device().run(x, bundle.policy).payload if bundle.has_server else x
    codec = Codec.parse(bundle.codec or "fp32")
    data = codec.encode(payload)
    back = decode_arrays(data)
    items = payload if isinstance(payload, (tuple, list)) else (payload,)
    back_items = back if isinstance(back, (tuple, list)) else (back,)
    assert [np.asarray(a).shape for a in items] == [b.shape for b in back_items]
    _no_torch(f"codec {codec.spec()} on {directory}")

    print(f"ok {directory}: {bundle.num_exits} exits, cut={bundle.cut!r}, exits taken "
          f"{np.bincount(exits, minlength=bundle.num_exits).tolist()}, edge answers {sources}, "
          f"{codec.spec()} payload {len(data)} B, {time.perf_counter() - t0:.2f} s")


def check_entropy_codec(rng: np.random.Generator) -> None:
    """The learned entropy bottleneck's coder (constriction, integer tables) round-trips an
    integer latent on the device side, without torch."""
    from splitexit.split.entropy import register, tables_from_pmf

    shape, lo, symbols = (2, 7, 7), -8, 17
    pmf = rng.random((int(np.prod(shape)), symbols)) ** 4  # peaked, like a trained prior
    codec = register(tables_from_pmf(pmf, shape, lo))  # as a server loading its tables
    latent = rng.integers(lo, lo + symbols, size=(3, *shape)).astype(np.float32)
    back = decode_arrays(codec.encode(latent))
    back = back[0] if isinstance(back, (tuple, list)) else back
    assert np.array_equal(np.asarray(back), latent), "entropy codec round trip"
    _no_torch("entropy codec")
    print(f"ok entropy codec: {len(codec.encode(latent[:1]))} B for one {shape} latent")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    _no_torch("importing the edge modules")
    rng = np.random.default_rng(0)
    for directory in argv:
        check(directory, rng)
    check_entropy_codec(rng)
    _no_torch("end")
    print("edge smoke: ok, torch never imported")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
