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


@pytest.fixture(autouse=True, scope="session")
def _torch_through_gradwatchs_namespace() -> None:
    """The core runs on torch tensors through the namespace the torch engine installs, in
    every test alike, whichever test builds an engine first."""
    if importlib.util.find_spec("torch") is not None:
        from gradwatch.integrations import _torch_namespace

        _torch_namespace.install()


@pytest.fixture(params=["torch", "tensorflow"])
def framework_xp(request: pytest.FixtureRequest):
    """The namespace the core runs on inside an adapter: torch's, or gradwatch's TensorFlow one."""
    if request.param == "torch":
        return pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    from gradwatch.integrations import _tf_namespace

    _tf_namespace.install()
    return _tf_namespace


@pytest.fixture(autouse=True)
def _in_a_folder_of_its_own(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Each test runs in an empty folder, so that what an adapter writes by default (`runs`,
    `logs`, `lightning_logs`) never lands in the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
