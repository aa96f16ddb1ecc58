"""The batch-1 exit graph: an exit program and its policy's threshold test in one ONNX graph.

Piece 0, then ``If confident: return its logits else: piece 1, ...``: one ONNX Runtime call
per sample, and only the pieces a sample needs run. The test is the policy's own statistic
(:mod:`splitexit.policies`), lowered to ONNX nodes by :class:`OnnxOps` from the same
definition the numpy and torch runtimes use. :class:`~splitexit.runtime.OrtProgram` runs it
for single samples (and the per-piece graphs for batches and other policies); a bundle
(:mod:`splitexit.deploy`) carries both forms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..policies import ThresholdPolicy, _per_exit, has_graph_statistic
from ..runtime.arrays import check_grid
from .onnx import DEFAULT_OPSET

__all__ = ["export_exit_graph", "decision_nodes", "class_map_nodes", "OnnxOps"]


def _renamed(model: onnx.ModelProto, prefix: str, inputs: dict[str, str]
             ) -> tuple[list, list, list[str]]:
    """Nodes and initializers of ``model`` with every name prefixed; inputs mapped to ``inputs``."""
    g = model.graph
    rename = dict(inputs)
    for init in g.initializer:
        rename[init.name] = prefix + init.name
    for node in g.node:
        for o in node.output:
            if o:
                rename[o] = prefix + o
    nodes = []
    for i, node in enumerate(g.node):
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = f"{prefix}{node.name or i}"
        new.input[:] = [rename.get(n, n) if n else n for n in node.input]
        new.output[:] = [rename[n] if n else n for n in node.output]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            raise InputError(f"segment {prefix!r} already has control flow ({node.op_type}); "
                             "the single-graph export needs plain segments")
        nodes.append(new)
    inits = []
    for init in g.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = prefix + init.name
        inits.append(new)
    outputs = [rename[o.name] for o in g.output]
    return nodes, inits, outputs


class OnnxOps:
    """The statistic primitives of :mod:`splitexit.runtime.arrays` as ONNX nodes.

    Each call appends nodes (and constant initializers) and returns the name of its output,
    so a statistic written once in :mod:`splitexit.policies` (``statistic_fn(ops, z)``)
    becomes a graph. Rows are samples, axis 1 classes, as everywhere else.
    """

    def __init__(self, prefix: str, shape=None):
        self.prefix = prefix
        #: the logits' shape when known (``(1, C, H, W)`` for a dense map): the pixel grid's
        #: slice and the pixel mean's axes need it
        self.shape = None if shape is None else tuple(int(d) for d in shape)
        self.nodes: list = []
        self.inits: list = []
        self._bool: set[str] = set()  # outputs of comparisons, cast by float32
        self._n = 0

    def _name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}{what}{self._n}"

    def const(self, value, dtype=np.float32) -> str:
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def _node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def softmax(self, z):
        return self._node("Softmax", [z], axis=1)

    def log_softmax(self, z):
        return self._node("LogSoftmax", [z], axis=1)

    def amax(self, z, keepdims: bool = False):
        return self._node("ReduceMax", [z], axes=[1], keepdims=int(keepdims))

    def sum(self, z):
        return self._node("ReduceSum", [z, self.const([1], np.int64)], keepdims=0)

    def exp(self, z):
        return self._node("Exp", [z])

    def mul(self, a, b):
        return self._node("Mul", [a, b])

    def neg(self, a):
        return self._node("Neg", [a])

    def sub(self, a, b):
        return self._node("Sub", [a, b])

    def reciprocal(self, a):
        return self._node("Reciprocal", [a])

    def at_least(self, a, value: float):
        out = self._node("GreaterOrEqual", [a, self.const(value)])
        self._bool.add(out)
        return out

    def float32(self, z):
        """Logits are float32 already; a comparison's booleans are cast."""
        return self._node("Cast", [z], to=TensorProto.FLOAT) if z in self._bool else z

    def _dense(self, what: str) -> bool:
        """Whether the logits are a dense map (rank 4); the shape must be known."""
        if self.shape is None:
            raise InputError(f"lowering {what} needs the logit map's shape: build "
                             "OnnxOps(prefix, shape=(1, C, H, W))")
        return len(self.shape) == 4

    def grid(self, z, stride: int):
        """The strided pixel grid of :meth:`NumpyOps.grid`, as a Slice."""
        if stride == 1 or not self._dense(f"a pixel grid of stride {stride}"):
            return z
        check_grid(self.shape, stride)
        first = stride // 2
        return self._node("Slice", [z, self.const([first, first], np.int64),
                                    self.const(list(self.shape[2:]), np.int64),
                                    self.const([2, 3], np.int64),
                                    self.const([stride, stride], np.int64)])

    def pixel_mean(self, a):
        """The mean over the pixels of a per-pixel map ``(N, H, W)``; a per-sample ``(N,)``
        value (from ``(N, C)`` logits) is its own mean."""
        if not self._dense("a mean over pixels"):
            return a
        return self._node("ReduceMean", [a], axes=[1, 2], keepdims=0)

    def top2(self, z):
        top, idx = self._name("top"), self._name("topi")
        self.nodes.append(helper.make_node("TopK", [z, self.const([2], np.int64)], [top, idx],
                                           axis=1))
        first, second = self._name("first"), self._name("second")
        self.nodes.append(helper.make_node("Split", [top, self.const([1, 1], np.int64)],
                                           [first, second], axis=1))
        axes = self.const([1], np.int64)
        return (self._node("Squeeze", [first, axes]), self._node("Squeeze", [second, axes]))


