"""Test-session setup: the shared harness on sys.path, Triton's CPU interpreter, and the
`seed` fixture (a fresh seed per test, named in the report when the test fails)."""
import os
import sys
from pathlib import Path

import pytest

# Triton kernels run in interpreter mode on CPU-only machines (set before triton imports).
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from harness import SEED_ENV, fresh_seed


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fresh random seed for this test (``COMMRT_TEST_SEED=N`` replays one); a failing
    test's report shows it. Build inputs from it with ``harness.generator(seed, ...)``."""
    value = fresh_seed()
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(
                    ("seed", f"seed={value} (replay: {SEED_ENV}={value} pytest {item.nodeid})"))
