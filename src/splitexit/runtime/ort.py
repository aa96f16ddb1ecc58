"""Exit programs on ONNX Runtime, with numpy alone.

- :class:`OrtSession`: one ONNX graph in an ONNX Runtime session; payload in, payload out
  (numpy arrays, or torch tensors when the caller has them: the same kind comes back).
- :class:`OrtProgram`: an exit program (pieces, exits, the batch-1 exit graph) run through the
  shared exit loop (:mod:`splitexit.runtime.loop`): the runtime protocol (``step``,
  ``exit_stages``, ``exit_names``, ``input_shape``, ``infer``) every runtime implements.

No torch import here: an edge device runs this with ``numpy`` and ``onnxruntime`` only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import CorruptFileError, InputError
from .arrays import is_torch
from .loop import (
    ExitResult,
    ExitRun,
    advance_exits,
    all_exit_logits,
    check_batch,
    check_policy,
    infer_exits,
    payload_tensors,
)

__all__ = ["OrtSession", "OrtProgram", "ORT_DTYPES"]

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_}

_LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


class OrtSession:
    """An ONNX graph run by ONNX Runtime: payload in, payload out.

    Takes numpy arrays or torch tensors (one, or a tuple for a multi-tensor payload) and
    returns the same kind: a torch payload in gives a torch payload out. At this level (one
    graph, e.g. a server half fed a decoded payload) a floating-point array is cast to the
    dtype the graph takes; :class:`OrtProgram`, which takes a model's inputs, refuses any
    other dtype than the graph's instead.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (1 for single-threaded, reproducible timing; ``None`` lets
            ONNX Runtime decide).
        optimization: graph optimisation level (``"all"``, ``"extended"``, ``"basic"`` or
            ``"disable"``).
    """

    def __init__(self, path: str | Path, threads: int | None = 1, optimization: str = "all"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"no ONNX file at {self.path}; export the piece first with "
                             "splitexit.export.export_piece")
        if optimization not in _LEVELS:
            raise InputError(f"unknown optimization {optimization!r}; use one of "
                             f"{', '.join(_LEVELS)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = _LEVELS[optimization]
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CorruptFileError(f"ONNX Runtime cannot load {self.path} ({exc}); export "
                                   "it again") from exc
        self.inputs = self.session.get_inputs()
        self.outputs = self.session.get_outputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.outputs]
        self._input_dtypes = [ORT_DTYPES.get(i.type) for i in self.inputs]
        self._run = self.session.run
        # the C session under InferenceSession.run: the wrapper re-validates the input names
        # on every call, microseconds a batch-1 exit cannot spare (feeds built here are right)
        self._sess_run = getattr(self.session, "_sess", self.session).run

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, inputs={self.input_names}, "
                f"outputs={self.output_names})")

    def run_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run on numpy arrays, one per graph input; returns one array per graph output."""
        if len(arrays) != len(self.inputs):
            raise InputError(f"{self.path.name} takes {len(self.inputs)} input tensor(s) "
                             f"({', '.join(self.input_names)}), got {len(arrays)}")
        feed = {}
        for spec, dtype, a in zip(self.inputs, self._input_dtypes, arrays):
            a = np.asarray(a)
            if dtype is not None and a.dtype != dtype:
                if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
                    raise InputError(f"input {spec.name!r} of {self.path.name} needs dtype "
                                     f"{np.dtype(dtype).name}, got {a.dtype}")
                a = a.astype(dtype)
            if a.ndim != len(spec.shape):
                raise InputError(f"input {spec.name!r} of {self.path.name} needs "
                                 f"{len(spec.shape)} dimensions {spec.shape}, got shape "
                                 f"{a.shape}")
            feed[spec.name] = np.ascontiguousarray(a)
        try:
            return self._sess_run(self.output_names, feed, None)
        except Exception as exc:
            raise InputError(f"ONNX Runtime failed on {self.path.name}: {exc}") from exc

    def __call__(self, payload):
        """Run on a payload (numpy or torch; one tensor or a tuple); returns the same kind."""
        items = payload if isinstance(payload, tuple) else (payload,)
        as_torch = is_torch(items[0])
        arrays = [t.detach().cpu().numpy() if is_torch(t) else t for t in items]
        outs = self.run_arrays(arrays)
        if as_torch:
            import torch

            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _graph_answer(outputs: list[np.ndarray]) -> ExitResult:
    """The exit graph's answer: ``logits, exit_index`` and, for a dense map, its ``classes``
    (computed in the graph; else the argmax here)."""
    logits, exits = outputs[0], outputs[1]
    return ExitResult(outputs[2] if len(outputs) == 3 else logits.argmax(1), exits, logits)