def decision_nodes(policy: ThresholdPolicy, e: int, logits: str, prefix: str, shape=None,
                   out: str | None = None) -> tuple[list, list, str]:
    """Nodes computing the boolean "exit now" at exit ``e`` for ``logits``: the policy's own
    statistic (``policy.statistic_over``, the definition numpy and torch run) lowered to ONNX,
    then its threshold test, compared in float32 as the runtimes compare a float32 statistic
    with a Python float. ``shape``: the logits' shape, needed by the dense policies (a
    ``(1, C, H, W)`` map). Returns the nodes, their initializers and the name of the boolean
    output (``out`` when given, else ``prefix + "fire"``).

    Raises:
        InputError: a policy without a graph form, or a dense one without ``shape``.
    """
    if not has_graph_statistic(policy):
        raise InputError(f"no graph form of the {policy.name!r} policy (max-prob, entropy, "
                         "margin, meanconf and pixelshare have one)")
    ops = OnnxOps(prefix, shape)
    t = _per_exit(policy.temperature, e)
    scaled = logits if t == 1.0 else ops._node("Div", [logits, ops.const(t)])
    stat = policy.statistic_over(ops, scaled)
    compare = "GreaterOrEqual" if policy.higher_is_confident else "LessOrEqual"
    fire = out or prefix + "fire"
    ops.nodes.append(helper.make_node(compare, [stat, ops.const(_per_exit(policy.threshold, e))],
                                      [fire]))
    return ops.nodes, ops.inits, fire


def class_map_nodes(logits: str, out: str, dtype=np.int64) -> list:
    """Nodes answering ``out``, the class map of ``logits``: ArgMax over the classes (axis 1,
    the first maximum, as numpy's ``argmax``), ``int64`` or cast to ``uint8`` (a smaller
    answer, for up to 256 classes).

    Raises:
        InputError: another dtype.
    """
    dtype = np.dtype(dtype)
    if dtype == np.int64:
        return [helper.make_node("ArgMax", [logits], [out], axis=1, keepdims=0)]
    if dtype != np.uint8:
        raise InputError(f"a class map is int64 or uint8, got {dtype.name}")
    return [helper.make_node("ArgMax", [logits], [out + "_int64"], axis=1, keepdims=0),
            helper.make_node("Cast", [out + "_int64"], [out], to=TensorProto.UINT8)]


def _exit_constant(name: str, e: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array([e], dtype=np.int64), f"value_{name}"))


def _outputs(logits: str, exit_index: str, shape: list[int]) -> list:
    return [helper.make_tensor_value_info(logits, TensorProto.FLOAT, shape),
            helper.make_tensor_value_info(exit_index, TensorProto.INT64, [1])]


def _program(model, policy, example, what: str):
    """The device-only exit program of ``model`` (lowered when needed), checked for a graph
    form: a policy whose test lowers to ONNX nodes and no cascading heads."""
    from ..program import ExitProgram, lower

    program = model if isinstance(model, ExitProgram) else lower(model, policy, None, example)
    policy = policy or program.policy
    if program.has_server:
        raise InputError(f"the {what} covers a whole model on one side; lower it without a cut")
    if not has_graph_statistic(policy):
        raise InputError(f"the {what} supports max-prob, entropy, margin, meanconf and "
                         f"pixelshare policies, got {policy.name!r}; run the pieces "
                         "(splitexit.runtime.OrtProgram) for the others")
    if any(p.takes_previous for p in program.pieces) or any(
            getattr(h, "uses_previous", False) for h in program.model.heads):
        raise InputError("cascading heads need the previous logits; run the pieces "
                         "(splitexit.runtime.OrtProgram) instead of the single exit graph")
    return program, policy


def _export_segments(program, path: Path, opset: int) -> tuple[list[onnx.ModelProto], list[int]]:
    """Every piece as a batch-1 ONNX model with outputs ``(*payload, logits)`` (the last: the
    final logits); and the logits' shape, ``(1, C)`` or a dense ``(1, C, H, W)``, the same at
    every exit."""
    from ..program import export_pieces

    tmp = path.with_name(f"{path.stem}.pieces.tmp")
    files = export_pieces(program, tmp, opset, dynamic_batch=False)
    try:
        segments = [onnx.load(str(f)) for f in files]
    finally:
        for f in files:
            f.unlink()
        tmp.rmdir()
    shapes = {tuple(d.dim_value for d in seg.graph.output[-1].type.tensor_type.shape.dim)
              for seg in segments}
    if len(shapes) != 1 or not all(all(s) for s in shapes):
        raise InputError(f"the exits' logits have shapes {sorted(shapes)}; the single exit "
                         "graph needs one static shape at every exit")
    return segments, list(shapes.pop())


