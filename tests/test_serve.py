"""Server half over HTTP: equality with the in-process model, micro-batching, auth, limits,
malformed / forged / fuzzed payloads, model directories."""

from __future__ import annotations

import random
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import load_file

from serve_helpers import (
    CUT,
    SlowModule,
    device_payload,
    make_model_dir,
    median_policy,
    running_server,
    server_process,
)
from splitexit.errors import CorruptFileError, InputError
from splitexit.serve import (
    PayloadSpec,
    ServerSettings,
    export_model_dir,
    load_device,
    load_server,
    read_config,
)
from splitexit.split.codec import Codec
from splitexit.stages import StagedModel

TOKEN = "s3cret-token-for-tests"


pytestmark = pytest.mark.usefixtures("one_thread_module")




@pytest.fixture(scope="module")
def policy(small_model, digits):
    return median_policy(small_model, digits.calib.x)


@pytest.fixture(scope="module")
def model_dir(small_model, policy, tmp_path_factory):
    return make_model_dir(small_model, tmp_path_factory.mktemp("serve") / "model", policy)


def _post(url: str, body: bytes, **headers) -> httpx.Response:
    return httpx.post(url + "/v1/infer", content=body, timeout=10,
                      headers={"Content-Type": "application/octet-stream", **headers})


def test_model_dir_round_trip(small_model, model_dir, digits, policy):
    cfg = read_config(model_dir)
    assert cfg.cut == CUT and cfg.payload.shapes == ((8, 8, 8),)
    server, _ = load_server(model_dir)
    device, loaded_policy, _ = load_device(model_dir)
    assert loaded_policy == policy
    x = digits.test.x[:16]
    with torch.inference_mode():
        assert torch.equal(server(device_payload(small_model, x)), small_model.backbone(x))
    # the server directory holds the server half's weights only
    names = load_file(str(model_dir / "server" / "weights.safetensors"))
    assert names and not any("head" in k for k in names)


def test_torchscript_server_runtime_matches_eager(small_model, model_dir, digits):
    x = digits.test.x[:24]
    payload = device_payload(small_model, x)
    with torch.inference_mode():
        expected = small_model.backbone(x)
    scripted, _ = load_server(model_dir, "torchscript")
    assert isinstance(scripted, torch.jit.ScriptModule)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(payload), expected, rtol=1e-4, atol=1e-4)
    # the real command, as a process: same predictions over HTTP
    with server_process(model_dir, "--runtime", "torchscript") as (_, url):
        r = _post(url, Codec.parse("fp32").encode(payload))
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == expected.argmax(1).tolist()
    with pytest.raises(InputError, match="unknown server runtime"):
        load_server(model_dir, "tensorrt")
    with pytest.raises(InputError, match="runtime"):
        ServerSettings(runtime="tensorrt")


def test_predictions_equal_in_process_model(small_model, model_dir, digits):
    x = digits.test.x[:24]
    payload = device_payload(small_model, x)
    with torch.inference_mode():
        expected = small_model.backbone(x)
    with running_server(model_dir) as srv:
        for codec in ("fp32", "fp16+zstd"):
            r = _post(srv.url, Codec.parse(codec).encode(payload), **{"X-Request-ID": "req-1"})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["request_id"] == "req-1" and r.headers["x-request-id"] == "req-1"
            assert doc["predictions"] == expected.argmax(1).tolist()
            tol = 0 if codec == "fp32" else 5e-2
            assert torch.allclose(torch.tensor(doc["logits"]), expected, atol=tol, rtol=0)
        health = httpx.get(srv.url + "/health").json()
        assert health["status"] == "ok" and health["cut"] == CUT


