"""Detections and actions a user can trust: loss scaling, stop, skip, labels, console, resume.

Each test runs what a user runs (a plain PyTorch loop, a Lightning Trainer, event files read
back by TensorBoard's reader) and fails without the behaviour it names.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import warnings

import pytest

pytest.importorskip("lightning")

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from _models import Regressor, gradwatch_events, loader, trainer
from gradwatch.detectors import Explosion
from gradwatch.integrations.lightning import GradWatch
from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.record import Record
from gradwatch.report import report
from gradwatch.reporting import GradWatchWarning, Reporter
from gradwatch.sinks import MemorySink
from gradwatch.sinks.fanout import Fanout

# -- a plain loop ----------------------------------------------------------------------------


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 16, generator=g)
    return x, x[:, :1] + 0.1 * torch.randn(32, 1, generator=g)


def snapshot(*tensors_and_optimizers) -> list[torch.Tensor]:
    """Copies of parameters and of every tensor in the optimizers' state."""
    out = []
    for item in tensors_and_optimizers:
        if isinstance(item, torch.optim.Optimizer):
            out += [v for s in item.state.values() for v in s.values() if torch.is_tensor(v)]
        else:
            out.append(item)
    return [t.detach().clone() for t in out]


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        yield


# -- 1. loss scaling is not a fault ---------------------------------------------------------


def amp_loop(scaler_given: bool, steps: int = 40):
    model, sink = net(), MemorySink()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    # Starting far above what float16 holds: the scaler's first steps overflow and are
    # dropped by the scaler itself, and growing every 5 steps it probes again.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=5)
    dropped = 0
    watch = TorchGradWatch(
        model,
        False,
        log_every_n_steps=10,
        sinks=[sink],
        on_nonfinite="stop",
        scaler=scaler if scaler_given else None,
    )
    with quiet(), watch:
        for step in range(steps):
            optimizer.zero_grad()
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if not scaler_given:
                scaler.unscale_(optimizer)
            watch.before_optimizer_step(optimizer)
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            dropped += scaler.get_scale() < scale  # the scaler backs off after an overflow
            watch.after_optimizer_step()
            if watch.should_stop:
                break
    return watch, sink, step, dropped


def test_the_loss_scalers_own_overflow_checks_are_counted_never_reported():
    watch, sink, last, dropped = amp_loop(scaler_given=True)
    assert last == 39 and not watch.should_stop and watch.events == []
    assert dropped >= 5  # the scaler really did drop steps
    counted = sink.scalars("amp/skipped_steps")
    assert counted[-1] == (39, float(dropped))
    assert all(v == 0 for _, v in sink.scalars("global/nonfinite_steps"))

    # Without `scaler=`, the same gradients are non-finite to gradwatch: its first step stops.
    watch, _, last, _ = amp_loop(scaler_given=False)
    assert last == 0 and watch.should_stop


def test_lightning_finds_the_scaler_of_16_mixed_itself(tmp_path):
    watch = GradWatch(log_every_n_steps=5, on_nonfinite="stop")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    run = trainer(tmp_path, callbacks=[watch], max_steps=30, plugins=[plugin])
    with quiet():
        run.fit(Regressor(lr=0.01), loader(64))
    assert run.global_step == 30 and watch.stopped_at is None and watch.events == []
    skipped = [e.value for e in gradwatch_events(tmp_path).Scalars("amp/skipped_steps")]
    assert skipped[-1] >= 5


def test_a_nonfinite_gradient_the_scaler_would_not_see_is_caught():
    """bf16 autocast has no loss scaler: a NaN is gradwatch's to catch, and "skip" drops it."""
    model = net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with quiet(), TorchGradWatch(model, False, log_every_n_steps=5, on_nonfinite="skip") as watch:
        for step in range(8):
            optimizer.zero_grad()
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step == 3:
                model[2].weight.grad[0, 0] = float("nan")
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
    assert watch.engine.skipped == [3]
    assert ("nonfinite", "global", "skip") in {
        (e["kind"], e["group"], e["action"]) for e in watch.events
    }
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 2. "stop" and "skip" drop the whole optimizer step -----------------------------------------


@pytest.mark.parametrize("action", ["skip", "stop"])
def test_a_dropped_step_leaves_every_parameter_the_optimizer_holds(action):
    """A learned temperature outside the watched model is part of the step too."""
    model = net()
    temperature = nn.Parameter(torch.ones(()))
    optimizer = torch.optim.AdamW([*model.parameters(), temperature], lr=1e-2, weight_decay=0.1)
    watch = TorchGradWatch(model, False, log_every_n_steps=5, on_nonfinite=action)
    with quiet(), watch:
        for step in range(6):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x) * temperature, y).backward()
            if step == 4:
                model[0].weight.grad[0, 0] = float("nan")
                before = snapshot(*model.parameters(), temperature, optimizer)
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
            if step == 4:
                after = snapshot(*model.parameters(), temperature, optimizer)
                break
    assert len(before) == len(after) > len(list(model.parameters())) + 1
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert watch.should_stop == (action == "stop")


