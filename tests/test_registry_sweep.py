"""Every registry, swept (in the spirit of timm's test_models.py): every zoo model with every
head type builds, cuts, runs forward, keeps ``infer == simulate`` and exports to ONNX with the
same exits; every policy, data set and method name is listed and its errors are clear."""

from __future__ import annotations

import pytest
import torch

from splitexit.data import DATASETS
from splitexit.errors import InputError
from splitexit.heads import HEADS
from splitexit.methods import METHODS
from splitexit.multiexit import simulate_exits
from splitexit.policies import POLICIES, MaxProb
from splitexit.program import lower
from splitexit.registry import Registry
from splitexit.split.halves import split_model
from splitexit.training import fit_class_means
from splitexit.zoo import MODELS, create_multiexit, list_models

pytestmark = pytest.mark.usefixtures("one_thread_module")

SHAPES = {"cnn1d": (3, 64)}  # 1-D signals; every other zoo model takes images
HEAD_KWARGS = {"cascading": {"base": "linear"}}
HEAD_TYPES = [h for h in HEADS.list() if h != "module"]  # "module" wraps a module you give


def _policy(model, x) -> MaxProb:
    """A threshold that sends about half the samples out at exit 0, halfway between two
    samples' confidences (no sample sits on it, so float rounding cannot flip a decision)."""
    with torch.no_grad():
        stats = sorted(set(MaxProb().statistic(model(x)[0]).double().tolist()))
    if len(stats) == 1:  # every sample alike (an untrained binary head): all leave
        return MaxProb(stats[0] - 1e-3)
    k = len(stats) // 2
    return MaxProb((stats[k - 1] + stats[k]) / 2)


@pytest.mark.parametrize("head", HEAD_TYPES)
@pytest.mark.parametrize("name", list_models(task="classification"))  # dense: test_segmentation
def test_every_model_with_every_head(name, head, tmp_path):
    torch.manual_seed(0)
    shape = SHAPES.get(name, (1, 16, 16))
    if name == "mlp" and head in ("conv", "depthwise"):  # flat features: a clear refusal
        with pytest.raises(InputError, match="a conv head needs .* features, got"):
            create_multiexit(name, 5, shape, head=head)
        return
    model = create_multiexit(name, 5, shape, head=head, head_kwargs=HEAD_KWARGS.get(head)).eval()
    x = torch.rand(9, *shape)
    if head == "class-means":  # no gradient training: class means of a pass over data
        fit_class_means(model, (torch.rand(40, *shape), torch.arange(40) % 5))
    with torch.no_grad():
        logits = model(x)
        assert [tuple(g.shape) for g in logits] == [(9, 5)] * model.num_exits
        policy = _policy(model, x)
        got, ref = model.infer(x, policy), simulate_exits(logits, policy)
    assert torch.equal(got.exit_index, ref.exit_index)
    assert torch.equal(got.predictions, ref.predictions)
    cut = model.backbone.cut_names[0]  # split at the first cut: the same numbers
    with torch.no_grad():
        assert torch.equal(split_model(model.backbone, cut, example=x).forward(x),
                           model.backbone(x))
    program = lower(model, policy).on_onnx_runtime(tmp_path)
    onnx = program.infer(x.numpy(), policy)
    assert (onnx.exit_index == got.exit_index.numpy()).all()
    assert torch.allclose(torch.from_numpy(program.forward(x.numpy())[-1]), logits[-1],
                          atol=1e-4)


@pytest.mark.parametrize("registry, build", [
    (POLICIES, lambda cls: cls), (HEADS, lambda cls: cls), (METHODS, lambda m: m),
    (DATASETS, lambda f: f), (MODELS, lambda f: f)])
def test_registries_refuse_duplicates_and_unknown_names(registry, build):
    first = registry.list()[0]
    with pytest.raises(InputError, match="registered twice"):
        registry.add(first, build(registry.get(first)))
    with pytest.raises(InputError, match=f"unknown {registry.kind} 'nope'; known: .*{first}"):
        registry.get("nope")
    assert first in registry and "nope" not in registry and list(registry) == registry.list()


def test_registry_helper():
    shapes = Registry("shape")

    @shapes.register("square")
    def square(side):
        return (side, side)

    assert shapes.create("square", 3) == (3, 3) and shapes.list("sq*") == ["square"]
    with pytest.raises(InputError, match="non-empty string"):
        shapes.add("", square)
    with pytest.raises(InputError, match="unknown shape"):
        shapes.create(["square"])  # an unhashable name is just unknown


def test_register_can_stamp_the_name_on_the_entry():
    kinds = Registry("widget")

    @kinds.register("round", stamp="kind")
    class Round:
        pass

    assert Round.kind == "round" and kinds.get("round") is Round
    with pytest.raises(InputError, match="registered twice"):
        kinds.register("round", stamp="kind")(type("Other", (), {}))
    # the built-in head types carry the name they are registered under
    from splitexit.heads import HEADS
    assert all(HEADS.get(name).kind == name for name in HEADS.list())
