"""Depth and activations: how far back the gradient of a 20-layer MLP reaches.

The same 20-layer MLP (PyTorch's default initialization) with sigmoid, tanh and ReLU, ReLU with
residual connections, and ReLU or sigmoid with LayerNorm. Each layer multiplies the gradient on
its way back by its weights and its activation's slope: the sigmoid's slope is at most 1/4, so
the first layers of the sigmoid net receive almost nothing. Residual connections add a path the
gradient takes unchanged; LayerNorm rescales it at every layer.

python examples/depth_activations.py --log-dir logs/depth --steps 200
tensorboard --logdir logs/depth     # or open logs/depth/report.html
"""

from __future__ import annotations

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

NETS = {
    "sigmoid": {"activation": nn.Sigmoid},
    "tanh": {"activation": nn.Tanh},
    "relu": {"activation": nn.ReLU},
    "relu_residual": {"activation": nn.ReLU, "residual": True},
    "relu_layernorm": {"activation": nn.ReLU, "norm": True},
    "sigmoid_layernorm": {"activation": nn.Sigmoid, "norm": True},
}


def main(log_dir: str, steps: int, seed: int = 0, depth: int = 20) -> dict[str, float]:
    """Train each net; return its first hidden layer's gradient norm over its last's, at step 0."""
    ratios = {}
    for name, options in NETS.items():
        torch.manual_seed(seed)
        x, y = regression()
        sample = batches(x, y)
        model = DeepMLP(depth=depth, **options)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def loss(model=model, sample=sample):
            inputs, targets = sample()
            return nn.functional.mse_loss(model(inputs), targets)

        sink, losses = train(model, loss, Path(log_dir) / name, steps, optimizer)
        start = norms(sink, 0)
        first, last = (start[g] for g in linears(start)[:: depth - 1])
        ratios[name] = first / last
        print(
            f"{name:>17}: layer 1 gradient is {sci(first / last)} of layer {depth}'s "
            f"({sci(first)} vs {sci(last)}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
            f"detections: {detections(sink)}"
        )
    write_report(Path(log_dir))
    return ratios


if __name__ == "__main__":
    parser = arguments(__doc__, steps=200, log_dir="logs/depth")
    parser.add_argument("--depth", type=int, default=20)
    main(**vars(parser.parse_args()))
