"""Depth and activations: how far back the gradient of a 20-layer MLP reaches.

The same 20-layer MLP (PyTorch's default initialization) with sigmoid, tanh and ReLU, ReLU with
residual connections, ReLU or sigmoid with LayerNorm, and pre-norm residual ReLU blocks. Each
layer multiplies the backward signal dL/dy on its way back by its weights and its activation's
slope: the sigmoid's slope is at most 1/4, so the first layers of the sigmoid net receive almost
nothing. Residual connections add a path the signal takes unchanged; LayerNorm rescales it at
every layer. With ``track_signal=True`` gradwatch measures that backward signal at every layer
(``act_grad_rms``) and its gain from layer to layer (``act_gain``), besides the parameters'
gradients; the lines printed quote both.

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
    signal,
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
    "relu_prenorm_residual": {"activation": nn.ReLU, "residual": True, "norm": True},
}


def main(log_dir: str, steps: int, seed: int = 0, depth: int = 20) -> dict[str, dict]:
    """Train each net; return, at step 0, its first hidden layer's over its last's: gradient
    norm (``gradient``), backward signal RMS (``backward``) and forward RMS (``forward``)."""
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
        first, last = linears(start)[:: depth - 1]
        backward, forward = signal(sink, "act_grad_rms"), signal(sink, "act_rms")
        ratios[name] = {
            "gradient": start[first] / start[last],
            "backward": backward[first] / backward[last],
            "forward": forward[first] / forward[last],
        }
        print(
            f"{name:>21}: layer 1's gradient is {sci(ratios[name]['gradient'])} of layer"
            f" {depth}'s, its backward signal dL/dy {sci(ratios[name]['backward'])} of it"
            f" (forward RMS {forward[first]:.2g} -> {forward[last]:.2g}); loss"
            f" {losses[0]:.3f} -> {losses[-1]:.3f}; detections: {detections(sink)}"
        )
    write_report(Path(log_dir))
    return ratios


if __name__ == "__main__":
    parser = arguments(__doc__, steps=200, log_dir="logs/depth")
    parser.add_argument("--depth", type=int, default=20)
    main(**vars(parser.parse_args()))
