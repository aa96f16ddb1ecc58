"""Bundles: what leaves the training machine, for any model that can be cut.

:func:`bundle` lowers a model to its exit program (:func:`splitexit.program.lower`), exports
every piece to ONNX, adds the batch-1 exit graph where the policy has a graph form, measures
batch-1 latency on ONNX Runtime against the full model, and writes a self-describing
directory with a checksum of every file (layout: :mod:`splitexit.runtime.bundle`).
:func:`load_bundle` reads one back in any process, without PyTorch and without user code.

Example:
    >>> bundle(model, "bundle/", policy=MaxProb(0.9), example=calib_x[:256])
    >>> b = load_bundle("bundle/")
    >>> b.program().infer(x_numpy, b.policy)          # same exits as model.infer
    >>> bundle(model, "split/", cut="layer1", codec="int8", policy=MaxProb(0.9))
    >>> # splitexit serve split/   and   splitexit edge split/ --server URL
"""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, checkpoint
from .errors import InputError
from .export.exit_graph import export_exit_graph
from .export.onnx import DEFAULT_OPSET, export_piece
from .multiexit import MultiExitModel
from .policies import ExitPolicy, NeverExit, has_graph_statistic, is_plain_threshold, leave_at
from .program import ExitProgram, as_multiexit, export_pieces, lower, policy_for_exits
from .runtime.bundle import FORMAT, MANIFEST, VERSION, Bundle, load_bundle, sha256_of
from .runtime.ort import OrtSession

__all__ = ["bundle", "load_bundle", "Bundle"]


def _has_exit_graph(program: ExitProgram) -> bool:
    """Whether the program and its policy have a batch-1 exit graph."""
    return not (program.has_server or not has_graph_statistic(program.policy)
                or len(program.pieces) < 2 or any(p.takes_previous for p in program.pieces))


def _write_exit_graph(program: ExitProgram, path: Path, opset: int) -> bool:
    """The batch-1 exit graph, when the program and its policy have one."""
    if not _has_exit_graph(program):
        return False
    export_exit_graph(program, None, path, opset=opset)
    return True


def _latencies(fns: dict, xs: np.ndarray, warmup: int = 20) -> dict[str, list[float]]:
    from .measure import interleaved_seconds

    return interleaved_seconds(fns, xs, warmup=warmup)


def _summary(times: list[float]) -> dict:
    ms = [1e3 * t for t in times]
    return {"mean_ms": statistics.fmean(ms), "p50_ms": statistics.median(ms)}


def _full_graph(model: MultiExitModel, example: torch.Tensor, path: Path, opset: int):
    export_piece(model.backbone, example[:2], path, opset=opset)
    return OrtSession(path)


def _measure(work: Path, program: ExitProgram, samples: np.ndarray, threads: int | None,
             opset: int) -> dict:
    """Batch-1 latency on ONNX Runtime, interleaved: the full model as one graph, the bundle
    as deployed (exit graph or pieces) and the bundle with no exit firing."""

    full = _full_graph(program.model, torch.from_numpy(samples[:2]), work / "full.onnx", opset)
    ort_program = program.on_onnx_runtime(work / "pieces", exit_graph=_has_exit_graph(program),
                                          threads=threads, opset=opset)
    graph = ort_program.exit_graph
    never = leave_at(program.policy, program.num_exits - 1, program.num_exits)
    fns = {"full": _runner(full),
           "bundle": lambda x: ort_program.infer(x, program.policy)}
    if graph is not None:
        never_graph = work / "never.onnx"
        export_exit_graph(program, never, never_graph, opset=opset)
        never_session = OrtSession(never_graph, threads)
        fns["no_exit"] = _runner(never_session)  # called as the full model is
    else:
        fns["no_exit"] = lambda x: ort_program.infer(x, never)
    times = _latencies(fns, samples)
    out = {name: _summary(t) for name, t in times.items()}
    full_mean, full_p50 = out["full"]["mean_ms"], out["full"]["p50_ms"]
    return {"runtime": "onnxruntime", "threads": threads, "samples": int(len(samples)),
            "full_model": out["full"], "bundle": out["bundle"], "no_exit": out["no_exit"],
            "speedup_mean": full_mean / out["bundle"]["mean_ms"],
            "speedup_p50": full_p50 / out["bundle"]["p50_ms"],
            "no_exit_ratio": out["no_exit"]["mean_ms"] / full_mean,
            "form": "exit graph" if graph is not None else "pieces"}


