"""CBNet on real data (a slice of mnist5k): targets, converter, pipeline, ONNX, bad input."""

import numpy as np
import pytest
import torch

from splitexit import cbnet, checkpoint
from splitexit.cli import main
from splitexit.data import Split, load_dataset
from splitexit.deploy import bundle, load_bundle
from splitexit.errors import CorruptFileError, InputError
from splitexit.measure import torch_threads
from splitexit.runtime.ort import OrtSession
from splitexit.zoo import create_multiexit


@pytest.fixture(scope="module")
def mnist():
    ds = load_dataset("mnist5k")
    return ds, ds.train.subset(800, seed=0)


@pytest.fixture(scope="module")
def branchy(mnist):
    ds, train = mnist
    with torch_threads(1):
        model, _ = cbnet.train_branchynet(train, 10, ds.input_shape, epochs=3, lr=3e-3,
                                          batch_size=32, progress=False)
    return model


@pytest.fixture(scope="module")
def scored(mnist, branchy):
    _, train = mnist
    entropy, predictions = cbnet.first_exit_entropy(branchy, train.x)
    threshold = float(entropy.quantile(0.7))
    return entropy, predictions, threshold


@pytest.fixture(scope="module")
def targets(mnist, scored):
    _, train = mnist
    entropy, predictions, threshold = scored
    return cbnet.select_targets(train.x, train.y, entropy, threshold, 10,
                                predictions=predictions)


@pytest.fixture(scope="module")
def trained(mnist, branchy, targets):
    ds, train = mnist
    torch.manual_seed(0)
    converter = cbnet.ConvertingAutoencoder(ds.input_shape, "fc")
    with torch_threads(1):
        history = cbnet.train_converter(converter, train.x, targets, epochs=6, lr=2e-3,
                                        batch_size=16, progress=False)
    pipeline = cbnet.CBNetPipeline(converter, cbnet.light_classifier(branchy), 10,
                                   {"dataset": "mnist5k"}).eval()
    return converter, history, pipeline


def test_first_exit_entropy_matches_model_exit(mnist, branchy, scored):
    _, train = mnist
    entropy, predictions, _ = scored
    logits = branchy.collect_logits(train.x[:50])[0]
    p = logits.softmax(1)
    expected = -(p * p.log()).sum(1)
    assert torch.allclose(entropy[:50], expected, atol=1e-5)
    assert torch.equal(predictions[:50], logits.argmax(1))


def test_target_is_lowest_entropy_correct_easy_image_per_class(mnist, scored, targets):
    _, train = mnist
    entropy, predictions, threshold = scored
    assert len(targets.target_index) == 10
    assert targets.target_class.tolist() == list(range(10))
    assert torch.equal(targets.easy, entropy < threshold)
    assert abs(targets.hard_fraction - 0.3) < 0.01
    for c in range(10):
        ok = torch.nonzero((train.y == c) & targets.easy & (predictions == train.y)).flatten()
        best = int(ok[entropy[ok].argmin()])
        assert int(targets.target_index[c]) == best
        assert torch.all(targets.assignment[train.y == c] == c)
    assert targets.fallback_classes == [] and targets.warnings == []


def test_without_predictions_target_is_class_minimum(mnist, scored):
    _, train = mnist
    entropy, _, threshold = scored
    t = cbnet.select_targets(train.x, train.y, entropy, threshold, 10)
    for c in range(10):
        idx = torch.nonzero(train.y == c).flatten()
        assert int(t.target_index[c]) == int(idx[entropy[idx].argmin()])


def test_kmeans_targets_are_lowest_entropy_per_cluster(mnist, scored):
    _, train = mnist
    entropy, predictions, threshold = scored
    t = cbnet.select_targets(train.x, train.y, entropy, threshold, 10,
                             predictions=predictions, per_class=3, seed=0)
    assert len(t.target_index) == 30
    assert torch.bincount(t.target_class, minlength=10).tolist() == [3] * 10
    for j in range(30):
        members = torch.nonzero(t.assignment == j).flatten()
        assert len(members) > 0
        c = int(t.target_class[j])
        assert torch.all(train.y[members] == c)
        assert int(t.target_index[j]) in members.tolist()
        good = members[t.easy[members] & (predictions[members] == c)]
        pool = good if len(good) else members
        assert int(t.target_index[j]) == int(pool[entropy[pool].argmin()])


