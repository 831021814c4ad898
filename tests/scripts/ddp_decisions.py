"""Two DDP ranks on CPU where rank 1's loss turns NaN at one step: do both decide alike?

    python ddp_decisions.py ACTION OUTPUT_DIR      # ACTION: skip or stop

The NaN reaches both ranks through DDP's gradient all-reduce, so both must skip (or stop at)
the same step without a collective of gradwatch's own, and neither may hang. Each rank writes
``OUTPUT_DIR/rank<r>.json``: the steps it skipped, where it stopped, its final parameters.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

NAN_AT = 3
STEPS = 6


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_rank == 1 and batch_idx == NAN_AT:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.global_rank)
        batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))] * STEPS
        return DataLoader(batches, batch_size=None)


def main(action: str, out: str) -> None:
    from gradwatch.integrations.lightning import GradWatch, GradWatchWarning

    warnings.simplefilter("ignore", GradWatchWarning)
    watch = GradWatch(log_every_n_steps=2, on_nonfinite=action)
    trainer = L.Trainer(
        default_root_dir=out,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        max_steps=STEPS,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        callbacks=[watch],
    )
    model = Regressor()
    trainer.fit(model)
    result = {
        "rank": trainer.global_rank,
        "skipped": watch.engine.skipped,
        "stopped_at": watch.stopped_at,
        "global_step": trainer.global_step,
        "parameters": [p.detach().flatten().tolist() for p in model.parameters()],
        "events": sorted({(e["kind"], e["group"], e["action"]) for e in watch.events}),
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
