"""The benchmarks and checks: scripts, each run as `python tools/NAME.py` from the project's
root, and a package so that they import one another as `tools.NAME` (gpu_report.py runs
bench_loader.py's peers, for instance) and the tests import them the same way."""
