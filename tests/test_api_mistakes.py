"""A new user's mistakes with their own model get a clear InputError that says how to fix
them: never a silent wrong result, never a raw PyTorch error, never a misleading message.

The model is a residual network written as a user writes one (tests/user_net.py), cut by name,
with exit heads, trained for one epoch on the digits data set.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from splitexit import (
    CorruptFileError,
    CutError,
    Entropy,
    InputError,
    MaxProb,
    MultiExitModel,
    Patience,
    create_multiexit,
)
from splitexit.calibration import choose_operating_point, oracle, select_exits, sweep
from splitexit.checkpoint import META, WEIGHTS, load_weights, save
from splitexit.data import Split
from splitexit.heads import LinearHead, SDNHead, create_head
from splitexit.policies import Gated, GeometricEnsemble, fit_temperature
from splitexit.program import lower
from splitexit.stages import StagedModel
from splitexit.training import JointWeighted, evaluate_exits, train
from splitexit.usermodel import build_multiexit
from user_net import net

CUTS = ["stem", "block1"]  # two heads: three exits


@pytest.fixture(scope="module")
def model(digits):
    torch.manual_seed(0)
    m = build_multiexit(net(digits.num_classes), CUTS, digits.num_classes, digits.input_shape)
    train(m, digits.train, JointWeighted(), epochs=1, progress=False)
    return m.eval()


@pytest.fixture(scope="module")
def ort_program(model, digits, tmp_path_factory):
    from splitexit.deploy import bundle
    from splitexit.runtime.bundle import load_bundle

    path = bundle(model, tmp_path_factory.mktemp("bundle") / "b", policy=MaxProb(0.9),
                  example=digits.calib.x[:64], measure=False)
    return load_bundle(path).program()


def _bare(model, heads=None, input_shape=None):
    """The model's backbone with ``heads`` (its own by default), as a user assembles one."""
    heads = dict(zip(model.head_cuts, model.heads)) if heads is None else heads
    return MultiExitModel(model.backbone, heads, input_shape=input_shape).eval()


# 1. silent wrong results -------------------------------------------------------------------
@pytest.mark.parametrize("policy", [MaxProb((0.0,)), MaxProb((0.9, 0.8, 0.7, 0.5)),
                                    Entropy(0.2, temperature=(1.0, 1.5, 1.5, 1.0, 1.0)),
                                    GeometricEnsemble(weights=((1.0,), (0.5, 1.0)))],
                         ids=["one-threshold", "four-thresholds", "five-temperatures",
                              "ensemble-of-two-exits"])
def test_per_exit_values_of_the_wrong_length_are_refused(model, digits, policy):
    x = digits.test.x[:16]
    for batch in (x[:1], x):  # batch 1 has its own fast path
        with pytest.raises(InputError, match="exit"):
            model.infer(batch, policy)
    with pytest.raises(InputError, match="exit"):
        model.simulate(model.collect_logits(x), policy)
    with pytest.raises(InputError, match="exit"):
        lower(model, policy)
    with pytest.raises(InputError, match="exit"):
        sweep(model.collect_logits(x), digits.test.y[:16], [1.0, 2.0, 3.0], policy)


def test_the_one_threshold_tuple_says_how_to_fix_it(model, digits):
    with pytest.raises(InputError) as info:
        model.infer(digits.test.x[:1], MaxProb((0.0,)))
    msg = str(info.value)
    assert "1 value" in msg and "3 exit" in msg and "2 (one per head) or 3" in msg
    assert "never repeated" in msg


