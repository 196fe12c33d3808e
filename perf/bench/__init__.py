"""The benchmarks. Each is a command: ``python -m perf.bench.NAME --help``."""
