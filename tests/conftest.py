"""Where the test run must have every framework (CI), a missing one is an error, not a skip."""

from __future__ import annotations

import importlib.util
import os

import pytest

FRAMEWORKS = ("torch", "lightning", "tensorflow", "keras")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("GRADWATCH_REQUIRE_FRAMEWORKS"):
        missing = [name for name in FRAMEWORKS if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(f"GRADWATCH_REQUIRE_FRAMEWORKS is set but missing: {missing}")