def test_per_exit_values_of_a_right_length_still_run(model, digits):
    x = digits.test.x[:32]
    logits = model.collect_logits(x)
    for policy in (MaxProb((0.9, 0.8)), MaxProb((0.9, 0.8, 0.5)),
                   MaxProb(0.8, temperature=(1.5, 1.2)), Gated(MaxProb((0.9,)))):
        if isinstance(policy, Gated):  # the gate is exit 0: the inner sees the model's rest
            from splitexit.runtime.loop import check_policy

            check_policy(policy, 3)
            with pytest.raises(InputError, match="exit"):
                check_policy(policy, 4)
            continue
        together = model.infer(x, policy)
        assert torch.equal(together.exit_index, model.simulate(logits, policy).exit_index)
        alone = torch.cat([model.infer(x[i: i + 1], policy).exit_index for i in range(8)])
        assert torch.equal(alone, together.exit_index[:8])


def test_onnx_runtime_refuses_a_policy_that_does_not_fit(ort_program, digits):
    x = digits.test.x[:8].numpy()
    for batch in (x[:1], x):  # batch 1 runs the exit graph
        with pytest.raises(InputError, match="1 value"):
            ort_program.infer(batch, MaxProb((0.0,)))
        with pytest.raises(InputError, match="MaxProb\\(0.9\\)"):
            ort_program.infer(batch, 0.9)


def test_a_bundle_whose_policy_does_not_fit_its_exits_is_refused(model, digits, tmp_path):
    from splitexit.deploy import bundle
    from splitexit.runtime.bundle import MANIFEST, load_bundle

    path = bundle(model, tmp_path / "b", policy=MaxProb((0.9, 0.8)),
                  example=digits.calib.x[:32], measure=False)
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["policy"]["threshold"] = [0.0]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="does not fit its 3 exits"):
        load_bundle(path)


def test_simulate_refuses_nan_logits(model, digits):
    logits = model.collect_logits(digits.test.x[:16])
    logits[1][3, 2] = float("nan")
    with pytest.raises(InputError, match="exit 1's logits contain NaN"):
        model.simulate(logits, MaxProb(0.9))
    with pytest.raises(InputError, match="NaN"):
        sweep(logits, digits.test.y[:16], [1.0, 2.0, 3.0], MaxProb())
    logits[1][3, 2] = float("inf")
    with pytest.raises(InputError, match="infinite"):
        model.simulate(logits, MaxProb(0.9))