def test_micro_batching_merges_concurrent_requests(small_model, model_dir, digits):
    x = digits.test.x[:8]
    bodies = [Codec().encode(device_payload(small_model, x[i: i + 1])) for i in range(8)]
    with torch.inference_mode():
        expected = small_model.backbone(x)
    with running_server(model_dir, max_batch=8, max_wait_ms=300) as srv:
        _post(srv.url, bodies[0])  # warm-up
        with ThreadPoolExecutor(8) as pool:
            docs = [r.json() for r in pool.map(lambda b: _post(srv.url, b), bodies)]
        metrics = httpx.get(srv.url + "/metrics").json()
    assert max(d["batch_size"] for d in docs) >= 4, [d["batch_size"] for d in docs]
    assert metrics["batches"] < 1 + 8  # fewer forward passes than requests
    for i, d in enumerate(docs):  # merged requests still get their own rows back
        assert d["predictions"] == [int(expected[i].argmax())]
        assert torch.allclose(torch.tensor(d["logits"][0]), expected[i], atol=1e-5)
    assert metrics["requests_ok"] == 9 and metrics["samples"] == 9
    assert metrics["latency_ms"]["p50"] > 0 and sum(metrics["batch_sizes"].values()) == \
        metrics["batches"]


def test_token_required(small_model, model_dir, digits):
    body = Codec().encode(device_payload(small_model, digits.test.x[:2]))
    with running_server(model_dir, token=TOKEN) as srv:
        assert _post(srv.url, body).status_code == 401
        r = _post(srv.url, body, Authorization="Bearer wrong-token-123")
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
        assert _post(srv.url, body, Authorization=f"Bearer {TOKEN}").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics",
                         headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert "s3cret" not in httpx.get(srv.url + "/health").text


def test_oversized_requests_get_413(small_model, model_dir, digits):
    payload = device_payload(small_model, digits.test.x[:40])
    body = Codec().encode(payload)  # 40 * 2 KiB
    with running_server(model_dir, max_request_bytes=16 * 1024, max_request_samples=16) as srv:
        r = _post(srv.url, body)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks():  # no Content-Length: the limit holds while streaming
            for i in range(0, len(body), 4096):
                yield body[i: i + 4096]

        r = httpx.post(srv.url + "/v1/infer", content=chunks(), timeout=10)
        assert r.status_code == 413
        small = Codec.parse("int4+zstd").encode(payload)  # few bytes, too many samples
        assert len(small) < 16 * 1024
        r = _post(srv.url, small)
        assert r.status_code == 413 and "max_request_samples" in r.json()["error"]
        assert httpx.get(srv.url + "/health").status_code == 200


def _forged_messages(valid: bytes) -> list[tuple[str, bytes]]:
    huge_dims = bytearray(valid)
    # first tensor descriptor starts at offset 8: dtype, ndim, dims...; claim 2**31 rows
    struct.pack_into("<I", huge_dims, 10, 2**31 - 1)
    bad_len = bytearray(valid)
    ndim = valid[9]
    struct.pack_into("<Q", bad_len, 10 + 4 * ndim + 4, 10**15)
    return [
        ("empty", b""),
        ("garbage", b"not a payload at all"),
        ("pickle", b"\x80\x04\x95" + b"cos\nsystem\n(S'echo pwned'\ntR." + b"\x00" * 20),
        ("truncated", valid[: len(valid) // 2]),
        ("trailing", valid + b"\x00\x01"),
        ("bad magic", b"XXXX" + valid[4:]),
        ("bad version", valid[:4] + b"\x09" + valid[5:]),
        ("huge dims", bytes(huge_dims)),
        ("huge body length", bytes(bad_len)),
        ("json", b'{"tensor": [1, 2, 3]}'),
    ]


def test_malformed_forged_and_fuzzed_payloads(small_model, model_dir, digits):
    payload = device_payload(small_model, digits.test.x[:3])
    valid = Codec().encode(payload)
    wrong = [
        ("wrong shape", Codec().encode(torch.zeros(3, 8, 4, 4))),
        ("wrong dtype", Codec().encode(payload.double())),
        ("tuple payload", Codec().encode((payload, payload))),
        ("no batch dim", Codec().encode(payload[0])),
        ("empty batch", Codec().encode(payload[:0])),
    ]
    rng = random.Random(0)
    fuzzed = []
    for _ in range(150):
        buf = bytearray(valid if rng.random() < 0.5 else Codec.parse("int8-ch+zstd").encode(
            payload))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(buf), 96) if rng.random() < 0.7 else len(buf))
            buf[pos] = rng.randrange(256)
        if rng.random() < 0.2:
            buf = buf[: rng.randrange(len(buf))]
        fuzzed.append(("fuzz", bytes(buf)))
    with running_server(model_dir) as srv:
        with httpx.Client(timeout=10) as client:
            for name, body in _forged_messages(valid) + wrong + fuzzed:
                r = client.post(srv.url + "/v1/infer", content=body)
                if name == "fuzz" and r.status_code == 200:
                    continue  # a flipped bit inside the tensor data is still a valid message
                assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
                assert r.json()["error"], name
                if name in ("wrong shape", "wrong dtype", "tuple payload", "no batch dim"):
                    assert r.status_code == 422, (name, r.text)
            assert client.get(srv.url + "/health").json()["status"] == "ok"
            r = client.post(srv.url + "/v1/infer", content=valid)
            assert r.status_code == 200 and len(r.json()["predictions"]) == 3
            by_status = client.get(srv.url + "/metrics").json()["requests_by_status"]
    assert not any(s.startswith("5") for s in by_status), by_status


