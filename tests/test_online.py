"""Online layer caching on real digits traffic: caches learn from the frozen model's own
outputs, switch on once reliable, and serving keeps agreeing with the model."""

from __future__ import annotations

import copy

import pytest
import torch

from splitexit.cost import cost_table
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.methods import OnlineCache
from splitexit.training import Baseline, train
from splitexit.zoo import create_model, create_multiexit

WIDTHS = (8, 16, 32)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def setup(one_thread_module):
    ds = load_dataset("digits")
    frozen = create_model("resnet8", 10, ds.input_shape, widths=WIDTHS)
    train(frozen, ds.train, Baseline(), epochs=5, lr=5e-3, progress=False)
    return ds, frozen.eval()


def fresh_caches(ds, frozen):
    model = create_multiexit("resnet8", 10, ds.input_shape, head="sdn", widths=WIDTHS)
    model.backbone.load_state_dict(frozen.state_dict())
    return model.eval()


def test_caches_switch_on_and_agree_with_the_model(setup):
    ds, frozen = setup
    model = fresh_caches(ds, frozen)
    before = copy.deepcopy(model.backbone.state_dict())
    cache = OnlineCache(model, threshold=0.9, probe_fraction=0.5, target_agreement=0.98,
                        window=300, min_confident=100)
    traffic = torch.cat([ds.train.x, ds.calib.x])  # unlabelled: labels are never used
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(2):
        order = torch.randperm(len(traffic), generator=gen)
        for i in range(0, len(order), 32):
            result = cache.process(traffic[order[i: i + 32]])
            if first is None:
                first = result
    # at first nothing is trusted: every sample runs to the final exit
    assert bool((first.exit_index == model.num_exits - 1).all())
    assert any(cache.enabled), cache.window_agreement()
    assert cache.stats.samples == 2 * len(traffic)
    stats = cache.stats.to_dict()
    assert stats["served_agreement"] > 0.97
    full_macs = cost_table(model, traffic[:1], measure=False).exit_macs[-1]
    assert stats["mean_served_macs"] < full_macs
    assert sum(stats["exit_counts"][:-1]) > 0
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the model stays frozen"
    # the switched-on caches on unseen test traffic: real path, agreement with the model
    result = model.infer(ds.test.x, cache.policy)
    own = frozen(ds.test.x).argmax(1)
    assert float((result.predictions == own).double().mean()) > 0.95
    assert float((result.exit_index < model.num_exits - 1).double().mean()) > 0.2
    reference = model.simulate(model.collect_logits(ds.test.x), cache.policy)
    for batch_size in (1, 7, 256):
        n = 70 if batch_size < 256 else len(ds.test.x)
        parts = [model.infer(ds.test.x[i: i + batch_size], cache.policy)
                 for i in range(0, n, batch_size)]
        assert torch.equal(torch.cat([p.predictions for p in parts]), reference.predictions[:n])
        assert torch.equal(torch.cat([p.exit_index for p in parts]), reference.exit_index[:n])


def test_unreliable_caches_stay_off(setup):
    ds, frozen = setup
    model = fresh_caches(ds, frozen)
    # a demanding target on little traffic: the caches may learn but must not serve
    cache = OnlineCache(model, target_agreement=1.0, min_confident=250, window=300, lr=1e-4)
    for i in range(0, 256, 32):
        result = cache.process(ds.train.x[i: i + 32])
        assert bool((result.exit_index == model.num_exits - 1).all())
    assert not any(cache.enabled)
    assert cache.stats.served_agreement == 1.0


def test_online_cache_bad_input(setup):
    ds, frozen = setup
    with pytest.raises(InputError, match="exit heads"):
        OnlineCache(frozen)
    model = fresh_caches(ds, frozen)
    with pytest.raises(InputError, match="probe_fraction"):
        OnlineCache(model, probe_fraction=0.0)
    with pytest.raises(InputError, match="min_confident"):
        OnlineCache(model, window=10, min_confident=20)
    model.heads.requires_grad_(False)
    with pytest.raises(InputError, match="frozen"):
        OnlineCache(model)
    model.heads.requires_grad_(True)
    cache = OnlineCache(model)
    with pytest.raises(InputError, match="shape"):
        cache.process(torch.rand(2, 1, 28, 28))