class OrtProgram:
    """An exit program on ONNX Runtime: one graph per piece, the shared exit loop between them.

    Piece ``k`` takes the payload (and, for a cascading head, the previous exit's logits) and
    returns the payload at its end, plus its exit's logits when ``has_exit[k]``. An optional
    batch-1 exit graph (the pieces and the policy's threshold test in one ONNX graph with
    ``If`` nodes) answers single samples in one call, for the policy it was exported with.

    Args:
        pieces: the piece sessions, in order.
        exit_stages: piece index of every exit (the last: the final exit).
        exit_names: names of the exits (the last is ``"final"``).
        takes_previous: per piece, whether it takes the previous exit's logits.
        input_shape: per-sample input shape, checked on every call.
        exit_graph: the batch-1 exit graph (outputs ``logits``, ``exit_index`` and, for a
            dense model, ``classes``), or ``None``.
        graph_policy: the policy config the exit graph was exported with.
    """

    def __init__(self, pieces: Sequence[OrtSession], exit_stages: Sequence[int],
                 exit_names: Sequence[str], takes_previous: Sequence[bool],
                 input_shape: Sequence[int] | None, exit_graph: OrtSession | None = None,
                 graph_policy: dict | None = None):
        self.pieces = list(pieces)
        self.exit_stages = [int(k) for k in exit_stages]
        self.exit_names = list(exit_names)
        self.takes_previous = [bool(t) for t in takes_previous]
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.exit_graph = exit_graph
        self.graph_policy = graph_policy
        self._has_exit = [False] * len(self.pieces)
        for k in self.exit_stages[:-1]:
            self._has_exit[k] = True
        self._runs = [p.run_arrays for p in self.pieces]
        first = self.pieces[0]._input_dtypes[0] if self.pieces else np.float32
        #: the dtype inputs must have (the first graph's input; float64 is refused, not cast)
        self.input_dtype = np.dtype(first or np.float32).name
        self._graph_run = exit_graph._run if exit_graph is not None else None
        self._graph_checked = None
        self._graph_matches = False
        if exit_graph is not None:
            self._graph_fast = exit_graph._sess_run
            self._graph_outputs = list(exit_graph.output_names)
            self._graph_input = exit_graph.input_names[0]
        self._float32 = np.dtype(np.float32)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    @property
    def num_stages(self) -> int:
        return len(self.pieces)

    def step(self, k: int, e: int | None, payload, previous):
        """Piece ``k``; its exit logits when ``e`` is given (computed whenever it has a head)."""
        piece = self.pieces[k]
        args = payload_tensors(payload)
        outs = piece((*args, previous) if self.takes_previous[k] else args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if self._has_exit[k]:
            return (outs[0] if len(outs) == 2 else tuple(outs[:-1])), outs[-1]
        return (outs[0] if len(outs) == 1 else tuple(outs)), None

    def _uses_graph(self, x, policy) -> bool:
        if self._graph_run is None or x.shape[0] != 1 or policy is None:
            return False
        check_policy(policy, len(self.exit_stages))  # before config(): a float has none
        if policy is not self._graph_checked:  # config() costs microseconds: once per policy
            self._graph_checked = policy
            self._graph_matches = policy.config() == self.graph_policy
        return self._graph_matches

    def infer(self, x, policy) -> ExitResult:
        """Early-exit inference; the same exits as the PyTorch model.

        Numpy in gives numpy out; torch in gives torch out.

        Raises:
            InputError: wrong type, dtype (float32 only: convert float64 data, numpy's
                default, with ``x.astype(np.float32)``; it is never cast silently), shape, or
                non-finite input; a policy that does not fit the program's exits.
        """
        if (policy is self._graph_checked and self._graph_matches and type(x) is np.ndarray
                and x.shape[0] == 1 and x.dtype == self._float32
                and x.shape[1:] == self.input_shape and math.isfinite(x.sum())):
            # the common case of a device answering one sample at a time, checked in a
            # microsecond: a float32 numpy sample of the right shape, all finite, and the
            # policy the exit graph was exported with (as last time)
            return _graph_answer(self._graph_fast(self._graph_outputs, {self._graph_input: x},
                                                  None))
        check_batch(x, self.input_shape, self.input_dtype)
        if self._uses_graph(x, policy):
            if is_torch(x):
                import torch

                r = _graph_answer(self._graph_run(None, {"x": x.detach().numpy()}))
                return ExitResult(*(torch.from_numpy(a) for a in
                                    (r.predictions, r.exit_index, r.logits)))
            return _graph_answer(self._graph_run(None, {"x": x}))
        return infer_exits(self.step, self.exit_stages, policy, len(self.pieces), x)

    def forward(self, x) -> list:
        """Every exit's logits for the whole batch (nobody leaves)."""
        check_batch(x, self.input_shape, self.input_dtype)
        return all_exit_logits(self.step, self.exit_stages, len(self.pieces), x)

    __call__ = forward

    def run_until(self, x, policy, end: int) -> ExitRun:
        """Pieces ``0 .. end - 1`` and their exits (a device half): the run so far."""
        check_batch(x, self.input_shape, self.input_dtype)
        return advance_exits(ExitRun.start(x), self.step, self.exit_stages, policy, end)

    def finish(self, run: ExitRun, policy) -> ExitResult:
        """The remaining pieces of a run from :meth:`run_until` (a server half)."""
        if not run.done:
            run = advance_exits(run, self.step, self.exit_stages, policy, len(self.pieces))
        return run.result
