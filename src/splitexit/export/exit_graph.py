"""Batch-1 early exits on ONNX Runtime with the exit decision inside the graphs.

At batch 1 the per-exit Python round trip of :class:`~splitexit.export.OrtExitPipeline`
(one ONNX Runtime call and one torch policy call per exit) costs as much as a small stage.
Two faster forms put the threshold test of a :class:`ThresholdPolicy` (max-prob, entropy or
margin, with per-exit thresholds and temperatures) into ONNX, after each exit's head:

- :func:`export_exit_graph` / :class:`OrtExitGraph`: one graph, segment 0, then
  ``If confident: return its logits else: segment 1, ...`` -- one call per sample.
- :func:`export_exit_chain` / :class:`OrtExitChain`: one plain graph per segment, each
  returning its payload, logits and the ``fire`` flag; Python only reads the flag. On ONNX
  Runtime's CPU provider an ``If`` node costs about as much as an exit head (its subgraph
  gets its own execution frame), and a chained call about as much as an ``If``; which form
  is faster depends on the model and the machine, so ``splitexit bench compress --parts
  exits`` times both (and every subset of exits) and keeps the faster.

Both run only the segments a sample needs and give the PyTorch model's exits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..errors import InputError
from ..multiexit import ExitResult, MultiExitModel, check_input
from ..policies import Entropy, Margin, MaxProb, ThresholdPolicy, _per_exit
from ..stages import payload_tensors
from .onnx import DEFAULT_OPSET, OrtPiece, export_piece

__all__ = ["export_exit_graph", "OrtExitGraph", "export_exit_chain", "OrtExitChain"]

CHAIN_FORMAT = "splitexit-exit-chain"


class _Segment(nn.Module):
    """Stages ``start..end`` of a backbone, then the exit head (if any): (*payload, logits)."""

    def __init__(self, stages: Sequence[nn.Module], head: nn.Module | None, num_inputs: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head
        self.num_inputs = num_inputs

    def forward(self, *tensors: torch.Tensor):
        payload = tensors[0] if self.num_inputs == 1 else tuple(tensors)
        for stage in self.stages:
            payload = stage(payload)
        if self.head is None:
            return payload_tensors(payload)[0]
        return (*payload_tensors(payload), self.head(payload_tensors(payload)[0]))


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


def _decision(policy: ThresholdPolicy, e: int, logits: str, prefix: str
              ) -> tuple[list, list, str]:
    """Nodes computing the boolean "exit now" for batch-1 ``logits`` (same rule as decide)."""
    nodes, inits = [], []

    def const(name: str, value, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), prefix + name))
        return prefix + name

    t = _per_exit(policy.temperature, e)
    scaled = logits
    if t != 1.0:
        scaled = prefix + "scaled"
        nodes.append(helper.make_node("Div", [logits, const("t", t)], [scaled]))
    threshold = const("threshold", _per_exit(policy.threshold, e))
    fire = prefix + "fire"
    if isinstance(policy, MaxProb):
        nodes += [helper.make_node("Softmax", [scaled], [prefix + "p"], axis=1),
                  helper.make_node("ReduceMax", [prefix + "p"], [prefix + "stat"], axes=[1],
                                   keepdims=0),
                  helper.make_node("GreaterOrEqual", [prefix + "stat", threshold], [fire])]
    elif isinstance(policy, Entropy):
        nodes += [helper.make_node("LogSoftmax", [scaled], [prefix + "logp"], axis=1),
                  helper.make_node("Exp", [prefix + "logp"], [prefix + "p"]),
                  helper.make_node("Mul", [prefix + "p", prefix + "logp"], [prefix + "plogp"]),
                  helper.make_node("ReduceSum", [prefix + "plogp", const("axes", [1], np.int64)],
                                   [prefix + "negent"], keepdims=0),
                  helper.make_node("Neg", [prefix + "negent"], [prefix + "stat"]),
                  helper.make_node("LessOrEqual", [prefix + "stat", threshold], [fire])]
    elif isinstance(policy, Margin):
        nodes += [helper.make_node("Softmax", [scaled], [prefix + "p"], axis=1),
                  helper.make_node("TopK", [prefix + "p", const("k", [2], np.int64)],
                                   [prefix + "top", prefix + "topi"], axis=1),
                  helper.make_node("Split", [prefix + "top", const("splits", [1, 1], np.int64)],
                                   [prefix + "a", prefix + "b"], axis=1),
                  helper.make_node("Sub", [prefix + "a", prefix + "b"], [prefix + "stat2"]),
                  helper.make_node("Squeeze", [prefix + "stat2", const("sq", [1], np.int64)],
                                   [prefix + "stat"]),
                  helper.make_node("GreaterOrEqual", [prefix + "stat", threshold], [fire])]
    else:
        raise InputError(f"no graph form of the {policy.name!r} statistic")
    return nodes, inits, fire


def _exit_constant(name: str, e: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array([e], dtype=np.int64), f"value_{name}"))


def _outputs(logits: str, exit_index: str, num_classes: int) -> list:
    return [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, num_classes]),
            helper.make_tensor_value_info(exit_index, TensorProto.INT64, [1])]


def _checked(model: MultiExitModel, policy: ThresholdPolicy, example: torch.Tensor | None,
             what: str) -> torch.Tensor:
    """The batch-1 example, after checking that ``model`` and ``policy`` have a graph form."""
    if example is None:
        if model.input_shape is None:
            raise InputError("the model has no input_shape; pass example=one input sample")
        example = torch.zeros(1, *model.input_shape)
    check_input(example, model.input_shape)
    if not isinstance(policy, (MaxProb, Entropy, Margin)):
        raise InputError(f"the {what} supports max-prob, entropy and margin policies, got "
                         f"{policy.name!r}; use OrtExitPipeline for the others")
    if any(getattr(h, "uses_previous", False) for h in model.heads):
        raise InputError("cascading heads need the previous logits; export them with "
                         "export_multiexit and run OrtExitPipeline")
    return example[:1]


def _export_segments(model: MultiExitModel, example: torch.Tensor, path: Path, opset: int
                     ) -> tuple[list[onnx.ModelProto], int]:
    """Each exit's segment (the stages since the previous exit, then its head) as an ONNX
    model with outputs ``(*payload, logits)`` (the last: the final logits); and the class
    count."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    segments = []
    try:
        with torch.no_grad():
            payload = example
            start = 0
            for e, k in enumerate(model.exit_stages):
                head = model.heads[e] if e < len(model.heads) else None
                seg = _Segment(list(model.backbone.stages[start: k + 1]), head,
                               len(payload_tensors(payload)))
                file = path.with_name(f"{path.stem}.segment{e}.tmp.onnx")
                export_piece(seg, payload, file, dynamic_batch=False, opset=opset,
                             as_payload=False)
                segments.append(onnx.load(str(file)))
                file.unlink()
                payload = model.backbone.run(payload, start, k + 1)
                start = k + 1
    finally:
        for m, mode in modes:
            m.training = mode
    return segments, int(payload_tensors(payload)[0].shape[1])


