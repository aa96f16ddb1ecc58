"""Every exit statistic with a graph form is one definition over the array primitives: numpy,
torch and its ONNX lowering (OnnxOps) give the same values, dense maps and strides included."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from splitexit.errors import InputError
from splitexit.export.exit_graph import OnnxOps, class_map_nodes, decision_nodes
from splitexit.policies import Entropy, Margin, MaxProb, MeanConfidence, Patience, PixelShare
from splitexit.runtime.ort import OrtSession

POLICIES = [MaxProb(0.5), Entropy(0.5), Margin(0.2), MeanConfidence(0.5),
            MeanConfidence(0.5, stride=4), PixelShare(0.5, pixel_threshold=0.6),
            PixelShare(0.5, pixel_threshold=0.6, stride=3), MeanConfidence(0.5, stride=5)]


def _session(policy, shape, tmp_path, decide: bool):
    """A graph from logits of ``shape`` to the policy's statistic (and its decision)."""
    ops = OnnxOps("s_", shape)
    stat = policy.statistic_over(ops, "z")
    nodes, inits = ops.nodes, ops.inits
    outputs = [helper.make_tensor_value_info(stat, TensorProto.FLOAT, [shape[0]])]
    if decide:
        d_nodes, d_inits, fire = decision_nodes(policy, 0, "z", "d_", shape)
        nodes, inits = [*nodes, *d_nodes], [*inits, *d_inits]
        outputs.append(helper.make_tensor_value_info(fire, TensorProto.BOOL, [shape[0]]))
    graph = helper.make_graph(nodes, "statistic",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{policy.name}.onnx"
    onnx.save(model, str(path))
    return OrtSession(path)


CASES = [(p, (1, 6)) for p in POLICIES] + [(p, (1, 5, 13, 11)) for p in POLICIES
                                            if isinstance(p, (MeanConfidence, PixelShare))]


@pytest.mark.parametrize(("policy", "shape"), CASES,
                         ids=lambda c: c.name if hasattr(c, "name") else "x".join(map(str, c)))
def test_numpy_torch_and_onnx_compute_one_statistic(policy, shape, tmp_path):
    rng = np.random.default_rng(0)
    session = _session(policy, shape, tmp_path, decide=True)
    for scale in (0.3, 1.0, 4.0):
        z = (rng.standard_normal(shape) * scale).astype(np.float32)
        stat, fire = session.run_arrays([z])
        want = policy.statistic(z)
        np.testing.assert_allclose(stat, want, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(policy.statistic(torch.from_numpy(z)).numpy(), want,
                                   rtol=2e-6, atol=1e-6)
        higher = policy.higher_is_confident
        assert bool(fire[0]) == bool(want[0] >= 0.5 if higher else want[0] <= 0.5) or \
            abs(float(want[0]) - 0.5) < 1e-6


def test_the_dense_lowering_reads_the_grid_and_casts_shares(tmp_path):
    # a map whose grid pixels (rows/columns 1, 3) are confident and the others are not
    z = np.zeros((1, 3, 4, 4), np.float32)
    z[0, 0, 1::2, 1::2] = 10.0
    strided, full = MeanConfidence(0.5, stride=2), MeanConfidence(0.5)
    (got,), _ = _session(strided, z.shape, tmp_path, decide=True).run_arrays([z])
    assert got > 0.99 and got == pytest.approx(float(strided.statistic(z)[0]))
    (every,), _ = _session(full, z.shape, tmp_path, decide=True).run_arrays([z])
    assert every == pytest.approx(0.25 * got + 0.75 / 3, rel=1e-5)
    share = PixelShare(0.5, pixel_threshold=0.9)
    ops = OnnxOps("p_", z.shape)
    share.statistic_over(ops, "z")
    assert [n.op_type for n in ops.nodes].count("Cast") == 1  # the booleans become a share
    (value,), _ = _session(share, z.shape, tmp_path, decide=True).run_arrays([z])
    assert value == pytest.approx(0.25)


def test_lowering_errors_say_what_to_do():
    with pytest.raises(InputError, match="OnnxOps\\(prefix, shape"):
        decision_nodes(MeanConfidence(0.5, stride=2), 0, "z", "d_")
    with pytest.raises(InputError, match="use a smaller stride"):
        decision_nodes(MeanConfidence(0.5, stride=8), 0, "z", "d_", (1, 3, 4, 4))
    with pytest.raises(InputError, match="no graph form"):
        decision_nodes(Patience(), 0, "z", "d_", (1, 3))
    with pytest.raises(InputError, match="int64 or uint8"):
        class_map_nodes("z", "classes", np.float32)