def _input_position(name: str, count: int) -> int:
    """Which payload tensor a piece's graph input ``in{k}`` is."""
    k = name[2:] if name.startswith("in") else ""
    if not k.isdigit() or int(k) >= count:
        raise InputError(f"a piece's ONNX input is named {name!r}; expected in0 .. "
                         f"in{count - 1} (pieces are exported by splitexit.program.export_pieces)")
    return int(k)


def export_exit_graph(model, policy: ThresholdPolicy | None, path: str | Path,
                      example: torch.Tensor | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Export a model with ``policy`` as one batch-1 ONNX graph that exits early by itself.

    Args:
        model: a multi-exit model (heads must not use the previous exit's logits) or an
            :class:`~splitexit.program.ExitProgram` without a cut.
        policy: a max-prob, entropy or margin policy, or for a dense model a meanconf or
            pixelshare one (per-exit thresholds and temperatures, and the pixel grid's
            ``stride``, are honoured); ``None`` takes the program's.
        path: the ``.onnx`` file; input ``x`` (1, ...), outputs ``logits`` (1, C) and
            ``exit_index`` (1,); a dense model's logits are its map (1, C, H, W), and a third
            output ``classes`` (1, H, W) is its class map (ArgMax over the classes, int64, the
            first maximum as numpy's), so a device reads the answer without a pass over the
            map.
        example: one input sample batch; zeros of the model's input shape if ``None``.
        opset: ONNX opset version.

    Raises:
        InputError: an unsupported policy or head, or a piece that does not export.
    """
    program, policy = _program(model, policy, example, "single-graph export")
    path = Path(path)
    segments, shape = _export_segments(program, path, opset)
    last = len(segments) - 1

    def build(e: int, inputs: list[str], logits_out: str, exit_out: str) -> tuple[list, list]:
        """Nodes and initializers running segments ``e..last`` on ``inputs``, answering
        ``logits_out`` and ``exit_out`` (named by the caller: no copy between the levels)."""
        prefix = f"e{e}_"
        seg = segments[e]
        # by name (in0, in1 ...: payload tensor k), not position: the exporter drops an
        # input the piece never reads, which shifts the ones after it
        mapping = {i.name: inputs[_input_position(i.name, len(inputs))] for i in seg.graph.input}
        nodes, inits, outs = _renamed(seg, prefix, mapping)
        if e == last:
            nodes += [helper.make_node("Identity", [outs[-1]], [logits_out]),
                      _exit_constant(exit_out, e)]
            return nodes, inits
        dec_nodes, dec_inits, fire = decision_nodes(policy, e, outs[-1], prefix + "d_", shape)
        then_logits, then_exit = f"then_logits_{e}", f"then_exit_{e}"
        then_graph = helper.make_graph(
            [helper.make_node("Identity", [outs[-1]], [then_logits]),
             _exit_constant(then_exit, e)],
            f"exit{e}", [], _outputs(then_logits, then_exit, shape))
        else_logits, else_exit = f"else_logits_{e}", f"else_exit_{e}"
        rest, rest_inits = build(e + 1, outs[:-1], else_logits, else_exit)
        # A segment's weights live in the branch that runs it: ONNX Runtime only folds and
        # re-lays-out (NCHWc) weights that are initializers of the graph using them.
        else_graph = helper.make_graph(rest, f"continue{e}", [],
                                       _outputs(else_logits, else_exit, shape),
                                       initializer=rest_inits)
        nodes += dec_nodes
        nodes.append(helper.make_node("If", [fire], [logits_out, exit_out],
                                      then_branch=then_graph, else_branch=else_graph))
        return nodes, inits + dec_inits

    x_info = segments[0].graph.input[0]
    nodes, inits = build(0, ["x"], "logits", "exit_index")
    outputs = _outputs("logits", "exit_index", shape)
    if len(shape) == 4:  # a dense map: its class map too
        nodes += class_map_nodes("logits", "classes")
        outputs.append(helper.make_tensor_value_info("classes", TensorProto.INT64,
                                                     [1, *shape[2:]]))
    x_shape = [d.dim_value for d in x_info.type.tensor_type.shape.dim]
    graph = helper.make_graph(
        nodes, "early_exit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        outputs, initializer=inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="splitexit")
    onnx_model.ir_version = segments[0].ir_version
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except Exception as exc:
        raise InputError(f"the composed early-exit graph fails onnx.checker: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_model, str(path))
    return path
