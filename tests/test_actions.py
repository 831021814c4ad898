"""Detectors, clipping and actions under a real Lightning Trainer on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import math
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _models import FEATURES, FixedBatch, Regressor, gradwatch_events, loader, trainer
from gradwatch.integrations.lightning import GradWatch, GradWatchWarning
from gradwatch.policies import AGC, AutoClip, ClipByValue

SPIKE = 30  # the step from which the learning rate is 200 times larger


class Spiking(L.LightningModule):
    """A regressor whose learning rate jumps 200x at step SPIKE: it diverges unless rescued."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda k: 1.0 if k < SPIKE else 200.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def regression_data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    y = 2 * x[:, :1] + 0.1 * torch.randn(512, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def quiet_fit(run: L.Trainer, model, data) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        run.fit(model, data)


def test_autoclip_keeps_the_same_run_finite(tmp_path):
    unguarded, rescued = Spiking(), Spiking()
    quiet_fit(trainer(tmp_path / "a", max_steps=60, logger=False), unguarded, regression_data())
    watch = GradWatch(log_every_n_steps=10, clip=AutoClip())
    quiet_fit(trainer(tmp_path / "b", callbacks=[watch], max_steps=60), rescued, regression_data())
    assert not math.isfinite(unguarded.losses[-1])
    assert all(math.isfinite(loss) for loss in rescued.losses)
    assert all(torch.isfinite(p).all() for p in rescued.parameters())
    events = gradwatch_events(tmp_path / "b")
    assert "clip/threshold" in events.Tags()["scalars"]
    coefficients = [e.value for e in events.Scalars("clip/coefficient")]
    assert min(coefficients) < 0.5  # it did clip


class Deep(L.LightningModule):
    def __init__(self, activation: nn.Module, residual: bool, depth: int = 20) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(FEATURES, 32)
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(depth))
        self.out = nn.Linear(32, 1)
        self.activation, self.residual = activation, residual

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            update = self.activation(block(h))
            h = h + update if self.residual else update
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


@pytest.mark.parametrize(
    ("activation", "residual", "vanishes"),
    [(nn.Sigmoid(), False, True), (nn.ReLU(), True, False)],
    ids=["sigmoid", "relu-residual"],
)
def test_vanishing_early_layers_of_a_deep_sigmoid_net(tmp_path, activation, residual, vanishes):
    watch = GradWatch(log_every_n_steps=5)
    model = Deep(activation, residual)
    data = DataLoader(FixedBatch(length=64, batch_size=64), batch_size=None)
    quiet_fit(trainer(tmp_path, callbacks=[watch], max_steps=15), model, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    flagged = {e["group"] for e in watch.events if e["kind"] == "vanishing"}
    if vanishes:
        assert {"inp", "blocks.0", "blocks.1"} <= flagged
        assert "blocks.19" not in flagged and "out" not in flagged
    else:
        assert flagged == set()


def test_clipping_twice_is_called_out(tmp_path):
    run = trainer(tmp_path, callbacks=[GradWatch(clip=1.0)], gradient_clip_val=0.5, max_steps=1)
    with pytest.warns(GradWatchWarning, match=r"both clip"):
        run.fit(Regressor(), loader())


# ClipByNorm (a float) runs in test_adapter_contract.py.
@pytest.mark.parametrize("clip", [ClipByValue(1e-3), AGC(clipping=1e-3)], ids=str)
def test_the_logged_clipped_norm_is_the_norm_of_the_clipped_gradient(tmp_path, clip):
    class Probe(Callback):  # after GradWatch: sees the gradients as the optimizer will
        def __init__(self) -> None:
            self.norms: dict[int, float] = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad.flatten() for p in pl_module.parameters()]
            self.norms[trainer.global_step] = torch.cat(grads).norm().item()

    probe = Probe()
    run = trainer(tmp_path, callbacks=[GradWatch(log_every_n_steps=2, clip=clip), probe])
    quiet_fit(run, Regressor(lr=0.01), loader())
    logged = gradwatch_events(tmp_path).Scalars("global/clipped_norm")
    assert [e.step for e in logged] == [0, 1, 3, 5, 7]
    for e in logged:
        assert e.value == pytest.approx(probe.norms[e.step], rel=1e-5)
    before = gradwatch_events(tmp_path).Scalars("global/grad_norm")
    assert all(c.value < b.value for c, b in zip(logged, before, strict=True))  # it clipped
