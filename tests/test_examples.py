"""The examples run as a user runs them, in a tiny configuration."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import subprocess
import sys
from pathlib import Path

from _models import event_files, read_events

pytestmark = pytest.mark.slow  # each example trains in a process of its own

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(EXAMPLES / script), *args], check=True, timeout=300)


def test_plain_torch_loop(tmp_path):
    run("plain_torch_loop.py", "--log-dir", str(tmp_path), "--steps", "21")
    events = read_events(event_files(tmp_path)[0])
    assert [e.step for e in events.Scalars("grad_norm/0")] == [0, 9, 19, 20]  # and the last step
    assert "grad_hist/4" in events.Tags()["histograms"]


def test_lightning_quickstart(tmp_path):
    run("lightning_quickstart.py", "--max-steps", "11", "--root", str(tmp_path))
    user_run, gradwatch_run = event_files(tmp_path)
    assert "train_loss" in read_events(user_run).Tags()["scalars"]
    assert [e.step for e in read_events(gradwatch_run).Scalars("grad_norm/net.0")] == [
        0,
        9,
        10,
    ]  # and the last step
    assert "grad_hist/net.4" in read_events(gradwatch_run).Tags()["histograms"]
