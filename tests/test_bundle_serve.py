"""Bundles served and run at the edge: a residual network of our own (not from the zoo), cut
inside a block, trained briefly, bundled split with the int8 codec, served by a real
``splitexit serve BUNDLE`` process on ONNX Runtime, and run by the edge runtime on the
bundle's ONNX Runtime device part; its answers equal the in-process PyTorch model's."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from serve_helpers import (
    OWN_CODEC,
    OWN_SPLIT,
    own_bundle,
    own_model,
    own_model_file,
    running_server,
    server_module,
    server_process,
    small_model,
    zoo_bundle,
)
from splitexit import checkpoint
from splitexit.deploy import bundle
from splitexit.errors import InputError
from splitexit.policies import NeverExit
from splitexit.program import lower
from splitexit.runtime.bundle import load_bundle
from splitexit.runtime.loop import ExitRun, advance_exits, payload_tensors
from splitexit.serve import EdgeRuntime, EdgeSettings, load_serving
from splitexit.split import codec as wire

TOKEN = "bundle-token-for-tests"
SOURCES = {"exit", "server", "fallback", "failed"}


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def own():
    """(trained model, bundle directory, policy)."""
    path, policy = own_bundle()
    return own_model(), path, policy


def _reference(model, policy, x: torch.Tensor, cut=OWN_SPLIT, codec=OWN_CODEC):
    """The split in PyTorch, in process: the local exits' decisions, and the server half's
    logits for the rest after the same wire codec (what crosses the link is quantised)."""
    program = lower(model, policy, cut, x[:2])
    with torch.inference_mode():
        run = advance_exits(ExitRun.start(x), program.step, program.exit_stages, policy,
                            program.device_pieces)
        logits = None
        if len(run.active):
            payload = wire.decode(wire.Codec.parse(codec).encode(run.payload))
            logits = program.module(program.device_pieces)(*payload_tensors(payload))[0]
    return run, logits


def _check_once(answers, n):
    assert sorted(a.index for a in answers) == list(range(n))
    assert all(a.source in SOURCES for a in answers)


def _assert_matches_pytorch(answers, model, policy, x, bundle_dir):
    """Exits and predictions of the edge answers equal the in-process PyTorch split's."""
    run, server_logits = _reference(model, policy, x)
    final = load_bundle(bundle_dir).num_exits - 1
    with torch.inference_mode():
        full = model.infer(x, policy)  # the unsplit model: same local decisions
    offloaded = {int(i): j for j, i in enumerate(run.active.tolist())}
    by_index = {a.index: a for a in answers}
    for i, a in by_index.items():
        if i not in offloaded:
            assert a.source == "exit", (i, a)
            assert a.exit_index == int(run.result.exit_index[i]) == int(full.exit_index[i])
            assert a.prediction == int(run.result.predictions[i]) == int(full.predictions[i])
            continue
        assert a.source == "server" and a.exit_index == final, (i, a)
        ref = server_logits[offloaded[i]]
        top2 = ref.topk(2).values
        if float(top2[0] - top2[1]) > 1e-3:  # not a float tie between the runtimes
            assert a.prediction == int(ref.argmax()), (i, a.logits, ref)
        np.testing.assert_allclose(a.logits, ref.numpy(), atol=2e-3, rtol=0)
    return offloaded


