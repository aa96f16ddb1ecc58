"""What every suite's command line shares: the command recorded in a report, and its table."""

from __future__ import annotations

import shlex
import sys


def command_line() -> str:
    """The command that regenerates this run, as recorded in report.json."""
    return "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def print_rows(report: dict) -> None:
    """The report's rows as a markdown table on stdout."""
    from splitexit.report import markdown_table

    print(markdown_table(report["rows"]))
