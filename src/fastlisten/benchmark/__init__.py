"""``fastlisten bench``'s machinery: a load generator, the servers under
test, the runner that compares them side by side, and the report.

``run_benchmark(Options())`` runs the full comparison; ``Options.quick()``
the under-a-minute one.  ``run_load`` is the load generator on its own.
"""

from fastlisten.benchmark.loadgen import LoadResult, run_load
from fastlisten.benchmark.runner import Options, Report, run_benchmark

__all__ = ["LoadResult", "run_load", "Options", "Report", "run_benchmark"]
