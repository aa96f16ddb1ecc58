"""Real early exits: infer (batch shrinks) agrees exactly with the offline simulation."""

import pytest
import torch

from splitexit import (
    Entropy,
    FixedExit,
    InputError,
    Margin,
    MaxProb,
    MultiExitModel,
    NeverExit,
    Patience,
    create_multiexit,
    list_models,
)
from splitexit.heads import LinearHead
from splitexit.zoo import create_model

POLICIES = [MaxProb(0.9), MaxProb((0.95, 0.8, 0.6)), Entropy(0.3), Margin(0.5), Patience(1),
            Patience(2), NeverExit(), FixedExit(exit_index=1),
            MaxProb(0.85, temperature=(1.5, 1.2, 1.0, 1.0))]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}")
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_infer_matches_simulate(trained_resnet8, digits, policy, batch_size):
    model = trained_resnet8
    x = digits.test.x[:256] if batch_size != 1 else digits.test.x[:24]
    logits = model.collect_logits(x)
    offline = model.simulate(logits, policy)
    preds, exits = [], []
    for i in range(0, len(x), batch_size):
        r = model.infer(x[i: i + batch_size], policy)
        preds.append(r.predictions)
        exits.append(r.exit_index)
    assert torch.equal(torch.cat(preds), offline.predictions)
    assert torch.equal(torch.cat(exits), offline.exit_index)


def test_samples_really_leave_the_batch(trained_resnet8, digits):
    model = trained_resnet8
    seen = []
    hooks = [model.backbone.stages[k].register_forward_hook(
        lambda m, i, o, k=k: seen.append((k, o.shape[0]))) for k in range(4)]
    try:
        result = model.infer(digits.test.x[:128], MaxProb(0.8))
    finally:
        for h in hooks:
            h.remove()
    sizes = dict(seen)
    counts = torch.bincount(result.exit_index, minlength=4)
    assert sizes[0] == 128
    assert sizes[1] == 128 - counts[0]
    assert sizes[3] == 128 - counts[:3].sum()
    assert counts[:3].sum() > 0, "some samples should exit early on digits"


def test_policy_state_follows_the_batch(trained_resnet8, digits):
    """Patience keeps per-sample counters; mixing exits in one batch must not mix them."""
    model = trained_resnet8
    x = digits.test.x[:64]
    together = model.infer(x, Patience(1))
    alone = [model.infer(x[i: i + 1], Patience(1)) for i in range(len(x))]
    assert torch.equal(together.exit_index, torch.cat([a.exit_index for a in alone]))


def test_exits_are_accurate_after_training(trained_resnet8, digits):
    from splitexit.training import evaluate_exits

    accs = evaluate_exits(trained_resnet8, digits.test.x, digits.test.y)
    assert accs[-1] > 0.9 and min(accs) > 0.25  # chance is 0.1


@pytest.mark.parametrize("name", list_models(task="classification"))
def test_every_zoo_model_runs_and_agrees(name):
    shape = (3, 64) if name == "cnn1d" else (1, 12, 12)
    torch.manual_seed(0)
    model = create_multiexit(name, 5, shape).eval()
    x = torch.rand(9, *shape)
    outs = model(x)
    assert len(outs) == model.num_exits and all(o.shape == (9, 5) for o in outs)
    assert torch.equal(outs[-1], model.backbone(x))
    # per-exit thresholds at the median confidence: about half the samples still in the
    # batch leave at each early exit (an untrained model's near-uniform softmax would
    # send every sample to the final exit under a fixed threshold)
    policy = MaxProb(tuple(MaxProb().statistic(o).median().item() for o in outs[:-1]))
    r = model.infer(x, policy)
    s = model.simulate(outs, policy)
    assert torch.equal(r.exit_index, s.exit_index)
    assert torch.equal(r.predictions, s.predictions)
    counts = torch.bincount(r.exit_index, minlength=model.num_exits)
    assert counts[0] > 0 and counts[1:].sum() > 0, counts  # the batch really shrank