def _subsets(heads: int) -> list[list[int]]:
    """Every subset of ``heads`` exit heads, the largest first (each is timed, so at most 6
    heads: 64 subsets)."""
    if heads > 6:
        raise InputError(f"{heads} exit heads give {2 ** heads} subsets to time; pass a model "
                         "with at most 6 heads (model.keep_exits(...)) or no max_overhead")
    return [list(k) for r in range(heads, -1, -1) for k in itertools.combinations(range(heads), r)]


def _select(model: MultiExitModel, policy: ExitPolicy, samples: np.ndarray, example,
            max_overhead: float, threads: int | None, opset: int, work: Path
            ) -> tuple[list[int], list[dict]]:
    """The exit subset with the lowest measured mean latency among those whose no-exit
    latency is at most ``max_overhead`` times the full model's (measured together)."""
    rows = []
    best = None
    for keep in _subsets(len(model.heads)):
        sub = model.keep_exits(keep)
        program = lower(sub, policy_for_exits(policy, [*keep, len(model.heads)]), None,
                        example)
        m = _measure(work / f"subset{len(rows)}", program, samples, threads, opset)
        # without heads the bundle is the full model's graph: its ratio is 1 by definition
        ratio = m["no_exit_ratio"] if keep else 1.0
        speedup = (m["speedup_mean"], m["speedup_p50"]) if keep else (1.0, 1.0)
        row = {"exits": [model.head_cuts[e] for e in keep], "no_exit_ratio": ratio,
               "mean_ms": m["bundle"]["mean_ms"], "speedup_mean": speedup[0],
               "speedup_p50": speedup[1], "meets_bound": ratio <= max_overhead}
        rows.append(row)
        if row["meets_bound"] and (best is None or row["speedup_mean"] > best[1]):
            best = (keep, row["speedup_mean"])
    if best is None:
        raise InputError(f"no exit subset keeps the no-exit latency within {max_overhead:g}x "
                         "the full model's (not even no heads at all); raise max_overhead")
    for row in rows:
        row["chosen"] = row["exits"] == [model.head_cuts[e] for e in best[0]]
    return best[0], rows


def _leave_at_sessions(model: MultiExitModel, policy: ExitPolicy, example, threads: int | None,
                       opset: int, work: Path) -> list[OrtSession]:
    """One exit graph per exit of ``model``, each forced to leave there (every decision on
    the way computed; the last: no exit fires), on ONNX Runtime."""
    work.mkdir(parents=True, exist_ok=True)
    sessions = []
    for k in range(model.num_exits):
        forced = leave_at(policy, k, model.num_exits)
        path = export_exit_graph(lower(model, forced, None, example), forced,
                                 work / f"leave-at-{k}.onnx", opset=opset)
        sessions.append(OrtSession(path, threads))
    return sessions


def _runner(session: OrtSession):
    return lambda x: session.run_arrays([x])


def _no_heads(final: torch.Tensor, labels: torch.Tensor, seconds: float, policy: ExitPolicy,
              reference_accuracy: float, max_drop: float):
    """The subset without heads: the final exit alone, if it is accurate enough."""
    from .calibration import OperatingPoint

    accuracy = float((final.argmax(1) == labels).double().mean())
    if accuracy < reference_accuracy - max_drop - 1e-12:
        raise InputError(f"the final exit alone is {accuracy:.4f}, below the target")
    return OperatingPoint(policy, accuracy, seconds, [1.0])


