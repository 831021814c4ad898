"""Initialization: the same deep ReLU net with too-large, too-small and He-scaled weights.

A 20-layer ReLU MLP whose weights are drawn from N(0, gain^2 / fan_in). Each layer scales the
signal, forward and backward, by about gain / sqrt(2): above He's sqrt(2) the gradient grows
layer after layer (3 / sqrt(2) ~ 2.1, ~1e6 over 20 layers), below it shrinks, at He's it keeps
its size. Xavier's gain 1 does the same for tanh.

python examples/initialization.py --log-dir logs/init --steps 200
tensorboard --logdir logs/init     # or open logs/init/report.html
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from _lab import (
    DeepMLP,
    arguments,
    batches,
    detections,
    linears,
    norms,
    regression,
    sci,
    train,
    write_report,
)
from torch import nn

INITS = {  # name: (activation, gain)
    "too_large": (nn.ReLU, 3.0),
    "too_small": (nn.ReLU, 0.5),
    "he": (nn.ReLU, math.sqrt(2.0)),
    "xavier_tanh": (nn.Tanh, 1.0),
}


def main(log_dir: str, steps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train each net; return its global gradient norm and first/last layer ratio at step 0."""
    found = {}
    for name, (activation, gain) in INITS.items():
        torch.manual_seed(seed)
        x, y = regression()
        sample = batches(x, y)
        model = DeepMLP(activation=activation)
        for block in model.blocks:
            nn.init.normal_(block.linear.weight, std=gain / math.sqrt(block.linear.in_features))
            nn.init.zeros_(block.linear.bias)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def loss(model=model, sample=sample):
            inputs, targets = sample()
            return nn.functional.mse_loss(model(inputs), targets)

        sink, losses = train(model, loss, Path(log_dir) / name, steps, optimizer)
        start = norms(sink, 0)
        first, *_, last = (start[g] for g in linears(start))
        total = sink.scalars("global/grad_norm")[0][1]
        found[name] = {"global": total, "ratio": first / last}
        print(
            f"{name:>11} (gain {gain:.2f}): gradient norm {sci(total)} at step 0, "
            f"layer 1 gets {sci(first / last)} of layer 20's; loss {losses[0]:.3g} -> "
            f"{losses[-1]:.3g}; detections: {detections(sink)}"
        )
    write_report(Path(log_dir))
    return found


if __name__ == "__main__":
    main(**vars(arguments(__doc__, steps=200, log_dir="logs/init").parse_args()))
