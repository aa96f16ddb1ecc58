"""Reports: ``report.json`` (machine-readable), ``report.md`` (the same table for people), plots.

Every benchmark and the demo write their figures through here, so numbers quoted anywhere
come from a report and never from hand. A field that does not apply is left out.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["host_description", "write_report", "markdown_table", "plot_pareto", "load_report"]

# Column order of report.md; any other row keys follow in first-seen order.
_COLUMNS = ["method", "model", "dataset", "accuracy", "accuracy_drop_pt", "mean_macs",
            "macs_ratio", "latency_ms", "latency_ratio", "throughput_sps", "throughput_ratio",
            "bytes_per_sample", "energy_mj", "exit_fractions"]


def host_description() -> str:
    """This machine, as reports name it (measured figures are only valid here)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads")


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows``; columns that no row has are left out."""
    if not rows:
        return "_no rows_\n"
    keys: list[str] = []
    for row in rows:
        for k in row:
            if k not in keys:
                keys.append(k)
    order = [c for c in (columns or _COLUMNS) if c in keys] + [k for k in keys
                                                               if k not in (columns or _COLUMNS)]
    lines = ["| " + " | ".join(order) + " |", "|" + "---|" * len(order)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[k]) if k in row else "" for k in order) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, suite: str, rows: Sequence[Mapping], *,
                 dataset: str | None = None, model: str | None = None,
                 sections: Mapping[str, Sequence[Mapping]] | None = None,
                 notes: Sequence[str] = (), **extra) -> dict:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return the report dict.

    Args:
        rows: the main table (DESIGN.md's row fields: method, accuracy, mean_macs, ...).
        sections: further named tables (anytime, budgeted, per-link ...).
        notes: sentences printed under the table (how to read it, what is an estimate); also
            kept in report.json as ``notes``.
        extra: more top-level JSON fields (command, seed, plots ...).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"suite": suite, "dataset": dataset, "model": model, "device": host_description(),
              "rows": [dict(r) for r in rows], **extra}
    if notes:
        report["notes"] = list(notes)
    if sections:
        report["sections"] = {k: [dict(r) for r in v] for k, v in sections.items()}
    report = {k: v for k, v in report.items() if v is not None}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    md = [f"# {suite}", ""]
    for key in ("dataset", "model", "device", "command"):
        if report.get(key):
            md.append(f"- {key}: {report[key]}")
    md += ["", markdown_table(report["rows"])]
    for name, table in (sections or {}).items():
        md += [f"## {name}", "", markdown_table(table)]
    for note in notes:
        md.append(f"- {note}")
    for plot in report.get("plots", []):
        md.append(f"\n![{plot}]({plot})")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return report


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def load_report(path: str | os.PathLike) -> dict:
    p = Path(path)
    return json.loads((p / "report.json" if p.is_dir() else p).read_text())


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks write PNGs, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(path: str | os.PathLike, curves: Mapping[str, Sequence[tuple[float, float]]],
                points: Mapping[str, tuple[float, float]] | None = None,
                xlabel: str = "mean MACs per sample", ylabel: str = "accuracy",
                title: str | None = None) -> Path:
    """Accuracy-vs-cost curves (lines) and single operating points (markers) in one PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=3, label=name)
    markers = iter("o*sD^vP")
    for name, (x, y) in (points or {}).items():
        ax.scatter([x], [y], marker=next(markers, "o"), s=60, zorder=5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
