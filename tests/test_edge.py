"""Edge runtime against real servers: local exits, deadline, server killed mid-stream, link
outages through the shaping proxy, slow server, retries, circuit breaker. The fault scenarios
run on a zoo model directory (PyTorch device part) and on a bundle of a residual network of
our own, split inside a block (ONNX Runtime device part, int8 wire codec)."""

from __future__ import annotations

import time

import pytest
import torch

from serve_helpers import (
    SlowModule,
    make_model_dir,
    own_bundle,
    running_server,
    server_module,
    server_process,
)
from splitexit.errors import InputError
from splitexit.policies import NeverExit
from splitexit.serve import (
    CircuitBreaker,
    DevicePart,
    EdgeRuntime,
    EdgeSettings,
    LinkConditions,
    NetemProxy,
    load_device,
    load_server,
)
from splitexit.serve.cli import load_edge_device

SOURCES = {"exit", "server", "fallback", "failed"}


pytestmark = pytest.mark.usefixtures("one_thread_module")






@pytest.fixture(scope="module", params=["model_dir", "bundle"])
def target(request, model_dir):
    """Where the fault scenarios run: the zoo model directory, or our own model's bundle."""
    return model_dir if request.param == "model_dir" else own_bundle()[0]


def _edge(model_dir, url, **settings) -> EdgeRuntime:
    """The edge runtime of a model directory (PyTorch) or a bundle (ONNX Runtime)."""
    device, policy, codec = load_edge_device(model_dir)
    return EdgeRuntime(device, policy, url, codec, EdgeSettings(**settings))


def _check_once(answers, n):
    assert sorted(a.index for a in answers) == list(range(n))
    assert all(a.source in SOURCES for a in answers)


def test_local_exits_plus_server_equal_in_process_inference(small_model, model_dir, digits):
    x = digits.test.x[:64]
    device, policy, _ = load_device(model_dir)
    expected = small_model.infer(x, policy)  # server skips no exit the device has not run
    with running_server(model_dir) as srv, _edge(model_dir, srv.url) as edge:
        answers = edge.classify(x)
        stats = edge.stats.snapshot()
    _check_once(answers, 64)
    sources = {a.source for a in answers}
    assert sources == {"exit", "server"}, sources
    local = [a for a in answers if a.source == "exit"]
    assert all(a.exit_index < 2 for a in local)  # exits stem/block1 are on the device
    full = small_model.backbone(x).argmax(1)
    for a in answers:
        if a.source == "exit":
            assert a.prediction == int(expected.predictions[a.index])
        else:
            assert a.prediction == int(full[a.index]) and a.exit_index == 3
    n_server = sum(a.source == "server" for a in answers)
    assert stats["requests"] == 1 and stats["answers_by_source"]["server"] == n_server
    # only undecided samples crossed the link: 8x8x8 float32 each plus a small header
    assert n_server * 2048 < stats["bytes_sent"] < n_server * 2048 + 200


def test_full_offload_and_no_server(small_model, model_dir, digits, tmp_path):
    full_dir = make_model_dir(small_model, tmp_path / "full", NeverExit(), cut=None)
    x = digits.test.x[:8]
    with running_server(full_dir) as srv, _edge(full_dir, srv.url) as edge:
        answers = edge.classify(x)
    assert [a.source for a in answers] == ["server"] * 8
    assert [a.prediction for a in answers] == small_model.backbone(x).argmax(1).tolist()
    with _edge(full_dir, None) as edge:  # no server and no local exit: labelled failures
        answers = edge.classify(x)
    assert {a.source for a in answers} == {"failed"} and all(a.prediction == -1 for a in answers)
    with _edge(model_dir, None) as edge:  # no server: local fallback
        assert {a.source for a in edge.classify(x)} <= {"exit", "fallback"}


def test_deadline_respected_with_slow_server(target, digits):
    model_dir = target
    server = server_module(model_dir)
    x = digits.test.x[:32]
    with running_server(model_dir, module=SlowModule(server, delay_s=0.6)) as srv:
        with _edge(model_dir, srv.url, deadline_s=0.25, retries=3) as edge:
            for _ in range(2):
                t0 = time.monotonic()
                answers = edge.classify(x)
                elapsed = time.monotonic() - t0
                assert elapsed < 0.25 + 0.15, elapsed
                _check_once(answers, 32)
                assert {a.source for a in answers} == {"exit", "fallback"}
                assert all("deadline" in a.error for a in answers if a.source == "fallback"), {a.error for a in answers}
        with _edge(model_dir, srv.url, deadline_s=3.0) as edge:  # patient edge: server answers
            answers = edge.classify(x)
            assert "server" in {a.source for a in answers}
            assert max(a.latency_ms for a in answers) >= 600


