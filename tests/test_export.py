"""ONNX export of every piece and ONNX Runtime parity: stages, heads, halves, tuple payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from splitexit.errors import CorruptFileError, InputError
from splitexit.export import OrtPiece, export_piece
from splitexit.runtime.ort import OrtSession
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


@pytest.mark.parametrize("name", list_models(task="classification"))
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


@pytest.mark.parametrize("name", list_models(task="classification"))
def test_device_and_server_halves_of_every_zoo_cut(name, tmp_path):
    torch.manual_seed(0)
    model = create_multiexit(name, 10, _shape(name)).eval()
    x = torch.randn(2, *_shape(name))
    assert model.backbone.cut_names
    for k, cut in enumerate(model.backbone.cut_names):
        device, server = model.backbone.split(cut)
        with torch.no_grad():
            mid = device(x)
            assert torch.equal(server(mid), model.backbone(x))
            _close(OrtPiece(export_piece(device, x, tmp_path / f"d{k}.onnx"))(x), mid)
            _close(OrtPiece(export_piece(server, mid, tmp_path / f"s{k}.onnx"))(mid),
                   server(mid))


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


# exit programs on ONNX Runtime: the pieces and the batch-1 exit graph ---------------------
from splitexit.deploy import bundle, load_bundle  # noqa: E402
from splitexit.export import export_exit_graph, parity  # noqa: E402
from splitexit.heads import create_head  # noqa: E402
from splitexit.multiexit import MultiExitModel  # noqa: E402
from splitexit.policies import Entropy, Margin, MaxProb, NeverExit, Patience  # noqa: E402
from splitexit.program import lower  # noqa: E402


def _median_policy(model, x) -> MaxProb:
    """A max-prob threshold at which about half the samples leave at each early exit."""
    with torch.no_grad():
        logits = model(x)
    stats = [MaxProb().statistic(lg).median().item() for lg in logits[:-1]]
    return MaxProb(threshold=tuple(stats))


def _ort(model, directory, policy=None, cut=None, exit_graph=False, example=None):
    """``model`` lowered to its exit program, every piece exported, run on ONNX Runtime;
    with ``exit_graph``, also the batch-1 exit graph of ``policy``."""
    program = lower(model, policy, cut, example)
    return program.on_onnx_runtime(directory, exit_graph=exit_graph), program


def _assert_same(got, ref, logits=True) -> None:
    assert torch.equal(got.exit_index, ref.exit_index)
    assert torch.equal(got.predictions, ref.predictions)
    if logits:
        torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("name", list_models(task="classification"))
def test_pieces_match_pytorch_infer(name, tmp_path):
    torch.manual_seed(1)
    model = create_multiexit(name, 10, _shape(name)).eval()
    x = torch.rand(24, *_shape(name))
    runtime, _ = _ort(model, tmp_path)
    for policy in (_median_policy(model, x), Patience(patience=1), NeverExit()):
        report = parity(model, runtime, x, policy)
        assert report["same_predictions"] == 1.0 and report["same_exits"] == 1.0, policy
        assert report["max_abs_logit_diff"] < ATOL
        _assert_same(runtime.infer(x, policy), model.infer(x, policy))
    # numpy in, numpy out: the same decisions (the statistic on numpy arrays); thresholds
    # between two samples' statistics, as a median one may tie to the last float bit
    for policy in (_off_median(MaxProb, model, x, temperature=0.02), Patience(patience=1)):
        got = runtime.infer(x.numpy(), policy)
        assert isinstance(got.exit_index, np.ndarray)
        np.testing.assert_array_equal(got.exit_index, model.infer(x, policy).exit_index.numpy())
    counts = torch.bincount(runtime.infer(x, _median_policy(model, x)).exit_index)
    assert (counts > 0).sum() >= 2  # the batch really shrank at an early exit
    torch.testing.assert_close(runtime.forward(x)[-1], model.backbone(x), atol=ATOL, rtol=1e-4)


def test_cascading_heads_and_patience_on_pieces(tmp_path):
    torch.manual_seed(6)
    model = create_multiexit("resnet8", 10, (1, 12, 12), head="cascading").eval()
    with torch.no_grad():
        for head in model.heads[1:]:
            head.previous.weight.normal_(0, 0.5)  # the previous logits really matter
    x = torch.rand(20, 1, 12, 12)
    runtime, program = _ort(model, tmp_path)
    assert any(p.takes_previous for p in program.pieces)
    for policy in (_median_policy(model, x), Patience(patience=1), Patience(patience=2),
                   _off_median(Entropy, model, x, temperature=0.02)):
        report = parity(model, runtime, x, policy)
        assert report["same_exits"] == 1.0 and report["same_predictions"] == 1.0, policy
        assert report["max_abs_logit_diff"] < ATOL
    # no batch-1 exit graph for cascading heads: the error says what to run instead
    with pytest.raises(InputError, match="OrtProgram"):
        export_exit_graph(model, MaxProb(0.5), tmp_path / "ee.onnx")


def test_tuple_payload_pieces_match_pytorch(tmp_path):
    """A head on one tensor of a two-tensor cut inside a residual block: the pieces carry the
    tuple payload between them."""
    torch.manual_seed(7)
    staged = StagedModel.from_module(ResNet(10, 1), ["stem", "block1.conv1", "block1"])
    shapes = staged.payload_shapes(torch.zeros(1, 1, 12, 12))
    heads = {"stem": create_head("linear", shapes["stem"][0], 10),
             "block1.conv1@1": create_head("linear", shapes["block1.conv1"][1], 10)}
    model = MultiExitModel(staged, heads, (1, 12, 12)).eval()
    x = torch.rand(16, 1, 12, 12)
    runtime, program = _ort(model, tmp_path, exit_graph=True,
                            policy=_off_median(MaxProb, model, x, temperature=0.02))
    assert max(len(p.outputs) for p in program.pieces) == 2
    assert len(runtime.pieces[2].input_names) == 2
    for policy in (program.policy, Patience(patience=1), NeverExit()):
        report = parity(model, runtime, x, policy)
        assert report["same_exits"] == 1.0 and report["max_abs_logit_diff"] < ATOL, policy
    ref = model.infer(x, program.policy)
    for i in range(len(x)):  # batch 1 through the exit graph
        got = runtime.infer(x[i: i + 1], program.policy)
        assert got.exit_index.item() == ref.exit_index[i].item()
        assert got.predictions.item() == ref.predictions[i].item()


def test_split_run_until_and_finish_equal_unsplit(tmp_path):
    torch.manual_seed(2)
    model = create_multiexit("resnet8", 10, (1, 12, 12)).eval()
    x = torch.rand(16, 1, 12, 12)
    policy = _median_policy(model, x)
    ref = model.infer(x, policy)
    runtime, program = _ort(model, tmp_path / "whole")
    # the one loop cut after every piece: device half, then server half
    for end in range(len(program.pieces) + 1):
        run = runtime.run_until(x, policy, end)
        device_exits = [e for e, k in enumerate(runtime.exit_stages) if k < end]
        # exactly the samples PyTorch exits on the device side have left
        assert len(run.active) == int((~torch.isin(ref.exit_index,
                                                   torch.tensor(device_exits))).sum())
        _assert_same(runtime.finish(run, policy), ref, logits=False)
    # a program lowered with a cut: the device pieces keep their local exits, the server
    # piece ends at the final exit; the split run equals the unsplit one of the same program
    scalar = MaxProb(threshold=float(min(policy.threshold)))
    for cut in model.backbone.cut_names[:-1]:
        split, lowered = _ort(model, tmp_path / cut, scalar, cut)
        assert lowered.cut == cut and lowered.device_pieces < len(lowered.pieces)
        local = model.keep_exits([e for e in range(len(model.heads))
                                  if model.exit_stages[e] <= model.backbone.cut_index(cut)])
        want = local.infer(x, scalar)
        run = split.run_until(x, scalar, lowered.device_pieces)
        _assert_same(split.finish(run, scalar), want, logits=False)
        _assert_same(split.infer(x, scalar), want, logits=False)


def test_batch_of_one_and_numpy(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    runtime, _ = _ort(model, tmp_path)
    x = torch.rand(5, 1, 8, 8)
    ref = model.infer(x, MaxProb(0.12))
    for i in range(5):
        got = runtime.infer(x[i: i + 1].numpy(), MaxProb(0.12))
        assert got.exit_index.item() == ref.exit_index[i].item()
        assert got.predictions.item() == ref.predictions[i].item()


def test_bad_input_unknown_cut_and_missing_or_corrupt_files(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    runtime, _ = _ort(model, tmp_path / "p")
    with pytest.raises(InputError, match="shape"):
        runtime.infer(torch.rand(2, 1, 9, 9), MaxProb(0.5))
    with pytest.raises(InputError, match="NaN"):
        runtime.infer(torch.full((2, 1, 8, 8), float("nan")), MaxProb(0.5))
    with pytest.raises(InputError, match="unknown cut"):
        lower(model, MaxProb(0.5), "nope")
    with pytest.raises(InputError, match="unknown cut"):
        bundle(model, tmp_path / "b0", cut="nope", measure=False)
    with pytest.raises(InputError, match="export the piece first"):
        OrtSession(tmp_path / "p" / "missing.onnx")
    (tmp_path / "p" / "piece0.onnx").write_bytes(b"not a graph")
    with pytest.raises(CorruptFileError):
        OrtSession(tmp_path / "p" / "piece0.onnx")
    # a bundle: a missing or altered file is refused before anything runs
    b = bundle(model, tmp_path / "b", policy=MaxProb(0.5), measure=False)
    (b / "device" / "piece0.onnx").write_bytes(b"not a graph")
    with pytest.raises(CorruptFileError, match="checksum"):
        load_bundle(b)
    (b / "device" / "piece0.onnx").unlink()
    with pytest.raises(CorruptFileError, match="missing"):
        load_bundle(b)


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
def test_exit_graph_matches_pytorch_infer(name, tmp_path):
    torch.manual_seed(3)
    model = create_multiexit(name, 10, (1, 12, 12)).eval()
    x = torch.rand(30, 1, 12, 12)
    # sharp temperatures spread the near-uniform softmax of an untrained model
    for k, policy in enumerate((_off_median(MaxProb, model, x, temperature=0.02),
                                _off_median(Entropy, model, x, temperature=(0.02, 0.03, 0.025)),
                                _off_median(Margin, model, x, temperature=0.02))):
        runtime, _ = _ort(model, tmp_path / str(k), policy, exit_graph=True)
        ref = model.infer(x, policy)
        # batch 1 runs the exit graph (the statistic lowered to ONNX); the batch runs the
        # pieces with the statistic on numpy: the same decisions
        assert runtime._uses_graph(x[:1].numpy(), policy)
        singles = [runtime.infer(x[i: i + 1].numpy(), policy) for i in range(len(x))]
        graph = type(ref)(torch.from_numpy(np.concatenate([r.predictions for r in singles])),
                          torch.from_numpy(np.concatenate([r.exit_index for r in singles])),
                          torch.from_numpy(np.concatenate([r.logits for r in singles])))
        for got in (graph, runtime.infer(x, policy)):
            _assert_same(got, ref)
            if isinstance(policy, MaxProb):  # an untrained model's max-prob still spreads
                assert len(torch.unique(got.exit_index)) >= 2


def test_exit_graph_rejects_stateful_policies_and_foreign_files(tmp_path):
    model = create_multiexit("mlp", 10, (1, 8, 8)).eval()
    with pytest.raises(InputError, match="OrtProgram"):
        export_exit_graph(model, Patience(patience=1), tmp_path / "p.onnx")
    with pytest.raises(InputError, match="without a cut"):
        export_exit_graph(lower(model, MaxProb(0.5), "fc1"), None, tmp_path / "c.onnx")
    # a bundle whose exit graph is some other graph is refused when its program is built
    b = bundle(model, tmp_path / "b", policy=MaxProb(0.5), measure=False)
    export_piece(nn.Linear(4, 2), torch.randn(2, 4), b / "device" / "exits.onnx")
    with pytest.raises(CorruptFileError, match="exits.onnx"):
        load_bundle(b, verify=False).program()
    # a policy other than the exit graph's runs the pieces
    runtime, _ = _ort(model, tmp_path / "g", MaxProb(0.5), exit_graph=True)
    assert not runtime._uses_graph(torch.rand(1, 1, 8, 8), MaxProb(0.4))
    x = torch.rand(4, 1, 8, 8)
    for i in range(4):
        got = runtime.infer(x[i: i + 1], Patience(patience=1))
        assert got.exit_index.item() == model.infer(x[i: i + 1], Patience(patience=1)
                                                    ).exit_index.item()


@pytest.mark.parametrize("head", ["sdn", "pool", "linear", "depthwise"])
def test_every_head_type_exports_and_runs_on_onnx_runtime(head, tmp_path):
    """28x28 maps take the heads' fixed-kernel pooling path: it must export too."""
    torch.manual_seed(4)
    model = create_multiexit("resnet8", 10, (1, 28, 28), head=head).eval()
    x = torch.rand(9, 1, 28, 28)
    b = load_bundle(bundle(model, tmp_path / "b", policy=MaxProb(0.5, temperature=0.05),
                           example=x[:2], measure=False))
    report = parity(model, b.program(exit_graph=False), x, _median_policy(model, x))
    assert report["same_exits"] == 1.0 and report["max_abs_logit_diff"] < ATOL
    graph = b.program()
    assert graph.exit_graph is not None
    ref = model.infer(x[:5], b.policy)
    for i in range(5):
        assert graph.infer(x[i: i + 1].numpy(), b.policy).exit_index.item() == \
            ref.exit_index[i].item()


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_sdn_head_mix_exports_as_its_lerp_branch(alpha, tmp_path):
    """The exported SDN head writes only the branch torch.lerp takes for its (constant) mix
    weight: few nodes, the same numbers."""
    import onnx

    torch.manual_seed(5)
    head = create_head("sdn", (8, 12, 12), 10).eval()
    with torch.no_grad():
        head.alpha.fill_(alpha)
    x = torch.randn(3, 8, 12, 12)
    path = export_piece(head, x, tmp_path / "h.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Where" not in ops and "Less" not in ops
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(OrtPiece(path)(x)), head(x), atol=1e-5,
                                   rtol=1e-5)