def test_bad_inputs_get_clear_errors(trained_resnet8):
    model = trained_resnet8
    with pytest.raises(InputError, match="shape"):
        model.infer(torch.rand(2, 1, 28, 28), MaxProb(0.9))
    with pytest.raises(InputError, match="batch dimension"):
        model.infer(torch.rand(1, 8, 8), MaxProb(0.9))
    with pytest.raises(InputError, match="floating-point"):
        model.infer(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), MaxProb(0.9))
    with pytest.raises(InputError, match="NaN"):
        model.infer(torch.full((2, 1, 8, 8), float("nan")), MaxProb(0.9))
    with pytest.raises(InputError, match="torch.Tensor"):
        model.infer([[0.0]], MaxProb(0.9))
    with pytest.raises(InputError, match="out of range"):
        MaxProb(1.5)
    with pytest.raises(InputError, match="out of range"):
        Entropy(-0.1)
    with pytest.raises(InputError, match="patience"):
        Patience(0)


def test_heads_at_unknown_or_tuple_cuts_rejected():
    from splitexit import CutError, StagedModel
    from splitexit.zoo import ResNet

    net = ResNet(10, 1).eval()
    staged = StagedModel.from_module(net, ["block1.conv1", "block2"])
    with pytest.raises(CutError):
        MultiExitModel(staged, {"nope": LinearHead((16,), 10)})
    model = MultiExitModel(staged, {"block1.conv1": LinearHead((16, 8, 8), 10)})
    with pytest.raises(InputError, match="carries 2 tensors.*block1.conv1@<index>"):
        model(torch.rand(2, 1, 8, 8))


def test_head_fed_by_one_tensor_of_a_multi_tensor_cut():
    from splitexit import StagedModel
    from splitexit.runtime.loop import simulate_exits
    from splitexit.zoo import ResNet

    torch.manual_seed(0)
    net = ResNet(10, 1).eval()
    staged = StagedModel.from_module(net, ["block1.conv1", "block2"])
    x = torch.rand(5, 1, 8, 8)
    shapes = staged.payload_shapes(x)["block1.conv1"]
    assert len(shapes) == 2
    model = MultiExitModel(staged, {"block1.conv1@1": LinearHead(shapes[1], 10)}).eval()
    outs = model(x)
    payload = staged.stages[0](x)
    assert torch.equal(outs[0], model.heads[0](payload[1]))
    assert torch.equal(outs[-1], net(x))
    policy = MaxProb(float(outs[0].softmax(1).amax(1).median()))
    got, want = model.infer(x, policy), simulate_exits(outs, policy)
    assert torch.equal(got.exit_index, want.exit_index)
    assert torch.equal(got.predictions, want.predictions)


def test_backbone_is_the_baseline_architecture():
    base = create_model("resnet8", 10, (1, 28, 28))
    multi = create_multiexit("resnet8", 10, (1, 28, 28))
    multi.backbone.load_state_dict(base.state_dict())
    base.eval()
    multi.eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(multi(x)[-1], base(x))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.name}")
def test_batch_one_path_equals_the_shared_loop(trained_resnet8, digits, policy):
    """A single sample skips the batch bookkeeping; its exit, prediction and logits are the
    ones the shared exit loop (what split and server runtimes use) gives."""
    from splitexit.multiexit import ExitRun, advance_exits

    model = trained_resnet8
    for i in range(24):
        x = digits.test.x[i: i + 1]
        fast = model.infer(x, policy)
        loop = advance_exits(ExitRun.start(x), model.step, model.exit_stages, policy,
                             model.backbone.num_stages).result
        assert torch.equal(fast.predictions, loop.predictions)
        assert torch.equal(fast.exit_index, loop.exit_index)
        assert torch.equal(fast.logits, loop.logits)