def test_class_without_easy_sample_falls_back_with_warning(mnist, scored):
    _, train = mnist
    entropy, _, threshold = scored
    entropy = entropy.clone()
    zeros = train.y == 0
    entropy[zeros] = threshold + 1.0 + torch.arange(int(zeros.sum()), dtype=entropy.dtype)
    with pytest.warns(UserWarning, match="class 0 has no easy image"):
        t = cbnet.select_targets(train.x, train.y, entropy, threshold, 10)
    assert t.fallback_classes == [0]
    assert len(t.warnings) == 1
    first_zero = int(torch.nonzero(zeros).flatten()[0])
    assert int(t.target_index[0]) == first_zero  # lowest entropy of the class, though hard
    assert not bool(t.easy[first_zero])


def test_select_targets_rejects_bad_arguments(mnist, scored):
    _, train = mnist
    entropy, _, threshold = scored
    with pytest.raises(InputError, match="same"):
        cbnet.select_targets(train.x[:10], train.y, entropy, threshold, 10)
    with pytest.raises(InputError, match="per_class"):
        cbnet.select_targets(train.x, train.y, entropy, threshold, 10, per_class=0)
    with pytest.raises(InputError, match="class 10 has no training image"):
        cbnet.select_targets(train.x, train.y, entropy, threshold, 11)
    with pytest.raises(InputError, match="threshold"):
        cbnet.select_targets(train.x, train.y, entropy, -1.0, 10)


def test_converter_loss_decreases_and_maps_to_targets(mnist, targets, trained):
    _, train = mnist
    converter, history, _ = trained
    assert history.loss[-1] < 0.8 * history.loss[0]
    out = cbnet.convert(converter, train.x).flatten(1)
    target_images = targets.images(train.x).flatten(1)
    nearest = torch.cdist(out, target_images).argmin(1)
    assert float((nearest == targets.assignment).double().mean()) > 0.6  # chance: 0.1
    assert out.min() >= 0 and out.max() <= 1


def test_conv_converter_trains(mnist, targets):
    _, train = mnist
    torch.manual_seed(0)
    converter = cbnet.ConvertingAutoencoder((1, 28, 28), "conv")
    with torch_threads(1):
        history = cbnet.train_converter(converter, train.x, targets, epochs=2, lr=3e-3,
                                        batch_size=32, progress=False)
    assert history.loss[-1] < history.loss[0]
    assert converter(train.x[:3]).shape == (3, 1, 28, 28)


def test_converter_rejects_bad_configuration():
    with pytest.raises(InputError, match="divisible by 4"):
        cbnet.ConvertingAutoencoder((1, 30, 30), "conv")
    with pytest.raises(InputError, match="unknown converter kind"):
        cbnet.ConvertingAutoencoder((1, 28, 28), "lstm")


def test_pipeline_accuracy_above_chance(mnist, branchy, trained):
    ds, _ = mnist
    _, _, pipeline = trained
    accuracy = float((pipeline.predict(ds.test.x) == ds.test.y).double().mean())
    assert accuracy > 0.5  # chance is 0.1
    light = cbnet.light_classifier(branchy)
    # The truncated classifier is B-LeNet's first exit, exactly.
    assert torch.equal(light(ds.test.x[:20]), branchy(ds.test.x[:20])[0])
    assert pipeline.macs() > light_macs(light)


def light_macs(light):
    from splitexit.cost import count_macs

    return count_macs(lambda: light(torch.zeros(1, 1, 28, 28)))


def test_finetune_changes_only_the_copy(mnist, branchy, trained):
    _, train = mnist
    converter, _, pipeline = trained
    tuned = cbnet.light_classifier(branchy)
    before = [p.clone() for p in pipeline.classifier.parameters()]
    history = cbnet.finetune_classifier(tuned, converter, Split(train.x[:300], train.y[:300]),
                                        epochs=1, progress=False)
    assert len(history.loss) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, pipeline.classifier.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, tuned.parameters()))