def test_nan_input_is_refused_everywhere(model, digits):
    x = digits.test.x[:8].clone()
    x[5, 0, 3, 3] = float("nan")
    for call in (model, model.collect_logits, model.backbone, lambda v: model.infer(v, MaxProb()),
                 lambda v: model.infer(v[5:6], MaxProb())):
        with pytest.raises(InputError, match="NaN"):
            call(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_float64_and_float16_inputs_get_a_clear_error(model, digits, dtype):
    x = digits.test.x[:4].to(dtype)
    calls = {"infer": lambda v: model.infer(v, MaxProb()),
             "infer batch 1": lambda v: model.infer(v[:1], MaxProb()),
             "forward": model, "collect_logits": model.collect_logits}
    name = str(dtype).removeprefix("torch.")
    for call in calls.values():
        with pytest.raises(InputError, match=f"expected a float32 batch.*got dtype {name}.*"
                                             r"x\.float\(\)"):
            call(x)


def test_a_model_converted_to_float64_takes_float64(model, digits):
    import copy

    double = copy.deepcopy(model).double()
    x = digits.test.x[:4]
    assert double.input_dtype == "float64"
    r = double.infer(x.double(), MaxProb(0.9))
    assert torch.equal(r.predictions, model.infer(x, MaxProb(0.9)).predictions)
    with pytest.raises(InputError, match=r"expected a float64 batch.*x\.to\(torch\.float64\)"):
        double.infer(x, MaxProb(0.9))


def test_onnx_runtime_refuses_float64_like_pytorch(ort_program, model, digits):
    x = digits.test.x[:8].numpy()
    for batch in (x[:1], x):
        with pytest.raises(InputError, match=r"float32 batch.*float64.*astype\(np\.float32\)"):
            ort_program.infer(batch.astype(np.float64), MaxProb(0.9))
        with pytest.raises(InputError, match="float32 batch.*float16"):
            ort_program.infer(batch.astype(np.float16), MaxProb(0.9))
        with pytest.raises(InputError, match="float32 batch.*float64"):
            ort_program.infer(torch.from_numpy(batch).double(), MaxProb(0.9))
    with pytest.raises(InputError, match="float32 batch.*float64"):
        ort_program.forward(x.astype(np.float64))
    with pytest.raises(InputError, match="float32 batch.*float64"):
        ort_program.run_until(x.astype(np.float64), MaxProb(0.9), 1)
    # float32 in: the same exits as PyTorch
    r = ort_program.infer(x, MaxProb(0.9))
    assert np.array_equal(r.exit_index, model.infer(digits.test.x[:8], MaxProb(0.9))
                          .exit_index.numpy())


def test_without_input_shape_the_first_batch_fixes_it(model, digits):
    bare = _bare(model)
    assert bare.input_shape is None
    x = digits.test.x[:4]
    bare.infer(x, MaxProb(0.9))
    assert bare.input_shape == tuple(digits.input_shape)
    wrong = torch.rand(2, 1, 10, 10)  # the user's network pools adaptively: it would run
    for call in (bare, lambda v: bare.infer(v, MaxProb(0.9)), bare.collect_logits):
        with pytest.raises(InputError, match=r"expected a batch of shape \(N, 1, 8, 8\)"):
            call(wrong)
    with pytest.raises(InputError, match="add the batch dimension"):
        bare.infer(x[0], MaxProb(0.9))


def test_without_input_shape_a_wrong_first_batch_is_refused(model):
    bare = _bare(model)
    with pytest.raises(InputError, match=r"built for inputs of shape \(16, 8, 8\).*\(16, 10, 10\)"):
        bare.infer(torch.rand(2, 1, 10, 10), MaxProb(0.9))
    assert bare.input_shape is None  # not adopted: the right shape still works
    bare(torch.rand(2, 1, 8, 8))
    assert bare.input_shape == (1, 8, 8)


def test_bad_input_shape_arguments(model):
    for shape in ([(1, 8, 8)], (1, 0, 8), "1,8,8", (1.5, 8, 8)):
        with pytest.raises(InputError, match="input_shape must be the shape of one sample"):
            _bare(model, input_shape=shape)


# 2. raw errors -----------------------------------------------------------------------------
def test_make_head_takes_what_payload_shapes_gives(model, digits):
    shapes = model.backbone.payload_shapes(digits.test.x[:1])
    assert shapes["block1"] == [(16, 8, 8)]
    for kind in ("linear", "sdn"):
        head = create_head(kind, shapes["block1"], digits.num_classes)
        assert head.in_shape == (16, 8, 8)
    assert LinearHead(shapes["stem"], 10).in_shape == (16, 8, 8)


def test_make_head_on_a_multi_tensor_cut_says_pick_one(digits):
    staged = StagedModel.from_module(net(10), ["block1.conv1"])
    shapes = staged.payload_shapes(digits.test.x[:1])["block1.conv1"]
    assert len(shapes) == 2
    with pytest.raises(InputError, match=r"several tensors.*payload_shapes\(x\)\[cut\]\[i\].*@i"):
        create_head("linear", shapes, 10)
    with pytest.raises(InputError, match="in_shape"):
        create_head("linear", [], 10)
    with pytest.raises(InputError, match="num_classes"):
        create_head("linear", (16, 8, 8), 0)


def test_a_head_with_the_wrong_in_shape_is_refused_when_attached(model, digits):
    heads = {"stem": create_head("linear", (16, 8, 8), 10),
             "block1": SDNHead((32, 4, 4), 10)}
    with pytest.raises(InputError, match=r"cut 'block1' was built for inputs of shape "
                                         r"\(32, 4, 4\).*\(16, 8, 8\).*create_head"):
        _bare(model, heads, input_shape=digits.input_shape)
    # a plain module without in_shape is run there: its failure, named
    with pytest.raises(InputError, match="gives 3 classes"):
        _bare(model, {"stem": nn.Sequential(nn.Flatten(), nn.Linear(16 * 64, 3))},
              input_shape=digits.input_shape)
    bad = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(InputError, match="cut 'stem' fails on the payload there.*16, 8, 8"):
        _bare(model, {"stem": bad}, input_shape=digits.input_shape)
    # a head for another number of classes
    with pytest.raises(InputError, match="gives 7 classes, but the final exit gives 10"):
        _bare(model, {"stem": LinearHead((16, 8, 8), 7)}, input_shape=digits.input_shape)


@pytest.mark.parametrize("policy", [0.9, "maxprob", None, {"name": "maxprob"}])
def test_a_policy_that_is_not_a_policy_object(model, digits, policy):
    x = digits.test.x[:4]
    logits = model.collect_logits(x)
    for call in (lambda: model.infer(x, policy), lambda: model.infer(x[:1], policy),
                 lambda: model.simulate(logits, policy)):
        with pytest.raises(InputError, match="must be an exit policy object"):
            call()
    if policy == 0.9:
        with pytest.raises(InputError, match=r"MaxProb\(0.9\)"):
            model.infer(x, policy)
    if policy == "maxprob":
        with pytest.raises(InputError, match=r"create_policy\('maxprob'"):
            model.infer(x, policy)


def test_labels_out_of_range(model, digits):
    x, y = digits.train.x[:64], digits.train.y[:64]
    for labels in (y + 10, y - 1):
        with pytest.raises(InputError, match="class indices in 0 .. 9"):
            train(model, Split(x, labels), JointWeighted(), epochs=1, progress=False)
    logits = model.collect_logits(digits.calib.x[:64])
    bad = digits.calib.y[:64] + 10
    with pytest.raises(InputError, match="class indices in 0 .. 9"):
        fit_temperature(logits[0], bad)
    with pytest.raises(InputError, match="class indices"):
        sweep(logits, bad, [1.0, 2.0, 3.0], MaxProb())
    with pytest.raises(InputError, match="class indices"):
        oracle(logits, bad, [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="class indices"):
        evaluate_exits(model, digits.calib.x[:64], bad)
    with pytest.raises(InputError, match="64 samples"):
        sweep(logits, digits.calib.y[:10], [1.0, 2.0, 3.0], MaxProb())


def test_labels_beyond_a_model_that_does_not_say_its_classes(digits):
    """A plain StagedModel without a spec: cross-entropy's IndexError is explained."""
    torch.manual_seed(0)
    staged = StagedModel.from_module(net(10), ["block1"])
    with pytest.raises(InputError, match="does not fit the model's classes.*span 10 .. 19"):
        from splitexit.training import Baseline

        train(staged, Split(digits.train.x[:32], digits.train.y[:32] + 10), Baseline(),
              epochs=1, progress=False)


def test_train_takes_an_x_y_pair_of_tensors(digits):
    torch.manual_seed(0)
    m = build_multiexit(net(10), CUTS, 10, digits.input_shape)
    x, y = digits.train.x[:64], digits.train.y[:64]
    history = train(m, (x, y), JointWeighted(), epochs=1, progress=False)
    assert len(history.loss) == 1
    with pytest.raises(InputError, match="torch.as_tensor"):
        train(m, (x.numpy(), y.numpy()), JointWeighted(), epochs=1, progress=False)
    with pytest.raises(InputError, match=r"data split .* or an \(x, y\) pair of tensors"):
        train(m, "digits", JointWeighted(), epochs=1, progress=False)
    with pytest.raises(InputError, match="training strategy such as JointWeighted"):
        train(m, (x, y), "joint", epochs=1, progress=False)


# 3. misleading messages --------------------------------------------------------------------
def test_an_integer_cut_says_names_are_strings(digits):
    with pytest.raises(CutError, match="cut names are strings.*got int 1.*Valid cuts.*block1"):
        build_multiexit(net(10), [1], 10, digits.input_shape)
    with pytest.raises(CutError, match="cut names are strings.*got int 1"):
        StagedModel.from_module(net(10), [1])
    seq = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(CutError, match="did you mean the name '1'"):
        StagedModel.from_sequential(seq, [1])
    with pytest.raises(CutError, match="cut names are strings"):
        create_multiexit("resnet8", 10, (1, 8, 8), exits=[1])
    backbone = StagedModel.from_module(net(10), ["block1"])
    with pytest.raises(InputError, match="keyed by cut name, a string"):
        MultiExitModel(backbone, {0: LinearHead((16, 8, 8), 10)})


def test_load_weights_from_a_missing_directory(model, tmp_path):
    with pytest.raises(CorruptFileError) as info:
        load_weights(model, tmp_path / "no-such-run")
    msg = str(info.value)
    assert "does not exist" in msg and "truncated" not in msg


def test_corrupt_weights_are_not_called_an_architecture_mismatch(model, digits, tmp_path):
    import copy

    path = save(model, tmp_path / "run")
    weights = path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in a tensor
    weights.write_bytes(bytes(data))
    target = copy.deepcopy(model)
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as info:
        load_weights(target, path)
    assert "architecture" not in str(info.value)
    # truncated, with no digest to compare against: still "corrupt", not a mismatch
    meta = json.loads((path / META).read_text())
    meta.pop("weights_sha256")
    (path / META).write_text(json.dumps(meta))
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptFileError, match="truncated or corrupt") as info:
        load_weights(target, path)
    assert "architecture" not in str(info.value)


def test_another_architecture_is_called_a_mismatch_not_corrupt(model, digits, tmp_path):
    path = save(model, tmp_path / "run")
    other = build_multiexit(net(10), ["block1"], 10, digits.input_shape)
    with pytest.raises(CorruptFileError, match="architecture .* does not match") as info:
        load_weights(other, path)
    assert "corrupt" not in str(info.value)


def test_a_percentage_reference_accuracy_is_flagged(model, digits):
    logits = model.collect_logits(digits.calib.x[:128])
    y = digits.calib.y[:128]
    points = sweep(logits, y, [1.0, 2.0, 3.0], MaxProb())
    with pytest.raises(InputError, match="fraction in .0, 1.*got 99.*percentage, pass 0.99"):
        choose_operating_point(points, reference_accuracy=99, max_drop=0.01)
    with pytest.raises(InputError, match="max_drop is a fraction.*pass 0.05"):
        choose_operating_point(points, reference_accuracy=0.99, max_drop=5)
    with pytest.raises(InputError, match="reference_accuracy is a fraction"):
        select_exits(logits, y, lambda keep: [1.0] * (len(keep) + 1), MaxProb(),
                     reference_accuracy=99.0, max_drop=0.01)


def test_the_integer_input_hint_does_not_assume_images(model, ort_program, digits):
    tokens = torch.randint(0, 255, (2, 1, 8, 8))
    for call in (lambda: model.infer(tokens, MaxProb()), lambda: model(tokens),
                 lambda: ort_program.infer(tokens.numpy(), MaxProb())):
        with pytest.raises(InputError, match="floating-point") as info:
            call()
        msg = str(info.value)
        assert "255" not in msg and "image" not in msg
        assert "training data" in msg


def test_patience_and_fixed_exit_fit_any_length_check(model, digits):
    """Policies without per-exit values pass the check; FixedExit beyond the exits does not."""
    from splitexit.policies import FixedExit

    x = digits.test.x[:8]
    model.infer(x, Patience(2))
    model.infer(x, FixedExit(exit_index=2))
    with pytest.raises(InputError, match="exit index in 0..2"):
        model.infer(x, FixedExit(exit_index=3))
