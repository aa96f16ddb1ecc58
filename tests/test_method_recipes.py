"""Every published method's recipe (splitexit.methods) on a small trained ResNet-8, on real
digits data: it fits, beats chance, leaves the caller's model untouched, and its real
per-sample exits equal the offline replay of its policy."""

from __future__ import annotations

import pytest
import torch

from splitexit.cli import main
from splitexit.data import load_dataset
from splitexit.errors import InputError
from splitexit.methods import GatedMultiExitModel, fit_method, list_methods
from splitexit.multiexit import simulate_exits
from splitexit.policies import Patience
from splitexit.training import Baseline, train
from splitexit.zoo import create_model, create_multiexit

pytestmark = pytest.mark.usefixtures("one_thread_module")
WIDTHS = (8, 16, 32)


@pytest.fixture(scope="module")
def digits(one_thread_module):
    return load_dataset("digits")


@pytest.fixture(scope="module")
def model(digits):
    base = create_model("resnet8", 10, digits.input_shape, widths=WIDTHS)
    train(base, digits.train, Baseline(), epochs=4, lr=5e-3, progress=False)
    multi = create_multiexit("resnet8", 10, digits.input_shape, widths=WIDTHS)
    multi.backbone.load_state_dict(base.state_dict())
    return multi.eval()


def test_every_published_method_is_registered():
    assert set(list_methods()) == {
        "sdn", "sdn-ramp", "pabee", "ztw", "e2cm", "binary-heads", "branchynet",
        "self-distillation", "boostnet", "quicknets", "t-recx", "gate", "online-caching"}


@pytest.mark.parametrize("name", list_methods())
def test_recipe_fits_and_exits_for_real(name, model, digits):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = fit_method(name, model, digits.train, calib=digits.calib, epochs=1, lr=4e-3,
                        batch_size=64, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is intact
    m, policy = fitted.model, fitted.policy
    assert fitted.method == name and fitted.seconds > 0 and fitted.info["training"]
    x, y = digits.test.x, digits.test.y
    with torch.no_grad():
        logits = m.collect_logits(x)
        got = m.infer(x, policy)
    if isinstance(m, GatedMultiExitModel):
        ref = m.simulate_gated(logits, m.is_hard(m.hard_probability(x)), policy)
    else:
        ref = simulate_exits(logits, policy)
    assert torch.equal(got.exit_index, ref.exit_index)
    assert torch.equal(got.predictions, ref.predictions)
    assert got.accuracy(y) > 0.5  # ten classes: chance is 0.1
    if name == "t-recx":
        assert m.num_exits == 2 and m.head_cuts == ["block1"]  # near a third of the MACs
    if name == "pabee":
        assert isinstance(policy, Patience)
    if name == "ztw":
        assert len(fitted.info["ensemble_weights"]) == m.num_exits


def test_recipe_mistakes_get_clear_errors(model, digits):
    with pytest.raises(InputError, match="unknown method 'sdm'; known: .*sdn"):
        fit_method("sdm", model, digits.train)
    with pytest.raises(InputError, match="calib=ds.calib"):
        fit_method("gate", model, digits.train)
    with pytest.raises(InputError, match="keeps every exit"):
        fit_method("sdn", model, digits.train, cut="block1")
    with pytest.raises(InputError, match="not one of the model's exit cuts"):
        fit_method("t-recx", model, digits.train, cut="nowhere", epochs=0)
    with pytest.raises(InputError, match="starts from a MultiExitModel"):
        fit_method("sdn", model.backbone, digits.train)


def test_train_method_on_the_command_line(tmp_path, capsys):
    base, out = tmp_path / "base", tmp_path / "ztw"
    ztw = ["train", "--model", "resnet8", "--dataset", "digits", "--method", "ztw",
           "--epochs", "1", "--out", str(out)]
    assert main(ztw) == 2  # a frozen-backbone method needs a trained baseline
    assert "give --init CHECKPOINT of a trained baseline" in capsys.readouterr().err
    assert main(["train", "--model", "resnet8", "--dataset", "digits", "--strategy",
                 "baseline", "--epochs", "2", "--out", str(base)]) == 0
    assert main([*ztw, "--init", str(base)]) == 0
    assert "(ztw)" in capsys.readouterr().out
    from splitexit import checkpoint

    meta = checkpoint.read_meta(out)
    assert meta["method"] == "ztw" and meta["policy"]["name"] == "geometric-ensemble"
    assert checkpoint.load_policy(out).name == "geometric-ensemble"
    assert main(["calibrate", str(out), "--max-drop", "0.05"]) == 0  # the ensemble's thresholds
    assert "geometric-ensemble" in capsys.readouterr().out
    assert main(["train", "--model", "resnet8", "--method", "nope", "--out",
                 str(tmp_path / "n")]) == 2
    assert "unknown method 'nope'; known: " in capsys.readouterr().err
    assert main(["list", "methods"]) == 0
    assert "ztw" in capsys.readouterr().out
    assert main([*ztw, "--strategy", "joint"]) == 2
