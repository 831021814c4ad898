"""The Lightning quickstart: one callback, then `tensorboard --logdir lightning_logs`.

python examples/lightning_quickstart.py --max-steps 300
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.integrations.lightning import GradWatch


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main(max_steps: int, root: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    data = DataLoader(TensorDataset(x, (x[:, :3].argmax(dim=1))), batch_size=64, shuffle=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        default_root_dir=root,
        log_every_n_steps=10,
        callbacks=[GradWatch(histogram_every_n_steps=50)],
    )
    trainer.fit(Classifier(), data)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--root", default=".")
    main(**vars(parser.parse_args()))
