"""A dense multi-exit model on ONNX Runtime at batch 1, in a lean loop.

:class:`~splitexit.runtime.OrtProgram` runs the pieces through the shared exit loop, whose
batch bookkeeping (masks, payload selection, per-exit result assembly, input checks) costs,
on MESS's canvases at batch 1, about 0.2 ms: two thirds of the first piece itself.
:class:`DenseSteps` runs the same exported pieces for one sample at a time with only what a
single sample needs: the policy's statistic after each exit (numpy, the shared definition)
and the class map of the exit that answers. :func:`exit_test_graph` is the test and class map
as ONNX nodes (ArgMax: the first maximum, as :meth:`NumpyOps.classes` picks), for timing that
alternative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..policies.base import _per_exit
from ..policies.dense import MeanConfidence, PixelShare
from ..runtime.arrays import one_float32_sample

__all__ = ["DenseSteps", "exit_test_graph"]


def _test_nodes(policy, e: int, logits: str) -> tuple[list, list, str]:
    """Nodes computing ``policy``'s test at exit ``e`` on a ``(1, C, H, W)`` logit map: the
    pixel confidence ``1 / sum_k exp(z_k - max_k z)``, then its mean (meanconf) or the share
    of pixels at or above ``pixel_threshold`` (pixelshare), at or above the threshold."""
    nodes, inits = [], []

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"t{e}_{name}"))
        return f"t{e}_{name}"

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"t{e}_{name}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    z = logits
    t = _per_exit(policy.temperature, e)
    if t != 1.0:
        z = node("Div", [z, const("temperature", t)], "scaled")
    top = node("ReduceMax", [z], "top", axes=[1], keepdims=1)
    total = node("ReduceSum", [node("Exp", [node("Sub", [z, top], "shifted")], "exp"),
                               const("axes", [1], np.int64)], "sum", keepdims=0)
    confidence = node("Reciprocal", [total], "confidence")  # (1, H, W)
    if isinstance(policy, PixelShare):
        confident = node("GreaterOrEqual", [confidence, const("pixel", policy.pixel_threshold)],
                         "confident")
        confidence = node("Cast", [confident], "share", to=TensorProto.FLOAT)
    stat = node("ReduceMean", [node("Flatten", [confidence], "flat", axis=1)], "stat",
                axes=[1], keepdims=0)
    fire = node("GreaterOrEqual", [stat, const("threshold", _per_exit(policy.threshold, e))],
                "fire")
    return nodes, inits, fire


def exit_test_graph(policy, e: int, shape, path: str | Path) -> Path:
    """The exit test of ``policy`` at exit ``e`` and the class map, alone: a graph from a
    logit map of ``shape`` ``(1, C, H, W)`` to ``classes`` and ``exit`` (for timing them)."""
    nodes, inits, fire = _test_nodes(policy, e, "logits")
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [*nodes, helper.make_node("Identity", [fire], ["exit"]),
         helper.make_node("ArgMax", ["logits"], ["classes"], axis=1, keepdims=0)],
        "dense_exit_test", [info("logits", TensorProto.FLOAT, list(shape))],
        [info("classes", TensorProto.INT64, [1, *shape[2:]]), info("exit", TensorProto.BOOL, [1])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return Path(path)


class DenseSteps:
    """A dense multi-exit model's exit program on ONNX Runtime at batch 1, with the lean loop
    of the module docstring.

    Each piece's graph answers the payload for the next piece and its exit's logit map; the
    policy's own statistic (numpy, the definition every runtime shares) decides, and only the
    exit that answers computes its class map (:meth:`NumpyOps.classes`). Measured on MESS's
    canvases, the statistic and the class map cost less in numpy than as graph nodes
    (:func:`exit_test_graph` builds those, for comparison).

    Args:
        model: a dense :class:`~splitexit.multiexit.MultiExitModel` (heads must not take the
            previous exit's logits).
        policy: a :class:`MeanConfidence` or :class:`PixelShare` policy (per-exit thresholds
            and temperatures are honoured).
        directory: where the graphs are written.
        example: one input batch (zeros of the model's input shape when ``None``).
        threads: ONNX Runtime intra-op threads.

    Raises:
        InputError: another policy, a model that is not dense, or cascading heads.
    """

    def __init__(self, model, policy, directory: str | Path, example: torch.Tensor | None = None,
                 threads: int | None = 1):
        from ..program import export_pieces, lower
        from ..runtime.ort import OrtSession

        if type(policy) not in (MeanConfidence, PixelShare):
            raise InputError(f"DenseSteps tests meanconf and pixelshare policies, got "
                             f"{getattr(policy, 'name', policy)!r}; use "
                             "splitexit.runtime.OrtProgram for others")
        if not getattr(model, "dense", False):
            raise InputError("DenseSteps runs dense (segmentation) models; use the exit graph "
                             "(splitexit.export.export_exit_graph) for classifiers")
        program = lower(model, policy, example=example)
        if program.has_server or any(p.takes_previous for p in program.pieces):
            raise InputError("DenseSteps needs a whole model on one side without cascading "
                             "heads; use splitexit.runtime.OrtProgram")
        policy.check_exits(program.num_exits)
        self.policy = policy
        self.input_shape = tuple(program.input_shape)
        files = export_pieces(program, Path(directory), dynamic_batch=False)
        exit_of = {k: e for e, k in enumerate(program.exit_stages)}
        last = len(files) - 1
        self._runs = []
        for k, path in enumerate(files):
            session = OrtSession(path, threads=threads)
            e = exit_of.get(k)
            # the test's temperature and threshold at this exit, resolved once
            test = None if e is None or k == last else (
                _per_exit(policy.temperature, e), _per_exit(policy.threshold, e))
            self._runs.append((session._sess_run, list(session.output_names),
                               list(session.input_names), e, k == last, test))

    def step_calls(self, x: np.ndarray) -> list:
        """Zero-argument calls running each piece's graph alone on sample ``x``'s payload (as
        :meth:`infer` would reach it, every piece taken): for timing the pieces one by one."""
        payload, calls = [self._check(x)], []
        for run, outputs, inputs, e, _final, _test in self._runs:
            feed = {name: payload[int(name[2:])] for name in inputs}
            calls.append(lambda run=run, outputs=outputs, feed=feed: run(outputs, feed, None))
            outs = run(outputs, feed, None)
            payload = outs if e is None else outs[:-1]
        return calls

    def _check(self, x) -> np.ndarray:
        return one_float32_sample(x, self.input_shape, "DenseSteps")

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """One sample through the pieces until an exit's test fires (or the final exit):
        ``(class map (1, H, W) int64, exit index)``."""
        from ..runtime.arrays import NUMPY

        payload = [self._check(x)]
        statistic = self.policy.statistic
        for run, outputs, inputs, e, final, test in self._runs:
            outs = run(outputs, {name: payload[int(name[2:])] for name in inputs}, None)
            if e is None:
                payload = outs
                continue
            logits = outs[-1]
            if final:
                return NUMPY.classes(logits), e
            temperature, threshold = test
            z = logits if temperature == 1.0 else logits / np.float32(temperature)
            if statistic(z)[0] >= threshold:
                return NUMPY.classes(logits), e
            payload = outs[:-1]
        raise AssertionError("unreachable: the final exit always answers")
