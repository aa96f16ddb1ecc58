"""Your own ``nn.Module`` as a multi-exit model: load it from a file, cut it, add exit heads.

A model given as ``"path/to/file.py:function"`` is imported from that file only (never from
``sys.path``), under a module name of its own; the function is called with no arguments, or
with ``num_classes=`` / ``input_shape=`` when its signature takes them, and must return an
``nn.Module``. A checkpoint records the file's absolute path, the function and the file's
SHA-256, but loading it never imports that code by itself: the caller passes the architecture
again (``splitexit.checkpoint.load(directory, model=...)``, ``--model path.py:fn``).

Cut names are those :func:`splitexit.list_cuts` gives. ``"name@i"`` names tensor ``i`` of a
cut that carries several tensors (a cut inside a residual block).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .heads import create_head
from .multiexit import MultiExitModel
from .stages import StagedModel, _unknown_cut, list_cuts, payload_tensors

__all__ = ["is_model_file", "load_user_model", "user_model_source", "parse_cuts",
           "build_backbone", "build_multiexit", "rebuild"]

_HELP = "pass your own model as path/to/file.py:function (a function returning an nn.Module)"


def is_model_file(spec: str) -> bool:
    """Whether ``spec`` names a model file (``path.py:function``) rather than a zoo model."""
    return ":" in spec or spec.endswith(".py") or "/" in spec or "\\" in spec


def _split_spec(spec: str) -> tuple[Path, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"a model file is given as 'path/to/file.py:function', got {spec!r}")
    path_text, sep, function = spec.rpartition(":")
    if not sep or not path_text or "/" in function or "\\" in function:
        raise InputError(f"{spec!r} names no function: write '{spec}:function_name', the "
                         "function in that file that returns your nn.Module")
    function = function.strip()
    if not function:
        raise InputError(f"{spec!r} names no function after ':': write "
                         f"'{path_text}:function_name'")
    if not function.isidentifier():
        raise InputError(f"{function!r} (after ':' in {spec!r}) is not a Python function name")
    path = Path(path_text).expanduser()
    if path.suffix != ".py":
        raise InputError(f"{path} is not a .py file: the model must come from Python source, "
                         "given as path/to/file.py:function")
    if not path.is_file():
        raise InputError(f"no such file: {path} (from {spec!r}); give the path of the .py file "
                         "that defines your model, as path/to/file.py:function")
    return path.resolve(), function


def _import_file(path: Path) -> tuple[object, str]:
    """Execute ``path`` as a fresh module of its own; returns it and the file's SHA-256."""
    source = path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"splitexit_usermodel_{stem}_{digest[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise InputError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    try:
        # the bytes hashed above are the bytes executed
        exec(compile(source, str(path), "exec"), module.__dict__)
    except ImportError as exc:
        del sys.modules[name]
        raise InputError(f"importing {path} failed ({type(exc).__name__}: {exc}). The file is "
                         "imported on its own (its folder is not put on sys.path): import "
                         "only installed packages from it, or make it self-contained") from exc
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise InputError(f"running {path} failed ({type(exc).__name__}: {exc}); fix the "
                         f"file so that `python {path}` runs") from exc
    return module, digest


def _call(fn, where: str, kwargs: Mapping) -> nn.Module:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    call_kwargs: dict = {}
    if sig is not None:
        params = sig.parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        call_kwargs = {k: v for k, v in kwargs.items() if takes_any or (
            k in params and params[k].kind in (params[k].POSITIONAL_OR_KEYWORD,
                                               params[k].KEYWORD_ONLY))}
        try:
            sig.bind(**call_kwargs)
        except TypeError as exc:
            raise InputError(f"{where} cannot be called with {sorted(call_kwargs) or 'no arguments'}"
                             f" ({exc}); it must need no arguments, or take only num_classes= "
                             "and input_shape=") from exc
    try:
        model = fn(**call_kwargs)
    except Exception as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items())
        raise InputError(f"{where}({shown}) raised {type(exc).__name__}: {exc}; fix the "
                         "function so that it returns your nn.Module") from exc
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise InputError(f"{where}() returned the class {model.__name__}, not a model: return "
                         f"an instance, e.g. `return {model.__name__}(...)`")
    if not isinstance(model, nn.Module):
        raise InputError(f"{where}() returned {type(model).__name__}, not a torch.nn.Module; "
                         "return the model instance (e.g. `return MyNet()`)")
    return model


