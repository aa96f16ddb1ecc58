"""The torch-free edge install: its requirement files agree with pyproject.toml.

The install itself (a venv without torch running scripts/edge_smoke.py) is ``make test-edge``,
which ``make test`` runs after pytest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]


def _lines(path: Path) -> list[str]:
    return [s for line in path.read_text().splitlines() if (s := line.split("#")[0].strip())]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_edge_requirements_file_is_the_edge_extra():
    edge = _project()["optional-dependencies"]["edge"]
    assert sorted(_lines(ROOT / "requirements" / "edge.txt")) == sorted(edge)
    assert not any(r.split(">")[0].split("=")[0].strip() == "torch" for r in edge)


def test_library_declares_ranges_and_setup_pins_torch():
    torch = [r for r in _project()["dependencies"] if r.startswith("torch")]
    assert torch and "==" not in torch[0], torch
    assert any(r.startswith("torch==") for r in _lines(ROOT / "constraints.txt"))
