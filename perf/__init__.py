"""commrt's perf suite: ``python -m perf run SUITE`` from the repository root (perf/__main__.py).

  perf/suites.py     the suites as data: which benchmark runs where, with which flags
  perf/runner.py     runs a suite's jobs, collects their records, writes the report
  perf/infra/        launching jobs (launch), emulated links (netem), py-spy profiles
                     (profile), shared units and the benchmarks' driver/worker pattern
  perf/bench/        the benchmarks, each also a command: ``python -m perf.bench.NAME``
  perf/analysis/     the α–β model (model) and the report (report)

Results go to ``results/`` at the top of the checkout (committed runs live there too).
"""
