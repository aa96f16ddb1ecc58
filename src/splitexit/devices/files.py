"""Profile files: the built-in ones and a user's own JSON, validated; lookup by name."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, InputError
from .profiles import (
    _DEVICE_FIGURES,
    _LINK_FIGURES,
    _LINK_OPTIONAL,
    DeviceProfile,
    LinkProfile,
)

# ---------------------------------------------------------------------------------------------
# Loading profile files


def _read_json(path: Path | None, builtin: str) -> tuple[Any, str]:
    """Return the parsed JSON document and a label of where it came from."""
    if path is None:
        text = resources.files("splitexit").joinpath("profiles").joinpath(builtin).read_text("utf-8")
        return json.loads(text), f"built-in profiles/{builtin}"
    path = Path(path)
    if not path.is_file():
        raise InputError(f"profile file {str(path)!r} does not exist; give the path to a JSON file")
    try:
        return json.loads(path.read_text("utf-8")), str(path)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"profile file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CorruptFileError(
            f"profile file {str(path)!r} is not valid JSON (line {exc.lineno}, column "
            f"{exc.colno}: {exc.msg}); fix the file or restore it from profiles/"
        ) from exc


def _entries(doc: Any, key: str, origin: str) -> list[dict[str, Any]]:
    """The list of profile entries: ``{key: [...]}``, ``{key: {name: {...}}}`` or a bare list."""
    body = doc.get(key) if isinstance(doc, dict) else doc
    if isinstance(body, dict):
        body = [{"name": name, **entry} if isinstance(entry, dict) else entry
                for name, entry in body.items()]
    if not isinstance(body, list):
        raise CorruptFileError(
            f"{origin}: expected a JSON object with a {key!r} list of profiles "
            f'(e.g. {{"{key}": [{{"name": ...}}]}}), got {type(body).__name__}'
        )
    return body


def _parse(
    entry: Any, index: int, kind: str, figures: dict[str, tuple[str, str]],
    optional: dict[str, float], origin: str,
) -> dict[str, Any]:
    """Turn one JSON entry into constructor keyword arguments, validating presence and types."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{origin}: {kind} entry #{index} is not a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise CorruptFileError(
            f"{origin}: {kind} entry #{index} has no 'name'; expected a non-empty string"
        )
    kwargs: dict[str, Any] = {"name": name, "description": str(entry.get("description", ""))}
    sources: dict[str, str] = {}
    any_estimate = False
    for fname, (_rule, expected) in figures.items():
        if fname not in entry:
            if fname in optional:
                kwargs[fname] = optional[fname]
                sources[fname] = "not given; default"
                continue
            raise CorruptFileError(
                f"{origin}: {kind} profile {name!r} is missing field {fname!r}; expected "
                f'{expected}, e.g. "{fname}": {{"value": ..., "source": "..."}}'
            )
        raw = entry[fname]
        if isinstance(raw, dict):
            if "value" not in raw:
                raise CorruptFileError(
                    f"{origin}: {kind} profile {name!r}: field {fname!r} has no 'value'; "
                    f"expected {expected}"
                )
            kwargs[fname] = raw["value"]
            sources[fname] = str(raw.get("source", f"user-supplied ({origin})"))
            any_estimate |= bool(raw.get("estimate", True))
        else:
            kwargs[fname] = raw
            sources[fname] = f"user-supplied ({origin})"
            any_estimate = True
    kwargs["sources"] = sources
    kwargs["estimate"] = any_estimate
    return kwargs


def _load(
    path: Path | str | None, key: str, kind: str, cls: type,
    figures: dict[str, tuple[str, str]], optional: dict[str, float],
) -> dict[str, Any]:
    doc, origin = _read_json(None if path is None else Path(path), f"{key}.json")
    out: dict[str, Any] = {}
    for index, entry in enumerate(_entries(doc, key, origin)):
        kwargs = _parse(entry, index, kind, figures, optional, origin)
        try:
            profile = cls(**kwargs)
        except InputError as exc:
            raise CorruptFileError(f"{origin}: {exc}") from exc
        if profile.name in out:
            raise CorruptFileError(
                f"{origin}: {kind} profile {profile.name!r} appears twice; names must be unique"
            )
        out[profile.name] = profile
    if not out:
        raise CorruptFileError(f"{origin}: no {kind} profiles in the file")
    return out