def test_retry_with_backoff_recovers_from_a_failed_request(model_dir, digits):
    server, _ = load_server(model_dir)
    flaky = SlowModule(server, fail=1)
    with running_server(model_dir, module=flaky) as srv:
        with _edge(model_dir, srv.url, retries=2, backoff_s=0.05) as edge:
            t0 = time.monotonic()
            answers = edge.classify(digits.test.x[:16])
            assert time.monotonic() - t0 >= 0.05  # waited before retrying
            stats = edge.stats.snapshot()
    assert "server" in {a.source for a in answers} and "fallback" not in {a.source for a in
                                                                            answers}
    assert stats["retries"] == 1 and stats["request_failures"] == 1 and stats["requests"] == 2


@pytest.mark.slow
def test_server_killed_mid_stream(target, digits):
    model_dir = target
    x = digits.test.x[:40]
    with server_process(model_dir) as (proc, url):
        with _edge(model_dir, url, deadline_s=1.0, retries=1, breaker_failures=2,
                   breaker_reset_s=30) as edge:
            answers = []
            for i in range(40):
                if i == 15:
                    proc.kill()
                    proc.wait(10)
                batch = edge.classify(x[i: i + 1])
                for a in batch:
                    a.index = i
                answers += batch
            assert edge.breaker.state == "open"
    _check_once(answers, 40)
    before = {a.source for a in answers[:15]}
    after = [a for a in answers[15:]]
    assert "server" in before
    assert all(a.source in ("exit", "fallback") for a in after)
    assert any(a.source == "fallback" for a in after)
    assert all(a.latency_ms < 1000 + 100 for a in answers)


def test_link_outage_through_proxy_and_recovery(target, digits):
    model_dir = target
    x = digits.test.x[:32]
    with running_server(model_dir) as srv:
        with NetemProxy("127.0.0.1", srv.port, LinkConditions(delay_ms=5)) as proxy, \
                _edge(model_dir, proxy.url, deadline_s=0.5, retries=1, breaker_failures=4,
                      breaker_reset_s=0.3) as edge:
            assert "server" in {a.source for a in edge.classify(x)}
            proxy.set_outage("down")  # connections reset, new ones refused: 2 failed attempts
            t0 = time.monotonic()
            down = edge.classify(x)
            assert time.monotonic() - t0 < 0.5 + 0.1
            assert {a.source for a in down} == {"exit", "fallback"}
            assert edge.breaker.state == "closed"
            proxy.set_outage("blackhole")  # nothing gets through: deadline, then fallback
            black = []
            for _ in range(2):
                t0 = time.monotonic()
                black.append(edge.classify(x))
                assert 0.4 < time.monotonic() - t0 < 0.5 + 0.15
            assert edge.breaker.state == "open"  # 4 consecutive failures
            t0 = time.monotonic()
            opened = edge.classify(x)  # no request at all while open
            assert time.monotonic() - t0 < 0.1
            assert all("circuit breaker" in a.error for a in opened if a.source == "fallback")
            proxy.set_outage(None)
            time.sleep(0.35)  # breaker half-opens; the probe succeeds and closes it
            back = edge.classify(x)
            assert "server" in {a.source for a in back}
            assert edge.breaker.state == "closed"
            for batch in (down, *black, opened, back):
                _check_once(batch, 32)
                assert {a.source for a in batch} <= {"exit", "fallback", "server"}


