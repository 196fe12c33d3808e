"""Entry point of one rank of a `run_ranks` job: import the test file, call the worker.

Usage: python tests/support/worker_mpi.py TEST_FILE FUNCTION KWARGS_JSON
"""
import importlib.util
import json
import sys

from commrt.transports import install_abort_on_error


def main() -> None:
    path, name, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    install_abort_on_error()
    spec = importlib.util.spec_from_file_location(f"_commrt_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, name)(**kwargs)


if __name__ == "__main__":
    main()
