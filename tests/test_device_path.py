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
    torch._dynamo.utils.counters.clear()
    device, device_records = train(net(), **options)
    assert device.engine.guard.compiled.compilations == 1  # at the first step, never again
    assert not device.engine.guard.compiled.failed
    assert not torch._dynamo.utils.counters["graph_break"]
    assert device.engine.skipped == host.engine.skipped == [6]
    assert [repr(e) for e in device.events] == [repr(e) for e in host.events]  # NaN values
    for a, b in zip(host_records, device_records, strict=True):
        assert a.scalars.keys() == b.scalars.keys()
        for tag, value in a.scalars.items():
            assert b.scalars[tag] == pytest.approx(value, rel=1e-5, nan_ok=True), tag


def test_a_failing_compiler_falls_back_to_eager_after_one_warning(monkeypatch):
    def broken(graph, inputs, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_compiled.torch._inductor, "compile", broken)
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
    region: no graph break in it and no recompilation of it (gradwatch's own update is
    compiled without Dynamo)."""
    if device_path:
        monkeypatch.setenv(DEVICE_DECISIONS, "1")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.compile(net())
    _, records = train(model, clip=1.0)
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1  # the model's forward, compiled once
    assert "grad_norm/0" in records[0].scalars  # the model's own names, no _orig_mod


def test_many_watches_compile_each_their_own_update(monkeypatch):
    """Each watch compiles its own update once: the tenth watch in a process (a test suite, a
    sweep) is still compiled, never recompiled, and never falls back to eager."""
    monkeypatch.setenv(DEVICE_DECISIONS, "1")
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        watches = [train(net(), steps=3)[0] for _ in range(10)]
    assert [w.engine.guard.compiled.compilations for w in watches] == [1] * 10
    assert not [w for w in told if "recompile" in str(w.message) or "eagerly" in str(w.message)]


def test_inputs_that_keep_changing_shape_decide_eagerly_after_one_warning():
    compiled = _compiled.Compiled(lambda x: (x * 2, x.sum()))
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        for size in range(1, _compiled.MAX_SIGNATURES + 3):
            doubled, total = compiled(torch.ones(size))
            assert doubled.tolist() == [2.0] * size and total.item() == size
    assert compiled.compilations == _compiled.MAX_SIGNATURES
    assert compiled.failed
    assert len([w for w in told if "decides eagerly" in str(w.message)]) == 1


def test_a_branch_on_a_value_is_not_compiled_into_a_constant():
    """Tracing with fake tensors: an update that branches on a value cannot be compiled (it
    would bake one branch in); it runs eagerly and stays right."""
    compiled = _compiled.Compiled(lambda x: (x + 1 if bool(x > 0) else x - 1,))
    with warnings.catch_warnings(record=True) as told:
        warnings.simplefilter("always")
        results = [compiled(torch.tensor(v))[0].item() for v in (1.0, -1.0)]
    assert results == [2.0, -2.0]
    assert compiled.failed and len(told) == 1


def compiled_training(watch_options: dict | None) -> dict:
    """A plain loop whose forward and optimizer step are both compiled (the PyTorch recipe for
    a compiled optimizer), with or without gradwatch between backward and the step: Dynamo's
    counters afterwards."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.compile(net())
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2))
    opt_step = torch.compile(optimizer.step)
    watch = None if watch_options is None else TorchGradWatch(model, False, **watch_options)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(8):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if watch is not None:
            watch.before_optimizer_step(optimizer)
        opt_step()
        if watch is not None:
            watch.after_optimizer_step()
    counters = torch._dynamo.utils.counters
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": sum(counters["graph_break"].values()),
    }


@pytest.mark.parametrize("device_path", [False, True], ids=["host", "device"])
def test_a_compiled_training_step_compiles_as_without_gradwatch(monkeypatch, device_path):
    """The model and the optimizer step compiled: gradwatch (clipping every step, logging
    every other) adds no graph, no graph break and no recompilation to them."""
    if device_path:
        monkeypatch.setenv(DEVICE_DECISIONS, "1")
    alone = compiled_training(None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        watched = compiled_training({"clip": AutoClip(), "log_every_n_steps": 2})
    assert watched == alone


def test_an_input_with_other_strides_gets_its_own_graph():
    """A state made by broadcasting (stride 0) and the same state as the graph returns it
    (contiguous) are two signatures: each compiled for what it is, both right."""
    compiled = _compiled.Compiled(lambda x: (x + torch.arange(3.0),))
    (first,) = compiled(torch.zeros(()).expand(3))
    (second,) = compiled(first)
    assert first.tolist() == [0.0, 1.0, 2.0] and second.tolist() == [0.0, 2.0, 4.0]
    assert compiled.compilations == 2 and not compiled.failed
