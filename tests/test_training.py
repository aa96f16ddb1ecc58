"""Training strategies reach above-chance accuracy on real data and are reproducible."""

import copy

import pytest
import torch

from splitexit import InputError, create_model, create_multiexit
from splitexit.training import Baseline, HeadsOnly, JointWeighted, evaluate_exits, train


def test_baseline_learns(digits):
    model = create_model("mlp", digits.num_classes, digits.input_shape)
    train(model, digits.train, Baseline(), epochs=5, progress=False)
    acc = float((model(digits.test.x).argmax(1) == digits.test.y).double().mean())
    assert acc > 0.8


def test_heads_only_keeps_backbone_fixed(digits):
    base = create_model("mlp", digits.num_classes, digits.input_shape)
    train(base, digits.train, Baseline(), epochs=3, progress=False)
    model = create_multiexit("mlp", digits.num_classes, digits.input_shape, head="linear")
    model.backbone.load_state_dict(base.state_dict())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    train(model, digits.train, HeadsOnly(), epochs=4, progress=False)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    accs = evaluate_exits(model, digits.test.x, digits.test.y)
    assert min(accs) > 0.5


def test_training_is_reproducible(digits):
    """Same init and seed: identical weights, whatever the global RNG held before; another
    seed (another shuffle) gives other weights."""
    x = digits.test.x[:16]
    torch.manual_seed(123)  # init is the caller's; the loop seeds shuffling
    init = create_multiexit("mlp", digits.num_classes, digits.input_shape, head="linear")
    before = init(x)[-1]

    def trained(seed, rng_state):
        model = copy.deepcopy(init)
        torch.manual_seed(rng_state)  # a different global RNG state for every run
        train(model, digits.train, JointWeighted([1.0, 0.5, 0.5, 0.3]), epochs=2, seed=seed,
              progress=False)
        return model(x)[-1]

    first = trained(3, 0)
    assert not torch.allclose(first, before)  # it did train
    assert torch.equal(trained(3, 1), first)
    assert not torch.allclose(trained(4, 0), first)


def test_strategy_misuse_errors(digits):
    plain = create_model("mlp", digits.num_classes, digits.input_shape)
    with pytest.raises(InputError, match="has none"):
        train(plain, digits.train, JointWeighted(), epochs=1, progress=False)
    model = create_multiexit("mlp", digits.num_classes, digits.input_shape)
    with pytest.raises(InputError, match="weights"):
        train(model, digits.train, JointWeighted([1.0]), epochs=1, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable"):
        train(model, digits.train, Baseline(), epochs=1, progress=False)
    with pytest.raises(InputError, match="unknown training option"):
        train(model, digits.train, Baseline(), epoch=1)


def test_overrides_leave_the_callers_config_unchanged(digits):
    from splitexit.training import TrainConfig

    config = TrainConfig(epochs=7, lr=1e-3, progress=False)
    model = create_multiexit("mlp", digits.num_classes, digits.input_shape)
    train(model, digits.train.subset(64, seed=0), JointWeighted(), config, epochs=1, lr=5e-3)
    assert (config.epochs, config.lr) == (7, 1e-3)


def test_progress_is_one_line_per_epoch_when_not_a_terminal(digits, capsys):
    model = create_multiexit("mlp", digits.num_classes, digits.input_shape)
    small = digits.train.subset(64, seed=0)
    train(model, small, JointWeighted(), epochs=2)  # stderr is captured: not a terminal
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("joint epoch 2/2: loss ")
    train(model, small, JointWeighted(), epochs=2, progress=False)
    assert capsys.readouterr().err == ""
