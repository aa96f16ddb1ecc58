"""StagedModel: a network as an ordered chain of named stages, cut where the user names.

What crosses a cut is a *payload*: one tensor, or a tuple of tensors when the cut lies inside
a residual block. Running the stages one after another equals the original model bit for bit
in eval mode; every constructor here is tested against that invariant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from .errors import CutError, InputError
from .runtime.loop import check_batch, payload_select, payload_tensors

Payload = torch.Tensor | tuple[torch.Tensor, ...]

__all__ = ["Payload", "Stage", "StagedModel", "list_cuts", "payload_tensors", "payload_nbytes",
           "payload_select", "payload_batch_size", "weights_dtype", "per_sample_shape"]


def weights_dtype(module: nn.Module) -> str:
    """The dtype name a module computes in: its first floating-point parameter's or buffer's
    (``"float32"`` when it has none)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return "float32"


def per_sample_shape(shape, what: str = "input_shape") -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints (a per-sample shape, without the batch), or a
    clear :class:`InputError`."""
    try:
        dims = tuple(shape)
        ok = bool(dims) and all(int(d) == d and int(d) > 0 and not isinstance(d, bool)
                                for d in dims)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{what} must be the shape of one sample without the batch dimension, "
                         f"as positive ints, e.g. (1, 28, 28) or (3, 128); got {shape!r}")
    return tuple(int(d) for d in dims)


def not_traced() -> bool:
    """Whether inputs may be checked: not while torch traces, exports or compiles the model
    (a check reads values, which a trace cannot record)."""
    return torch._C._get_tracing_state() is None and not torch.compiler.is_compiling()


def payload_batch_size(payload: Payload) -> int:
    return payload_tensors(payload)[0].shape[0]


def payload_nbytes(payload: Payload, per_sample: bool = True) -> int:
    """Bytes of the raw payload (uncoded), per sample by default."""
    tensors = payload_tensors(payload)
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total // max(1, tensors[0].shape[0]) if per_sample else total


def _direct_call(module: nn.Module):
    """``module.forward`` for a traced graph with no hooks of its own, else ``module``.

    A ``GraphModule`` call goes through two wrappers (fx's and ``nn.Module``'s) that cost
    about 9 us per stage at batch 1: a staged network would be measurably slower than the
    network it was cut from. Hooks on the layers inside the graph still run; hooks on the
    graph module itself keep the full call.
    """
    if isinstance(module, fx.GraphModule) and not (
            module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or module._backward_pre_hooks):
        return module.forward
    return module


class Stage(nn.Module):
    """One stage: payload in, payload out.

    Wraps a module that takes the payload's tensors as positional arguments, so a stage built
    from an ``nn.Sequential`` and one built from a traced graph share one contract.
    """

    def __init__(self, module: nn.Module, name: str, num_inputs: int = 1):
        super().__init__()
        self.module = module
        self.name = name
        self.num_inputs = num_inputs

    def forward(self, payload: Payload) -> Payload:
        call = _direct_call(self.module)
        if isinstance(payload, tuple):
            return call(*payload)
        return call(payload)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_inputs={self.num_inputs}"


class _ModulePathTracer(fx.Tracer):
    """A tracer that tags every node with the qualified names of the modules it came from."""

    def __init__(self) -> None:
        super().__init__()
        self._stack: list[str] = []
        self.node_modules: dict[str, tuple[str, ...]] = {}

    def call_module(self, m, forward, args, kwargs):
        self._stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._stack.pop()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        stack = tuple(self._stack)
        if kind == "call_module":
            stack = stack + (str(target),) if not stack or stack[-1] != target else stack
        self.node_modules[node.name] = stack
        return node


def _trace(module: nn.Module) -> tuple[fx.GraphModule, dict[str, tuple[str, ...]]]:
    tracer = _ModulePathTracer()
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        raise InputError(
            f"{type(module).__name__} cannot be traced by torch.fx ({exc}). Build the "
            "StagedModel from an nn.Sequential or a list of modules instead, or make the "
            "forward free of data-dependent control flow."
        ) from exc
    return fx.GraphModule(module, graph), tracer.node_modules


def _cut_candidates(gm: fx.GraphModule, node_modules: dict[str, tuple[str, ...]]
                    ) -> dict[str, int]:
    """Valid cut names -> position of the node after which the graph is cut.

    Node names (``layer1_0_conv1``) and module names (``layer1.0``: cut after the module's
    last node) are both accepted. The output node and the last computing node are not cuts.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    cuts: dict[str, int] = {}
    for n in nodes[:-1]:
        cuts[n.name] = order[n.name]
    last_of_module: dict[str, int] = {}
    for n in nodes:
        for path in node_modules.get(n.name, ()):
            last_of_module[path] = order[n.name]
    final = order[nodes[-1].name] if nodes else -1
    for path, pos in last_of_module.items():
        if path and pos != final and path not in cuts:
            cuts[path] = pos
    return cuts


