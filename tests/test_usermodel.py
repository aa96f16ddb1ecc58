"""Your own model from a file: train, calibrate and evaluate it from the command line; loading
its checkpoint never imports its code; every bad input is a clear error."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import textwrap

import pytest
import torch
from torch import nn

from splitexit import CutError, InputError, checkpoint
from splitexit.cli import main
from splitexit.multiexit import MultiExitModel
from splitexit.stages import StagedModel
from splitexit.usermodel import build_multiexit, load_user_model, parse_cuts, rebuild

# A small residual network; importing the file leaves a marker beside it, so a test can tell
# whether its code ran.
MODEL_SOURCE = textwrap.dedent('''
    from pathlib import Path

    import torch
    from torch import nn

    Path(__file__).with_suffix(".ran").write_text("imported")


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))


    class Net(nn.Module):
        def __init__(self, num_classes=10, channels=1, side=8):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU())
            self.layer1 = nn.Sequential(Block(8), Block(8))
            self.fc = nn.Linear(8 * side * side, num_classes)

        def forward(self, x):
            return self.fc(self.layer1(self.stem(x)).flatten(1))


    def make(num_classes, input_shape):
        return Net(num_classes, input_shape[0], input_shape[-1])


    def make_default():
        return Net()


    def make_kwargs(**kwargs):
        return Net(kwargs["num_classes"], kwargs["input_shape"][0])


    def boom():
        raise RuntimeError("boom")


    def not_a_module():
        return 42


    def the_class():
        return Net


    def needs_args(depth):
        return Net()
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(MODEL_SOURCE)
    return path


def test_train_calibrate_evaluate_own_model_from_the_cli(model_file, tmp_path, capsys,
                                                         one_thread, digits):
    ckpt = tmp_path / "ckpt"
    spec = f"{model_file}:make"
    # cuts in any order; the heads go where they are in execution order
    assert main(["train", "--model", spec, "--cuts", "layer1.0,stem", "--epochs", "1",
                 "--lr", "1e-2", "--batch-size", "32", "--out", str(ckpt)]) == 0
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["spec"]["user_model"] == {
        "path": str(model_file.resolve()), "function": "make",
        "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()}
    assert meta["spec"]["cuts"] == ["stem", "layer1.0"]
    assert meta["spec"]["head"] == "linear"
    assert meta["spec"]["num_classes"] == 10 and meta["spec"]["input_shape"] == [1, 8, 8]
    assert meta["test_accuracy_per_exit"][-1] > 0.5  # chance is 0.1

    # the checkpoint never imports the file by itself
    marker = model_file.with_suffix(".ran")
    marker.unlink()
    capsys.readouterr()
    assert main(["calibrate", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"--model {model_file.resolve()}:make" in err and "never imports" in err
    assert not marker.exists()
    with pytest.raises(InputError, match=r"load\(directory, model="):
        checkpoint.load(ckpt)
    assert not marker.exists()

    assert main(["calibrate", str(ckpt), "--model", spec, "--max-drop", "0.02"]) == 0
    assert marker.exists()
    cal = json.loads((ckpt / "calibration.json").read_text())
    assert cal["calib_final_exit_accuracy"] > 0.5
    assert cal["calib_accuracy"] >= cal["calib_final_exit_accuracy"] - 0.02
    assert main(["evaluate", str(ckpt), "--model", spec, "--latency-samples", "10"]) == 0
    report = json.loads((ckpt / "evaluation" / "report.json").read_text())
    assert report["rows"][0]["accuracy"] > 0.5

    # Python: the file again, the uncut module, or a model built already all load alike
    x = digits.test.x[:16]
    from_file = checkpoint.load(ckpt, model=spec)
    module = load_user_model(spec, num_classes=10, input_shape=(1, 8, 8))
    from_module = checkpoint.load(ckpt, model=module)
    built = build_multiexit(load_user_model(spec, num_classes=10, input_shape=(1, 8, 8)),
                            ["stem", "layer1.0"], 10, (1, 8, 8))
    from_built = checkpoint.load(ckpt, model=built)
    assert from_built is built
    with torch.no_grad():
        for a, b, c in zip(from_file(x), from_module(x), from_built(x)):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert from_file.spec["user_model"]["path"] == str(model_file.resolve())

    # a file edited since training still loads, with a warning
    model_file.write_text(MODEL_SOURCE + "\n# edited\n")
    with pytest.warns(UserWarning, match="changed since"):
        checkpoint.load(ckpt, model=spec)


def test_baseline_and_init_across_cuts(model_file, tmp_path, one_thread, digits):
    spec = f"{model_file}:make"
    base = tmp_path / "base"
    assert main(["train", "--model", spec, "--strategy", "baseline", "--epochs", "1",
                 "--lr", "1e-2", "--batch-size", "32", "--out", str(base)]) == 0
    staged = checkpoint.load(base, model=spec)
    assert isinstance(staged, StagedModel) and staged.cut_names == []
    # --init: the baseline (one stage) initialises a multi-exit model cut elsewhere
    multi = tmp_path / "multi"
    assert main(["train", "--model", spec, "--cuts", "stem", "--init", str(base),
                 "--strategy", "heads-only", "--epochs", "1", "--out", str(multi)]) == 0
    model = checkpoint.load(multi, model=spec)
    with torch.no_grad():
        assert torch.equal(model(digits.test.x[:8])[-1], staged(digits.test.x[:8]))


def test_function_arguments(model_file):
    net = load_user_model(f"{model_file}:make_default", num_classes=3, input_shape=(1, 8, 8))
    assert net.fc.out_features == 10  # takes no arguments: none passed
    net = load_user_model(f"{model_file}:make_kwargs", num_classes=3, input_shape=(1, 8, 8))
    assert net.fc.out_features == 3
    net = load_user_model(f"{model_file}:make", num_classes=4, input_shape=(1, 8, 8))
    assert net.fc.out_features == 4


def test_user_code_is_imported_from_its_path_only(tmp_path):
    # a file named like a standard module neither shadows it nor is found through sys.path
    path = tmp_path / "json.py"
    path.write_text("from torch import nn\n\ndef make():\n    return nn.Linear(64, 10)\n")
    before = list(sys.path)
    net = load_user_model(f"{path}:make")
    assert isinstance(net, nn.Linear)
    assert sys.modules["json"] is json and sys.path == before
    # a sibling module is not importable from the file
    (tmp_path / "helper.py").write_text("X = 1\n")
    (tmp_path / "uses_helper.py").write_text("import helper\n\ndef make():\n    pass\n")
    with pytest.raises(InputError, match="not put on sys.path"):
        load_user_model(f"{tmp_path / 'uses_helper.py'}:make")


@pytest.mark.parametrize("spec, message", [
    ("{dir}/absent.py:make", "no such file"),
    ("{dir}/mynet.txt:make", "not a .py file"),
    ("{file}", "names no function"),
    ("{file}:", "names no function"),
    ("{file}:nope", "defines no 'nope'; it defines: .*make"),
    ("{file}:boom", "raised RuntimeError: boom"),
    ("{file}:not_a_module", "returned int, not a torch.nn.Module"),
    ("{file}:the_class", "returned the class Net"),
    ("{file}:needs_args", "cannot be called"),
])
def test_bad_model_files(model_file, spec, message):
    (model_file.parent / "mynet.txt").write_text("x = 1\n")
    spec = spec.format(dir=model_file.parent, file=model_file)
    with pytest.raises(InputError, match=message):
        load_user_model(spec, num_classes=10, input_shape=(1, 8, 8))


def test_broken_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def make(:\n")
    with pytest.raises(InputError, match="running .*broken.py failed .*SyntaxError"):
        load_user_model(f"{path}:make")


def test_bad_cuts_and_shapes(model_file):
    spec = f"{model_file}:make"
    with pytest.raises(CutError, match="unknown cut 'layer9'.*Valid cuts.*layer1.0"):
        build_multiexit(spec, "stem,layer9", 10, (1, 8, 8))
    with pytest.raises(InputError, match=r"heads at multi-tensor cuts need @<tensor index>.*"
                                         r"'layer1.0.conv1@0'"):
        build_multiexit(spec, "layer1.0.conv1", 10, (1, 8, 8))
    with pytest.raises(InputError, match="@2 is out of range"):
        build_multiexit(spec, "layer1.0.conv1@2", 10, (1, 8, 8))
    with pytest.raises(InputError, match="at least one cut"):
        build_multiexit(spec, "", 10, (1, 8, 8))
    with pytest.raises(InputError, match="unknown head type 'nope'"):
        build_multiexit(spec, "stem", 10, (1, 8, 8), head="nope")
    net = load_user_model(spec, num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(InputError, match=r"shape \(N, 7\)"):
        build_multiexit(net, "stem", 7, (1, 8, 8))
    with pytest.raises(InputError, match=r"input shape \(1, 9, 9\)"):
        build_multiexit(net, "stem", 10, (1, 9, 9))
    assert parse_cuts(" stem, layer1.0.conv1@1 ") == [
        {"cut": "stem", "tensor_index": None}, {"cut": "layer1.0.conv1", "tensor_index": 1}]
    with pytest.raises(InputError, match="tensor index"):
        parse_cuts("stem@x")
    with pytest.raises(InputError, match="once"):
        parse_cuts("stem,stem")


def test_cli_errors_say_how_to_fix(model_file, tmp_path, capsys):
    out = str(tmp_path / "x")
    cases = [
        (["--model", "nope"], "unknown model 'nope'.*file.py:function"),
        (["--model", f"{model_file}:make"], "needs --cuts"),
        (["--model", f"{model_file}:make", "--cuts", "stem,bogus"], "Valid cuts"),
        (["--model", f"{model_file}:make", "--exits", "stem"], "--cuts"),
        (["--model", "mlp", "--cuts", "fc1"], "--exits"),
        (["--model", str(model_file)], "names no function"),
        (["--model", f"{model_file}:boom", "--cuts", "stem"], "raised RuntimeError"),
    ]
    for extra, message in cases:
        assert main(["train", *extra, "--epochs", "1", "--out", out]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("splitexit: error:"), err
        assert re.search(message, err), (message, err)


def test_rebuild_checks_what_it_is_given(model_file):
    spec = {"cuts": ["stem"], "num_classes": 10, "input_shape": [1, 8, 8], "head": "linear"}
    with pytest.raises(InputError, match="nn.Module or 'path/to/file.py:function'"):
        rebuild(42, spec)
    model = rebuild(f"{model_file}:make", spec)
    assert isinstance(model, MultiExitModel) and model.head_cuts == ["stem"]
