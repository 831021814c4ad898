"""Recurrent nets: how much gradient reaches the early time steps (backpropagation through time).

A plain RNN, an LSTM and a GRU read 50 steps of noise and must output the mean of one input
feature over all steps, so every step matters. Going back one time step multiplies the gradient
by the recurrent Jacobian: for the plain RNN that is W_hh times tanh's slope, and it shrinks the
gradient step after step; the LSTM's cell state and the GRU's update path are additive, and the
gates learn to keep them open. gradwatch's per-layer norms cannot show time steps (the weights
are shared across them), so this script measures d loss / d input_t for each t itself, at the
start and after training, and writes it to TensorBoard with the time step t on the x axis
(run `<net>/by_time_step`, tags `input_grad/start` and `input_grad/trained`), and draws it in
`by_time_step.png`.

python examples/recurrent.py --log-dir logs/recurrent --steps 200
tensorboard --logdir logs/recurrent     # or open logs/recurrent/report.html
"""

from __future__ import annotations

from pathlib import Path

import torch
from _lab import arguments, sci, train, write_report
from torch import nn

from gradwatch import Record, TensorBoardSink

FEATURES, HIDDEN = 8, 32


class Reader(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(FEATURES, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def target(x: torch.Tensor) -> torch.Tensor:
    return 3 * x[:, :, 0].mean(dim=1, keepdim=True)


def input_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|d loss / d x_t|`` for every time step t (norm over the batch and the features)."""
    x = x.clone().requires_grad_()
    nn.functional.mse_loss(model(x), target(x).detach()).backward()
    model.zero_grad()
    return x.grad.norm(dim=(0, 2))


def draw(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], steps: int, path: Path) -> None:
    """``|d loss / d x_t|`` against t, one colour per net: dashed at the start, solid trained."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is optional: pip install "gradwatch[report]"
        return
    axes = (figure := Figure(figsize=(6.4, 3.6), layout="constrained")).subplots()
    for (name, (start, end)), colour in zip(curves.items(), ("C3", "C0", "C2"), strict=False):
        axes.semilogy(start, "--", color=colour, label=f"{name}, step 0")
        axes.semilogy(end, color=colour, label=f"{name}, step {steps}")
    axes.set(xlabel="time step t", ylabel="|d loss / d input_t|", title="gradient through time")
    axes.legend(fontsize=8, ncols=3)
    figure.savefig(path, dpi=80)


def main(log_dir: str, steps: int, seed: int = 0, length: int = 50) -> dict[str, list[float]]:
    """Train each net; return ``|d loss / d x_0| / |d loss / d x_last|`` at the start and end."""
    found, curves = {}, {}
    for name, cell in {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}.items():
        torch.manual_seed(seed)
        model, probe = Reader(cell), torch.randn(128, length, FEATURES)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

        def loss(model=model):
            x = torch.randn(32, length, FEATURES)
            return nn.functional.mse_loss(model(x), target(x))

        start = input_gradients(model, probe)
        _, losses = train(model, loss, Path(log_dir) / name, steps, optimizer)
        end = input_gradients(model, probe)
        with TensorBoardSink(Path(log_dir) / name / "by_time_step") as sink:
            for t in range(length):
                scalars = {"input_grad/start": float(start[t]), "input_grad/trained": float(end[t])}
                sink.write(Record(step=t, scalars=scalars))
        found[name] = [float(start[0] / start[-1]), float(end[0] / end[-1])]
        curves[name] = (start, end)
        print(
            f"{name:>4}: gradient reaching step 0 is {sci(found[name][0])} of the last step's "
            f"at the start, {sci(found[name][1])} after {steps} steps; "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
    draw(curves, steps, Path(log_dir) / "by_time_step.png")
    write_report(Path(log_dir))
    return found


if __name__ == "__main__":
    parser = arguments(__doc__, steps=200, log_dir="logs/recurrent")
    parser.add_argument("--length", type=int, default=50, help="time steps per sequence")
    main(**vars(parser.parse_args()))