def _load(spec: str, kwargs: Mapping) -> tuple[nn.Module, dict]:
    path, function = _split_spec(spec)
    module, digest = _import_file(path)
    fn = getattr(module, function, None)
    if fn is None:
        defined = sorted(n for n, v in vars(module).items()
                         if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise InputError(f"{path} defines no {function!r}; it defines: "
                         f"{', '.join(defined) or 'no functions'} (write path.py:function)")
    if not callable(fn):
        raise InputError(f"{function!r} in {path} is a {type(fn).__name__}, not a function")
    model = _call(fn, f"{path.name}:{function}", kwargs)
    return model, {"path": str(path), "function": function, "sha256": digest}


def load_user_model(spec: str, **kwargs) -> nn.Module:
    """The ``nn.Module`` that ``"path/to/file.py:function"`` returns. Runs code from that file.

    Args:
        spec: ``path/to/file.py:function``.
        kwargs: passed to the function when its signature takes them (usually
            ``num_classes`` and ``input_shape``); left out when it does not.

    Raises:
        InputError: missing or non-``.py`` file, no ``:function``, a function that is not
            there, raises, or returns something that is not an ``nn.Module``.
    """
    return _load(spec, kwargs)[0]


def user_model_source(spec: str) -> dict:
    """``{"path": absolute path, "function": name, "sha256": of the file}`` (no code runs)."""
    path, function = _split_spec(spec)
    return {"path": str(path), "function": function,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def parse_cuts(cuts: str | Sequence[str], module: nn.Module | None = None) -> list[dict]:
    """``"a,b@1"`` (or ``["a", "b@1"]``) -> ``[{"cut": "a", "tensor_index": None},
    {"cut": "b", "tensor_index": 1}]``; ``@i`` picks tensor ``i`` of a multi-tensor cut.

    Raises:
        CutError: a cut that is not a string (the message lists ``module``'s cuts).
    """
    items = cuts.split(",") if isinstance(cuts, str) else list(cuts)
    out = []
    for item in items:
        if not isinstance(item, str):
            try:
                valid = list_cuts(module) if isinstance(module, nn.Module) else []
            except Exception:  # an untraceable module: say what a cut is without the list
                valid = []
            raise _unknown_cut(item, valid)
        text = str(item).strip()
        name, at, index = text.rpartition("@") if "@" in text else (text, "", "")
        name = name.strip()
        if not name:
            raise InputError(f"empty cut name in {cuts!r}; give comma-separated cut names "
                             "(splitexit.list_cuts(model) lists them)")
        tensor_index = None
        if at:
            if not index.strip().isdigit():
                raise InputError(f"bad cut {text!r}: after '@' comes a tensor index (0, 1, ...) "
                                 "choosing one tensor of a cut that carries several")
            tensor_index = int(index)
        out.append({"cut": name, "tensor_index": tensor_index})
    names = [c["cut"] for c in out]
    if len(set(names)) != len(names):
        raise InputError(f"each cut can be named once, got {names}")
    return out


def _resolve(module: nn.Module | str, num_classes: int, input_shape: Sequence[int]
             ) -> tuple[nn.Module, dict | None]:
    if isinstance(module, str):
        return _load(module, {"num_classes": num_classes, "input_shape": tuple(input_shape)})
    if not isinstance(module, nn.Module):
        raise InputError(f"expected an nn.Module or 'path/to/file.py:function', got "
                         f"{type(module).__name__}")
    return module, None


def _stage(module: nn.Module, cuts: Sequence[str]) -> StagedModel:
    """``module`` staged at ``cuts`` (put in execution order); a StagedModel already cut there
    is used as it is."""
    if isinstance(module, StagedModel):
        missing = [c for c in cuts if c not in module.cut_names]
        if missing:
            raise InputError(f"this StagedModel has no cut {missing[0]!r} (its cuts: "
                             f"{module.cut_names}); pass the uncut nn.Module to cut it anew")
        return module
    valid = list_cuts(module, nodes=True)
    order = {c: i for i, c in enumerate(valid)}
    if all(c in order for c in cuts):
        cuts = sorted(cuts, key=order.__getitem__)
    return StagedModel.from_module(module, list(cuts))  # CutError lists the valid cuts


def _probe(backbone: StagedModel, num_classes: int, input_shape: Sequence[int]) -> list:
    """The payload after every stage for a zeros batch (eval mode, restored after)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            outs = backbone.forward_intermediates(torch.zeros(2, *input_shape))
    except Exception as exc:
        raise InputError(f"running the model on a batch of shape (2, "
                         f"{', '.join(map(str, input_shape))}) failed ({type(exc).__name__}: "
                         f"{exc}); the model must take the data set's input shape "
                         f"{tuple(input_shape)} (the function may take input_shape=)") from exc
    finally:
        backbone.train(was_training)
    final = outs[-1]
    if (not isinstance(final, torch.Tensor) or final.dim() != 2
            or final.shape[1] != num_classes):
        got = (tuple(final.shape) if isinstance(final, torch.Tensor)
               else f"a {type(final).__name__}")
        raise InputError(f"the model returns {got} for a batch of 2; it must return logits of "
                         f"shape (N, {num_classes}) for this data set's {num_classes} classes "
                         "(the function may take num_classes=)")
    return outs


def _spec(source: dict | None, cuts: Sequence[str], num_classes: int,
          input_shape: Sequence[int], **extra) -> dict:
    spec = {"user_model": source} if source else {}
    return {**spec, "cuts": list(cuts), "num_classes": int(num_classes),
            "input_shape": [int(d) for d in input_shape], **extra}


def build_backbone(module: nn.Module | str, cuts: str | Sequence[str], num_classes: int,
                   input_shape: Sequence[int]) -> StagedModel:
    """``module`` (or ``"path.py:fn"``, whose code runs) as a :class:`StagedModel` cut at
    ``cuts`` (none: one stage), with a ``spec`` a checkpoint records.

    Raises:
        CutError: a cut the model does not have (the message lists the valid ones).
    """
    module, source = _resolve(module, num_classes, input_shape)
    parsed = parse_cuts(cuts, module) if cuts else []
    backbone = _stage(module, [c["cut"] for c in parsed])
    _probe(backbone, num_classes, input_shape)
    backbone.spec = _spec(source, backbone.cut_names, num_classes, input_shape)
    return backbone


def build_multiexit(module: nn.Module | str, cuts: str | Sequence[str], num_classes: int,
                    input_shape: Sequence[int], head: str = "linear",
                    head_kwargs: dict | None = None) -> MultiExitModel:
    """``module`` cut at ``cuts`` with an exit head of type ``head`` at each cut.

    Args:
        module: your ``nn.Module`` (uncut), a :class:`StagedModel` already cut at ``cuts``, or
            ``"path/to/file.py:function"`` (runs code from that file; see
            :func:`load_user_model`).
        cuts: cut names (``splitexit.list_cuts(module)``), comma-separated or a list, in any
            order. ``"name@i"`` names tensor ``i`` of a cut that carries several tensors.
        head: head type for every exit (:func:`splitexit.heads.create_head`), sized from the
            payload shape at its cut.

    The model's ``spec`` (saved by :func:`splitexit.checkpoint.save`) records the cuts, head,
    classes, input shape and, for a model from a file, ``user_model``: its absolute path,
    function and SHA-256.

    Raises:
        CutError: a cut the model does not have (the message lists the valid ones).
        InputError: no cuts, a multi-tensor cut without ``@i``, an unknown head type, a model
            that does not take ``input_shape`` or does not return ``num_classes`` logits.
    """
    parsed = parse_cuts(cuts, module) if cuts else []
    if not parsed:
        raise InputError("exit heads need at least one cut: give cut names (see "
                         "splitexit.list_cuts(model)), e.g. cuts='layer1,layer2'")
    module, source = _resolve(module, num_classes, input_shape)
    backbone = _stage(module, [c["cut"] for c in parsed])
    outs = _probe(backbone, num_classes, input_shape)
    payloads = {name: payload_tensors(p) for name, p in zip(backbone.cut_names, outs)}
    by_name = {c["cut"]: c for c in parsed}
    heads = {}
    for cut in backbone.cut_names:
        tensors, index = payloads[cut], by_name[cut]["tensor_index"]
        if index is not None and index >= len(tensors):
            raise InputError(f"cut {cut!r} carries {len(tensors)} tensor(s); @{index} is out of "
                             f"range (use @0 .. @{len(tensors) - 1})")
        if len(tensors) > 1 and index is None:
            raise InputError(
                f"heads at multi-tensor cuts need @<tensor index>: cut {cut!r} lies inside a "
                f"block and carries {len(tensors)} tensors of shapes "
                f"{[tuple(t.shape[1:]) for t in tensors]}; write '{cut}@0' .. "
                f"'{cut}@{len(tensors) - 1}', or cut after the whole block")
        key = cut if index is None else f"{cut}@{index}"
        heads[key] = create_head(head, tuple(tensors[index or 0].shape[1:]), num_classes,
                               **(head_kwargs or {}))
    backbone.spec = _spec(source, backbone.cut_names, num_classes, input_shape)
    model = MultiExitModel(backbone, heads, input_shape=tuple(input_shape))
    named = [c + ("" if by_name[c]["tensor_index"] is None else f"@{by_name[c]['tensor_index']}")
             for c in backbone.cut_names]
    model.spec = _spec(source, named, num_classes, input_shape, head=head,
                       head_kwargs=dict(head_kwargs or {}))
    return model


def rebuild(model: nn.Module | str, spec: Mapping, where: str = "the checkpoint") -> nn.Module:
    """The architecture a checkpoint ``spec`` describes, from the caller's ``model``.

    ``model`` is the user's ``nn.Module`` (uncut; it is cut and given heads as ``spec``
    says), a model already built that way (a :class:`MultiExitModel`, returned as it is), or
    ``"path/to/file.py:function"`` given explicitly by the caller (that file's code runs; a
    warning says when it changed since the checkpoint was written).
    """
    num_classes, input_shape = int(spec["num_classes"]), tuple(spec["input_shape"])
    if isinstance(model, MultiExitModel):
        return model
    if isinstance(model, str):
        recorded = spec.get("user_model") or {}
        module, source = _load(model, {"num_classes": num_classes, "input_shape": input_shape})
        if recorded.get("sha256") and recorded["sha256"] != source["sha256"]:
            warnings.warn(f"{source['path']} changed since {where} was written (SHA-256 "
                          f"{recorded['sha256'][:12]}... then, {source['sha256'][:12]}... now); "
                          "its weights load only if names and shapes still match",
                          stacklevel=2)
        model = module
    elif not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or 'path/to/file.py:function', got "
                         f"{type(model).__name__}")
    else:
        source = None
    if spec.get("head") is None:
        cuts = [c["cut"] for c in parse_cuts(spec["cuts"])] if spec["cuts"] else []
        if isinstance(model, StagedModel) and model.cut_names == cuts:
            return model
        built = build_backbone(model, cuts, num_classes, input_shape)
    else:
        built = build_multiexit(model, spec["cuts"], num_classes, input_shape,
                                head=spec["head"], head_kwargs=spec.get("head_kwargs") or None)
    if source:
        built.spec = {"user_model": source, **built.spec}
    return built
