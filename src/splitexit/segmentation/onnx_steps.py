"""A dense multi-exit model on ONNX Runtime at batch 1, in a lean loop.

:class:`~splitexit.runtime.OrtProgram` runs the pieces through the shared exit loop, whose
batch bookkeeping (masks, payload selection, per-exit result assembly, input checks) costs,
on MESS's canvases at batch 1, about 0.2 ms: two thirds of the first piece itself.
:class:`DenseSteps` runs the same exported pieces for one sample at a time with only what a
single sample needs. Each piece's graph carries its exit's test (the policy's statistic and
threshold, lowered from the policy's one definition by
:func:`~splitexit.export.exit_graph.decision_nodes`) and the class map of its logit map (ArgMax: the first
maximum, as :meth:`NumpyOps.classes` picks, cast to ``uint8``): one call answers the exit
boolean, the class map and the payload for the next piece, and the loop reads only the
boolean.
:func:`exit_test_graph` is the test and class map alone, for timing them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import InputError
from ..export.exit_graph import class_map_nodes, decision_nodes
from ..policies.dense import DENSE_POLICIES
from ..runtime.arrays import NUMPY, one_float32_sample

__all__ = ["DenseSteps", "exit_test_graph", "class_map_dtype"]

CLASS_MAPS = ("graph", "numpy")


def class_map_dtype(num_classes: int) -> type:
    """The dtype of a graph's class map: ``uint8`` up to 256 classes, else ``int64``."""
    return np.uint8 if num_classes <= 256 else np.int64


def _map_info(name: str, shape) -> onnx.ValueInfoProto:
    dtype = class_map_dtype(shape[1])
    return helper.make_tensor_value_info(
        name, TensorProto.UINT8 if dtype is np.uint8 else TensorProto.INT64,
        [shape[0], *shape[2:]])


