"""Exit programs and bundles: any model lowers to pieces, bundles, and runs on ONNX Runtime with
the PyTorch model's exits; a bundle loads in a fresh process from its directory alone, and every
broken bundle is refused with a clear error before anything runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from splitexit import checkpoint
from splitexit.deploy import bundle, load_bundle
from splitexit.errors import CorruptFileError, CutError, InputError
from splitexit.heads import create_head
from splitexit.multiexit import MultiExitModel
from splitexit.policies import Entropy, MaxProb, Patience
from splitexit.program import lower
from splitexit.stages import StagedModel
from splitexit.training import JointWeighted, train

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Block(nn.Module):
    """A residual block written by a user (not the zoo's)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


class UserNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU())
        self.layer1 = Block(8, 12, 2)
        self.layer2 = Block(12, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


def _user_model(digits, cuts=("stem", "layer1.conv1@1", "layer1"), epochs=3):
    torch.manual_seed(0)
    staged = StagedModel.from_module(UserNet(digits.num_classes), [c.split("@")[0] for c in cuts])
    shapes = staged.payload_shapes(torch.zeros(1, *digits.input_shape))
    heads = {}
    for c in cuts:
        name, _, index = c.partition("@")
        heads[c] = create_head("linear", shapes[name][int(index or 0)], digits.num_classes)
    model = MultiExitModel(staged, heads, digits.input_shape)
    train(model, digits.train, JointWeighted(), epochs=epochs, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def user_model(digits):
    return _user_model(digits)


def _policy(model, x, kind=MaxProb):
    with torch.no_grad():
        logits = model(x)[0]
    return kind(float(kind().statistic(logits).median()))


def _same(got, ref):
    got_e = np.asarray(got.exit_index)
    assert (got_e == ref.exit_index.numpy()).mean() >= 0.99
    assert (np.asarray(got.predictions) == ref.predictions.numpy()).mean() >= 0.99


def test_user_model_bundle_runs_with_the_pytorch_exits(user_model, digits, tmp_path):
    x = digits.test.x[:120]
    policy = _policy(user_model, digits.calib.x)
    out = bundle(user_model, tmp_path / "b", policy=policy, example=digits.calib.x[:64])
    b = load_bundle(out)
    ref = user_model.infer(x, policy)
    assert len(set(ref.exit_index.tolist())) > 1  # the samples really spread over the exits
    program = b.program()
    _same(program.infer(x.numpy(), b.policy), ref)  # batched, numpy, pieces
    single = [program.infer(x[i: i + 1].numpy(), b.policy) for i in range(len(x))]  # exit graph
    assert b.manifest["device"]["exit_graph"] == "device/exits.onnx"
    got = np.concatenate([s.exit_index for s in single])
    assert (got == ref.exit_index.numpy()).mean() >= 0.99
    m = b.manifest
    assert [e["name"] for e in m["exits"]] == ["stem", "layer1.conv1@1", "layer1", "final"]
    assert m["latency"]["bundle"]["mean_ms"] > 0 and m["latency"]["no_exit_ratio"] > 0
    assert all(p["macs"] > 0 and p["params"] > 0 for p in m["pieces"])
    assert m["input"] == {"dtype": "float32", "shape": [1, 8, 8], "normalisation": None}



def test_batch_one_fast_path_still_checks_every_sample(user_model, digits, tmp_path):
    """After a first call has matched the policy, single float32 samples take a short path;
    a NaN, float64 or misshapen sample after it is still refused, and torch input, a batch of
    two or another policy still get the same answers as the pieces."""
    policy = _policy(user_model, digits.calib.x)
    b = load_bundle(bundle(user_model, tmp_path / "b", policy=policy,
                           example=digits.calib.x[:64], measure=False))
    program = b.program()
    x = digits.test.x[:40].numpy()
    pieces = program.infer(x, b.policy)  # batched: the pieces and the numpy loop
    fast = [program.infer(x[i: i + 1], b.policy) for i in range(len(x))]
    assert np.array_equal(np.concatenate([f.exit_index for f in fast]), pieces.exit_index)
    assert np.array_equal(np.concatenate([f.predictions for f in fast]), pieces.predictions)
    bad = x[:1].copy()
    bad[0, 0, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        program.infer(bad, b.policy)
    with pytest.raises(InputError, match="float32"):
        program.infer(x[:1].astype(np.float64), b.policy)
    with pytest.raises(InputError, match="shape"):
        program.infer(x[:1, :, :4], b.policy)
    one = program.infer(digits.test.x[:1], b.policy)  # torch in, torch out
    assert isinstance(one.predictions, torch.Tensor)
    assert int(one.exit_index[0]) == int(pieces.exit_index[0])
    for i in range(3):  # another policy (not the exit graph's): every sample leaves at exit 0
        assert program.infer(x[i: i + 1], MaxProb(0.0)).exit_index.tolist() == [0]

@pytest.mark.parametrize("policy_kind", [Entropy, Patience])
def test_other_policies_run_on_the_pieces(user_model, digits, tmp_path, policy_kind):
    policy = Patience(1) if policy_kind is Patience else _policy(user_model, digits.calib.x,
                                                                  Entropy)
    b = load_bundle(bundle(user_model, tmp_path / "b", policy=policy, measure=False))
    x = digits.test.x[:80]
    _same(b.program().infer(x.numpy(), b.policy), user_model.infer(x, policy))


def test_split_bundle_equals_unsplit(user_model, digits, tmp_path):
    policy = _policy(user_model, digits.calib.x)
    b = load_bundle(bundle(user_model, tmp_path / "s", cut="layer1.conv1", policy=policy,
                           codec="int8", measure=False))
    assert b.cut == "layer1.conv1" and b.codec == "int8" and b.has_server
    assert len(b.payload) == 2  # the cut lies inside a block: skip and main path cross it
    assert b.exit_names == ["stem", "layer1.conv1@1", "final"]
    x = digits.test.x[:64].numpy()
    program = b.program()
    run = program.run_until(x, b.policy, b.device_pieces)
    result = program.finish(run, b.policy)
    device_only = lower(user_model.keep_exits([0, 1]), policy).infer(torch.from_numpy(x))
    assert np.array_equal(result.exit_index, device_only.exit_index.numpy())
    assert (result.predictions == device_only.predictions.numpy()).mean() >= 0.99
    out = b.device().run(x, b.policy)
    assert set(out.undecided.tolist()) == set(np.nonzero(result.exit_index == 2)[0].tolist())
    logits = b.server()(out.payload)
    assert logits.shape == (len(out.undecided), 10)


def test_full_offload_bundle(user_model, digits, tmp_path):
    b = load_bundle(bundle(user_model, tmp_path / "f", cut="input", measure=False))
    assert b.device_pieces == 0 and b.exit_names == ["final"]
    x = digits.test.x[:16]
    np.testing.assert_allclose(b.server()(x.numpy()), user_model(x)[-1].detach().numpy(),
                               atol=1e-4)


def test_keep_exits_trecx_and_cbnet_like_models_bundle(user_model, digits, tmp_path):
    from splitexit.methods import early_view_model

    sub = user_model.keep_exits([2])
    b = load_bundle(bundle(sub, tmp_path / "k", policy=MaxProb(0.8), measure=False))
    assert b.exit_names == ["layer1", "final"]
    x = digits.test.x[:40]
    _same(b.program().infer(x.numpy(), b.policy), sub.infer(x, MaxProb(0.8)))

    trecx = early_view_model(user_model.backbone, "layer1", 10, digits.input_shape).eval()
    b = load_bundle(bundle(trecx, tmp_path / "t", policy=MaxProb(0.5), measure=False))
    _same(b.program().infer(x.numpy(), b.policy), trecx.infer(x, MaxProb(0.5)))

    class Pipeline(nn.Module):  # converter -> classifier, as a CBNet pipeline is
        def __init__(self):
            super().__init__()
            self.converter = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Sigmoid(),
                                           nn.Unflatten(1, (1, 8, 8)))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.input_shape = (1, 8, 8)

    pipe = Pipeline().eval()
    b = load_bundle(bundle(pipe, tmp_path / "c", measure=False))
    np.testing.assert_allclose(b.program()(x.numpy())[-1], pipe.classifier(pipe.converter(x))
                               .detach().numpy(), atol=1e-5)


def test_max_overhead_drops_exit_subsets_that_break_it(user_model, digits, tmp_path):
    policy = _policy(user_model, digits.calib.x)
    b = load_bundle(bundle(user_model, tmp_path / "m", policy=policy,
                           example=digits.calib.x[:60], max_overhead=1.0))
    subsets = b.manifest["selection"]["subsets"]
    assert len(subsets) == 8
    chosen = [s for s in subsets if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["meets_bound"]
    assert chosen[0]["no_exit_ratio"] <= 1.0
    assert b.exit_names == [*chosen[0]["exits"], "final"]


def test_bundle_loads_in_a_fresh_process_without_torch(user_model, digits, tmp_path):
    policy = _policy(user_model, digits.calib.x)
    written = bundle(user_model, tmp_path / "w", policy=policy, measure=False)
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(written, moved)
    shutil.rmtree(written)
    x = digits.test.x[:50]
    np.save(tmp_path / "x.npy", x.numpy())
    ref = user_model.infer(x, policy)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # the device has no PyTorch
        sys.path.insert(0, {SRC!r})
        import numpy as np
        from splitexit.runtime.bundle import load_bundle
        b = load_bundle({str(moved)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        r = b.program().infer(x, b.policy)
        print(" ".join(map(str, r.exit_index.tolist())))
        print(" ".join(map(str, r.predictions.tolist())))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    exits, preds = (np.array(line.split(), dtype=int) for line in proc.stdout.splitlines())
    assert (exits == ref.exit_index.numpy()).mean() >= 0.99
    assert (preds == ref.predictions.numpy()).mean() >= 0.99


def test_weights_load_back_from_a_bundle(user_model, tmp_path, digits):
    b = bundle(user_model, tmp_path / "b", measure=False)
    with pytest.raises(InputError, match="model="):
        checkpoint.load(b / "weights")  # not a zoo model: user code is never imported
    fresh = _user_model(digits, epochs=0)
    loaded = checkpoint.load_weights(fresh, b / "weights")
    x = digits.test.x[:8]
    for a, c in zip(loaded(x), user_model(x)):
        assert torch.equal(a, c)


# bad bundles ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_bundle(user_model, tmp_path_factory):
    return bundle(user_model, tmp_path_factory.mktemp("good") / "b", policy=MaxProb(0.9),
                  cut="layer1", codec="int8", measure=False)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, change) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    change(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def test_missing_truncated_or_altered_files_are_refused(good_bundle, tmp_path):
    b = _copy(good_bundle, tmp_path)
    (b / "device" / "piece0.onnx").unlink()
    with pytest.raises(CorruptFileError, match="piece0.onnx is missing"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy(good_bundle, tmp_path)
    data = (b / "server.onnx").read_bytes()
    (b / "server.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="server.onnx does not match its checksum"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy(good_bundle, tmp_path)
    w = b / "weights" / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="checksum"):
        load_bundle(b)
    with pytest.raises(InputError, match="no bundle"):
        load_bundle(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="not a splitexit bundle"):
        load_bundle(tmp_path / "empty")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["input"].update(shape=[1, 10 ** 9, 8]), "absurd dimension"),
    (lambda d: d["input"].update(shape=[4096, 4096, 4096]), "elements per sample"),
    (lambda d: d["pieces"][0]["outputs"][0].update(dtype="complex128"), "dtype"),
    (lambda d: d["pieces"][0].update(file="../../etc/passwd"), "outside the bundle"),
    (lambda d: d["exits"][0].update(piece=5), "exit pieces"),
    (lambda d: d["pieces"][1]["inputs"][0].update(shape=[3, 3, 3]), "takes"),
    (lambda d: d["policy"].update(threshold="high"), "threshold|policy"),
    (lambda d: d.update(classes=["a"]), "classes"),
    (lambda d: d.pop("pieces"), "malformed"),
])
def test_absurd_or_inconsistent_manifests_are_refused(good_bundle, tmp_path, change, message):
    b = _copy(good_bundle, tmp_path)
    _edit(b, change)
    with pytest.raises(InputError, match=message):
        load_bundle(b)


def test_graph_inputs_must_match_the_manifest(good_bundle, user_model, tmp_path):
    b = _copy(good_bundle, tmp_path)
    # a graph from another model at the same place, checksum updated: the inputs disagree
    other = bundle(user_model, tmp_path / "other", cut="stem", measure=False)
    shutil.copy(other / "server.onnx", b / "server.onnx")
    from splitexit.runtime.bundle import sha256_of

    _edit(b, lambda d: d["files"].update({"server.onnx": sha256_of(b / "server.onnx")}))
    with pytest.raises(CorruptFileError, match="input 0 has shape"):
        load_bundle(b).server()


@pytest.mark.slow
def test_bundle_chooses_exits_and_a_threshold_per_exit_on_calibration_data(user_model, digits,
                                                                         tmp_path):
    """With calibration data the bundler tries every exit subset, gives each kept exit its own
    threshold within max_drop for the latency of leaving there on ONNX Runtime, and bundles
    the fastest; the bundle then runs with the PyTorch model's exits."""
    cal_x, cal_y = digits.calib.x, digits.calib.y
    model = user_model.keep_exits([0, 2])
    b = load_bundle(bundle(model, tmp_path / "c", policy=MaxProb(), example=cal_x[:40],
                           calibration=(cal_x, cal_y), max_drop=0.02, max_overhead=2.0))
    sel = b.manifest["selection"]
    assert sel["max_drop"] == 0.02 and sel["calib_samples"] == len(cal_y)
    assert len(sel["subsets"]) == 4  # 2 heads: every subset, timed together
    chosen = [s for s in sel["subsets"] if s.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["meets_bound"]
    assert chosen[0]["calib_accuracy"] >= sel["reference_accuracy"] - 0.02 - 1e-9
    tried = [s for s in sel["subsets"] if "predicted_mean_ms" in s and s["meets_bound"]]
    assert chosen[0]["predicted_mean_ms"] == min(s["predicted_mean_ms"] for s in tried)
    assert b.exit_names == [*chosen[0]["exits"], "final"]
    if len(chosen[0]["exits"]) > 1:
        assert isinstance(b.policy.threshold, tuple)
    kept = model.keep_exits([model.head_cuts.index(n) for n in chosen[0]["exits"]])
    x = digits.test.x[:100]
    _same(b.program().infer(x.numpy(), b.policy), kept.infer(x, b.policy))
    with pytest.raises(InputError, match="max_drop"):
        bundle(user_model, tmp_path / "d", policy=MaxProb(), calibration=(cal_x, cal_y),
               measure=False)
    with pytest.raises(InputError, match="one non-zero length"):
        bundle(user_model, tmp_path / "d", policy=MaxProb(), calibration=(cal_x, cal_y[:5]),
               max_drop=0.02, measure=False)
    with pytest.raises(InputError, match="max-prob, entropy or margin"):
        bundle(user_model, tmp_path / "d", policy=Patience(), calibration=(cal_x, cal_y),
               max_drop=0.02, measure=False)


def test_bad_bundle_arguments(user_model, tmp_path):
    with pytest.raises(CutError, match="Valid cuts"):
        bundle(user_model, tmp_path / "x", cut="nope", measure=False)
    with pytest.raises(InputError, match="class names"):
        bundle(user_model, tmp_path / "x", classes=["a", "b"], measure=False)
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a bundle"):
        bundle(user_model, tmp_path / "notabundle", measure=False)
    assert (tmp_path / "notabundle" / "keep.txt").is_file()


def test_gated_model_lowers_with_the_gate_as_exit_zero(digits, tmp_path, trained_resnet8):
    from splitexit.methods import GatedMultiExitModel

    torch.manual_seed(0)
    gated = GatedMultiExitModel.from_multiexit(trained_resnet8).eval()
    x = digits.test.x[:150]
    gated.gate_threshold = float(gated.hard_probability(x).median())  # half the samples hard
    hard = gated.is_hard(gated.hard_probability(x))
    assert 0 < int(hard.sum()) < len(x)
    for policy in (MaxProb(0.7), Patience(1)):
        ref = gated.infer(x, policy)
        b = load_bundle(bundle(gated, tmp_path / policy.name, policy=policy, measure=False))
        assert b.exit_names[0] == "gate" and b.policy.name == "gated"
        got = b.program().infer(x.numpy(), b.policy)
        assert np.array_equal(got.exit_index - 1, ref.exit_index.numpy())  # exit 0: the gate
        assert (got.predictions == ref.predictions.numpy()).mean() >= 0.99
        assert (got.exit_index[hard.numpy()] == b.num_exits - 1).all()


def test_splitexit_load_rebuilds_a_zoo_model_from_its_bundle(trained_resnet8, digits, tmp_path):
    import splitexit

    b = bundle(trained_resnet8, tmp_path / "z", policy=MaxProb(0.8), measure=False)
    model = splitexit.load(b)
    x = digits.test.x[:16]
    for a, c in zip(model(x), trained_resnet8(x)):
        assert torch.equal(a, c)
    (b / "weights" / "weights.safetensors").write_bytes(b"broken")
    with pytest.raises(CorruptFileError, match="checksum"):
        splitexit.load(b)