def test_stop_leaves_only_finite_checkpoints_and_logs_the_stop_step(tmp_path):
    """Lightning's default checkpoint and `every_n_train_steps=1, save_last=True` both hold
    finite weights; the stop step's statistics and cause are in TensorBoard and the report."""

    class Diverges(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * (1e30 if self.global_step == 25 else 1.0)

    every_step = ModelCheckpoint(
        tmp_path / "every", every_n_train_steps=1, save_last=True, save_top_k=-1
    )
    default = ModelCheckpoint(tmp_path / "default")  # what Trainer() adds by itself
    watch = GradWatch(log_every_n_steps=10, on_explosion="stop", on_nonfinite="stop")
    run = trainer(tmp_path, callbacks=[watch, every_step, default], max_steps=60)
    with quiet():
        run.fit(Diverges(lr=0.01, optimizer="adam"), loader(64))
    assert watch.stopped_at == 25
    assert all(torch.isfinite(p).all() for p in run.lightning_module.parameters())
    paths = glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)
    assert len(paths) == 25 + 1 + 1 + 1  # every step's, "last", and the default one
    for path in paths:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path

    events = gradwatch_events(tmp_path)
    totals = {e.step: e.value for e in events.Scalars("global/grad_norm")}
    assert 25 in totals and totals[25] > 1e20  # the value that triggered the stop
    (stopped,) = events.Tensors("gradwatch/stopped")
    assert stopped.step == 25
    assert stopped.tensor_proto.string_val[0].startswith(b"stopped at step 25: explosion")

    (page,) = report(tmp_path, tmp_path / "report.html", quiet=True)
    html = page.read_text()
    assert html.index("stopped at step 25: explosion") < html.index("<figure>")


# -- 3. "skip" adapts to a lasting change of level -------------------------------------------


def test_a_lasting_rise_is_skipped_a_bounded_number_of_times_then_accepted():
    model, sink = net(), MemorySink()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = TorchGradWatch(model, False, log_every_n_steps=50, sinks=[sink], on_explosion="skip")
    with quiet(), watch:
        for step in range(300):
            optimizer.zero_grad()
            x, y = batch(step)
            weight = 20.0 if step >= 30 else 1.0  # the loss re-weighted for good at step 30
            (weight * nn.functional.mse_loss(model(x), y)).backward()
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
    accept_after = Explosion().accept_after
    assert watch.engine.skipped == list(range(30, 30 + accept_after - 1))
    accepted = [e for e in watch.events if e["action"] == "accepted"]
    assert [(e["step"], e["group"]) for e in accepted] == [(30 + accept_after - 1, "global")]
    assert sink.scalars("global/skipped_steps")[-1] == (299, accept_after - 1.0)


def test_the_events_kept_in_memory_stay_bounded_over_100_000_steps():
    reporter = Reporter(Fanout([]))
    event = {"kind": "nonfinite", "group": "global", "value": math.nan}
    with quiet():
        for step in range(100_000):
            record = Record(step)
            record.events = [{**event, "step": step, "threshold": math.inf, "action": "skip"}]
            reporter.publish([record])
    assert len(reporter.events) == 1000 and reporter.events[-1]["step"] == 99_999
    assert reporter.counts[("nonfinite", "skip")] == 100_000


# -- 5. one line per finding -------------------------------------------------------------------