@pytest.mark.slow
def test_own_model_bundle_served_by_subprocess_equals_pytorch(own, digits, tmp_path,
                                                              monkeypatch, capsys):
    model, path, policy = own
    b = load_bundle(path)
    assert b.cut == OWN_SPLIT and b.codec == OWN_CODEC and len(b.payload) == 2  # in a block
    x = digits.test.x[:64]
    with server_process(path, env={"SPLITEXIT_TOKEN": TOKEN}) as (_, url):
        health = httpx.get(url + "/health", timeout=5,
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert health["bundle"] and health["runtime"] == "onnxruntime"
        assert health["model"] == "own architecture" and "own_net" not in json.dumps(health)
        with EdgeRuntime(b.device(), b.policy, url, b.codec,
                         EdgeSettings(token=TOKEN, deadline_s=10)) as edge:
            answers = edge.classify(x.numpy())
            torch_answers = edge.classify(x)  # a torch batch works the same
            stats = edge.stats.snapshot()
        with EdgeRuntime(b.device(), b.policy, url, b.codec,
                         EdgeSettings(deadline_s=10, retries=3)) as edge:  # no token
            refused = edge.classify(x.numpy())
        # the command line on a .npy file, against the same server
        np.save(tmp_path / "x.npy", x.numpy())
        np.save(tmp_path / "y.npy", digits.test.y[:64].numpy())
        monkeypatch.setenv("SPLITEXIT_TOKEN", TOKEN)
        from splitexit.cli import main

        assert main(["edge", str(path), "--server", url, "--inputs", str(tmp_path / "x.npy"),
                     "--labels", str(tmp_path / "y.npy"), "--batch-size", "8",
                     "--out", str(tmp_path / "a.jsonl")]) == 0
    _check_once(answers, 64)
    assert {a.source for a in answers} == {"exit", "server"}
    assert {a.exit_index for a in answers if a.source == "exit"} == {0, 1}
    offloaded = _assert_matches_pytorch(answers, model, policy, x, path)
    assert [(a.source, a.prediction) for a in torch_answers] == \
        [(a.source, a.prediction) for a in answers]
    assert isinstance(answers[0].logits, np.ndarray)
    assert json.loads(json.dumps(answers[0].to_json()))["logits"]
    # int8 on the wire: two 16x8x8 tensors per offloaded sample, one byte each, plus headers
    assert stats["requests"] == 2
    assert 2 * len(offloaded) * 2048 < stats["bytes_sent"] < 2 * (len(offloaded) * 2048 + 300)
    assert {a.source for a in refused} == {"exit", "fallback"}
    assert all("401" in a.error for a in refused if a.source == "fallback")
    cli_stats = json.loads(capsys.readouterr().out)
    assert cli_stats["inputs"] == 64 and cli_stats["accuracy"] > 0.6
    lines = [json.loads(v) for v in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(v["index"] for v in lines) == list(range(64))
    assert [v["prediction"] for v in sorted(lines, key=lambda v: v["index"])] == \
        [a.prediction for a in answers]


def test_bundle_server_batches_checks_and_guards(own, digits):
    model, path, policy = own
    b = load_bundle(path)
    x = digits.test.x[:8].numpy()
    full = b.device().run(x, NeverExit()).as_numpy()  # every sample has a payload
    codec = wire.Codec.parse(OWN_CODEC)
    bodies = [codec.encode(tuple(t[i: i + 1] for t in full.payload)) for i in range(8)]
    expected = server_module(path)(tuple(torch.from_numpy(t) for t in full.payload))
    with running_server(path, max_batch=8, max_wait_ms=300, token=TOKEN) as srv:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        post = lambda body, h=headers: httpx.post(srv.url + "/v1/infer", content=body,  # noqa: E731
                                                  headers=h, timeout=10)
        assert post(bodies[0], {}).status_code == 401
        post(bodies[0])  # warm-up
        with ThreadPoolExecutor(8) as pool:
            docs = [r.json() for r in pool.map(post, bodies)]
        wrong = post(codec.encode(full.payload[0]))  # one tensor where the cut carries two
        health = httpx.get(srv.url + "/health", headers=headers).json()
    assert max(d["batch_size"] for d in docs) >= 4, [d["batch_size"] for d in docs]
    for i, d in enumerate(docs):
        np.testing.assert_allclose(d["logits"][0], expected[i].numpy(), atol=1e-2)
    assert wrong.status_code == 422 and "2" in wrong.json()["error"]
    assert health["runtime"] == "onnxruntime" and health["spec"]["is_tuple"]
    assert health["settings"]["runtime"] == "onnxruntime" and TOKEN not in json.dumps(health)


def test_pytorch_runtimes_of_own_bundle_need_the_model_code(own, digits):
    model, path, policy = own
    with pytest.raises(InputError, match="--model path/to/file.py:function"):
        load_serving(path, "eager")
    b = load_bundle(path)
    out = b.device().run(digits.test.x[:16].numpy(), NeverExit())
    payload = tuple(torch.from_numpy(t) for t in out.as_numpy().payload)
    ort_logits = server_module(path)(payload)
    for runtime in ("eager", "torchscript"):
        server, spec, info = load_serving(path, runtime, model=own_model_file())
        assert info["runtime"] == runtime and spec.is_tuple and spec.shapes == ((16, 8, 8),) * 2
        with torch.inference_mode():
            torch.testing.assert_close(server(payload), ort_logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(InputError, match="unknown server runtime"):
        load_serving(path, "tensorrt")


def test_full_offload_device_only_and_no_server(own, digits, tmp_path):
    model, path, policy = own
    x = digits.test.x[:16]
    full_dir = bundle(model, tmp_path / "full", cut="input", policy=policy, codec="fp16",
                      example=x, measure=False)
    b = load_bundle(full_dir)
    with running_server(full_dir) as srv, \
            EdgeRuntime(b.device(), b.policy, srv.url, b.codec) as edge:
        answers = edge.classify(x.numpy())
    with torch.inference_mode():
        expected = model.backbone(x).argmax(1).tolist()
    assert [a.source for a in answers] == ["server"] * 16
    assert [a.prediction for a in answers] == expected
    with EdgeRuntime(b.device(), b.policy, None, b.codec) as edge:  # no server, no exit
        assert {a.source for a in edge.classify(x.numpy())} == {"failed"}
    # the split bundle without a server: the deepest local exit answers what none decided
    split = load_bundle(path)
    with EdgeRuntime(split.device(), split.policy, None, split.codec) as edge:
        local = edge.classify(x.numpy())
    _check_once(local, 16)
    with torch.inference_mode():
        exit1 = model(x)[1].argmax(1)
    fallback = [a for a in local if a.source == "fallback"]
    assert fallback and all(a.exit_index == 1 and a.prediction == int(exit1[a.index])
                            and a.error == "no server configured" for a in fallback)
    device_only = bundle(model, tmp_path / "dev", policy=policy, example=x, measure=False)
    with pytest.raises(InputError, match="no server half"):
        load_serving(device_only)


@pytest.mark.slow
def test_zoo_bundle_served_eagerly_by_subprocess(digits):
    path, policy = zoo_bundle()
    model = small_model()
    b = load_bundle(path)
    x = digits.test.x[:24]
    out = b.device().run(x.numpy(), NeverExit()).as_numpy()
    with torch.inference_mode():
        expected = model.backbone(x)
    with server_process(path, "--runtime", "eager") as (_, url):
        health = httpx.get(url + "/health", timeout=5).json()
        r = httpx.post(url + "/v1/infer", content=wire.Codec().encode(out.payload), timeout=10)
    assert health["runtime"] == "eager" and health["model"] == "resnet8"
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == expected.argmax(1).tolist()
    np.testing.assert_allclose(r.json()["logits"], expected.numpy(), atol=1e-4)


def test_cli_bundle_command(own, digits, tmp_path, capsys):
    from splitexit.cli import main

    model, _, policy = own
    ckpt = tmp_path / "ckpt"
    checkpoint.save(model, ckpt, dataset="digits")
    out = tmp_path / "b"
    args = ["bundle", str(ckpt), "--out", str(out), "--cut", OWN_SPLIT, "--codec", "int8",
            "--samples", "16"]
    assert main(args) == 2  # own architecture: --model needed
    assert "--model" in capsys.readouterr().err
    assert main([*args, "--model", own_model_file()]) == 2  # never calibrated, no --policy
    assert "calibrate" in capsys.readouterr().err
    (ckpt / "calibration.json").write_text(json.dumps({"policy": policy.config()}))
    assert main([*args, "--model", own_model_file()]) == 0
    printed = capsys.readouterr().out
    assert f"wrote bundle {out}" in printed and "split at relu" in printed
    assert "latency on ONNX Runtime" in printed and " ms mean" in printed
    b = load_bundle(out)
    # the split keeps the local exits and the final one: per-exit values follow their exits
    local = len(b.exit_names) - 1
    assert b.policy.threshold[:local] == policy.threshold[:local]
    assert b.codec == "int8" and b.cut == OWN_SPLIT
    assert b.classes == list(digits.class_names) and b.manifest["latency"]["samples"] == 16
    assert main(["bundle", str(ckpt), "--out", str(tmp_path / "bad"), "--cut", "nope",
                 "--model", own_model_file(), "--no-measure"]) == 2
    assert "nope" in capsys.readouterr().err
    # a device bundle whose thresholds are chosen for ONNX Runtime on the calibration split
    dev = tmp_path / "dev"
    assert main(["bundle", str(ckpt), "--out", str(dev), "--model", own_model_file(),
                 "--max-drop", "2", "--samples", "16"]) == 0
    b = load_bundle(dev)
    sel = b.manifest["selection"]
    assert sel["max_drop"] == 0.02 and sel["calib_samples"] == len(digits.calib)
    chosen = next(s for s in sel["subsets"] if s.get("chosen"))
    assert chosen["calib_accuracy"] >= sel["reference_accuracy"] - 0.02 - 1e-9
    assert main(["bundle", str(ckpt), "--out", str(tmp_path / "x"), "--model",
                 own_model_file(), "--max-drop", "2", "--cut", OWN_SPLIT]) == 2
    assert "no cut" in capsys.readouterr().err
