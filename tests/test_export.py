"""ONNX export of every piece and ONNX Runtime parity: stages, heads, halves, tuple payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from splitexit.errors import CorruptFileError, InputError
from splitexit.export import OrtPiece, export_piece
from splitexit.stages import StagedModel, payload_tensors
from splitexit.zoo import ResNet, create_multiexit, list_models

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _shape(name: str) -> tuple[int, ...]:
    return (3, 32) if name == "cnn1d" else (1, 12, 12)


def _close(a, b) -> None:
    for u, v in zip(payload_tensors(a), payload_tensors(b), strict=True):
        assert u.shape == v.shape
        torch.testing.assert_close(u, v, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", list_models())
def test_every_stage_and_head_matches_pytorch(name, tmp_path):
    torch.manual_seed(0)
    model = create_multiexit(name, 10, _shape(name)).eval()
    x = torch.randn(3, *_shape(name))
    payload = x
    e = 0
    previous = None
    with torch.no_grad():
        for k, stage in enumerate(model.backbone.stages):
            piece = OrtPiece(export_piece(stage, payload, tmp_path / f"s{k}.onnx"))
            expected = stage(payload)
            _close(piece(payload), expected)
            payload = expected
            while e < len(model.heads) and model.exit_stages[e] == k:
                head = model.heads[e]
                args = (payload, previous) if head.uses_previous else payload
                got = OrtPiece(export_piece(head, args, tmp_path / f"h{e}.onnx"))(args)
                previous = model.run_head(e, payload, previous)
                _close(got, previous)
                e += 1


def test_dynamic_batch_runs_other_batch_sizes(tmp_path):
    model = create_multiexit("resnet8", 10, (1, 28, 28)).eval()
    stage = model.backbone.stages[0]
    piece = OrtPiece(export_piece(stage, torch.randn(1, 1, 28, 28), tmp_path / "s.onnx"))
    for n in (1, 5):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            _close(piece(x), stage(x))


def test_numpy_in_numpy_out(tmp_path):
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    piece = OrtPiece(export_piece(head, torch.randn(2, 3, 4), tmp_path / "h.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3, 4))  # float64 is cast
    out = piece(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    with torch.no_grad():
        np.testing.assert_allclose(out, head(torch.from_numpy(x).float()).numpy(), atol=ATOL)


def test_tuple_payload_halves_of_a_cut_inside_a_residual_block(tmp_path):
    torch.manual_seed(0)
    staged = StagedModel.from_module(ResNet(10, 1), ["block1_conv1"]).eval()
    device, server = staged.split("block1_conv1")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        payload = device(x)
    assert isinstance(payload, tuple) and len(payload) == 2
    dev = OrtPiece(export_piece(device, x, tmp_path / "device.onnx"))
    srv = OrtPiece(export_piece(server, payload, tmp_path / "server.onnx"))
    assert len(dev.output_names) == 2 and len(srv.input_names) == 2
    with torch.no_grad():
        _close(dev(x), payload)
        _close(srv(payload), server(payload))
        _close(srv(dev(x)), staged(x))
    # export did not change any module's mode or running statistics
    assert not any(m.training for m in staged.stages.modules())


def test_device_and_server_halves_of_every_zoo_cut(tmp_path):
    model = create_multiexit("mobilenet", 10, (1, 12, 12)).eval()
    x = torch.randn(2, 1, 12, 12)
    for cut in model.backbone.cut_names:
        device, server = model.backbone.split(cut)
        with torch.no_grad():
            mid = device(x)
            _close(OrtPiece(export_piece(device, x, tmp_path / "d.onnx"))(x), mid)
            _close(OrtPiece(export_piece(server, mid, tmp_path / "s.onnx"))(mid), server(mid))


def test_names_and_training_mode_are_kept(tmp_path):
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()).train()
    path = export_piece(net, torch.randn(3, 4), tmp_path / "n.onnx", input_names=["features"],
                        output_names=["hidden"])
    assert net.training and net[1].training
    piece = OrtPiece(path)
    assert piece.input_names == ["features"] and piece.output_names == ["hidden"]


class _Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


def test_unsupported_operation_is_named(tmp_path):
    with pytest.raises(InputError, match="linalg_svd"):
        export_piece(_Svd(), torch.randn(2, 3, 3), tmp_path / "u.onnx")


def test_bad_inputs(tmp_path):
    lin = nn.Linear(4, 2)
    with pytest.raises(InputError, match="torch.Tensor"):
        export_piece(lin, np.zeros((2, 4)), tmp_path / "a.onnx")
    with pytest.raises(InputError, match="batch"):
        export_piece(lin, torch.zeros(0, 4), tmp_path / "a.onnx")
    with pytest.raises(InputError, match="fails on example_input"):
        export_piece(lin, torch.zeros(2, 5), tmp_path / "a.onnx")
    with pytest.raises(InputError, match="input names"):
        export_piece(lin, torch.zeros(2, 4), tmp_path / "a.onnx", input_names=["a", "b"])
    piece = OrtPiece(export_piece(lin, torch.zeros(2, 4), tmp_path / "a.onnx"))
    with pytest.raises(InputError, match="takes 1 input"):
        piece((torch.zeros(2, 4), torch.zeros(2, 4)))
    with pytest.raises(InputError, match="dimensions"):
        piece(torch.zeros(4))
    with pytest.raises(InputError, match="export the piece first"):
        OrtPiece(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(CorruptFileError):
        OrtPiece(tmp_path / "bad.onnx")


# ONNX Runtime early-exit pipeline ---------------------------------------------------------
from splitexit.export import OrtExitPipeline, export_multiexit, parity  # noqa: E402
from splitexit.policies import MaxProb, NeverExit, Patience  # noqa: E402


def _median_policy(model, x) -> MaxProb:
    """A max-prob threshold at which about half the samples leave at each early exit."""
    with torch.no_grad():
        logits = model(x)
    stats = [MaxProb().statistic(lg).median().item() for lg in logits[:-1]]
    return MaxProb(threshold=tuple(stats))


@pytest.mark.parametrize("name", list_models())
def test_pipeline_matches_pytorch_infer(name, tmp_path):
    torch.manual_seed(1)
    model = create_multiexit(name, 10, _shape(name)).eval()
    x = torch.rand(24, *_shape(name))
    export_multiexit(model, tmp_path)
    pipe = OrtExitPipeline(tmp_path)
    unfused = OrtExitPipeline(tmp_path, fused=False)
    assert any(f is not None for f in pipe.fused) and not any(unfused.fused)
    for policy in (_median_policy(model, x), Patience(patience=1), NeverExit()):
        assert parity(model, unfused, x, policy)["same_exits"] == 1.0
        report = parity(model, pipe, x, policy)
        assert report["same_predictions"] == 1.0 and report["same_exits"] == 1.0, policy
        assert report["max_abs_logit_diff"] < ATOL
        ref = model.infer(x, policy)
        got = pipe.infer(x, policy)
        torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=1e-4)
    counts = torch.bincount(pipe.infer(x, _median_policy(model, x)).exit_index)
    assert (counts > 0).sum() >= 2  # the batch really shrank at an early exit
    torch.testing.assert_close(pipe.run_full(x), model.backbone(x), atol=ATOL, rtol=1e-4)


def test_pipeline_split_at_every_cut_equals_unsplit(tmp_path):
    torch.manual_seed(2)
    model = create_multiexit("resnet8", 10, (1, 12, 12)).eval()
    x = torch.rand(16, 1, 12, 12)
    export_multiexit(model, tmp_path)
    pipe = OrtExitPipeline(tmp_path, threads=1)
    policy = _median_policy(model, x)
    ref = model.infer(x, policy)
    for cut in pipe.cut_names:
        outcome = pipe.run_device(x, policy, cut)
        device_exits = [e for e, k in enumerate(pipe.exit_stages)
                        if k <= pipe.cut_names.index(cut)]
        # exactly the samples PyTorch exits on the device side have left
        assert len(outcome.active) == int((~torch.isin(ref.exit_index,
                                                       torch.tensor(device_exits))).sum())
        result = pipe.run_server(outcome, policy)
        assert torch.equal(result.predictions, ref.predictions)
        assert torch.equal(result.exit_index, ref.exit_index)
        assert torch.equal(pipe.infer(x, policy, cut=cut).exit_index, ref.exit_index)


def test_pipeline_batch_of_one_and_numpy(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    export_multiexit(model, tmp_path)
    pipe = OrtExitPipeline(tmp_path)
    x = torch.rand(5, 1, 8, 8)
    ref = model.infer(x, MaxProb(0.12))
    for i in range(5):
        got = pipe.infer(x[i: i + 1].numpy(), MaxProb(0.12))
        assert got.exit_index.item() == ref.exit_index[i].item()
        assert got.predictions.item() == ref.predictions[i].item()


def test_pipeline_bad_input(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    export_multiexit(model, tmp_path)
    pipe = OrtExitPipeline(tmp_path)
    with pytest.raises(InputError, match="shape"):
        pipe.infer(torch.rand(2, 1, 9, 9), MaxProb(0.5))
    with pytest.raises(InputError, match="NaN"):
        pipe.infer(torch.full((2, 1, 8, 8), float("nan")), MaxProb(0.5))
    with pytest.raises(InputError, match="unknown cut"):
        pipe.run_device(torch.rand(2, 1, 8, 8), MaxProb(0.5), "nope")
    with pytest.raises(InputError, match="export_multiexit"):
        OrtExitPipeline(tmp_path / "empty")
    (tmp_path / "pipeline.json").write_text("{\"format\": 1}")
    with pytest.raises(CorruptFileError):
        OrtExitPipeline(tmp_path)


# one graph with If nodes ------------------------------------------------------------------
from splitexit.export import (  # noqa: E402
    OrtExitChain,
    OrtExitGraph,
    export_exit_chain,
    export_exit_graph,
)
from splitexit.policies import Entropy, Margin  # noqa: E402


def _off_median(policy_cls, model, x, **kw):
    """Per-exit thresholds halfway between the two middle values of the statistic (no ties)."""
    with torch.no_grad():
        logits = model(x)
    probe = policy_cls(**kw)
    thresholds = []
    for e, lg in enumerate(logits[:-1]):
        values = torch.unique(probe.statistic(probe.scaled(e, lg)).double())  # sorted
        mid = len(values) // 2
        thresholds.append(float(values[mid - 1: mid + 1].mean()) if len(values) > 1
                          else float(values[0]))
    return policy_cls(threshold=tuple(thresholds), **kw)


@pytest.mark.parametrize("name", ["resnet8", "mlp", "mobilenet"])
def test_single_graph_matches_pytorch_infer(name, tmp_path):
    torch.manual_seed(3)
    model = create_multiexit(name, 10, (1, 12, 12)).eval()
    x = torch.rand(30, 1, 12, 12)
    # sharp temperatures spread the near-uniform softmax of an untrained model
    for policy in (_off_median(MaxProb, model, x, temperature=0.02),
                   _off_median(Entropy, model, x, temperature=(0.02, 0.03, 0.025)),
                   _off_median(Margin, model, x, temperature=0.02)):
        graph = OrtExitGraph(export_exit_graph(model, policy, tmp_path / "ee.onnx"))
        # the same decisions as plain graphs chained from Python
        chain = OrtExitChain(export_exit_chain(model, policy, tmp_path / "chain"))
        ref = model.infer(x, policy)
        for got in (graph.infer(x), chain.infer(x)):
            assert torch.equal(got.exit_index, ref.exit_index), policy
            assert torch.equal(got.predictions, ref.predictions)
            torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=1e-4)
            if isinstance(policy, MaxProb):  # an untrained model's max-prob still spreads
                assert len(torch.unique(got.exit_index)) >= 2


def test_single_graph_rejects_stateful_policies_and_foreign_files(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    with pytest.raises(InputError, match="OrtExitPipeline"):
        export_exit_graph(model, Patience(patience=1), tmp_path / "p.onnx")
    plain = export_piece(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "l.onnx")
    with pytest.raises(InputError, match="export_exit_graph"):
        OrtExitGraph(plain)
    with pytest.raises(InputError, match="OrtExitPipeline"):
        export_exit_chain(model, Patience(patience=1), tmp_path / "c")
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "chain.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(InputError, match="export_exit_chain"):
        OrtExitChain(tmp_path / "c2")


@pytest.mark.parametrize("head", ["sdn", "pool", "linear", "depthwise"])
def test_every_head_type_exports_and_runs_on_onnx_runtime(head, tmp_path):
    """28x28 maps take the heads' fixed-kernel pooling path: it must export too."""
    torch.manual_seed(4)
    model = create_multiexit("resnet8", 10, (1, 28, 28), head=head).eval()
    x = torch.rand(9, 1, 28, 28)
    export_multiexit(model, tmp_path)
    pipe = OrtExitPipeline(tmp_path)
    policy = _median_policy(model, x)
    report = parity(model, pipe, x, policy)
    assert report["same_exits"] == 1.0 and report["max_abs_logit_diff"] < ATOL
    graph = OrtExitGraph(export_exit_graph(model, MaxProb(0.5, temperature=0.05),
                                           tmp_path / "ee.onnx"))
    ref = model.infer(x[:5], MaxProb(0.5, temperature=0.05))
    assert torch.equal(graph.infer(x[:5]).exit_index, ref.exit_index)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_sdn_head_mix_exports_as_its_lerp_branch(alpha, tmp_path):
    """The exported SDN head writes only the branch torch.lerp takes for its (constant) mix
    weight: few nodes, the same numbers."""
    import onnx

    from splitexit.heads import make_head

    torch.manual_seed(5)
    head = make_head("sdn", (8, 12, 12), 10).eval()
    with torch.no_grad():
        head.alpha.fill_(alpha)
    x = torch.randn(3, 8, 12, 12)
    path = export_piece(head, x, tmp_path / "h.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Where" not in ops and "Less" not in ops
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(OrtPiece(path)(x)), head(x), atol=1e-5,
                                   rtol=1e-5)
