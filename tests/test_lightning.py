"""The Lightning callback under a real Trainer on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import csv
import glob
import os
import re

import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.precision import MixedPrecision
from tensorboard.plugins.custom_scalar import layout_pb2

from _arguments import NUMPY
from _models import (
    Regressor,
    direct_group_norms,
    event_files,
    gradwatch_events,
    loader,
    make_net,
    read_events,
    trainer,
)
from gradwatch import tags
from gradwatch.integrations.lightning import GradWatch
from gradwatch.policies import ClipByNorm

GROUPS = ["net.0", "net.2", "net.4"]


def logged(accumulator, tag):
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_logged_norms_equal_a_direct_computation_in_every_logger(tmp_path):
    expected = direct_group_norms(make_net())
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    watch = GradWatch(log_every_n_steps=3, histogram_every_n_steps=4, statistics="all")
    trainer(tmp_path, logger=loggers, callbacks=[watch], max_steps=10).fit(
        Regressor(lr=0.0), loader()
    )

    user_run, gradwatch_run = event_files(tmp_path / "tb")
    assert os.path.dirname(gradwatch_run).endswith(os.path.join("version_0", "gradwatch"))
    # One event per step in gradwatch's own file, rather than one per scalar via the logger.
    scalars = read_events(gradwatch_run)
    user_tags = read_events(user_run).Tags()["scalars"]
    assert not [t for t in user_tags if t.startswith(("grad_", "param_"))]
    for group in GROUPS:
        values = logged(scalars, f"grad_norm/{group}")
        # Lightning logs at 2, 5, 8 too; the run's last step (9) is written when it ends
        assert [s for s, _ in values] == [0, 2, 5, 8, 9]
        assert all(v == pytest.approx(expected[group], rel=1e-5) for _, v in values)
        for statistic in ["grad_max_abs", "grad_nonfinite", "param_norm", "grad_to_param"]:
            assert len(logged(scalars, f"{statistic}/{group}")) == 4
    total = sum(v**2 for v in expected.values()) ** 0.5
    assert logged(scalars, "global/grad_norm")[-1][1] == pytest.approx(total, rel=1e-5)
    assert logged(scalars, "global/max_since_last_log")[-1][1] == pytest.approx(total, rel=1e-5)

    histograms = scalars
    assert sorted(histograms.Tags()["histograms"]) == [f"grad_hist/{g}" for g in GROUPS]
    assert [e.step for e in histograms.Histograms("grad_hist/net.0")] == [0, 3, 7]

    (metrics,) = glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm/net.0")]
    assert [int(r["step"]) for r in rows] == [0, 2, 5, 8, 9]
    assert float(rows[0]["grad_norm/net.0"]) == pytest.approx(expected["net.0"], rel=1e-5)


class LogsItsLoss(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


def test_a_csv_logger_gets_the_scalars_and_the_event_file_everything(tmp_path):
    watch = GradWatch(histogram_every_n_steps=4)  # the Trainer's cadence: 4
    logger = CSVLogger(tmp_path, name="csv")
    run = trainer(tmp_path, logger=logger, callbacks=[watch], log_every_n_steps=4)
    run.fit(LogsItsLoss(lr=0.0), loader())
    (path,) = event_files(tmp_path)
    assert os.path.dirname(path) == str(tmp_path / "csv" / "version_0" / "gradwatch")
    events = read_events(path)
    assert "grad_norm/net.0" in events.Tags()["scalars"]  # `gradwatch report` reads them
    assert sorted(events.Tags()["histograms"]) == [f"grad_hist/{g}" for g in GROUPS]
    (metrics,) = glob.glob(str(tmp_path / "csv" / "**" / "metrics.csv"), recursive=True)
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm/net.0") or r.get("loss")]
    # Where Lightning logs a step (3, 7), gradwatch's scalars share its row; step 0 has its own.
    assert [(int(r["step"]), bool(r["loss"]), bool(r["grad_norm/net.0"])) for r in rows] == [
        (0, False, True),
        (3, True, True),
        (7, True, True),
    ]


def test_no_arguments_and_no_logger(tmp_path):
    for _ in range(2):  # two fits: two runs, never one folder
        trainer(tmp_path, logger=False, callbacks=[GradWatch()], log_every_n_steps=4).fit(
            Regressor(lr=0.01), loader()
        )
    first, second = event_files(tmp_path)
    assert os.path.dirname(first) == str(tmp_path / "gradwatch_logs" / "version_0")
    assert os.path.dirname(second) == str(tmp_path / "gradwatch_logs" / "version_1")
    events = read_events(first)
    assert [s for s, _ in logged(events, "grad_norm/net.0")] == [0, 3, 7]  # the Trainer's cadence
    assert not (tmp_path / "gradwatch").exists()  # no folder named like the package


def test_an_unwritable_log_dir_is_an_error_at_fit_start(tmp_path):
    (tmp_path / "a_file").write_text("the user's")
    watch = GradWatch(log_dir=tmp_path / "a_file" / "logs")
    run = trainer(tmp_path, callbacks=[watch], logger=False)
    with pytest.raises(OSError, match=r"cannot write its event files to '.*a_file/logs'"):
        run.fit(Regressor(lr=0.01), loader())
    assert run.global_step == 0 and (tmp_path / "a_file").read_text() == "the user's"


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path):
    expected = direct_group_norms(make_net())
    watch = GradWatch(log_every_n_steps=1)
    trainer(tmp_path, callbacks=[watch], accumulate_grad_batches=4, max_steps=3).fit(
        Regressor(lr=0.0), loader()
    )
    events = gradwatch_events(tmp_path)
    values = logged(events, "grad_norm/net.2")
    assert [s for s, _ in values] == [0, 1, 2]
    # Lightning divides the loss by 4 and sums 4 equal micro-batch gradients: the same gradient.
    assert all(v == pytest.approx(expected["net.2"], rel=1e-5) for _, v in values)


class TwoOptimizers(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        for optimizer in (first, second):
            optimizer.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            optimizer.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[:2].parameters(), lr=0.0),
            torch.optim.SGD(self.net[2:].parameters(), lr=0.0),
        )


def test_manual_optimization_with_two_optimizers(tmp_path):
    expected = direct_group_norms(make_net())
    watch = GradWatch(log_every_n_steps=2)
    trainer(tmp_path, callbacks=[watch], max_steps=8).fit(TwoOptimizers(), loader())
    events = gradwatch_events(tmp_path)
    first = logged(events, "global/grad_norm_optimizer0")
    second = logged(events, "global/grad_norm_optimizer1")
    assert len(first) == len(second) == 3  # each optimizer stepped 4 times: logged at 0, 1, 3
    assert first[0][1] == pytest.approx(expected["net.0"], rel=1e-5)
    tail = (expected["net.2"] ** 2 + expected["net.4"] ** 2) ** 0.5
    assert second[0][1] == pytest.approx(tail, rel=1e-5)
    assert watch.state_dict()["optimizer_steps"] == [4, 4]
    (config,) = events.Tensors(tags.LAYOUT)  # one global-norm chart per optimizer
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    for label in (0, 1):
        tag = f"global/grad_norm_optimizer{label}"
        on = [title for title, tags in charts.items() if any(re.match(p, tag) for p in tags)]
        assert on == [f"global gradient norm (optimizer {label})"]


@pytest.mark.parametrize(
    ("precision", "optimizer", "fused"),
    [("bf16-mixed", "sgd", False), ("16-mixed", "sgd", False), ("16-mixed", "adam", True)],
)
def test_mixed_precision_statistics_are_unscaled(tmp_path, precision, optimizer, fused):
    expected = direct_group_norms(make_net())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if precision == "16-mixed" else None
    plugin = MixedPrecision(precision, "cpu", scaler)
    watch = GradWatch(log_every_n_steps=1)
    run = trainer(tmp_path, callbacks=[watch], plugins=[plugin], max_steps=3)
    run.fit(Regressor(lr=0.0, optimizer=optimizer, fused=fused), loader())
    events = gradwatch_events(tmp_path)
    for group in GROUPS:  # half-precision forward passes: a few parts per thousand
        (_, value), *_ = logged(events, f"grad_norm/{group}")
        assert value == pytest.approx(expected[group], rel=2e-2)
    if scaler is not None:
        assert scaler.get_scale() == 2.0**12  # no inf found: every step was taken


def test_a_crash_loses_nothing_that_was_logged(tmp_path):
    class Crashes(Regressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 5:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    watch = GradWatch(log_every_n_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, callbacks=[watch], logger=False).fit(Crashes(), loader())
    assert watch.reporter.closed
    events = read_events(event_files(tmp_path)[0])
    # the logging steps, and the last step before the crash
    assert [s for s, _ in logged(events, "grad_norm/net.0")] == [0, 1, 3, 4]


def test_numpy_numbers_are_accepted_as_python_numbers():
    options = GradWatch(**NUMPY).options
    assert (options.log_every_n_steps, options.histogram_every_n_steps) == (5, 10)
    assert options.histogram_bins == 7 and options.track_update_ratio is True
    assert options.guard.policy == ClipByNorm(0.5)
    assert all(type(v) is int for v in (options.log_every_n_steps, options.histogram_bins))
    assert GradWatch(log_every_n_steps=None).options.log_every_n_steps is None  # the Trainer's


def test_two_instances_checkpoint_their_own_state():
    assert GradWatch(log_every_n_steps=1).state_key != GradWatch(log_every_n_steps=2).state_key
