"""The edge side without PyTorch: a process where ``import torch`` (and FastAPI) fails loads a
bundle, runs its device part on ONNX Runtime against a real server, encodes with the wire
codec, falls back locally without a server, and runs ``edge BUNDLE --inputs x.npy`` (the
``splitexit.serve.cli`` parser, which imports no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from serve_helpers import own_bundle, running_server
from splitexit.measure import torch_threads
from splitexit.runtime.bundle import load_bundle
from splitexit.serve import EdgeRuntime, EdgeSettings

TOKEN = "edge-token-no-torch"

PROGRAM = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    sys.modules["fastapi"] = None
    sys.modules["uvicorn"] = None
    import io, json, contextlib
    import numpy as np
    from splitexit.runtime.bundle import load_bundle
    from splitexit.serve import EdgeRuntime, EdgeSettings
    from splitexit.serve.cli import main
    from splitexit.split.codec import Codec, decode_arrays

    bundle_dir, url, x_path, out_path, token = sys.argv[1:6]
    b = load_bundle(bundle_dir)
    x = np.load(x_path)
    doc = {}
    with EdgeRuntime(b.device(), b.policy, url, b.codec,
                     EdgeSettings(token=token, deadline_s=10)) as edge:
        answers = edge.classify(x)
        doc["stats"] = edge.stats.snapshot()
    doc["answers"] = [a.to_json() for a in answers]
    with EdgeRuntime(b.device(), b.policy, None, b.codec) as edge:
        doc["local"] = [a.to_json() for a in edge.classify(x)]
    out = b.device().run(x, b.policy).as_numpy()
    message = Codec.parse(b.codec).encode(out.payload)
    decoded = decode_arrays(message, max_bytes=1 << 24)
    doc["codec"] = {"bytes": len(message), "shapes": [list(t.shape) for t in decoded],
                    "max_error": max(float(np.abs(d - p).max())
                                     for d, p in zip(decoded, out.payload))}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        doc["cli_status"] = main(["edge", bundle_dir, "--server", url, "--inputs", x_path,
                                  "--token", token, "--out", out_path, "--batch-size", "4"])
    doc["cli_stats"] = json.loads(printed.getvalue())
    doc["torch"] = sys.modules.get("torch") is None and not any(
        m.startswith("torch.") for m in sys.modules)
    doc["fastapi"] = sys.modules.get("fastapi") is None
    print(json.dumps(doc))
""")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with torch_threads(1):
        yield


@pytest.mark.slow
def test_edge_runs_a_bundle_without_torch(digits, tmp_path):
    path, _ = own_bundle()
    b = load_bundle(path)
    x = digits.test.x[:48].numpy()
    np.save(tmp_path / "x.npy", x)
    with running_server(path, token=TOKEN) as srv:
        with EdgeRuntime(b.device(), b.policy, srv.url, b.codec,
                         EdgeSettings(token=TOKEN, deadline_s=10)) as edge:
            expected = edge.classify(x)
        proc = subprocess.run([sys.executable, "-c", PROGRAM, str(path), srv.url,
                               str(tmp_path / "x.npy"), str(tmp_path / "a.jsonl"), TOKEN],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["torch"] and doc["fastapi"]  # nothing imported torch, not even lazily
    answers = doc["answers"]
    assert sorted(a["index"] for a in answers) == list(range(48))
    assert [(a["source"], a["exit_index"], a["prediction"]) for a in answers] == \
        [(a.source, a.exit_index, a.prediction) for a in expected]
    assert {a["source"] for a in answers} == {"exit", "server"}
    for a, e in zip(answers, expected):
        np.testing.assert_allclose(a["logits"], e.logits, atol=1e-5)
    assert doc["stats"]["requests"] == 1 and doc["stats"]["inputs"] == 48
    local = doc["local"]
    assert sorted(a["index"] for a in local) == list(range(48))
    assert {a["source"] for a in local} == {"exit", "fallback"}
    assert all(a["exit_index"] == 1 for a in local if a["source"] == "fallback")
    n_off = sum(a.source == "server" for a in expected)
    assert doc["codec"]["shapes"] == [[n_off, 16, 8, 8]] * 2
    # int8: one byte per value, two 16x8x8 tensors per sample, plus a small header
    assert n_off * 2048 < doc["codec"]["bytes"] < n_off * 2048 + 300
    assert 0 < doc["codec"]["max_error"] < 0.1
    assert doc["cli_status"] == 0 and doc["cli_stats"]["inputs"] == 48
    assert "accuracy" not in doc["cli_stats"]  # no labels given
    lines = [json.loads(v) for v in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(v["index"] for v in lines) == list(range(48))
    assert {v["source"] for v in lines} <= {"exit", "server"}