def list_cuts(model: nn.Module, nodes: bool = False) -> list[str]:
    """Names at which ``model`` can be cut, in execution order.

    For an ``nn.Sequential`` these are its children's names (cut after that child). For any
    other module, the names of its submodules (``stem``, ``block1.conv1``: cut after that
    module runs; a container comes after its last child). With ``nodes=True``, also the
    torch.fx node names (``relu_1``, ``add``: cut after one operation, e.g. a function call
    that is no module); every name listed there is accepted as a cut.
    """
    if isinstance(model, StagedModel):
        return list(model.cut_names)
    if isinstance(model, nn.Sequential):
        return [name for name, _ in model.named_children()][:-1]
    gm, node_modules = _trace(model)
    cuts = _cut_candidates(gm, node_modules)
    if nodes:
        return sorted(cuts, key=lambda name: (cuts[name], "." in name))
    modules = {path for paths in node_modules.values() for path in paths if path}
    return sorted((c for c in cuts if c in modules),
                  key=lambda name: (cuts[name], -name.count(".")))


def _unknown_cut(name, valid: Sequence[str]) -> CutError:
    shown = ", ".join(valid[:40]) + (" ..." if len(valid) > 40 else "")
    if not isinstance(name, str):
        hint = (f" (did you mean the name {str(name)!r}?)" if str(name) in valid else "")
        return CutError(f"cut names are strings (module or torch.fx node names), got "
                        f"{type(name).__name__} {name!r}{hint}. Valid cuts (see "
                        f"splitexit.list_cuts(model)): {shown}")
    return CutError(f"unknown cut {name!r}. Valid cuts (see splitexit.list_cuts(model)): {shown}")


def _split_graph(gm: fx.GraphModule, positions: list[int]) -> list[tuple[fx.GraphModule, int]]:
    """Split a traced graph after each node position; returns (stage module, number of inputs).

    Each stage receives the values that are produced before it and used at or after it (the
    live values), in production order, and returns those live across its end cut.
    """
    all_nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(all_nodes)}
    output_node = next(n for n in all_nodes if n.op == "output")
    bounds = [-1, *positions, order[output_node] - 1]

    def live_after(pos: int) -> list[fx.Node]:
        return [n for n in all_nodes[: pos + 1]
                if n.op != "get_attr" and any(order[u] > pos for u in n.users)]

    stages = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        inputs = live_after(start) if start >= 0 else [n for n in all_nodes if n.op == "placeholder"]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, node in enumerate(inputs):
            env[node] = graph.placeholder(f"in{i}_{node.name}")
        for node in all_nodes[start + 1: end + 1]:
            if node.op in ("placeholder", "output"):
                continue
            for arg in node.all_input_nodes:
                if arg not in env and arg.op == "get_attr":
                    env[arg] = graph.node_copy(arg, env.__getitem__)
            env[node] = graph.node_copy(node, env.__getitem__)
        if end == order[output_node] - 1:
            graph.output(fx.map_arg(output_node.args[0], env.__getitem__))
        else:
            outs = tuple(env[n] for n in live_after(end))
            graph.output(outs[0] if len(outs) == 1 else outs)
        stages.append((fx.GraphModule(gm, graph), len(inputs)))
    return stages


