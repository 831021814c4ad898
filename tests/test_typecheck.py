"""The framework-free core passes mypy, configured in pyproject.toml (``[tool.mypy]``)."""

from __future__ import annotations

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api", reason="mypy comes with the `test` extra")

ROOT = Path(__file__).resolve().parent.parent


def test_core_passes_mypy() -> None:
    report, errors, status = api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            str(ROOT / "gradwatch"),  # the core only: integrations/ is typed against frameworks
        ]
    )
    assert status == 0, f"mypy found errors in gradwatch/:\n{report}{errors}"
