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
    quantization_noise,
)

SPEC = BottleneckSpec(channels=2, stride=2, hidden=8)


# one intra-op thread for the module: tiny models train faster without oversubscribing
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def teacher(one_thread_module, request):
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


def test_quantization_noise_is_one_step_per_sample():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 2, 7, 7, generator=g) * torch.arange(1, 17).reshape(16, 1, 1, 1)
    z[3] = 1.5  # a constant sample: its step is 0, so no noise
    for levels in (15, 255):
        out = quantization_noise(z, levels, generator=g)
        assert out.shape == z.shape
        flat = z.reshape(16, -1)
        step = (flat.amax(1) - flat.amin(1)) / levels
        err = (out - z).reshape(16, -1).abs().amax(1)
        assert (err <= step / 2 + 1e-6).all()
        assert (err[step > 0] > step[step > 0] / 4).all()  # 98 draws: some land far out
        assert torch.equal(out[3], z[3])
    y = z.clone().requires_grad_(True)
    quantization_noise(y, 15).sum().backward()
    assert torch.equal(y.grad, torch.ones_like(z))  # straight through: the step is a constant
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InputError, match="levels"):
            quantization_noise(z, bad)


def test_head_distillation_with_noise_adds_it_only_while_training(teacher, digits):
    student = inject_bottleneck(teacher, "block1", SPEC, digits.train.x[:8])
    x, y = digits.train.x[:32], digits.train.y[:32]
    plain, noisy = HeadDistillation(teacher), HeadDistillation(teacher, noise_levels=3)
    plain.prepare(student)
    noisy.prepare(student)
    with torch.no_grad():
        student.eval()
        assert torch.equal(plain.loss(student, x, y), noisy.loss(student, x, y))
        student.train()
        torch.manual_seed(0)
        assert not torch.equal(plain.loss(student, x, y), noisy.loss(student, x, y))
    student.eval()
    with pytest.raises(InputError, match="noise_levels"):
        HeadDistillation(teacher, noise_levels=0)


def test_bottlefit_with_stage1_noise_trains(teacher, digits):
    result = bottlefit(teacher, "block1", SPEC, digits.train, stage1_epochs=2, stage2_epochs=1,
                       stage1_noise=15, codec=Codec.parse("int4:v2"), progress=False)
    assert result.stage1.loss[-1] < result.stage1.loss[0]
    split = split_model(result.model, codec="int4:v2", example=digits.test.x[:8])
    assert _accuracy(split, digits.test) > 0.25  # chance is 0.1 (1 epoch of stage 2, int4)
