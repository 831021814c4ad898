"""Detectors, clipping and actions under a real Lightning Trainer on CPU."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import math
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
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


def test_explosion_stops_training_with_a_checkpoint_from_before(tmp_path):
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    watch = GradWatch(log_every_n_steps=10, on_explosion="stop")
    run = trainer(tmp_path, callbacks=[watch, checkpoints], max_steps=100)
    quiet_fit(run, Spiking(), regression_data())

    (first,) = [e for e in watch.events if e["kind"] == "explosion" and e["group"] == "global"]
    assert first["step"] == SPIKE + 1 and first["action"] == "stop"
    assert first["value"] > first["threshold"]  # 10x its running geometric mean, by default
    assert watch.stopped_at is not None and run.global_step <= SPIKE + 3
    before = torch.load(tmp_path / "ckpt" / f"epoch=1-step={SPIKE}.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in before["state_dict"].values())
    text = gradwatch_events(tmp_path).Tensors("gradwatch/events")
    assert any(b"explosion" in t.tensor_proto.string_val[0] for t in text)


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


class InjectNaN(Callback):
    """At step `at`, put a NaN in one gradient and remember every parameter and Adam tensor."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def _tensors(self, trainer: L.Trainer) -> list[torch.Tensor]:
        optimizer = trainer.optimizers[0]
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return [t.detach().clone() for t in [*trainer.lightning_module.parameters(), *state]]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at:
            pl_module.net[2].weight.grad[0, 0] = float("nan")
            self.before = self._tensors(trainer)

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at + 1:
            self.after = self._tensors(trainer)


def test_a_nonfinite_step_is_skipped_bit_for_bit(tmp_path):
    class AdamW(Regressor):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    inject = InjectNaN(at=5)
    watch = GradWatch(log_every_n_steps=3, on_nonfinite="skip")
    model = AdamW()
    quiet_fit(trainer(tmp_path, callbacks=[inject, watch], max_steps=9), model, loader())
    assert len(inject.before) == len(inject.after) > len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(inject.before, inject.after, strict=True))
    assert watch.engine.skipped == [5]
    assert {(e["kind"], e["group"], e["action"]) for e in watch.events} >= {
        ("nonfinite", "global", "skip"),  # what was done, on the finding that caused it
        ("nonfinite", "net.2", "warn"),  # where the NaN was: reported
    }
    assert all(torch.isfinite(p).all() for p in model.parameters())  # training went on


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


def test_resume_continues_with_the_same_autoclip_threshold(tmp_path):
    def watch() -> GradWatch:
        return GradWatch(log_every_n_steps=1, clip=AutoClip(percentile=50.0))

    quiet_fit(
        trainer(tmp_path / "straight", callbacks=[watch()], max_steps=16),
        Regressor(lr=0.05),
        loader(),
    )
    first = trainer(tmp_path / "first", callbacks=[watch()], max_steps=8)
    quiet_fit(first, Regressor(lr=0.05), loader())
    first.save_checkpoint(tmp_path / "eight.ckpt")
    second = trainer(tmp_path / "second", callbacks=[watch()], max_steps=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        second.fit(Regressor(lr=0.05), loader(), ckpt_path=tmp_path / "eight.ckpt")

    expected = {
        e.step: e.value for e in gradwatch_events(tmp_path / "straight").Scalars("clip/threshold")
    }
    resumed = {
        e.step: e.value for e in gradwatch_events(tmp_path / "second").Scalars("clip/threshold")
    }
    assert sorted(resumed) == list(range(8, 16))
    for step, value in resumed.items():
        assert value == pytest.approx(expected[step], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"on_vanishing": "skip"},
            ValueError,
            r"`on_vanishing` must be one of 'warn', 'stop', 'ignore'."
            r" Received: on_vanishing='skip'",
        ),
        (
            {"on_explosion": "explode"},
            ValueError,
            r"`on_explosion` must be one of 'warn', 'skip', 'stop', 'ignore'",
        ),
        ({"on_nonfinite": None}, ValueError, r"`on_nonfinite` must be one of"),
        ({"clip": "auto"}, TypeError, r"`clip` must be None, a positive float .* clip='auto'"),
        (
            {"clip": -1.0},
            ValueError,
            r"`clip` must be None, a positive float .* Received: clip=-1.0",
        ),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        GradWatch(**kwargs)
    with pytest.raises(ValueError, match=r"`percentile` must be in \(0, 100\]"):
        AutoClip(percentile=-5.0)


def test_clipping_twice_is_called_out(tmp_path):
    run = trainer(tmp_path, callbacks=[GradWatch(clip=1.0)], gradient_clip_val=0.5, max_steps=1)
    with pytest.warns(GradWatchWarning, match=r"both clip"):
        run.fit(Regressor(), loader())


@pytest.mark.parametrize("clip", [0.01, ClipByValue(1e-3), AGC(clipping=1e-3)], ids=str)
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
