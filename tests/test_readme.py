"""The README's quick start and CI run the same test command."""
import re

from harness import REPO_ROOT


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    command = "python -m pip install -e '.[mpi,dev]' && python -m pytest -q"
    assert command in ci, ".ci/run no longer runs the README's test command"
    assert re.search(re.escape(command), readme), "the README's test command changed"
