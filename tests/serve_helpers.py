"""Helpers shared by the serve / edge / load tests: model directories, bundles of a model of
our own (not from the zoo), servers, slow modules."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
    load_serving,
)
from splitexit.serve.runner import free_port, wait_until_healthy  # noqa: F401 (re-exported for tests)
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


def server_module(path: Path, runtime: str | None = None):
    """The server half of a model directory (PyTorch) or a bundle (ONNX Runtime by default)."""
    return load_serving(path, runtime, threads=1)[0]


@contextmanager
def running_server(model_dir: Path, module: nn.Module | None = None, **settings):
    """A server of ``model_dir`` or a bundle (or of ``module`` with its payload spec) in a
    thread."""
    server, spec, info = load_serving(model_dir, threads=1)
    settings.setdefault("threads", 1)
    settings.setdefault("runtime", info["runtime"])
    app = create_app(module if module is not None else server, spec,
                     ServerSettings(**settings), info=info)
    srv = BackgroundServer(app).start()
    try:
        yield srv
    finally:
        srv.stop()


@contextmanager
def server_process(model_dir: Path, *extra: str, env: dict | None = None):
    """``splitexit serve MODEL_DIR_OR_BUNDLE`` as a real subprocess on a free loopback port
    (``env``: extra environment variables, e.g. ``SPLITEXIT_TOKEN``; without a token the
    server runs with ``--no-auth``)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not env.get("SPLITEXIT_TOKEN") and "--token" not in extra:
        extra = (*extra, "--no-auth")  # a server without a token must say so
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


# ------------------------------------------------------------------ a model of our own
#: a small residual network written here (not from the zoo), loaded as user code from a file
#: the file of a small residual network written here (not from the zoo)
OWN_NET_FILE = Path(__file__).resolve().parent / "user_net.py"
OWN_NET_SOURCE = OWN_NET_FILE.read_text()
#: exits at the stem, inside block1 (tensor 1 of the two its cut carries) and after block2
OWN_CUTS = "stem,relu@1,block2"
#: the split: inside block1, where the payload is two tensors (the skip and the branch)
OWN_SPLIT = "relu"
OWN_CODEC = "int8"


@functools.cache
def _scratch() -> Path:
    path = Path(tempfile.mkdtemp(prefix="splitexit-test-own-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def own_model_file() -> str:
    """``path.py:net`` of the residual network above, written to a scratch directory."""
    path = _scratch() / "own_net.py"
    if not path.is_file():
        path.write_text(OWN_NET_SOURCE)
    return f"{path}:net"


def separated_policy(model, x: torch.Tensor, exits: tuple[int, ...] = (0,)) -> MaxProb:
    """Max-prob thresholds, one per exit in ``exits`` (later heads repeat the last), midway
    between the two confidences around that exit's median: about half the samples that reach
    it would leave there, and no sample sits at a threshold (float differences between
    runtimes cannot flip a decision)."""
    thresholds = []
    with torch.inference_mode():
        logits = model(x)
    for e in exits:
        conf, _ = logits[e].softmax(1).amax(1).sort()
        mid = len(conf) // 2
        thresholds.append(float((conf[mid - 1] + conf[mid]) / 2))
    if len(thresholds) == 1:
        return MaxProb(thresholds[0])
    # one value per head (a per-exit tuple must fit the model): later heads repeat the last
    heads = len(logits) - 1
    return MaxProb(tuple(thresholds + thresholds[-1:] * (heads - len(thresholds))))


@functools.cache
def own_model():
    """The residual network with exits (splitexit.usermodel.build_multiexit from the file),
    trained briefly on digits so its exits mean something (~3 s on one thread)."""
    from splitexit.data import load_dataset
    from splitexit.measure import torch_threads
    from splitexit.training import JointWeighted, train
    from splitexit.usermodel import build_multiexit

    ds = load_dataset("digits")
    with torch_threads(1):
        torch.manual_seed(0)
        model = build_multiexit(own_model_file(), OWN_CUTS, ds.num_classes, ds.input_shape,
                                head="sdn")
        train(model, ds.train, JointWeighted(), epochs=5, lr=1e-2, progress=False)
    return model.eval()


@functools.cache
def own_bundle() -> tuple[Path, MaxProb]:
    """The model above bundled split inside block1 with the int8 codec, and its policy."""
    from splitexit.data import load_dataset
    from splitexit.deploy import bundle

    ds = load_dataset("digits")
    model = own_model()
    policy = separated_policy(model, ds.calib.x, exits=(0, 1))
    path = bundle(model, _scratch() / "own-bundle", cut=OWN_SPLIT, policy=policy,
                  codec=OWN_CODEC, example=ds.calib.x[:32], classes=ds.class_names,
                  measure=False)
    return path, policy


@functools.cache
def zoo_bundle() -> tuple[Path, MaxProb]:
    """The untrained zoo ResNet-8 of :func:`small_model` bundled split at ``CUT`` (fp32)."""
    from splitexit.data import load_dataset
    from splitexit.deploy import bundle

    ds = load_dataset("digits")
    model = small_model()
    policy = median_policy(model, ds.calib.x)
    path = bundle(model, _scratch() / "zoo-bundle", cut=CUT, policy=policy, codec="fp32",
                  example=ds.calib.x[:8], measure=False)
    return path, policy
