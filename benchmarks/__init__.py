"""The benchmark suites that regenerate the README's tables (not part of the installed package).

Run from the repository root: ``python -m benchmarks <suite> --out reports/<suite>``
(``python -m benchmarks --help`` lists the suites). Every suite imports only splitexit's public
API; the reusable measurement (interleaved timing, throughput, paired intervals, comparison
of a multi-exit model with its baseline) lives in the library (``splitexit.measure``,
``splitexit.compare``), where ``splitexit bench`` uses it on your own model.
"""
