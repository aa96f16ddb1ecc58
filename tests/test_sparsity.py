"""Predefined sparsity: exact fan-in / fan-out, mask kept through training, compact storage,
sparse kernels equal to dense-masked ones, clear errors, and a sparse model that learns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitexit.compress import (
    SparseConv1d,
    SparseConv2d,
    SparseLinear,
    choose_kernels,
    dense_weight_bytes,
    effective_macs,
    fixed_fan_mask,
    load_sparse,
    save_sparse,
    sparse_layers,
    sparsify,
)
from splitexit.cost import count_macs
from splitexit.errors import CorruptFileError, InputError
from splitexit.export import OrtPiece, export_piece
from splitexit.training import Baseline, JointWeighted, train
from splitexit.zoo import create_model, create_multiexit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("out_units,in_units,fan_in", [(40, 784, 78), (10, 40, 4), (256, 64, 9),
                                                       (7, 13, 5), (64, 64, 64)])
def test_fixed_fan_in_and_balanced_fan_out(out_units, in_units, fan_in):
    mask = fixed_fan_mask(out_units, in_units, fan_in=fan_in, seed=3)
    assert mask.shape == (out_units, in_units)
    assert torch.equal(mask.sum(1), torch.full((out_units,), fan_in))
    fan_out = mask.sum(0)
    total = out_units * fan_in
    assert int(fan_out.min()) == total // in_units
    assert int(fan_out.max()) == -(-total // in_units)
    assert int(fan_out.sum()) == total


def test_exact_fan_out_when_divisible_and_seeds_differ():
    a = fixed_fan_mask(40, 800, density=0.05, seed=0)
    assert set(a.sum(0).tolist()) == {2} and set(a.sum(1).tolist()) == {40}
    assert not torch.equal(a, fixed_fan_mask(40, 800, density=0.05, seed=1))
    assert torch.equal(a, fixed_fan_mask(40, 800, density=0.05, seed=0))


def test_impossible_density_is_a_clear_error():
    with pytest.raises(InputError, match="fan-in rounds to 0"):
        fixed_fan_mask(10, 16, density=0.01)
    with pytest.raises(InputError, match="unconnected"):
        fixed_fan_mask(10, 784, density=0.05)  # 10 outputs x 39 inputs cannot reach 784 inputs
    with pytest.raises(InputError, match=r"density must be in \(0, 1\]"):
        fixed_fan_mask(10, 16, density=1.5)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    with pytest.raises(InputError, match="layer '0'.*unconnected.*exclude"):
        sparsify(net, 0.02)
    with pytest.raises(InputError, match="matches no Linear/Conv layer"):
        sparsify(net, {"nope": 0.5})


def test_conversion_of_every_layer_kind_keeps_function_where_dense():
    torch.manual_seed(0)
    model = create_multiexit("resnet8", 10, (1, 12, 12)).eval()
    summary = sparsify(model, 1.0, exclude=["*stem.0"])
    assert summary and all(v["density"] == 1.0 for v in summary.values())
    kinds = {type(m) for m in sparse_layers(model).values()}
    assert kinds == {SparseConv2d, SparseLinear}
    # depthwise convolutions of the heads stay dense
    assert all(getattr(m, "groups", 1) == 1 for m in sparse_layers(model).values())


def test_mask_is_kept_through_training(digits):
    torch.manual_seed(0)
    model = create_multiexit("mlp", digits.num_classes, digits.input_shape,
                             hidden=(64, 32))
    sparsify(model, 0.25)
    masks = {n: m.mask.clone() for n, m in sparse_layers(model).items()}
    before = {n: m.weight.detach().clone() for n, m in sparse_layers(model).items()}
    train(model, digits.train.subset(400), JointWeighted(), epochs=2, progress=False)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.mask, masks[name])
        assert bool((layer.weight[~layer.mask] == 0).all()), name
        assert not torch.equal(layer.weight, before[name])  # it did learn


def test_sparse_mlp_learns_digits(digits):
    torch.manual_seed(0)
    model = create_model("mlp", digits.num_classes, digits.input_shape, hidden=(128, 64))
    sparsify(model, 0.25)
    train(model, digits.train, Baseline(), epochs=15, lr=5e-3, progress=False)
    with torch.no_grad():
        acc = (model(digits.test.x).argmax(1) == digits.test.y).float().mean().item()
    assert acc > 0.85  # chance is 0.1


def test_compact_storage_is_smaller_and_reloads_equal(tmp_path):
    torch.manual_seed(0)
    model = create_multiexit("mlp", 10, (1, 28, 28)).eval()
    # 64 -> 10 layers cannot reach every input at 10 %: keep them at 20 %
    sparsify(model, {"backbone.stages.[012].*": 0.1, "heads.[01].*": 0.1,
                     "backbone.stages.3.*": 0.2, "heads.2.*": 0.2})
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    size = save_sparse(model, tmp_path / "m.safetensors")
    assert size == (tmp_path / "m.safetensors").stat().st_size
    dense = dense_weight_bytes(model)
    assert size < 0.2 * dense  # 10 % of the weights, 2-byte indices, no mask
    fresh = create_multiexit("mlp", 10, (1, 28, 28)).eval()
    load_sparse(fresh, tmp_path / "m.safetensors")
    assert set(sparse_layers(fresh)) == set(sparse_layers(model))
    with torch.no_grad():
        for a, b in zip(fresh(x), ref):
            assert torch.equal(a, b)
    # int8 values: smaller still, close to the float weights
    size8 = save_sparse(model, tmp_path / "m8.safetensors", values="int8")
    assert size8 < 0.6 * size
    fresh8 = load_sparse(create_multiexit("mlp", 10, (1, 28, 28)).eval(),
                         tmp_path / "m8.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh8(x)[-1], ref[-1], atol=0.05, rtol=0.05)


def test_corrupt_or_mismatched_checkpoint(tmp_path):
    model = create_model("mlp", 10, (1, 8, 8), hidden=(32,))
    sparsify(model, 0.5)
    save_sparse(model, tmp_path / "m.safetensors")
    with pytest.raises(CorruptFileError, match="shape"):
        load_sparse(create_model("mlp", 10, (1, 8, 8), hidden=(16,)), tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CorruptFileError):
        load_sparse(model, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="save_sparse"):
        load_sparse(model, tmp_path / "missing.safetensors")


@pytest.mark.parametrize("batch", [1, 7])
def test_csr_kernel_equals_dense_masked(batch):
    torch.manual_seed(0)
    lin = SparseLinear(300, 50, fixed_fan_mask(50, 300, density=0.1)).eval()
    conv = SparseConv2d(8, 16, 3, stride=2, padding=1,
                        mask=fixed_fan_mask(16, 8, density=0.25)).eval()
    x, img = torch.randn(batch, 300), torch.randn(batch, 8, 9, 9)
    with torch.no_grad():
        dense_lin = x @ (lin.weight * lin.mask).T + lin.bias
        dense_conv = nn.functional.conv2d(img, conv.masked_weight(), conv.bias, 2, 1)
        for kernel in ("dense", "csr"):
            lin.set_kernel(kernel)
            conv.set_kernel(kernel)
            torch.testing.assert_close(lin(x), dense_lin, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(conv(img), dense_conv, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="unknown kernel"):
        lin.set_kernel("ell")


def test_choose_kernels_measures_every_layer_and_keeps_outputs():
    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 28, 28), hidden=(512, 256)).eval()
    sparsify(model, 0.1)
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    chosen = choose_kernels(model, x, repeats=5)
    assert set(chosen) == set(sparse_layers(model))
    for info in chosen.values():
        assert info["dense_us"] > 0 and info["csr_us"] > 0
        assert info["kernel"] == ("csr" if info["csr_us"] * 1.1 < info["dense_us"] else "dense")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_effective_macs_scale_with_density():
    model = create_model("mlp", 10, (1, 28, 28), hidden=(200, 100))
    x = torch.rand(1, 1, 28, 28)
    dense = count_macs(lambda: model(x))
    sparsify(model, {"stages.0.*": 0.1, "stages.1.*": 0.5})
    expected = dense - (784 - 78) * 200 - (200 - 100) * 100  # fan-in round(78.4) = 78
    assert effective_macs(model, x) == pytest.approx(expected)


def test_sparse_halves_export_and_match(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet8", 10, (1, 12, 12)).eval()
    sparsify(model, 0.5, exclude=["*stem.0"])
    device, server = model.split("block1")
    # both halves hold sparse layers (the stem conv alone stays dense)
    assert sparse_layers(device) and sparse_layers(server)
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        mid = device(x)
        assert torch.equal(server(mid), model(x))
        got_mid = OrtPiece(export_piece(device, x, tmp_path / "d.onnx"))(x)
        torch.testing.assert_close(torch.as_tensor(got_mid), mid, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            OrtPiece(export_piece(server, mid, tmp_path / "s.onnx"))(mid), server(mid),
            atol=1e-4, rtol=1e-4)


# block patterns: fixed fan-in and fan-out, run as one gather + grouped products ----------
@pytest.mark.parametrize("out_units,in_units,density", [(1024, 784, 0.25), (12, 8, 0.5),
                                                         (32, 16, 0.125)])
def test_block_pattern_has_exact_fans_and_groups(out_units, in_units, density):
    mask = fixed_fan_mask(out_units, in_units, density=density, pattern="block", seed=3)
    groups = round(1 / density)
    assert (mask.sum(1) == in_units // groups).all()
    assert (mask.sum(0) == out_units // groups).all()
    layer = SparseLinear(in_units, out_units, mask)
    perm, g = layer.block_groups()
    assert g == groups and sorted(perm.tolist()) == list(range(in_units))
    # a cyclic pattern of the same density is not a block pattern: no grouped kernel
    cyclic = SparseLinear(in_units, out_units, fixed_fan_mask(out_units, in_units, density))
    assert cyclic.block_groups() is None
    with pytest.raises(InputError, match="not a block pattern"):
        cyclic.set_kernel("grouped")


def test_block_pattern_that_does_not_divide_is_a_clear_error():
    with pytest.raises(InputError, match="Densities that work: 0.5"):
        fixed_fan_mask(10, 512, density=0.25, pattern="block")
    # auto falls back to the cyclic pattern for such a layer
    mask = fixed_fan_mask(10, 512, density=0.25, pattern="auto")
    assert (mask.sum(1) == 128).all()
    with pytest.raises(InputError, match="unknown pattern"):
        sparsify(create_model("mlp", 10, (1, 8, 8)), 0.5, pattern="random")


@pytest.mark.parametrize("batch", [1, 5])
def test_grouped_kernel_equals_dense_masked(batch):
    torch.manual_seed(0)
    lin = SparseLinear(96, 64, fixed_fan_mask(64, 96, density=0.25, pattern="block")).eval()
    conv = SparseConv2d(16, 32, 3, stride=2, padding=1,
                        mask=fixed_fan_mask(32, 16, density=0.25, pattern="block")).eval()
    conv1 = SparseConv1d(8, 16, 5, padding=2,
                         mask=fixed_fan_mask(16, 8, density=0.5, pattern="block")).eval()
    x, img, seq = torch.randn(batch, 96), torch.randn(batch, 16, 9, 9), torch.randn(batch, 8, 20)
    with torch.no_grad():
        expected = [nn.functional.linear(x, lin.masked_weight(), lin.bias),
                    nn.functional.conv2d(img, conv.masked_weight(), conv.bias, 2, 1),
                    nn.functional.conv1d(seq, conv1.masked_weight(), conv1.bias, 1, 2)]
        for layer in (lin, conv, conv1):
            layer.set_kernel("grouped")
        for got, want in zip((lin(x), conv(img), conv1(seq)), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # training still goes through the masked weight (gradients reach the kept weights only)
    lin.train()
    lin(x).sum().backward()
    assert (lin.weight.grad[~lin.mask] == 0).all() and lin.weight.grad[lin.mask].abs().sum() > 0


def test_block_model_stores_a_permutation_reloads_equal_and_exports(tmp_path):
    torch.manual_seed(0)
    model = create_model("mlp", 10, (1, 28, 28), hidden=(256, 128)).eval()
    info = sparsify(model, 0.25, pattern="auto")
    assert [v["pattern"] for v in info.values()] == ["block", "block", "cyclic"]
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    chosen = choose_kernels(model, x[:1], repeats=3)
    assert all("grouped_us" in c for c in list(chosen.values())[:2])
    for layer in list(sparse_layers(model).values())[:2]:
        layer.set_kernel("grouped")
    size = save_sparse(model, tmp_path / "m.safetensors")
    assert size < 0.27 * dense_weight_bytes(model)  # values + one permutation per layer
    fresh = load_sparse(create_model("mlp", 10, (1, 28, 28), hidden=(256, 128)).eval(),
                        tmp_path / "m.safetensors")
    assert [m.kernel for m in sparse_layers(fresh).values()][:2] == ["grouped", "grouped"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, atol=1e-5, rtol=1e-5)
    # the ONNX graph runs the grouped form (Gather + batched MatMul), same outputs
    path = export_piece(fresh, x[:2], tmp_path / "m.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Gather" in ops
    torch.testing.assert_close(torch.as_tensor(OrtPiece(path)(x)), ref, atol=1e-4, rtol=1e-4)
    # a forged permutation is refused
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "m.safetensors"))
    key = next(k for k in tensors if k.endswith(".perm"))
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(tmp_path / "forged.safetensors"), metadata=meta)
    with pytest.raises(CorruptFileError, match="permutation"):
        load_sparse(create_model("mlp", 10, (1, 28, 28), hidden=(256, 128)),
                    tmp_path / "forged.safetensors")