def _select_calibrated(model: MultiExitModel, family: ExitPolicy, calibration, max_drop: float,
                       reference_accuracy: float | None, max_overhead: float | None,
                       samples: np.ndarray, example, threads: int | None, opset: int,
                       work: Path) -> tuple[list[int], ExitPolicy, dict]:
    """The exit subset and one threshold per kept exit with the lowest expected batch-1
    latency on ONNX Runtime, within ``max_drop`` of the reference on the calibration split
    and (with ``max_overhead``) within that no-exit latency of the full model's."""
    from .calibration import per_exit_thresholds

    if not is_plain_threshold(family):
        raise InputError("thresholds chosen at bundling need a max-prob, entropy or margin "
                         f"policy (its family and temperature), got {family.name!r}")
    cal_x, cal_y = (torch.as_tensor(np.asarray(v)) for v in calibration)
    if len(cal_x) != len(cal_y) or len(cal_y) == 0:
        raise InputError(f"calibration is (inputs, labels) of one non-zero length, got "
                         f"{len(cal_x)} inputs and {len(cal_y)} labels")
    heads = len(model.heads)
    with torch.inference_mode():
        logits = model.collect_logits(cal_x.float())
    if reference_accuracy is None:  # the model's own final exit
        reference_accuracy = float((logits[-1].argmax(1) == cal_y).double().mean())
    subsets = _subsets(heads) if max_overhead is not None else [list(range(heads))]
    # every subset's exits timed in one interleaved run, so their costs compare
    policies = {tuple(k): policy_for_exits(family, [*k, heads]) for k in subsets}
    fns = {"full": _runner(_full_graph(model, example, work / "full.onnx", opset))}
    for i, keep in enumerate(subsets):
        sessions = _leave_at_sessions(model.keep_exits(keep), policies[tuple(keep)], example,
                                      threads, opset, work / f"subset{i}")
        fns.update({(i, k): _runner(sess) for k, sess in enumerate(sessions)})
    seconds = {name: statistics.fmean(t) for name, t in _latencies(fns, samples).items()}
    rows, best = [], None
    for i, keep in enumerate(subsets):
        policy = policies[tuple(keep)]  # per-exit temperatures follow their exits
        costs = [seconds[(i, k)] for k in range(len(keep) + 1)]
        try:
            op = (per_exit_thresholds([logits[e] for e in keep] + [logits[-1]], cal_y, costs,
                                      policy, reference_accuracy=reference_accuracy,
                                      max_drop=max_drop) if keep
                  else _no_heads(logits[-1], cal_y, costs[0], policy, reference_accuracy,
                                 max_drop))
        except InputError as exc:  # no thresholds of this subset keep the accuracy
            rows.append({"exits": [model.head_cuts[e] for e in keep], "note": str(exc)})
            continue
        ratio = costs[-1] / seconds["full"] if keep else 1.0
        row = {"exits": [model.head_cuts[e] for e in keep], "policy": op.policy.config(),
               "calib_accuracy": op.accuracy, "exit_fractions": op.exit_fractions,
               "exit_latency_ms": [1e3 * c for c in costs],
               "predicted_mean_ms": 1e3 * op.mean_macs,
               "predicted_speedup_mean": seconds["full"] / op.mean_macs,
               "no_exit_ratio": ratio,
               "meets_bound": max_overhead is None or ratio <= max_overhead}
        rows.append(row)
        if row["meets_bound"] and (best is None or op.mean_macs < best[2]):
            best = (keep, op.policy, op.mean_macs, row)
    if best is None:
        raise InputError(f"no exit subset keeps the calibration accuracy within {max_drop:g} of "
                         f"{reference_accuracy:.4f}"
                         + ("" if max_overhead is None else
                            f" and the no-exit latency within {max_overhead:g}x")
                         + "; relax max_drop or max_overhead")
    for row in rows:
        row["chosen"] = row is best[3]
    info = {"max_drop": max_drop, "reference_accuracy": reference_accuracy,
            "calib_samples": int(len(cal_y)), "max_overhead": max_overhead, "subsets": rows}
    return best[0], best[1], info


