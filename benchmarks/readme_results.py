"""Regenerate the README's results section from reports/*/report.json (never typed by hand).

Usage: python benchmarks/readme_results.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitexit.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COLUMNS = ["method", "model", "runtime", "dataset", "link", "accuracy", "full_test_accuracy",
           "miou", "pixel_accuracy", "miou_drop_pt",
           "accuracy_drop_pt", "target_drop_pt", "test_drop_ci95_pt", "drop_vs_control_pt",
           "macs_ratio", "latency_ms",
           "latency_p50_ms", "latency_ratio", "p50_ms", "throughput_sps", "throughput_ratio",
           "bytes_per_sample", "bytes_ratio", "energy_mj", "stored_bytes", "overhead_batch1",
           "overhead_batched", "predicted_no_exit_ratio", "speedup_mean", "speedup_p50",
           "same_exits_batch1", "same_predictions_batch1", "same_exits_batched",
           "cold_start_ms", "cold_start_ratio", "peak_rss_mb", "rss_ratio", "install_mb",
           "install_ratio", "exit_fractions"]
MAX_ROWS = 40


def _compact(row: dict) -> dict:
    return {k: row[k] for k in COLUMNS if k in row}


def render(reports_dir: Path = ROOT / "reports") -> str:
    parts = []
    paths = sorted([*reports_dir.glob("*/report.json"), *reports_dir.glob("*/*/report.json")],
                   key=lambda p: p.parent.relative_to(reports_dir).parts)
    for path in paths:
        report = json.loads(path.read_text())
        rows = [_compact(r) for r in report.get("rows", []) if "accuracy" in r or "p50_ms" in r
                or "bytes_per_sample" in r or "miou" in r]
        shown = rows[:MAX_ROWS]
        rel = path.parent.relative_to(ROOT)
        parts.append(f"### {rel.relative_to('reports')} ({report.get('dataset', '')})\n")
        if report.get("command"):
            parts.append(f"Regenerate: `{report['command']}`  \n")
        parts.append(f"Measured on: {report.get('device', 'n/a')}. Full report: "
                     f"[{rel}/report.md]({rel}/report.md)\n")
        parts.append(markdown_table(shown, COLUMNS))
        if len(rows) > len(shown):
            parts.append(f"_{len(rows) - len(shown)} more rows in the full report._\n")
        for name in report.get("readme_sections", []):  # further tables the suite asks for
            table = [_compact(r) for r in report.get("sections", {}).get(name, [])]
            if table:
                parts.append(f"{name}:\n")
                parts.append(markdown_table(table, COLUMNS))
    return "\n".join(parts) if parts else "_No benchmark reports yet._\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the README is stale")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the {BEGIN} / {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}\n{END}{tail}"
    if args.check:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
