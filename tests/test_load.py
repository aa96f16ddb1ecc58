"""Bounded load tests: many concurrent edge clients against one server (uvicorn, and Ray Serve
with two replicas when Ray is installed); graceful shutdown under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve_helpers import make_model_dir, median_policy
from serve_helpers import small_model as _small_model
from splitexit.measure import torch_threads
from splitexit.serve import (
    BackgroundServer,
    EdgeRuntime,
    EdgeSettings,
    ServerSettings,
    create_app,
    load_device,
    load_server,
)
from splitexit.serve.ray_app import ray_available

CLIENTS, REQUESTS = 8, 25


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model_dir(digits, tmp_path_factory):
    model = _small_model()
    return make_model_dir(model, tmp_path_factory.mktemp("load") / "model",
                          median_policy(model, digits.calib.x))


def _load(url: str, model_dir, x: torch.Tensor, deadline_s: float = 5.0,
          stop_after: float | None = None):
    """CLIENTS threads, each with its own edge runtime, REQUESTS one-sample calls each."""
    answers: dict[int, list] = {}
    lock = threading.Lock()
    stats = []

    # built before the threads start: torch.fx tracing (zoo models) is not thread-safe
    devices = [load_device(model_dir) for _ in range(CLIENTS)]

    def client(c: int) -> None:
        device, policy, cfg = devices[c]
        with EdgeRuntime(device, policy, url, cfg.codec,
                         EdgeSettings(deadline_s=deadline_s, retries=1)) as edge:
            for r in range(REQUESTS):
                i = c * REQUESTS + r
                for a in edge.classify(x[i: i + 1]):
                    with lock:
                        answers.setdefault(i, []).append(a)
            stats.append(edge.stats.snapshot())

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return answers, stats, time.monotonic() - t0


def test_concurrent_clients_all_answered_once(model_dir, digits):
    x = digits.test.x[: CLIENTS * REQUESTS]
    server, cfg = load_server(model_dir)
    app = create_app(server, cfg.payload, ServerSettings(max_batch=16, max_wait_ms=5, threads=1))
    with BackgroundServer(app) as srv:
        answers, stats, elapsed = _load(srv.url, model_dir, x)
        metrics = httpx.get(srv.url + "/metrics").json()
    assert sorted(answers) == list(range(CLIENTS * REQUESTS))
    assert all(len(v) == 1 for v in answers.values())  # none lost, none duplicated
    sources = {v[0].source for v in answers.values()}
    assert sources == {"exit", "server"}, sources  # no fallback under normal load
    offloaded = sum(v[0].source == "server" for v in answers.values())
    assert metrics["samples"] == offloaded == metrics["requests_ok"]
    assert metrics["requests"] == metrics["requests_ok"]
    assert elapsed < 60
    assert sum(s["request_failures"] for s in stats) == 0
    assert metrics["batches"] < metrics["requests_ok"]  # concurrent requests were merged
    _check_server_predictions(answers, x)


def test_graceful_shutdown_under_load(model_dir, digits):
    x = digits.test.x[: CLIENTS * REQUESTS]
    server, cfg = load_server(model_dir)
    app = create_app(server, cfg.payload, ServerSettings(max_batch=16, max_wait_ms=5, threads=1))
    srv = BackgroundServer(app).start()

    def stop_midway() -> None:  # once part of the load is served, shut down gracefully
        t_end = time.monotonic() + 30
        while app.state.metrics.samples < 20 and time.monotonic() < t_end:
            time.sleep(0.005)
        srv.stop()

    stopper = threading.Thread(target=stop_midway)
    stopper.start()
    try:
        answers, stats, _ = _load(srv.url, model_dir, x, deadline_s=1.0)
    finally:
        stopper.join()
        srv.stop()
    assert sorted(answers) == list(range(CLIENTS * REQUESTS))
    assert all(len(v) == 1 for v in answers.values())
    sources = {v[0].source for v in answers.values()}
    assert "server" in sources and "fallback" in sources, sources  # before / after shutdown
    assert sources <= {"exit", "server", "fallback"}


@pytest.mark.slow
@pytest.mark.skipif(ray_available() is not None, reason=str(ray_available()))
def test_ray_serve_two_replicas(model_dir, digits):
    from serve_helpers import free_port, wait_until_healthy
    from splitexit.serve import ray_app

    url = ray_app.deploy(model_dir, replicas=2, settings=ServerSettings(max_batch=16,
                                                                        threads=1),
                         port=free_port(), num_cpus=2)
    try:
        wait_until_healthy(url, 60, interval_s=0.5)
        pids = {httpx.get(url + "/health", timeout=5).json()["replica_pid"] for _ in range(20)}
        assert len(pids) == 2
        x = digits.test.x[: CLIENTS * REQUESTS]
        answers, stats, _ = _load(url, model_dir, x, deadline_s=10.0)
    finally:
        ray_app.shutdown()
    assert all(len(answers[i]) == 1 for i in range(CLIENTS * REQUESTS))
    assert {v[0].source for v in answers.values()} == {"exit", "server"}
    _check_server_predictions(answers, x)


def _check_server_predictions(answers, x):
    with torch.inference_mode():
        full = _small_model().backbone(x).argmax(1)
    served = [i for i, v in answers.items() if v[0].source == "server"]
    assert served
    assert all(answers[i][0].prediction == int(full[i]) for i in served)