def test_exit_graph_maps_piece_inputs_by_name_when_one_is_unused(tmp_path):
    """A stage that ignores a tensor of its payload: the exporter drops that input, and the
    batch-1 exit graph must still feed each remaining input its own tensor."""
    from splitexit.export.exit_graph import export_exit_graph
    from splitexit.heads import create_head
    from splitexit.multiexit import MultiExitModel
    from splitexit.policies import MaxProb
    from splitexit.stages import Stage

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return x, self.conv(x)

    class UsesSecond(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, a, b):
            return self.fc(b.flatten(1))

    torch.manual_seed(0)
    staged = StagedModel([Stage(Two(), "two"), Stage(UsesSecond(), "out", num_inputs=2)], ["two"])
    model = MultiExitModel(staged, {"two@1": create_head("linear", (4, 8, 8), 3)},
                           input_shape=(1, 8, 8)).eval()
    x, policy = torch.rand(6, 1, 8, 8), MaxProb(0.5)
    session = OrtSession(export_exit_graph(model, policy, tmp_path / "exits.onnx"))
    for i in range(len(x)):
        logits, exit_index = session.run_arrays([x[i: i + 1].numpy()])
        ref = model.infer(x[i: i + 1], policy)
        assert int(exit_index[0]) == int(ref.exit_index[0])
        assert np.allclose(logits, ref.logits.numpy(), atol=1e-5)
