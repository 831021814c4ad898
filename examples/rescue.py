"""Rescue: a learning-rate spike makes a run diverge; clipping saves it, or gradwatch stops it.

A Lightning run (SGD on a small regression MLP) whose learning rate jumps 30x for 10 steps in
the middle of training, four times: unprotected, then with gradwatch's `AutoClip` (clip to the
10th percentile of recent gradient norms) and `ZClip` (clip norms whose z-score against a running
mean is too high), and with `on_explosion="stop"` (end training cleanly, through Lightning's
normal path, when the gradient norm jumps 10x above its running level).

python examples/rescue.py --log-dir logs/rescue --steps 300
tensorboard --logdir logs/rescue     # or open logs/rescue/report.html
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import lightning as L
import torch
from _lab import arguments, write_report
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.integrations.lightning import GradWatch
from gradwatch.policies import AutoClip, ZClip
from gradwatch.reporting import GradWatchWarning

SPIKE, SPIKE_STEPS = 100.0, 10

RUNS = {
    "unprotected": {},
    "autoclip": {"clip": AutoClip()},
    "zclip": {"clip": ZClip()},
    "stop": {"on_explosion": "stop"},
}


class Regressor(L.LightningModule):
    def __init__(self, spike_at: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
        )
        self.spike_at = spike_at
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        spiking = lambda step: SPIKE if 0 <= step - self.spike_at < SPIKE_STEPS else 1.0  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, spiking)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(log_dir: str, steps: int, seed: int = 0) -> dict[str, dict]:
    """Train each run; return where its loss first went non-finite and where it stopped."""
    spike_at, found = steps // 2, {}
    for name, options in RUNS.items():
        L.seed_everything(seed, verbose=False)
        x = torch.randn(4096, 16)
        y = torch.sin(x[:, :4].sum(dim=1, keepdim=True))
        data = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        model = Regressor(spike_at)
        watch = GradWatch(
            log_dir=str(Path(log_dir) / name), histogram_every_n_steps=steps // 2 + 1, **options
        )
        trainer = L.Trainer(
            max_steps=steps,
            log_every_n_steps=5,
            logger=False,  # gradwatch writes its own event files to log_dir
            callbacks=[watch],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():  # the verdict counts the detections instead
            warnings.simplefilter("ignore", GradWatchWarning)
            trainer.fit(model, data)
        bad = next((i for i, v in enumerate(model.losses) if not math.isfinite(v)), None)
        found[name] = {
            "nonfinite_at": bad,
            "stopped_at": watch.stopped_at,
            "loss": model.losses[-1],
        }
        if bad is not None:
            verdict = f"loss non-finite from step {bad}"
        else:
            before, peak = model.losses[spike_at - 1], max(model.losses[spike_at:])
            verdict = f"loss stayed finite: {before:.3f} before the spike, {peak:.3g} at most after"
            verdict += f" it, {model.losses[-1]:.3f} at the end"
        if watch.stopped_at is not None:
            into = watch.stopped_at - spike_at
            verdict += f"; stopped at step {watch.stopped_at}, {into} steps into the spike"
        kinds = sorted({e["kind"] for e in watch.events})
        print(f"{name:>11}: {verdict} ({len(watch.events)} detections: {', '.join(kinds)})")
    write_report(Path(log_dir))
    return found


if __name__ == "__main__":
    for logger in ("lightning.pytorch", "gradwatch"):  # keep the output to the verdicts
        logging.getLogger(logger).setLevel(logging.ERROR)
    main(**vars(arguments(__doc__, steps=300, log_dir="logs/rescue").parse_args()))