def test_proxy_shapes_delay_and_bandwidth(model_dir, digits):
    x = digits.test.x[:64]
    with running_server(model_dir) as srv, _edge(model_dir, srv.url) as edge:
        edge.classify(x)
        t0 = time.monotonic()
        edge.classify(x)
        direct = time.monotonic() - t0
    slow = LinkConditions(up_mbps=1.0, delay_ms=40)  # ~70 KB of payload: >= 0.28 s at 1 Mbit/s
    with running_server(model_dir) as srv, NetemProxy("127.0.0.1", srv.port, slow) as proxy, \
            _edge(model_dir, proxy.url, deadline_s=5) as edge:
        t0 = time.monotonic()
        answers = edge.classify(x)
        shaped = time.monotonic() - t0
        sent = edge.stats.snapshot()["bytes_sent"]
    assert "server" in {a.source for a in answers}
    assert shaped >= 2 * 0.040 + sent * 8 / 1e6 * 0.9, (shaped, sent)
    assert shaped > direct
    assert proxy.stats["bytes_up"] >= sent


def test_circuit_breaker_opens_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, reset_s=1.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow() and breaker.opens == 1
    now[0] = 1.5
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again
    assert breaker.state == "open" and breaker.opens == 2
    now[0] = 3.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_open_breaker_stops_requests(model_dir, digits):
    x = digits.test.x[:16]
    with running_server(model_dir) as srv:
        with NetemProxy("127.0.0.1", srv.port) as proxy, \
                _edge(model_dir, proxy.url, retries=0, breaker_failures=2,
                      breaker_reset_s=60) as edge:
            proxy.set_outage("down")
            for _ in range(2):
                edge.classify(x)
            assert edge.breaker.state == "open"
            requests = edge.stats.snapshot()["requests"]
            proxy.set_outage(None)
            answers = edge.classify(x)  # answered locally at once, nothing sent
            assert edge.stats.snapshot()["requests"] == requests
            assert all("circuit breaker" in a.error for a in answers if a.source == "fallback")


def test_bad_edge_input(model_dir, small_model):
    with pytest.raises(InputError, match="deadline_s"):
        EdgeSettings(deadline_s=0)
    with pytest.raises(InputError, match="retries"):
        EdgeSettings(retries=-1)
    with pytest.raises(InputError, match="MultiExitModel"):
        DevicePart(small_model.backbone, "block1")
    with pytest.raises(InputError, match="device runtime"):
        EdgeRuntime(small_model, NeverExit(), None)
    with pytest.raises(InputError, match="ExitPolicy"):
        EdgeRuntime(load_device(model_dir)[0], "maxprob", None)
    with pytest.raises(InputError, match="probability"):
        LinkConditions(loss=2)
    with pytest.raises(InputError, match="outage"):
        NetemProxy("127.0.0.1", 1).set_outage("flaky")
    with _edge(model_dir, None) as edge, pytest.raises(InputError, match="shape"):
        edge.classify(torch.zeros(2, 1, 28, 28))


def test_wrong_token_falls_back_without_retry(model_dir, digits):
    with running_server(model_dir, token="right-token-123") as srv:
        with _edge(model_dir, srv.url, token="wrong-token-456", retries=3) as edge:
            answers = edge.classify(digits.test.x[:16])
            stats = edge.stats.snapshot()
        with _edge(model_dir, srv.url, token="right-token-123") as edge:
            assert "server" in {a.source for a in edge.classify(digits.test.x[:16])}
    _check_once(answers, 16)
    assert all("401" in a.error for a in answers if a.source == "fallback")
    assert stats["requests"] == 1 and stats["retries"] == 0  # a refusal is not retried


def test_cli_prepare_and_edge(small_model, digits, tmp_path, capsys):
    import json

    from splitexit import checkpoint
    from splitexit.cli import main

    checkpoint.save(small_model, tmp_path / "ckpt")
    assert main(["prepare", str(tmp_path / "ckpt"), "--cut", "block1", "--codec", "int8",
                 "--policy", '{"name": "maxprob", "threshold": 0.15}',
                 "--out", str(tmp_path / "md")]) == 0
    with running_server(tmp_path / "md") as srv:
        assert main(["edge", str(tmp_path / "md"), "--server", srv.url, "--dataset", "digits",
                     "--limit", "20", "--workers", "2", "--out", str(tmp_path / "a.jsonl")]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    lines = [json.loads(v) for v in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert sorted(v["index"] for v in lines) == list(range(20))
    assert stats["inputs"] == 20 and 0 <= stats["accuracy"] <= 1
    assert {v["source"] for v in lines} <= {"exit", "server"}
    assert main(["prepare", str(tmp_path / "ckpt"), "--cut", "nope", "--out",
                 str(tmp_path / "bad")]) == 2
