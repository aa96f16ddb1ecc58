"""BottleFit two-stage training and the autoencoder baseline, on the digits data set."""

import pytest
import torch

from splitexit.errors import InputError
from splitexit.split.bottleneck import BottleneckSpec, inject_bottleneck
from splitexit.split.codec import Codec
from splitexit.split.halves import split_model
from splitexit.training import train
from splitexit.training.bottlefit import (
    OUTPUT,
    BottleneckFineTune,
    HeadDistillation,
    autoencoder_baseline,
    bottlefit,
    head_distillation_targets,
)

SPEC = BottleneckSpec(channels=2, stride=2, hidden=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models train faster without oversubscribing shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def teacher(one_thread, request):
    # Requested here, the shared session fixture is built (if not yet) with one thread too.
    return request.getfixturevalue("trained_resnet8").backbone



def _accuracy(model, split) -> float:
    with torch.no_grad():
        return float((model(split.x).argmax(1) == split.y).double().mean())


def _state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_stages_run_and_stage2_keeps_encoder_frozen(teacher, digits):
    teacher_before = _state(teacher)
    student = inject_bottleneck(teacher, "block1", SPEC, digits.train.x[:64])
    stage1 = HeadDistillation(teacher)
    h1 = train(student, digits.train, stage1, epochs=3, progress=False)
    assert stage1.targets == ["block1/decoded", "block2"]
    assert h1.loss[-1] < h1.loss[0]
    device_before = _state(torch.nn.ModuleList(student.stages[: student.encoder_index + 1]))
    decoder_before = _state(student.decoder)
    h2 = train(student, digits.train, BottleneckFineTune(teacher, codec=Codec("int8")),
               epochs=3, progress=False)
    assert h2.loss[-1] < h2.loss[0]
    device_after = _state(torch.nn.ModuleList(student.stages[: student.encoder_index + 1]))
    assert _same(device_before, device_after)  # encoder and device layers (incl. BN stats)
    assert not _same(decoder_before, _state(student.decoder))
    assert _same(teacher_before, _state(teacher))  # the teacher is never updated
    split = split_model(student, codec="int8", example=digits.test.x[:8])
    accuracy = _accuracy(split, digits.test)
    assert accuracy > 0.6  # chance is 0.1
    assert split.message_bytes(digits.test.x) < 784


@pytest.mark.slow
def test_bottlefit_with_cross_entropy_beats_chance(teacher, digits):
    result = bottlefit(teacher, "block1", SPEC, digits.train, stage1_epochs=2, stage2_epochs=2,
                       stage2_loss="ce", progress=False)
    assert len(result.stage1.loss) == 2 and len(result.stage2.loss) == 2
    assert _accuracy(result.model, digits.test) > 0.6


def test_autoencoder_baseline_trains_only_the_autoencoder(teacher, digits):
    model, history = autoencoder_baseline(teacher, "block2", SPEC, digits.train, epochs=2,
                                          progress=False)
    assert history.loss[-1] < history.loss[0]
    e = model.encoder_index
    originals = list(model.stages[:e]) + list(model.stages[e + 2:])
    for stage, original in zip(originals, teacher.stages, strict=True):
        assert _same(_state(stage), _state(original))


def test_targets_and_errors(teacher, digits):
    student = inject_bottleneck(teacher, "block2", SPEC, digits.train.x[:8])
    assert head_distillation_targets(student) == ["block2/decoded", OUTPUT]
    with pytest.raises(InputError, match="BottleneckedModel"):
        train(teacher, digits.train, HeadDistillation(teacher), epochs=1, progress=False)
    with pytest.raises(InputError, match="no counterpart"):
        train(student, digits.train, HeadDistillation(teacher, ["block2/bottleneck"]), epochs=1,
              progress=False)
    with pytest.raises(InputError, match="stage2_loss"):
        bottlefit(teacher, "block1", SPEC, digits.train, stage2_loss="mse")
    with pytest.raises(InputError, match="alpha"):
        BottleneckFineTune(teacher, alpha=2.0)
