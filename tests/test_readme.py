"""The README's quick start and CI run the same test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = "python -m pip install -e '.[mpi,dev]' && python -m pytest -q"
    assert command in ci, ".ci/run no longer runs the README's test command"
    assert re.search(re.escape(command), readme), "the README's test command changed"
