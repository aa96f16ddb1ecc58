"""Shared fixtures: small real data and a quickly trained multi-exit model."""

import contextlib

import pytest
import torch

from splitexit.data import load_dataset
from splitexit.training import JointWeighted, train
from splitexit.zoo import create_multiexit


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after: two intra-op threads on a shared
    two-core machine make small convolutions much slower and kernel timings meaningless."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole test module, restored when the module ends: for module
    fixtures that train a model (a module fixture cannot use a function one)."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_resnet8(digits):
    """ResNet-8 with three exits trained jointly on digits for a few epochs (~3 s)."""
    torch.manual_seed(0)
    model = create_multiexit("resnet8", digits.num_classes, digits.input_shape)
    train(model, digits.train, JointWeighted(), epochs=6, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def small_model():
    """The serve tests' small multi-exit model (tests/serve_helpers.small_model)."""
    from serve_helpers import small_model as build

    return build()


@pytest.fixture(scope="module")
def model_dir(small_model, digits, tmp_path_factory):
    """A model directory of ``small_model`` split at the serve tests' cut, with a policy under
    which about half the samples leave locally."""
    from serve_helpers import make_model_dir, median_policy

    policy = median_policy(small_model, digits.calib.x)
    return make_model_dir(small_model, tmp_path_factory.mktemp("serve") / "model", policy)
