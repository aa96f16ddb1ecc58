"""Helpers shared by the serve / edge / load tests: model directories, servers, slow modules."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from splitexit.policies import MaxProb
from splitexit.serve import (
    BackgroundServer,
    ServerSettings,
    create_app,
    export_model_dir,
    load_server,
)
from splitexit.serve.app import free_port, wait_until_healthy  # noqa: F401 (re-exported for tests)
from splitexit.zoo import create_multiexit

CUT = "block1"


@functools.cache
def small_model():
    """An untrained narrow ResNet-8 with exits (instant; the serve tests need no accuracy)."""
    torch.manual_seed(0)
    return create_multiexit("resnet8", 10, (1, 8, 8), widths=(8, 16, 32)).eval()


def median_policy(model, x: torch.Tensor) -> MaxProb:
    """Max-prob threshold at the median first-exit confidence: about half the samples exit."""
    with torch.inference_mode():
        conf = model(x)[0].softmax(1).amax(1)
    return MaxProb(float(conf.median()))


def make_model_dir(model, directory: Path, policy, cut: str | None = CUT) -> Path:
    return export_model_dir(model, cut, directory, codec="fp32", policy=policy)


class SlowModule(nn.Module):
    """Wraps a server half; sleeps ``delay_s`` per batch and can fail its first ``fail`` calls."""

    def __init__(self, inner: nn.Module, delay_s: float = 0.0, fail: int = 0):
        super().__init__()
        self.inner = inner
        self.delay_s = delay_s
        self.fail = fail
        self.calls = 0
        self._lock = threading.Lock()

    def forward(self, payload):
        with self._lock:
            self.calls += 1
            failing = self.calls <= self.fail
        if failing:
            raise RuntimeError("injected server failure")
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner(payload)


@contextmanager
def running_server(model_dir: Path, module: nn.Module | None = None, **settings):
    """A server of ``model_dir`` (or of ``module`` with its payload spec) in a thread."""
    server, cfg = load_server(model_dir)
    settings.setdefault("threads", 1)
    app = create_app(module if module is not None else server, cfg.payload,
                     ServerSettings(**settings), info={"cut": cfg.cut})
    srv = BackgroundServer(app).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def server_process(model_dir: Path, *extra: str):
    """``splitexit serve MODEL_DIR`` as a real subprocess on a free loopback port."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "splitexit.cli", "serve", str(model_dir),
                             "--port", str(port), "--threads", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, 60, process=proc, interval_s=0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stderr.close()


def device_payload(model, x: torch.Tensor, cut: str = CUT):
    device, _ = model.backbone.split(cut)
    with torch.inference_mode():
        return device(x)