def export_exit_graph(model: MultiExitModel, policy: ThresholdPolicy, path: str | Path,
                      example: torch.Tensor | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` with ``policy`` as one batch-1 ONNX graph that exits early by itself.

    Args:
        model: the multi-exit model (heads must not use the previous exit's logits).
        policy: a max-prob, entropy or margin policy (per-exit thresholds and temperatures
            are honoured).
        path: the ``.onnx`` file; its outputs are ``logits`` (1, C) and ``exit_index`` (1,).
        example: one input sample batch ``(1, ...)``; zeros of the model's input shape if
            ``None``.
        opset: ONNX opset version.

    Raises:
        InputError: an unsupported policy or head, or a piece that does not export.
    """
    example = _checked(model, policy, example, "single-graph export")
    path = Path(path)
    segments, num_classes = _export_segments(model, example, path, opset)
    last = len(segments) - 1

    def build(e: int, inputs: list[str]) -> tuple[list, list, str, str]:
        """Nodes and initializers running segments ``e..last`` on ``inputs``."""
        prefix = f"e{e}_"
        seg = segments[e]
        mapping = {i.name: n for i, n in zip(seg.graph.input, inputs)}
        nodes, inits, outs = _renamed(seg, prefix, mapping)
        logits_out, exit_out = f"logits_{e}", f"exit_{e}"
        if e == last:
            nodes += [helper.make_node("Identity", [outs[-1]], [logits_out]),
                      _exit_constant(exit_out, e)]
            return nodes, inits, logits_out, exit_out
        dec_nodes, dec_inits, fire = _decision(policy, e, outs[-1], prefix + "d_")
        then_logits, then_exit = f"then_logits_{e}", f"then_exit_{e}"
        then_graph = helper.make_graph(
            [helper.make_node("Identity", [outs[-1]], [then_logits]),
             _exit_constant(then_exit, e)],
            f"exit{e}", [], _outputs(then_logits, then_exit, num_classes))
        rest, rest_inits, rest_logits, rest_exit = build(e + 1, outs[:-1])
        else_logits, else_exit = f"else_logits_{e}", f"else_exit_{e}"
        rest += [helper.make_node("Identity", [rest_logits], [else_logits]),
                 helper.make_node("Identity", [rest_exit], [else_exit])]
        # A segment's weights live in the branch that runs it: ONNX Runtime only folds and
        # re-lays-out (NCHWc) weights that are initializers of the graph using them.
        else_graph = helper.make_graph(rest, f"continue{e}", [],
                                       _outputs(else_logits, else_exit, num_classes),
                                       initializer=rest_inits)
        nodes += dec_nodes
        nodes.append(helper.make_node("If", [fire], [logits_out, exit_out],
                                      then_branch=then_graph, else_branch=else_graph))
        return nodes, inits + dec_inits, logits_out, exit_out

    x_info = segments[0].graph.input[0]
    nodes, inits, logits_name, exit_name = build(0, ["x"])
    nodes += [helper.make_node("Identity", [logits_name], ["logits"]),
              helper.make_node("Identity", [exit_name], ["exit_index"])]
    shape = [d.dim_value for d in x_info.type.tensor_type.shape.dim]
    graph = helper.make_graph(
        nodes, "early_exit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        _outputs("logits", "exit_index", num_classes), initializer=inits)
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


def _result(logits: np.ndarray, exits: np.ndarray) -> ExitResult:
    """An :class:`ExitResult` over ONNX Runtime's arrays (argmax in numpy: cheaper at batch 1
    than a torch op)."""
    return ExitResult(torch.from_numpy(logits.argmax(1)), torch.from_numpy(exits),
                      torch.from_numpy(logits))


class OrtExitGraph:
    """Runs a graph from :func:`export_exit_graph`: one ONNX Runtime call per sample.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (1 for timing).
        input_shape: per-sample input shape checked on every call (``None``: from the graph).
    """

    def __init__(self, path: str | Path, threads: int | None = 1,
                 input_shape: Sequence[int] | None = None):
        self.piece = OrtPiece(path, threads)
        if self.piece.output_names != ["logits", "exit_index"]:
            raise InputError(f"{path} is not an early-exit graph (outputs "
                             f"{self.piece.output_names}); write one with export_exit_graph")
        dims = self.piece.inputs[0].shape[1:]
        self.input_shape = tuple(input_shape) if input_shape else tuple(int(d) for d in dims)
        self._run = self.piece.session.run

    def infer(self, x: torch.Tensor) -> ExitResult:
        """Early-exit inference, sample by sample; same result as ``MultiExitModel.infer``."""
        check_input(x, self.input_shape)
        arrays = x.detach().float().numpy()
        if len(arrays) == 1:  # the deployed case: no per-sample lists
            return _result(*self._run(None, {"x": arrays}))
        outs = [self._run(None, {"x": arrays[i: i + 1]}) for i in range(len(arrays))]
        return _result(np.concatenate([o[0] for o in outs]),
                       np.concatenate([o[1] for o in outs]))


def export_exit_chain(model: MultiExitModel, policy: ThresholdPolicy, directory: str | Path,
                      example: torch.Tensor | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` with ``policy`` as one batch-1 ONNX graph per exit segment.

    Segment ``e`` (the stages since the previous exit and exit ``e``'s head) returns its
    payload tensors, its logits and ``fire`` (bool, shape ``(1,)``: the policy's test, the same
    nodes as :func:`export_exit_graph` uses); the last segment returns the final logits.
    Run it with :class:`OrtExitChain`.

    Args:
        model: the multi-exit model (heads must not use the previous exit's logits).
        policy: a max-prob, entropy or margin policy.
        directory: written with ``segment<e>.onnx`` files and ``chain.json``.
        example: one input sample batch ``(1, ...)``; zeros of the input shape if ``None``.
        opset: ONNX opset version.

    Raises:
        InputError: an unsupported policy or head, or a piece that does not export.
    """
    example = _checked(model, policy, example, "exit chain")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    segments, num_classes = _export_segments(model, example, directory / "chain", opset)
    files = []
    for e, seg in enumerate(segments):
        g = seg.graph
        if e < len(segments) - 1:
            logits = g.output[-1].name
            nodes, inits, fire = _decision(policy, e, logits, "decision_")
            g.node.extend(nodes)
            g.initializer.extend(inits)
            g.output.append(helper.make_tensor_value_info(fire, TensorProto.BOOL, [1]))
        try:
            onnx.checker.check_model(seg, full_check=True)
        except Exception as exc:
            raise InputError(f"exit segment {e} with its decision fails onnx.checker: "
                             f"{exc}") from exc
        files.append(f"segment{e}.onnx")
        onnx.save(seg, str(directory / files[-1]))
    meta = {"format": CHAIN_FORMAT, "version": 1, "segments": files,
            "exit_names": list(model.exit_names), "num_classes": num_classes,
            "input_shape": list(example.shape[1:]), "policy": policy.config()}
    (directory / "chain.json").write_text(json.dumps(meta, indent=2))
    return directory


class OrtExitChain:
    """Runs an :func:`export_exit_chain` directory: per sample, segment after segment until
    one's ``fire`` flag is set (the last always answers). Same exits as
    ``MultiExitModel.infer`` and :class:`OrtExitGraph`.

    Args:
        directory: the exported directory.
        threads: intra-op threads (1 for timing).
    """

    def __init__(self, directory: str | Path, threads: int | None = 1):
        directory = Path(directory)
        try:
            meta = json.loads((directory / "chain.json").read_text())
            if meta.get("format") != CHAIN_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            files = [directory / f for f in meta["segments"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{directory} is not an exit chain ({exc}); write one with "
                             "export_exit_chain") from exc
        self.pieces = [OrtPiece(f, threads) for f in files]
        self.input_shape = tuple(meta["input_shape"])
        self.exit_names = list(meta["exit_names"])
        self._runs = [p.session.run for p in self.pieces]
        self._inputs = [[i.name for i in p.session.get_inputs()] for p in self.pieces]

    def _one(self, sample: np.ndarray) -> tuple[np.ndarray, int]:
        tensors = [sample]
        last = len(self._runs) - 1
        for e, run in enumerate(self._runs):
            outs = run(None, dict(zip(self._inputs[e], tensors)))
            if e == last:
                return outs[0], e
            if outs[-1][0]:
                return outs[-2], e
            tensors = outs[:-2]
        raise AssertionError("unreachable")

    def infer(self, x: torch.Tensor) -> ExitResult:
        """Early-exit inference, sample by sample; same result as ``MultiExitModel.infer``."""
        check_input(x, self.input_shape)
        arrays = x.detach().float().numpy()
        outs = [self._one(arrays[i: i + 1]) for i in range(len(arrays))]
        logits = outs[0][0] if len(outs) == 1 else np.concatenate([o[0] for o in outs])
        return _result(logits, np.array([o[1] for o in outs], dtype=np.int64))
