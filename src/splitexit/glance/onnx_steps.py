"""GFNet on ONNX Runtime at batch 1, one graph per step with its exit test inside.

The batch-1 exit graph (:func:`splitexit.export.exit_graph.export_exit_graph`) nests every
later step in the ``else`` branch of an ``If``; on this model each ``If`` that goes on costs
about as much as a third of a focus step (a subgraph run per call), and the pieces of
:class:`~splitexit.runtime.OrtProgram` pass the full-resolution image out and back in at
every step. :class:`GFNetSteps` exports each step as its own graph whose inputs are the image
and the state the step reads, and whose outputs are the state the next step reads, the
step's logits and, for every step but the last, the policy's exit test (the policy's own
statistic lowered to ONNX nodes, as the exit graph does). The caller's loop only reads that
boolean. :meth:`GFNetSteps.infer_all` runs the whole chain as one flat graph: the operating
point at which no sample leaves early needs no test at all; for the learned and the localiser
policies that graph is the same function in fewer graph operations (the glance image as a
convolution, the state term's glance-map part computed once, used locations masked by a
scatter).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..policies import ThresholdPolicy, is_plain_threshold
from ..runtime.arrays import one_float32_sample
from .model import GFNet, mark_used
from .patch_policies import LearnedPatchPolicy, LocaliserPolicy, PatchPolicy

__all__ = ["GFNetSteps"]


class _Glance(nn.Module):
    """x -> (glance image when the policy reads it, h, glance map, logits)."""

    def __init__(self, net: GFNet, small: bool):
        super().__init__()
        self.net, self.small = net, small

    def forward(self, x):
        small = self.net.glance.downsample(x)
        h, glance_map = self.net.glance.look(small)
        return ((small,) if self.small else ()) + (h, glance_map, self.net.classifier(h))


class _Focus(nn.Module):
    """Focus step ``t``: (x, [glance image], h, glance map[, used, prior]) -> (h, glance map
    when a later step needs it, used, prior, logits), or the logits alone at the last step."""

    def __init__(self, net: GFNet, policy: PatchPolicy, first: bool, last: bool):
        super().__init__()
        self.net, self.patch_policy, self.first, self.last = net, policy, first, last

    def forward(self, x, *state):
        if self.first:
            small = None
            if self.patch_policy.uses_glance_image:
                small, *state = state
            h, glance_map = state
            used = h.new_zeros((h.shape[0], self.net.grid.locations))
            prior = self.patch_policy.prior(x, small)
        else:
            h, glance_map, used, prior = state
        location = self.patch_policy.choose(prior, h, glance_map, used)
        h = self.net.focus(x, h, location)
        logits = self.net.classifier(h)
        if self.last:
            return logits
        return h, mark_used(used, location), prior, logits


class _Chain(nn.Module):
    """The glance and every focus step in one graph: x -> the last step's logits."""

    def __init__(self, net: GFNet, policy: PatchPolicy, steps: int):
        super().__init__()
        self.net, self.patch_policy, self.steps = net, policy, steps

    def forward(self, x):
        return self.net.rollout(x, self.patch_policy, self.steps)[0][-1]


def _pool_weight(net: GFNet) -> torch.Tensor:
    """The glance's average pool as convolution weights: one ``factor x factor`` kernel of
    ``1 / factor**2`` per channel (every product exact when the factor is a power of two)."""
    f, c = net.grid.factor, net.config.in_channels
    return (torch.eye(c)[:, :, None, None].expand(c, c, f, f) / (f * f)).contiguous()