def test_each_logging_step_tells_its_findings_in_one_line_global_first(caplog):
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    caplog.set_level(logging.INFO, logger="gradwatch")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        with TorchGradWatch(model, False, log_every_n_steps=5, on_nonfinite="skip") as watch:
            for step in range(10):
                optimizer.zero_grad()
                x, y = batch(step)
                nn.functional.mse_loss(model(x), y).backward()
                if step == 3:
                    model[0].weight.grad.fill_(float("nan"))
                    model[2].weight.grad[0, 0] = float("inf")
                watch.before_optimizer_step(optimizer)
                optimizer.step()
                watch.after_optimizer_step()
    lines = [str(w.message) for w in told if issubclass(w.category, GradWatchWarning)]
    assert lines == [
        "gradwatch: 513 non-finite values (NaN/Inf) in the gradient at step 3 (step skipped),"
        " in 0 (512), 2 (1)"
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert {(e["group"], e["action"], e["count"]) for e in watch.events} == {
        ("global", "skip", 513),  # which group, how many values: without grad_nonfinite charts
        ("0", "warn", 512),
        ("2", "warn", 1),
    }


def test_a_warned_nonfinite_step_between_logging_steps_says_how_many_values():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with quiet(), TorchGradWatch(model, False, log_every_n_steps=5) as watch:  # "warn"
        for step in range(5):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            if step == 2:  # not a logging step (0 and 4 are)
                model[0].bias.grad[:3] = float("nan")
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
    # (the NaN update then spreads through the weights: later steps have findings of their own)
    found = {(e["step"], e["group"]): e.get("count") for e in watch.events if e["step"] == 2}
    assert found == {(2, "global"): 3, (2, "0"): 3}


def test_a_stop_is_one_short_line_naming_its_cause():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    explosion = Explosion(warmup_steps=5)
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        watch = TorchGradWatch(
            model, False, log_every_n_steps=50, on_explosion="stop", explosion=explosion
        )
        with watch:
            for step in range(20):
                optimizer.zero_grad()
                x, y = batch(step)
                scale = 1e4 if step == 12 else 1.0
                nn.functional.mse_loss(model(x) * scale, y).backward()
                watch.before_optimizer_step(optimizer)
                optimizer.step()
                watch.after_optimizer_step()
                if watch.should_stop:
                    break
    lines = [str(w.message) for w in told if issubclass(w.category, GradWatchWarning)]
    assert step == 12 and len(lines) == 1 and len(lines[0]) < 160
    assert lines[0].startswith("gradwatch: stopped at step 12: explosion at step 12: global")


# -- 7. norms beyond float32's squares -------------------------------------------------------


def test_finite_gradients_whose_squares_overflow_are_not_called_nonfinite():
    model, sink = net(), MemorySink()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with quiet(), TorchGradWatch(model, False, log_every_n_steps=1, sinks=[sink]) as watch:
        optimizer.zero_grad()
        x, y = batch(0)
        (1e21 * nn.functional.mse_loss(model(x), y)).backward()
        grads = [p.grad.double() for p in model.parameters()]
        assert all(torch.isfinite(g).all() for g in grads)
        assert not math.isfinite(torch.cat([g.float().flatten() for g in grads]).norm().item())
        watch.before_optimizer_step(optimizer)
        optimizer.step()
        watch.after_optimizer_step()
    exact = torch.cat([g.flatten() for g in grads]).norm().item()
    (record,) = sink.records
    assert record.scalars["global/grad_norm"] == pytest.approx(exact, rel=1e-5)
    assert record.scalars["global/nonfinite_steps"] == 0
    assert not [e for e in watch.events if e["kind"] == "nonfinite"]


# -- 8. resume never crashes -----------------------------------------------------------------


def test_resume_under_another_configuration_warns_once_and_goes_on(tmp_path):
    first = trainer(tmp_path, callbacks=[GradWatch(log_every_n_steps=3)], max_steps=6)
    first.fit(Regressor(lr=0.01), loader())
    path = tmp_path / "six.ckpt"
    first.save_checkpoint(path)

    changed = GradWatch(log_every_n_steps=3, on_explosion="skip", on_vanishing="ignore", clip=0.5)
    second = trainer(tmp_path / "b", callbacks=[changed], max_steps=9, logger=False)
    with pytest.warns(GradWatchWarning) as told:
        second.fit(Regressor(lr=0.01), loader(), ckpt_path=path)
    (line,) = [str(w.message) for w in told if issubclass(w.category, GradWatchWarning)]
    assert "clipping policy ClipByNorm(max_norm=0.5)" in line and "explosion" not in line
    assert second.global_step == 9


def test_resume_from_an_older_or_foreign_gradwatch_state_starts_afresh(tmp_path):
    first = trainer(tmp_path, callbacks=[GradWatch(log_every_n_steps=3)], max_steps=4)
    first.fit(Regressor(lr=0.01), loader())
    path = tmp_path / "four.ckpt"
    first.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GradWatch")]
    guard = checkpoint["callbacks"][key]["guards"][0]
    del guard["config"]  # as written before configurations were saved
    guard["detectors"][1] = guard["detectors"][1][:2]  # the explosion state had two fields
    torch.save(checkpoint, path)

    second = trainer(tmp_path / "b", callbacks=[GradWatch(log_every_n_steps=3)], max_steps=8)
    with pytest.warns(GradWatchWarning, match="starting afresh: detector nonfinite"):
        second.fit(Regressor(lr=0.01), loader(), ckpt_path=path)
    assert second.global_step == 8


def test_resume_from_a_checkpoint_without_gradwatch_says_so(tmp_path, caplog):
    first = trainer(tmp_path, max_steps=4)
    first.fit(Regressor(lr=0.01), loader())
    path = tmp_path / "plain.ckpt"
    first.save_checkpoint(path)
    caplog.set_level(logging.INFO, logger="gradwatch")
    second = trainer(tmp_path / "b", callbacks=[GradWatch(log_every_n_steps=3)], max_steps=8)
    second.fit(Regressor(lr=0.01), loader(), ckpt_path=path)
    assert any("holds no gradwatch state" in r.getMessage() for r in caplog.records)
    assert second.global_step == 8


def test_a_resumed_plain_loop_goes_on_from_the_saved_detector_state():
    """The resumed detector state is the saved one: the next verdicts are those of a run
    that never stopped."""
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)

    def steps(watch, start, stop):
        for step in range(start, stop):
            optimizer.zero_grad()
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()

    first = TorchGradWatch(model, False)
    steps(first, 0, 25)
    saved = first.engine.state_dict()
    first.close()
    second = TorchGradWatch(model, False)
    second.engine.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # nothing starts afresh
        steps(second, 25, 26)
    restored = second.engine.state_dict()["guards"][0]["detectors"]
    np.testing.assert_array_equal(
        restored[1][1], np.asarray(saved["guards"][0]["detectors"][1][1]) + 1
    )
    second.close()
