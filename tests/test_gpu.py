"""On a GPU: exact statistics, and no host synchronisation outside the logging steps' one read.

Skipped where CUDA is absent (CI); run on a GPU machine with ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from torch import nn

from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.sinks import MemorySink

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8)
    ).cuda()


def test_records_are_exact_and_only_logging_steps_read_the_gpu():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    sink = MemorySink()
    watch = TorchGradWatch(
        model,
        log_dir=False,
        log_every_n_steps=3,
        histogram_every_n_steps=4,
        statistics="all",
        sinks=[sink],
    )
    x, y = torch.randn(128, 64, device="cuda"), torch.randn(128, 8, device="cuda")
    nn.functional.mse_loss(model(x), y).backward()
    expected = {n.rpartition(".")[0]: 0.0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        expected[n.rpartition(".")[0]] += p.grad.double().square().sum().item()
    torch.cuda.synchronize()
    logging_steps = {0, 2, 5, 8, 11}
    for step in range(12):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        # Any synchronising call raises, after the first step: there the decision compiles
        # (TorchInductor's constant folding reads a few constants it made, once).
        torch.cuda.set_sync_debug_mode("error" if step > 0 else 0)
        try:
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            if step not in logging_steps:
                watch.after_optimizer_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if step in logging_steps:
            watch.after_optimizer_step()  # the one read of a logging step
    watch.close()
    compiled = watch.engine.guard.compiled
    assert compiled.compilations == 1 and not compiled.failed  # decided by the compiled update
    logged = [r.step for r in sink.records if r.scalars]
    assert logged == [0, 2, 5, 8, 11]
    assert [r.step for r in sink.records if r.histograms] == [0, 3, 7, 11]
    for record in sink.records:
        for group, square in expected.items():
            if record.scalars:
                assert record.scalars[f"grad_norm/{group}"] == pytest.approx(square**0.5, rel=1e-4)
                assert record.scalars[f"update_to_param/{group}"] == 0.0