def _glance_image(net: GFNet, x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """The glance image (:meth:`GlanceNet.downsample`) as a strided convolution: the same
    average, one ONNX Runtime Conv instead of an AveragePool, which costs more at batch 1 on
    a one-channel image."""
    f = net.grid.factor
    return F.conv2d(x, pool, stride=f) if f > 1 else x


def _choose(scores: torch.Tensor, chosen: list[torch.Tensor]) -> torch.Tensor:
    """The best location not yet ``chosen``: the used ones' scores set to -inf by one scatter
    (what :func:`~splitexit.glance.patch_policies.masked_scores` does with a used mask, in
    fewer graph operations)."""
    if chosen:  # one location needs no stack (a Concat of one input in the graph)
        used = chosen[0][:, None] if len(chosen) == 1 else torch.stack(chosen, 1)
        scores = scores.scatter(1, used, float("-inf"))
    return scores.argmax(1)


class _LearnedChain(nn.Module):
    """:class:`_Chain` at batch 1 for the learned policy, in fewer graph operations: the glance
    image as a convolution (:func:`_glance_image`); the state term's first layer split by
    input (``W [m, h, used] = W_m m + W_h h + W_used used``): the glance map's part (with the
    bias) computed once, and each used location adding its column of ``W_used`` (a gather)
    instead of a product with the used mask; the actor's bias added to the image-only scores
    once (the actor's Gemm takes them as its C input); used locations masked by a scatter
    (:func:`_choose`). The same function, up to float rounding."""

    def __init__(self, net: GFNet, policy: LearnedPatchPolicy, steps: int):
        super().__init__()
        self.net, self.patch_policy, self.steps = net, policy, steps
        first = policy.trunk[0]
        hidden, locations = net.config.hidden, net.grid.locations
        m = first.in_features - hidden - locations
        w = first.weight.detach()
        self.register_buffer("w_map", w[:, :m].clone(), persistent=False)
        self.register_buffer("w_h", w[:, m: m + hidden].clone(), persistent=False)
        self.register_buffer("w_used", w[:, m + hidden:].t().contiguous(), persistent=False)
        self.register_buffer("bias", first.bias.detach().clone(), persistent=False)
        self.register_buffer("pool", _pool_weight(net), persistent=False)

    def forward(self, x):
        net, policy = self.net, self.patch_policy
        small = _glance_image(net, x, self.pool)
        h, glance_map = net.glance.look(small)
        prior = policy.spatial(small) + policy.actor.bias
        base = F.linear(torch.relu(policy.reduce(glance_map)).flatten(1), self.w_map, self.bias)
        chosen: list[torch.Tensor] = []
        for t in range(self.steps):
            z = policy.trunk[1:](base + F.linear(h, self.w_h))  # ReLU, Linear, ReLU
            location = _choose(torch.addmm(prior, z, policy.actor.weight.t()), chosen)
            h = net.focus(x, h, location)
            if t + 1 < self.steps:
                base = base + self.w_used[location]
                chosen.append(location)
        return net.classifier(h)


class _LocaliserChain(nn.Module):
    """:class:`_Chain` at batch 1 for the localiser policy, in fewer graph operations: the
    glance image as a convolution (:func:`_glance_image`), read by the glance CNN and the
    localiser alike; used locations masked by a scatter (:func:`_choose`). The same function, up to float rounding."""

    def __init__(self, net: GFNet, policy: LocaliserPolicy, steps: int):
        super().__init__()
        self.net, self.patch_policy, self.steps = net, policy, steps
        self.register_buffer("pool", _pool_weight(net), persistent=False)

    def forward(self, x):
        net = self.net
        small = _glance_image(net, x, self.pool)
        h, _ = net.glance.look(small)
        prior = self.patch_policy.prior(x, small)
        chosen: list[torch.Tensor] = []
        for _ in range(self.steps):
            location = _choose(prior, chosen)
            h = net.focus(x, h, location)
            chosen.append(location)
        return net.classifier(h)


def _flat_chain(net: GFNet, policy: PatchPolicy, steps: int) -> nn.Module:
    """The fastest batch-1 form of the every-step chain for ``policy`` (the same function)."""
    if isinstance(policy, LearnedPatchPolicy):
        return _LearnedChain(net, policy, steps)
    if isinstance(policy, LocaliserPolicy):
        return _LocaliserChain(net, policy, steps)
    return _Chain(net, policy, steps)


def _with_exit_test(path: Path, policy: ThresholdPolicy, e: int) -> None:
    """Append the policy's exit test on the graph's ``logits`` as a bool output ``exit``."""
    from ..export.exit_graph import decision_nodes

    model = onnx.load(str(path))
    nodes, inits, fire = decision_nodes(policy, e, "logits", "exit_test_")
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.node.append(helper.make_node("Identity", [fire], ["exit"]))
    model.graph.output.append(helper.make_tensor_value_info("exit", TensorProto.BOOL, [1]))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


class GFNetSteps:
    """GFNet's steps as batch-1 ONNX Runtime graphs, each with its exit test.

    Args:
        net: a GFNet (eval mode is used for the export; its mode is restored).
        patch_policy: ``"learned"``, ``"localiser"``, ``"random"``, ``"centre"`` or a policy
            object.
        policy: the exit policy (max-prob, entropy or margin; per-exit thresholds and
            temperatures are honoured); ``None``: only :meth:`infer_all` is available.
        directory: where the graphs are written.
        steps: focus steps (default: the net's budget).
        threads: ONNX Runtime intra-op threads.

    Raises:
        InputError: a policy without a graph form, or a bad budget.
    """

    def __init__(self, net: GFNet, patch_policy: str | PatchPolicy, policy: ThresholdPolicy | None,
                 directory: str | Path, steps: int | None = None, threads: int | None = 1):
        from ..export.onnx import export_piece
        from ..runtime.ort import OrtSession

        steps = net.config.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not \
                1 <= steps <= net.grid.locations:
            raise InputError(f"the patch budget must be an integer in 1 .. "
                             f"{net.grid.locations}, got {steps!r}")
        if policy is not None and not is_plain_threshold(policy):
            raise InputError(f"GFNetSteps tests max-prob, entropy or margin policies in the "
                             f"graphs, got {getattr(policy, 'name', policy)!r}; use "
                             "MultiExitModel.infer or splitexit.runtime.OrtProgram for others")
        if policy is not None:
            policy.check_exits(steps + 1)
        chosen = net.patch_policy(patch_policy)
        small = chosen.uses_glance_image
        c = net.config
        self.input_shape = (c.in_channels, c.image, c.image)
        self.policy, self.steps = policy, steps
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(1, *self.input_shape)
                chain = directory / "all_steps.onnx"
                export_piece(_flat_chain(net, chosen, steps), (x,), chain, dynamic_batch=False,
                             input_names=["x"], output_names=["logits"], as_payload=False)
                self._all = OrtSession(chain, threads=threads)
                self._sessions: list = []
                self._carried: list[list[str]] = []  # the state names each graph outputs
                if policy is None:
                    return
                glance = _Glance(net, small)
                state = glance(x)[:-1]
                glance_map = state[-1]
                names = (["small"] if small else []) + ["h", "glance_map"]
                graphs = [(glance, (x,), ["x"], [*names, "logits"])]
                for t in range(1, steps + 1):
                    module = _Focus(net, chosen, t == 1, t == steps)
                    inputs = ["x", *names]
                    outputs = ["logits"] if t == steps else [
                        "h_next", "used_next", "prior_next", "logits"]  # unique names
                    graphs.append((module, (x, *state), inputs, outputs))
                    if t < steps:
                        h, used, prior, _ = module(x, *state)
                        state = (h, glance_map, used, prior)
                        names = ["h", "glance_map", "used", "prior"]
                for e, (module, example, inputs, outputs) in enumerate(graphs):
                    path = directory / f"step{e}.onnx"
                    export_piece(module, example, path, dynamic_batch=False,
                                 input_names=inputs, output_names=outputs, as_payload=False)
                    if e < steps:
                        _with_exit_test(path, policy, e)
                    self._sessions.append(OrtSession(path, threads=threads))
                    # by position: the exporter renames an output that is a constant (the
                    # centre policy's prior)
                    self._carried.append([n.removesuffix("_next") for n in outputs[:-1]])
        finally:
            net.train(was_training)
        # the graphs' own input lists (the exporter drops an input a graph never reads)
        self._runs = [(s._sess_run, list(s.output_names), list(s.input_names), carried)
                      for s, carried in zip(self._sessions, self._carried)]

    def _check(self, x) -> np.ndarray:
        return one_float32_sample(x, self.input_shape, "GFNetSteps")

    def infer(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """One sample through the steps until the policy's test fires (or the last step):
        ``(logits (1, classes), exit index)``."""
        if self.policy is None:
            raise InputError("GFNetSteps was built without an exit policy; pass one, or use "
                             "infer_all for the every-step operating point")
        x = self._check(x)
        state = {"x": x}
        last = len(self._runs) - 1
        for e, (run, outputs, inputs, carried) in enumerate(self._runs):
            outs = run(outputs, {name: state[name] for name in inputs}, None)
            if e == last:
                return outs[0], e
            if outs[-1][0]:
                return outs[-2], e
            state.update(zip(carried, outs))
        raise AssertionError("unreachable: the last step always answers")

    def step_calls(self, x: np.ndarray) -> list:
        """Zero-argument calls running each step graph alone on sample ``x``'s state (as
        :meth:`infer` would reach it, every step taken): for timing the steps one by one."""
        if self.policy is None:
            raise InputError("GFNetSteps was built without an exit policy: no step graphs")
        state = {"x": self._check(x)}
        calls = []
        for run, outputs, inputs, carried in self._runs:
            feed = {name: state[name] for name in inputs}
            calls.append(lambda run=run, outputs=outputs, feed=feed: run(outputs, feed, None))
            state.update(zip(carried, run(outputs, feed, None)))
        return calls

    def infer_all(self, x: np.ndarray) -> np.ndarray:
        """The last step's logits of one sample, every step run (no exit test)."""
        x = self._check(x)
        return self._all._sess_run(["logits"], {"x": x}, None)[0]
