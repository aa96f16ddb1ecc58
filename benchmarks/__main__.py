"""``python -m benchmarks <suite> ...``: the suites that regenerate the README's tables.

Errors print as one line; BENCH_TRACE=1 in the environment shows their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from splitexit.errors import SplitexitError

SUITES = ["early_exit", "catalogue", "split", "cbnet", "serve", "compress", "deploy"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=(__doc__ or "").strip().splitlines()[0])
    suites = parser.add_subparsers(dest="suite", required=True)
    for name in SUITES:
        importlib.import_module(f"benchmarks.{name}").register(suites)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from splitexit.measure import steady_allocator

    steady_allocator()  # every method timed in the same allocator state
    try:
        return args.func(args)
    except SplitexitError as exc:
        if os.environ.get("BENCH_TRACE"):
            raise
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
