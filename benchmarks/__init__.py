"""Benchmarks of atc_det (scripts run from the repository root, ``python benchmarks/bench_x.py``)
and the fixtures they share (``benchmarks.fixtures``); not part of the ``atc_det`` library."""
