"""A user's own clipping policy, unchanged, in every framework: real training, real updates.

``HalveAbove`` (the README's example, in _custom.py) halves the gradients when their global
norm exceeds a limit. With plain SGD (no momentum), halving every gradient is exactly training
at half the learning rate (a factor of 2 is exact in floating point), so each test compares
the weights after training with the policy at ``lr`` against training without it at ``lr / 2``:
equal only if the optimizer really applied halved gradients at every step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from _custom import HalveAbove, UnitCap
from gradwatch.reporting import GradWatchWarning
from gradwatch.sinks import MemorySink

LR = 0.1
STEPS = 4
ALWAYS, NEVER = 0.0, 1e30  # limits: every norm is above the first, none above the second


def test_lightning(tmp_path):
    pytest.importorskip("lightning")
    import torch

    from _models import FixedData, Regressor, trainer
    from gradwatch.integrations.lightning import GradWatch

    def fit(lr: float, clip) -> list[torch.Tensor]:
        model = Regressor(lr=lr)
        watch = GradWatch(log_dir=str(tmp_path), clip=clip)
        options = dict(logger=False, enable_checkpointing=False, max_steps=STEPS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's advice on workers, and the like
            trainer(tmp_path, callbacks=[watch], **options).fit(model, datamodule=FixedData())
        return [p.detach().clone() for p in model.parameters()]

    halved = fit(LR, HalveAbove(ALWAYS))
    assert_equal(halved, fit(LR / 2, None))
    assert_not_equal(halved, fit(LR, None))
    assert_equal(fit(LR, HalveAbove(NEVER)), fit(LR, None))


def plain_loop(lr: float, clip, sink=None, steps: int = STEPS, seen=None):
    """A plain PyTorch loop with ``TorchGradWatch``; ``seen`` collects each step's gradients
    before and after the watch, and the update the optimizer made."""
    import torch
    from torch import nn

    from gradwatch.integrations.torch import TorchGradWatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    sinks = [] if sink is None else [sink]
    with TorchGradWatch(model, False, log_every_n_steps=1, clip=clip, sinks=sinks) as watch:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            raw = [p.grad.clone() for p in model.parameters()]
            before = [p.detach().clone() for p in model.parameters()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GradWatchWarning)
                watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
            if seen is not None:
                after = model.parameters()
                moved = [(b - p.detach()) / lr for b, p in zip(before, after, strict=True)]
                seen.append((raw, moved))
    return [p.detach().clone() for p in model.parameters()]


def test_plain_torch_loop():
    pytest.importorskip("torch")
    sink = MemorySink()
    halved = plain_loop(LR, HalveAbove(ALWAYS), sink)
    assert_equal(halved, plain_loop(LR / 2, None))
    assert_not_equal(halved, plain_loop(LR, None))
    assert [r.scalars["clip/coefficient"] for r in sink.records] == [0.5] * STEPS
    assert_equal(plain_loop(LR, HalveAbove(NEVER)), plain_loop(LR, None))


def test_plain_torch_loop_a_policy_that_needs_unit_norms():
    torch = pytest.importorskip("torch")
    cap, seen = 0.05, []
    plain_loop(LR, UnitCap(cap), steps=2, seen=seen)
    capped = 0
    for raw, applied in seen:
        for g, a in zip(raw, applied, strict=True):
            units = g.flatten(1) if g.ndim > 1 else g.reshape(1, -1)  # rows; a bias is one unit
            norms = units.norm(dim=1, keepdim=True)
            expected = units * torch.clamp(cap / norms, max=1.0)
            applied_units = a.flatten(1) if a.ndim > 1 else a.reshape(1, -1)
            torch.testing.assert_close(applied_units, expected, rtol=1e-4, atol=1e-7)
            capped += int((norms > cap).sum())
    assert capped > 0  # some units were above the cap, so it was really applied per unit


def test_keras_fit(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    from gradwatch.integrations.keras import GradWatch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (2 * x[:, :1]).astype("float32")

    def fit(lr: float, clip, sink=None) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        model.compile(keras.optimizers.SGD(lr), "mse")
        sinks = [] if sink is None else [sink]
        watch = GradWatch(log_dir=False, log_every_n_steps=1, clip=clip, sinks=sinks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GradWatchWarning)
            model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[watch])
        return [np.array(w) for w in model.get_weights()]

    sink = MemorySink()
    halved = fit(LR, HalveAbove(ALWAYS), sink)
    assert_equal(halved, fit(LR / 2, None))
    assert_not_equal(halved, fit(LR, None))
    assert [r.scalars["clip/coefficient"] for r in sink.records] == [0.5] * STEPS


def assert_equal(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-9)


def assert_not_equal(a, b) -> None:
    assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_the_readme_shows_this_policy():
    import inspect
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert inspect.getsource(HalveAbove) in readme