def test_pipeline_rejects_bad_input(trained):
    _, _, pipeline = trained
    with pytest.raises(InputError, match=r"shape \(N, 1, 28, 28\)"):
        pipeline(torch.rand(2, 1, 32, 32))
    with pytest.raises(InputError, match="unsqueeze"):
        pipeline(torch.rand(1, 28, 28))
    with pytest.raises(InputError, match=r"\[0, 1\].*255"):
        pipeline(torch.rand(2, 1, 28, 28) * 255)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        pipeline(torch.rand(2, 1, 28, 28) - 0.5)
    with pytest.raises(InputError, match="NaN"):
        pipeline(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(InputError, match="floating-point"):
        pipeline(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


def test_save_load_roundtrip(tmp_path, mnist, trained):
    ds, _ = mnist
    _, _, pipeline = trained
    cbnet.save_pipeline(pipeline, tmp_path / "cb")
    loaded = cbnet.load_pipeline(tmp_path / "cb")
    assert loaded.info["dataset"] == "mnist5k"
    with torch.inference_mode():
        assert torch.equal(loaded(ds.test.x[:64]), pipeline(ds.test.x[:64]))
    assert sorted(p.name for p in (tmp_path / "cb").iterdir()) == ["model.json",
                                                                   "weights.safetensors"]
    with pytest.raises(InputError, match="load_pipeline|not built from the zoo"):
        checkpoint.load(tmp_path / "cb")
    other = checkpoint.save(create_multiexit("b-lenet", 10, (1, 28, 28), head="published"),
                            tmp_path / "x")
    with pytest.raises(CorruptFileError, match="not a CBNet pipeline"):
        cbnet.load_pipeline(other)


def test_onnx_parity_and_checks(tmp_path, mnist, trained):
    ds, _ = mnist
    _, _, pipeline = trained
    path = cbnet.export_onnx(pipeline, tmp_path / "cbnet.onnx", ds.input_shape)
    session = cbnet.OnnxPipeline(path, ds.input_shape)
    x = ds.test.x[:200]
    with torch.inference_mode():
        expected = pipeline(x).numpy()
    got = session.run(x)
    assert np.abs(got - expected).max() < 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.array_equal(session.run(x[:1]), session.run(x)[:1])  # dynamic batch
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        session.run(x * 255)
    with pytest.raises(InputError, match="shape"):
        session.run(np.zeros((2, 1, 27, 27), np.float32))
    with pytest.raises(InputError, match="input_shape"):
        cbnet.OnnxPipeline(path)
    with pytest.raises(InputError, match="no ONNX file"):
        cbnet.OnnxPipeline(tmp_path / "missing.onnx", ds.input_shape)
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(CorruptFileError):
        cbnet.OnnxPipeline(tmp_path / "bad.onnx", ds.input_shape)
    assert isinstance(session.session, OrtSession)  # the one ONNX Runtime session type


def test_pipeline_bundles_like_any_model(tmp_path, mnist, trained):
    """A CBNet pipeline lowers to converter -> classifier and bundles; the bundle's program
    gives the pipeline's logits, whole or split at the converted image."""
    ds, _ = mnist
    _, _, pipeline = trained
    x = ds.test.x[:64]
    with torch.inference_mode():
        expected = pipeline(x)
    b = load_bundle(bundle(pipeline, tmp_path / "b", example=x[:8], measure=False))
    assert b.exit_names == ["final"] and b.input_shape == tuple(ds.input_shape)
    got = b.program().infer(x.numpy(), b.policy)
    np.testing.assert_allclose(got.logits, expected.numpy(), atol=1e-4)
    split = load_bundle(bundle(pipeline, tmp_path / "s", cut="converted", example=x[:8],
                               measure=False))
    program = split.program()
    run = program.run_until(x.numpy(), split.policy, split.device_pieces)
    assert run.payload.shape == (64, *ds.input_shape)  # the converted images cross the cut
    np.testing.assert_allclose(program.finish(run, split.policy).logits, expected.numpy(),
                               atol=1e-4)


def test_cli_export(tmp_path, trained, capsys):
    _, _, pipeline = trained
    cbnet.save_pipeline(pipeline, tmp_path / "cb")
    assert main(["cbnet", "export", str(tmp_path / "cb"), "--out",
                 str(tmp_path / "cb.onnx")]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    session = cbnet.OnnxPipeline(tmp_path / "cb.onnx")  # shape from the JSON sidecar
    assert session.predict(torch.rand(3, 1, 28, 28)).shape == (3,)
    assert main(["cbnet", "export", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "n.onnx")]) == 2
