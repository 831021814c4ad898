"""Small real models and data shared by the Lightning tests."""

from __future__ import annotations

import glob
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

FEATURES = 6


class FixedBatch(Dataset):
    """The same batch at every index: with learning rate 0 every step has the same gradients."""

    def __init__(self, length: int = 64, batch_size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch_size, FEATURES, generator=g)
        self.y = torch.randn(batch_size, 1, generator=g)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.x, self.y


def loader(length: int = 64) -> DataLoader:
    return DataLoader(FixedBatch(length), batch_size=None)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.0, optimizer: str = "sgd", fused: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.lr, self.optimizer_name, self.fused = lr, optimizer, fused

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def direct_group_norms(net: nn.Module, prefix: str = "net") -> dict[str, float]:
    """Per-module gradient norms of one backward pass on the fixed batch, computed directly."""
    data = FixedBatch()
    net.zero_grad()
    nn.functional.mse_loss(net(data.x), data.y).backward()
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in net.named_parameters():
        groups.setdefault(f"{prefix}.{name.rpartition('.')[0]}", []).append(p.grad.flatten())
    return {g: torch.cat(v).norm().item() for g, v in groups.items()}


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=8,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def event_files(directory) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True))


def read_events(path: str):
    """TensorBoard's own reader over one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(
        path, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


class FixedData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader()


def top_module(name: str) -> str:
    """A ``group_by`` rule for the CLI test: the first component of a parameter name."""
    return name.split(".")[0]


def gradwatch_events(directory):
    """TensorBoard's reader over the one event file gradwatch wrote below ``directory``."""
    (path,) = [
        f for f in event_files(directory) if os.path.basename(os.path.dirname(f)) == "gradwatch"
    ]
    return read_events(path)
