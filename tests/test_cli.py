"""GradWatch configured from a LightningCLI YAML file, as users of the CLI do."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import textwrap

from lightning.pytorch.cli import LightningCLI

from _models import FixedData, Regressor, event_files, read_events
from gradwatch.integrations.lightning import GradWatch


def test_configured_from_yaml(tmp_path):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "gradwatch.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_steps: 4
              accelerator: cpu
              logger: false
              enable_progress_bar: false
              enable_checkpointing: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: gradwatch.integrations.lightning.GradWatch
                  init_args:
                    log_every_n_steps: 2
                    histogram_every_n_steps: 4
                    group_by: _models.top_module
                    log_dir: {tmp_path / "gw"}
            """
        )
    )
    cli = LightningCLI(Regressor, FixedData, args=["fit", "--config", str(config)])
    (watch,) = [c for c in cli.trainer.callbacks if isinstance(c, GradWatch)]
    assert watch.options.log_every_n_steps == 2
    assert watch.options.group_by("net.0.weight") == "net"
    events = read_events(event_files(tmp_path / "gw")[0])
    assert [e.step for e in events.Scalars("grad_norm/net")] == [0, 1, 3]
    assert events.Tags()["histograms"] == ["grad_hist/net"]