def bundle(model: nn.Module, directory: str | Path, cut: str | int | None = None,
           policy: ExitPolicy | None = None, codec: str = "fp32",
           example: torch.Tensor | None = None, *, classes: Sequence[str] | None = None,
           normalisation: dict | None = None, max_overhead: float | None = None,
           calibration: tuple | None = None, max_drop: float | None = None,
           reference_accuracy: float | None = None, measure: bool = True, threads: int | None = 1, opset: int = DEFAULT_OPSET,
           overwrite: bool = True) -> Path:
    """Write a deployment bundle of ``model``.

    Args:
        model: a :class:`MultiExitModel` (any backbone: zoo or a user's module cut by name,
            ``keep_exits`` subsets, T-RECX), a CBNet pipeline, or a plain module.
        directory: the bundle directory (created; replaced when ``overwrite``).
        cut: ``None``: the whole model runs on the device; a cut name of the backbone: device
            pieces up to it with the exits at or before it, the rest on the server;
            ``"input"``: the device sends the raw input (full offload).
        policy: the exit policy (calibrated thresholds); ``NeverExit()`` when ``None``.
        codec: wire codec of a split bundle (``splitexit.split.codec.Codec`` spelling).
        example: input samples ``(N, *input_shape)``: shapes for export and, with
            ``measure``, the samples timed (use real held-out data: the mean latency depends
            on where they exit). Zeros of ``model.input_shape`` when ``None``.
        classes: class names (``"0"``, ``"1"``, ... when ``None``).
        normalisation: ``{"mean": [...], "std": [...]}`` the caller applies to raw inputs,
            recorded for the device side (the bundle's graphs take normalised inputs).
        max_overhead: keep only exit subsets whose no-exit batch-1 latency on ONNX Runtime is
            at most this times the full model's; the fastest such subset is bundled (device
            bundles only; the subsets tried are recorded in the manifest).
        calibration: ``(inputs, labels)`` of held-out data (device bundles with a max-prob,
            entropy or margin ``policy``): choose one threshold per kept exit there, within
            ``max_drop`` of ``reference_accuracy``, for the lowest expected batch-1 latency
            on ONNX Runtime, with the cost of leaving at each exit measured on ``example``
            (:func:`splitexit.calibration.per_exit_thresholds`); with ``max_overhead`` every
            exit subset is tried this way and the fastest within the bound is bundled. The
            policy then gives only the statistic and temperature; the manifest records every
            subset tried (``selection``).
        max_drop: with ``calibration``, the largest calibration accuracy drop (a fraction).
        reference_accuracy: with ``calibration``, the accuracy the drop is measured from (the
            baseline's, or an equally trained control's); the model's final exit's on the
            calibration data when ``None``.
        measure: time batch-1 latency on ONNX Runtime at bundling (full model, bundle, no
            exit firing), interleaved, and record it in the manifest.
        threads: ONNX Runtime intra-op threads while timing.
        opset: ONNX opset.
        overwrite: replace an existing directory.

    Returns:
        The bundle directory.

    Raises:
        InputError: an unknown cut, a model or piece that cannot be exported, a bad policy,
            no exit subset within ``max_overhead`` (and ``max_drop``), or ``calibration``
            without ``max_drop``, or with a cut.
    """
    from .split.codec import Codec

    model = as_multiexit(model, None if example is None else tuple(example.shape[1:]))
    policy = policy or NeverExit()
    if example is None:
        if model.input_shape is None:
            raise InputError("the model has no input_shape; pass example=input samples")
        example = torch.zeros(2, *model.input_shape)
    if not isinstance(example, torch.Tensor):
        example = torch.as_tensor(np.asarray(example))
    if len(example) < 2:
        example = torch.cat([example, example])
    codec_spec = Codec.parse(codec).spec() if cut is not None else None
    out = Path(directory)
    if out.exists():
        if not overwrite:
            raise InputError(f"{out} exists; pass overwrite=True or choose another directory")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise InputError(f"{out} exists and is not a bundle; refusing to replace it")
    samples = example.detach().float().numpy()
    selection = None
    with tempfile.TemporaryDirectory(prefix="splitexit-bundle-") as tmp:
        work = Path(tmp)
        was_training = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            if calibration is not None:
                if max_drop is None or cut is not None:
                    raise InputError("calibration=(inputs, labels) chooses thresholds within "
                                     "max_drop for a device bundle: pass max_drop=, no cut")
                keep, policy, selection = _select_calibrated(
                    model, policy, calibration, max_drop, reference_accuracy, max_overhead,
                    samples, example, threads, opset, work / "select")
                model = model.keep_exits(keep)
            elif max_overhead is not None and cut is None and len(model.heads) > 0:
                keep, selection = _select(model, policy, samples, example, max_overhead,
                                          threads, opset, work / "select")
                policy = policy_for_exits(policy, [*keep, len(model.heads)])
                model = model.keep_exits(keep)
            program = lower(model, policy, cut, example)
            stage = work / "bundle"
            manifest = _write(program, stage, example, codec_spec, classes, normalisation,
                              opset)
            if codec_spec is not None and codec_spec.startswith("entropy:") and "@" in codec_spec:
                manifest["codec"] = _copy_entropy_tables(codec_spec, stage)
            if isinstance(selection, dict):  # thresholds chosen here, per subset
                manifest["selection"] = selection
            elif selection is not None:
                manifest["selection"] = {"max_overhead": max_overhead, "subsets": selection}
            if measure:
                manifest["latency"] = _measure(work / "measure", lower(model, policy, None,
                                                                       example),
                                               samples, threads, opset)
                manifest["latency"]["of"] = "the whole model on one side (ONNX Runtime)"
        finally:
            for m, mode in was_training:
                m.training = mode
        manifest["files"] = {p.relative_to(stage).as_posix(): sha256_of(p)
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(stage, out)
    return out


def _copy_entropy_tables(spec: str, stage: Path) -> str:
    """An entropy codec's tables copied into the bundle; the spec then names that copy
    (relative to the bundle, checked against the same digest when loaded)."""
    source, _, digest = spec[len("entropy:"):].rpartition("@")
    target = stage / "codec" / "entropy-tables.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return f"entropy:codec/entropy-tables.json@{digest}"


def _portable(spec):
    """A model description without the training machine's paths (a user model's source is
    named by its file name and SHA-256; pass it again with ``--model`` to rebuild)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("user_model"), dict):
        return spec
    source = dict(spec["user_model"])
    if source.get("path"):
        source["path"] = Path(source["path"]).name
    return {**spec, "user_model": source}


def _write(program: ExitProgram, stage: Path, example: torch.Tensor, codec: str | None,
           classes: Sequence[str] | None, normalisation: dict | None, opset: int) -> dict:
    """Export the pieces, the exit graph and the weights into ``stage``; the manifest."""
    files = export_pieces(program, stage / "device", opset)
    names = []
    for j, f in enumerate(files):
        if program.pieces[j].part == "server":
            target = stage / "server.onnx"
            f.rename(target)
            names.append(target.name)
        else:
            names.append(f"device/{f.name}")
    graph = None
    if _write_exit_graph(program, stage / "device" / "exits.onnx", opset):
        graph = "device/exits.onnx"
    checkpoint.save(program.model, stage / "weights", cut=program.cut)
    spec = _portable(getattr(program.model, "spec", None))
    if spec is not None:  # the training machine's directories stay there
        meta_path = stage / "weights" / checkpoint.META
        meta = json.loads(meta_path.read_text())
        meta["spec"] = spec
        meta_path.write_text(json.dumps(meta, indent=2))
    n = program.num_classes
    if classes is not None and len(classes) != n:
        raise InputError(f"{len(classes)} class names for a model with {n} classes")
    if normalisation is not None and not {"mean", "std"} <= set(normalisation):
        raise InputError("normalisation is {'mean': [...], 'std': [...]}")
    cum = []
    total = 0.0
    for p in program.pieces:
        total += p.macs
        cum.append(total)
    return {
        "format": FORMAT, "version": VERSION, "created_by": f"splitexit {__version__}",
        "input": {"dtype": "float32", "shape": list(program.input_shape),
                  "normalisation": normalisation},
        "classes": [str(c) for c in (classes if classes is not None else range(n))],
        "exits": [{"name": name, "piece": k, "model_exit": int(i), "macs": cum[k]}
                  for name, k, i in zip(program.exit_names, program.exit_stages,
                                        program.exit_ids)],
        "cut": program.cut, "policy": program.policy.config(), "codec": codec,
        "pieces": [{"file": name, **p.to_json()} for name, p in zip(names, program.pieces)],
        "device": {"pieces": program.device_pieces, "exit_graph": graph},
        "server": {"file": "server.onnx"} if program.has_server else None,
        "weights": {"directory": "weights", "model": spec},
        "opset": opset,
    }