def test_model_failure_is_500_and_server_survives(model_dir, small_model, digits):
    server, cfg = load_server(model_dir)

    body = Codec().encode(device_payload(small_model, digits.test.x[:2]))
    with running_server(model_dir, module=SlowModule(server, fail=1)) as srv:
        r = _post(srv.url, body)
        assert r.status_code == 500 and "injected" in r.json()["error"]
        assert _post(srv.url, body).status_code == 200


def test_bad_configuration_errors(tmp_path, small_model):
    with pytest.raises(CorruptFileError, match="not a splitexit model directory"):
        read_config(tmp_path)
    (tmp_path / "serve.json").write_text("{broken")
    with pytest.raises(CorruptFileError, match="export the model directory again"):
        read_config(tmp_path)
    with pytest.raises(InputError, match="max_batch"):
        ServerSettings(max_batch=0)
    with pytest.raises(InputError, match="token"):
        ServerSettings(token="short")
    with pytest.raises(InputError, match="zoo multi-exit"):
        export_model_dir(StagedModel.from_modules([torch.nn.Identity()]), None, tmp_path / "x")
    with pytest.raises(InputError, match="unknown cut"):
        export_model_dir(small_model, "nope", tmp_path / "y")
    with pytest.raises(InputError, match="dtype"):
        PayloadSpec.from_json({"shapes": [[1]], "dtype": "nonsense"})


def test_full_queue_gets_503_not_unbounded_memory(small_model, model_dir, digits):
    server, _ = load_server(model_dir)
    body = Codec().encode(device_payload(small_model, digits.test.x[:1]))
    with running_server(model_dir, module=SlowModule(server, delay_s=0.2), max_batch=1,
                        max_queue_samples=2) as srv:
        with ThreadPoolExecutor(8) as pool:
            statuses = [r.status_code for r in pool.map(lambda _: _post(srv.url, body),
                                                        range(8))]
        assert statuses.count(200) >= 2 and 503 in statuses, statuses
        r = _post(srv.url, body)
        assert r.status_code == 200


def test_serve_bench_thresholds_are_chosen_against_the_unsplit_model(trained_resnet8, digits):
    from benchmarks.serve import _choose_policy

    with torch.inference_mode():
        unsplit = float((trained_resnet8.backbone(digits.calib.x).argmax(1)
                         == digits.calib.y).double().mean())
    _, policy, info = _choose_policy(trained_resnet8, digits, 0.01, unsplit)
    assert info["reference"] == "unsplit model" and info["reference_accuracy"] == unsplit
    assert info["calib_accuracy"] >= unsplit - 0.01 - 1e-9
    # a reference no exit configuration can reach falls back to the model's own final exit,
    # and the report says so
    _, _, info = _choose_policy(trained_resnet8, digits, 0.01, 1.5)
    assert info["reference"].startswith("bottlenecked model's final exit")
    assert info["calib_accuracy"] >= info["calib_final_accuracy"] - 0.01 - 1e-9