def exit_test_graph(policy, e: int, shape, path: str | Path) -> Path:
    """The exit test of ``policy`` at exit ``e`` and the class map, alone: a graph from a
    logit map of ``shape`` ``(1, C, H, W)`` to ``classes`` and ``exit`` (for timing them)."""
    nodes, inits, _ = decision_nodes(policy, e, "logits", f"t{e}_", shape, "exit")
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [*nodes, *class_map_nodes("logits", "classes", class_map_dtype(shape[1]))],
        "dense_exit_test", [info("logits", TensorProto.FLOAT, list(shape))],
        [_map_info("classes", shape), info("exit", TensorProto.BOOL, [1])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return Path(path)


def _answering(path: Path, policy, e: int | None, final: bool, class_map: str) -> Path:
    """Rewrite piece graph ``path`` to answer, in this order: ``exit`` (the test at exit
    ``e``; not at the final exit), the class map ``classes`` (``class_map="graph"``) or the
    ``logits``, then the payload ``out0, ...``. A piece without an exit is left alone."""
    if e is None:
        return path
    model = onnx.load(str(path))
    g = model.graph
    outputs = {o.name: o for o in g.output}
    shape = [d.dim_value for d in outputs["logits"].type.tensor_type.shape.dim]
    if len(shape) != 4 or not all(shape):
        raise InputError(f"DenseSteps needs each exit's logit map of a static shape "
                         f"(1, C, H, W), got {shape} in {path.name}")
    answer = [outputs["logits"]]
    if class_map == "graph":
        g.node.extend(class_map_nodes("logits", "classes", class_map_dtype(shape[1])))
        answer = [_map_info("classes", shape)]
    test = []
    if not final:
        nodes, inits, _ = decision_nodes(policy, e, "logits", f"t{e}_", shape, "exit")
        g.node.extend(nodes)
        g.initializer.extend(inits)
        test = [helper.make_tensor_value_info("exit", TensorProto.BOOL, [1])]
    payload = [o for o in g.output if o.name != "logits"]
    del g.output[:]
    g.output.extend([*test, *answer, *payload])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


class DenseSteps:
    """A dense multi-exit model's exit program on ONNX Runtime at batch 1, with the lean loop
    of the module docstring.

    Each piece with an exit answers its exit test, its class map and the payload for the next
    piece in one call; the loop reads the boolean and returns the class map of the exit that
    fires (the final exit's when none does). With ``class_map="numpy"`` the graphs answer the
    logit map instead and only the exit that answers computes its class map
    (:meth:`NumpyOps.classes`, int64), for comparison.

    Args:
        model: a dense :class:`~splitexit.multiexit.MultiExitModel` (heads must not take the
            previous exit's logits).
        policy: a :class:`MeanConfidence` or :class:`PixelShare` policy (per-exit thresholds
            and temperatures and the pixel grid's ``stride`` are honoured).
        directory: where the graphs are written.
        example: one input batch (zeros of the model's input shape when ``None``).
        threads: ONNX Runtime intra-op threads.
        class_map: ``"graph"`` (ArgMax in the graph, ``uint8`` up to 256 classes) or
            ``"numpy"``.

    Raises:
        InputError: another policy, a model that is not dense, cascading heads, or an unknown
            ``class_map``.
    """

    def __init__(self, model, policy, directory: str | Path, example: torch.Tensor | None = None,
                 threads: int | None = 1, class_map: str = "graph"):
        from ..program import export_pieces, lower
        from ..runtime.ort import OrtSession

        if type(policy) not in DENSE_POLICIES:
            raise InputError(f"DenseSteps tests meanconf and pixelshare policies, got "
                             f"{getattr(policy, 'name', policy)!r}; use "
                             "splitexit.runtime.OrtProgram for others")
        if not getattr(model, "dense", False):
            raise InputError("DenseSteps runs dense (segmentation) models; use the exit graph "
                             "(splitexit.export.export_exit_graph) for classifiers")
        if class_map not in CLASS_MAPS:
            raise InputError(f"class_map is one of {', '.join(CLASS_MAPS)}, got {class_map!r}")
        program = lower(model, policy, example=example)
        if program.has_server or any(p.takes_previous for p in program.pieces):
            raise InputError("DenseSteps needs a whole model on one side without cascading "
                             "heads; use splitexit.runtime.OrtProgram")
        policy.check_exits(program.num_exits)
        self.policy, self.class_map = policy, class_map
        self.input_shape = tuple(program.input_shape)
        files = export_pieces(program, Path(directory), dynamic_batch=False)
        exit_of = {k: e for e, k in enumerate(program.exit_stages)}
        last = len(files) - 1
        self._numpy = class_map == "numpy"
        self._runs = []
        for k, path in enumerate(files):
            e = exit_of.get(k)
            session = OrtSession(_answering(path, policy, e, k == last, class_map),
                                 threads=threads)
            # what the loop does after the call: 0 pass the payload on, 1 test, 2 answer
            kind = 0 if e is None else (2 if k == last else 1)
            self._runs.append((session._sess_run, list(session.output_names),
                               list(session.input_names), e, kind))

    def step_calls(self, x: np.ndarray) -> list:
        """Zero-argument calls running each piece's graph alone on sample ``x``'s payload (as
        :meth:`infer` would reach it, every piece taken): for timing the pieces one by one."""
        payload, calls = [self._check(x)], []
        for run, outputs, inputs, _e, kind in self._runs:
            feed = {name: payload[int(name[2:])] for name in inputs}
            calls.append(lambda run=run, outputs=outputs, feed=feed: run(outputs, feed, None))
            outs = run(outputs, feed, None)
            payload = outs[2:] if kind == 1 else outs
        return calls

    def _check(self, x) -> np.ndarray:
        return one_float32_sample(x, self.input_shape, "DenseSteps")

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """One sample through the pieces until an exit's test fires (or the final exit):
        ``(class map (1, H, W), exit index)``; the map is ``uint8`` (int64 beyond 256
        classes) from the graph, int64 with ``class_map="numpy"``."""
        payload = [self._check(x)]
        for run, outputs, inputs, e, kind in self._runs:
            outs = run(outputs, {name: payload[int(name[2:])] for name in inputs}, None)
            if kind == 0:
                payload = outs
                continue
            if kind == 1:
                if not outs[0][0]:  # the test did not fire: on to the next piece
                    payload = outs[2:]
                    continue
                answer = outs[1]
            else:
                answer = outs[0]
            return (NUMPY.classes(answer) if self._numpy else answer), e
        raise AssertionError("unreachable: the final exit always answers")
