"""GradWatch under a real two-process Trainer on CPU (gloo); run by ``tests/test_distributed.py``.

    python distributed_gradwatch.py MODE OUTPUT_DIR

MODE is ``ddp`` (``strategy="ddp"``, learning rate 0) or ``fsdp`` (``ModelParallelStrategy``
with FSDP2's ``fully_shard`` over two data-parallel ranks, learning rate 0.1); a ``-no-logger``
suffix runs with ``logger=False`` instead of a ``TensorBoardLogger``.

Lightning starts this file again for rank 1, so the work sits under ``__main__``. Each rank
trains a small regressor on its own fixed batch and writes ``OUTPUT_DIR/rank<r>.json``: the
records its GradWatch engine produced (a memory sink is added to the callback's fan-out on every
rank, beside rank 0's real sinks), the gradients and parameters it held before every optimizer
step (gathered to full tensors), how its gradients were sharded, and which batches it was given.
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from _records import as_json
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

FEATURES = 6
BATCH = 8
STEPS = 4
LOG_EVERY = 2
HISTOGRAM_EVERY = 3
BINS = 10
LEARNING_RATE = {"ddp": 0.0, "fsdp": 0.1}


def make_net() -> nn.Module:
    """Sharded over two ranks along dim 0, ``2.weight`` (5 rows) splits 3 + 2 and the last
    layer (1 row) leaves rank 1 with empty shards of both its weight and its bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 1)
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randn(BATCH, 1, generator=g)


class RankBatch(Dataset):
    """The batch of one rank at every index. (Lightning's distributed sampler always shuffles
    training data, so the Trainer runs with ``use_distributed_sampler=False``.)"""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __len__(self) -> int:
        return STEPS

    def __getitem__(self, index: int):
        return rank_batch(self.rank)


class Regressor(L.LightningModule):
    def __init__(self, fsdp: bool, lr: float) -> None:
        super().__init__()
        self.net = make_net()
        self.fsdp, self.lr = fsdp, lr
        self.seen: list[int] = []

    def configure_model(self) -> None:
        if not self.fsdp:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(next(r for r in (0, 1) if torch.equal(x, rank_batch(r)[0])))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(RankBatch(self.global_rank), batch_size=None)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Probe(Callback):
    """Placed after GradWatch: keeps what this rank's engine produced and what it measured."""

    def __init__(self, out: str) -> None:
        from gradwatch.sinks import MemorySink

        self.out = out
        self.memory = MemorySink()
        self.gradients: list[dict[str, list[float]]] = []
        self.parameters: list[dict[str, list[float]]] = []
        self.placements: dict[str, str] = {}
        self.local_sizes: dict[str, int] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        from gradwatch.integrations.lightning import GradWatch

        (watch,) = [c for c in trainer.callbacks if isinstance(c, GradWatch)]
        watch.reporter.fanout.sinks = (*watch.reporter.fanout.sinks, self.memory)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = list(pl_module.named_parameters())
        self.gradients.append({n: _full(p.grad).flatten().tolist() for n, p in named})
        self.parameters.append({n: _full(p.detach()).flatten().tolist() for n, p in named})
        for name, p in named:
            self.placements[name] = str(getattr(p.grad, "placements", "plain tensor"))
            self.local_sizes[name] = _local(p.grad).numel()

    def on_fit_end(self, trainer, pl_module) -> None:
        # The engine's records; rank 0 also writes its pictures, drawn in the background, as
        # records of their own.
        records = [as_json(r) for r in self.memory.records if r.scalars or r.histograms]
        result = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "seen": pl_module.seen,
            "records": records,
            "gradients": self.gradients,
            "parameters": self.parameters,
            "placements": self.placements,
            "local_sizes": self.local_sizes,
        }
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(result, f)


def main(mode: str, out: str) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import ModelParallelStrategy

    from gradwatch.integrations.lightning import GradWatch

    signal = mode.endswith("-signal")
    mode = mode.removesuffix("-signal")
    kind = mode.removesuffix("-no-logger")
    fsdp = kind == "fsdp"
    if fsdp:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    watch = GradWatch(
        log_every_n_steps=LOG_EVERY,
        histogram_every_n_steps=HISTOGRAM_EVERY,
        histogram_bins=BINS,
        statistics="all",
        track_signal=signal,
    )
    trainer = L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False if mode.endswith("-no-logger") else TensorBoardLogger(out, name="tb"),
        max_steps=STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=[watch, Probe(out)],
    )
    trainer.fit(Regressor(fsdp, LEARNING_RATE[kind]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
