"""Benchmark suites; each writes report.json, report.md and plots (run via ``splitexit bench``)."""