class StagedModel(nn.Module):
    """An ordered chain of named stages; ``forward`` runs them all.

    Build it with :meth:`from_sequential`, :meth:`from_modules` or :meth:`from_module`.
    ``cut_names[i]`` names the cut after ``stages[i]``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
        >>> staged = StagedModel.from_sequential(net, cuts=["1"])
        >>> staged.cut_names
        ['1']
    """

    def __init__(self, stages: Iterable[nn.Module], cut_names: Sequence[str] | None = None):
        super().__init__()
        stages = list(stages)
        if not stages:
            raise InputError("a StagedModel needs at least one stage")
        wrapped = [s if isinstance(s, Stage) else Stage(s, f"stage{i}")
                   for i, s in enumerate(stages)]
        self.stages = nn.ModuleList(wrapped)
        if cut_names is None:
            cut_names = [f"cut{i}" for i in range(len(stages) - 1)]
        if len(cut_names) != len(stages) - 1:
            raise InputError(f"{len(stages)} stages need {len(stages) - 1} cut names, "
                             f"got {len(cut_names)}")
        if len(set(cut_names)) != len(cut_names):
            raise InputError(f"cut names must be unique, got {list(cut_names)}")
        self.cut_names = list(cut_names)
        self._input_dtype: str | None = None  # the weights' dtype, found on first use

    def _apply(self, fn, recurse=True):  # .double(), .half(), .to(...): found again
        out = super()._apply(fn, recurse)
        self._input_dtype = None
        return out

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], names: Sequence[str] | None = None
                     ) -> StagedModel:
        """One stage per module; ``names`` name the cuts between them."""
        return cls(list(modules), names)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, cuts: Sequence[str] | None = None
                        ) -> StagedModel:
        """Cut an ``nn.Sequential`` after the named children (all of them by default)."""
        children = list(seq.named_children())
        names = [n for n, _ in children]
        valid = names[:-1]
        cuts = list(valid if cuts is None else cuts)
        positions = []
        for c in cuts:
            if c not in valid:
                raise _unknown_cut(c, valid)
            positions.append(names.index(c))
        if positions != sorted(set(positions)):
            raise InputError(f"cuts must be distinct and in execution order, got {cuts}")
        bounds = [-1, *positions, len(children) - 1]
        stages = [nn.Sequential(OrderedDict(children[a + 1: b + 1]))
                  for a, b in zip(bounds, bounds[1:])]
        return cls([Stage(s, f"stage{i}") for i, s in enumerate(stages)], cuts)

    @classmethod
    def from_module(cls, module: nn.Module, cuts: Sequence[str]) -> StagedModel:
        """Cut any traceable module after the named fx nodes or modules.

        A cut inside a residual block carries a tuple payload (the skip and the main path).

        Raises:
            CutError: a name that is not a cut; the message lists the valid ones.
        """
        if isinstance(module, nn.Sequential) and all(c in dict(module.named_children())
                                                     for c in cuts):
            return cls.from_sequential(module, cuts)
        gm, node_modules = _trace(module)
        candidates = _cut_candidates(gm, node_modules)
        positions = []
        for c in cuts:
            if c not in candidates:
                raise _unknown_cut(c, sorted(candidates, key=lambda n: candidates[n]))
            positions.append(candidates[c])
        if positions != sorted(set(positions)):
            raise InputError(f"cuts must be distinct and in execution order, got {list(cuts)}")
        parts = _split_graph(gm, positions)
        stages = [Stage(m, f"stage{i}", k) for i, (m, k) in enumerate(parts)]
        return cls(stages, list(cuts))

    # running ------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def cut_index(self, cut: str | int) -> int:
        """Index ``i`` of a cut (the cut after stage ``i``), by name or index."""
        if isinstance(cut, int):
            if not 0 <= cut < len(self.cut_names):
                raise CutError(f"cut index {cut} out of range 0..{len(self.cut_names) - 1}")
            return cut
        if cut not in self.cut_names:
            raise _unknown_cut(cut, self.cut_names)
        return self.cut_names.index(cut)

    def run(self, payload: Payload, start: int = 0, end: int | None = None) -> Payload:
        """Run stages ``start`` .. ``end - 1`` on ``payload``."""
        # a list, not a ModuleList slice: that builds a new module (tens of microseconds)
        for stage in list(self.stages)[start:end]:
            payload = stage(payload)
        return payload

    def forward(self, x: Payload) -> Payload:
        """Every stage on ``x``.

        Raises:
            InputError: a floating-point input of another dtype than the weights', or one
                with NaN or infinite values (integer inputs, e.g. token ids, and multi-tensor
                payloads pass unchecked).
        """
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not_traced():
            if self._input_dtype is None:
                self._input_dtype = weights_dtype(self)
            check_batch(x, None, self._input_dtype)
        return self.run(x)

    def forward_intermediates(self, x: Payload) -> list[Payload]:
        """The payload after every stage (the last is the model's output)."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def payload_shapes(self, example: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
        """Per-sample shapes of the payload at each cut, for one example input batch."""
        with torch.no_grad():
            outs = self.forward_intermediates(example)
        return {name: [tuple(t.shape[1:]) for t in payload_tensors(p)]
                for name, p in zip(self.cut_names, outs)}

    def split(self, cut: str | int) -> tuple[StagedModel, StagedModel]:
        """Device half (stages up to the cut) and server half (the rest); shares weights."""
        i = self.cut_index(cut)
        head = StagedModel(list(self.stages[: i + 1]), self.cut_names[:i])
        tail = StagedModel(list(self.stages[i + 1:]), self.cut_names[i + 1:])
        return head, tail
