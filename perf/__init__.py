"""commrt perf suite: `python -m perf run SUITE` (see perf/__main__.py and the README)."""