@functools.lru_cache(maxsize=1)
def _builtin_devices() -> dict[str, DeviceProfile]:
    return _load(None, "devices", "device", DeviceProfile, _DEVICE_FIGURES, {})


@functools.lru_cache(maxsize=1)
def _builtin_links() -> dict[str, LinkProfile]:
    return _load(None, "links", "link", LinkProfile, _LINK_FIGURES, _LINK_OPTIONAL)


def load_devices(path: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Load device profiles.

    Args:
        path: A JSON file in the format of ``profiles/devices.json``; None for the built-in
            profiles (Raspberry Pi 4, Jetson Nano 5 W / 10 W, 2-vCPU cloud VM, T4 GPU server).

    Returns:
        Profile name -> DeviceProfile.

    Raises:
        InputError: The file does not exist.
        CorruptFileError: The file is not valid JSON, or a profile misses a field or has a
            figure out of range (the message names the profile and the field).
    """
    if path is None:
        return dict(_builtin_devices())
    return _load(path, "devices", "device", DeviceProfile, _DEVICE_FIGURES, {})


def load_links(path: str | Path | None = None) -> dict[str, LinkProfile]:
    """Load link profiles.

    Args:
        path: A JSON file in the format of ``profiles/links.json``; None for the built-in
            profiles (lpwan, lte_weak, lte, wifi, 5g). ``jitter_ms``, ``loss_rate`` and
            ``rx_nj_per_bit`` may be left out (default 0); the other fields are required.

    Returns:
        Profile name -> LinkProfile.

    Raises:
        InputError: The file does not exist.
        CorruptFileError: The file is not valid JSON, or a profile misses a field or has a
            figure out of range (the message names the profile and the field).
    """
    if path is None:
        return dict(_builtin_links())
    return _load(path, "links", "link", LinkProfile, _LINK_FIGURES, _LINK_OPTIONAL)


def _lookup(name: Any, table: dict[str, Any], kind: str, origin: str) -> Any:
    if not isinstance(name, str):
        raise InputError(f"{kind} must be a profile name or a {kind.title()}Profile, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in table:
        return table[key]
    for candidate, profile in table.items():
        if candidate.lower().replace("-", "_") == key:
            return profile
    raise InputError(
        f"unknown {kind} {name!r} in {origin}; known {kind}s: {', '.join(sorted(table))}"
    )


def get_device(name: str | DeviceProfile, path: str | Path | None = None) -> DeviceProfile:
    """Look up a device profile by name (a DeviceProfile is returned unchanged).

    Args:
        name: Profile name such as ``"rpi4"`` (case-insensitive, ``-`` and ``_`` alike).
        path: Profile file to look in; None for the built-in profiles.

    Returns:
        The profile.

    Raises:
        InputError: Unknown name; the message lists the known ones.
    """
    if isinstance(name, DeviceProfile):
        return name
    origin = "built-in device profiles" if path is None else str(path)
    return _lookup(name, load_devices(path), "device", origin)


def get_link(name: str | LinkProfile, path: str | Path | None = None) -> LinkProfile:
    """Look up a link profile by name (a LinkProfile is returned unchanged).

    Args:
        name: Profile name such as ``"lte"`` (case-insensitive, ``-`` and ``_`` alike).
        path: Profile file to look in; None for the built-in profiles.

    Returns:
        The profile.

    Raises:
        InputError: Unknown name; the message lists the known ones.
    """
    if isinstance(name, LinkProfile):
        return name
    origin = "built-in link profiles" if path is None else str(path)
    return _lookup(name, load_links(path), "link", origin)
