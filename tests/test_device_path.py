"""The device decision path (a GPU's), run on the CPU: compiled once, no recompilation, and the
same decisions as the host path; a compiled model keeps its one graph."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import warnings

import torch
import torch._dynamo.utils
from torch import nn

from gradwatch.integrations import _compiled
from gradwatch.integrations._torch_decisions import DEVICE_DECISIONS
from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.policies import AutoClip
from gradwatch.reporting import GradWatchWarning
from gradwatch.sinks import MemorySink


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))


def train(model: nn.Module, steps: int = 12, **options) -> tuple[TorchGradWatch, list]:
    """A plain loop with a NaN at step 6; returns the watch and the records."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    sink = MemorySink()
    watch = TorchGradWatch(model, False, log_every_n_steps=4, sinks=[sink], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        for step in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if step == 6:
                next(model.parameters()).grad[0, 0] = float("nan")
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
        watch.close()
    return watch, sink.records


def test_the_switch_puts_the_cpu_on_the_device_path(monkeypatch):
    assert TorchGradWatch(net(), False).engine.guard.host_on_cpu is True
    monkeypatch.setenv(DEVICE_DECISIONS, "1")
    assert TorchGradWatch(net(), False).engine.guard.host_on_cpu is False


def test_the_update_compiles_once_and_decides_as_the_host_path(monkeypatch):
    options = {"clip": AutoClip(), "on_nonfinite": "skip"}
    host, host_records = train(net(), **options)
    monkeypatch.setenv(DEVICE_DECISIONS, "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    device, device_records = train(net(), **options)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1  # compiled at the second step, never again
    assert not torch._dynamo.utils.counters["graph_break"]
    assert device.engine.skipped == host.engine.skipped == [6]
    assert [repr(e) for e in device.events] == [repr(e) for e in host.events]  # NaN values
    for a, b in zip(host_records, device_records, strict=True):
        assert a.scalars.keys() == b.scalars.keys()
        for tag, value in a.scalars.items():
            assert b.scalars[tag] == pytest.approx(value, rel=1e-5, nan_ok=True), tag


def test_a_failing_compiler_falls_back_to_eager_after_one_warning(monkeypatch):
    def broken(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_compiled.torch, "compile", broken)
    monkeypatch.setenv(DEVICE_DECISIONS, "1")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        model = net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        watch = TorchGradWatch(model, False, on_nonfinite="skip")
        for step in range(4):
            optimizer.zero_grad()
            model(torch.randn(8, 6)).square().mean().backward()
            if step == 2:
                next(model.parameters()).grad[0, 0] = float("nan")
            watch.before_optimizer_step(optimizer)
            optimizer.step()
    eager = [str(w.message) for w in told if "decides eagerly" in str(w.message)]
    assert len(eager) == 1 and "no compiler here" in eager[0]
    assert watch.engine.skipped == [2]  # the eager update still decides


@pytest.mark.parametrize("device_path", [False, True], ids=["host", "device"])
def test_a_compiled_model_keeps_its_graph(monkeypatch, device_path):
    """gradwatch runs between backward and the optimizer step, outside the model's compiled
    region: no graph break in it and no recompilation of it."""
    if device_path:
        monkeypatch.setenv(DEVICE_DECISIONS, "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.compile(net())
    _, records = train(model, clip=1.0)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"]
    # the model's forward, and on the device path gradwatch's own update: one graph each
    assert counters["stats"]["unique_graphs"] == 1 + device_path
    assert "grad_norm/0" in records[0].scalars  # the model's own names, no _orig_mod


def test_many_watches_compile_each_their_own_update(monkeypatch):
    """Dynamo keeps a few compiled versions per code object: each update has its own, so the
    tenth watch in a process (a test suite, a sweep) is still compiled, never recompiled."""
    monkeypatch.setenv(DEVICE_DECISIONS, "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        for _ in range(10):
            train(net(), steps=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 10
    assert not [w for w in told if "recompile" in str(w.message) or "eagerly" in str(w.message)]
