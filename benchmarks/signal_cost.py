"""What ``track_signal=True`` costs: a logging step with it, against a training step.

    python benchmarks/signal_cost.py              # the examples' 20-layer MLPs, on the CPU
    python benchmarks/signal_cost.py --rounds 9

The examples' models (width 64, batch 64) and one wider. For each model, four ways to take
one training step (forward, backward, optimizer step), timed side by side in interleaved rounds
(the median of each round's mean, then the median over rounds):

* ``plain``: no gradwatch;
* ``between``: gradwatch with ``track_signal=True``, a step that is not a logging step;
* ``logging``: a logging step without the signal;
* ``logging + signal``: a logging step with it.

``signal cost`` is (``logging + signal`` - ``logging``) / ``plain``: what measuring the signal
adds to a logging step, as a share of a training step (the target is at most 10%). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from _lab import DeepMLP

from gradwatch.integrations.torch import TorchGradWatch

MODELS = {
    "relu MLP, 20 layers": {"activation": nn.ReLU},
    "sigmoid MLP, 20 layers": {"activation": nn.Sigmoid},
    "pre-norm residual MLP": {"activation": nn.ReLU, "residual": True, "norm": True},
    "relu MLP, 20 layers of 512": {"activation": nn.ReLU, "width": 512},
}


def stepper(options: dict, batch: int, every: int | None, signal: bool) -> Callable[[], None]:
    """One training step of a fresh model; ``every``: gradwatch's logging cadence (None:
    no gradwatch); ``signal``: ``track_signal``."""
    torch.manual_seed(0)
    model = DeepMLP(**options)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, options.get("width", 64)), torch.randn(batch, 1)
    watch = None
    if every is not None:
        watch = TorchGradWatch(model, False, log_every_n_steps=every, track_signal=signal)

    def step() -> None:
        if watch is not None:
            watch.before_forward()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if watch is not None:
            watch.before_optimizer_step(optimizer)
        optimizer.step()
        if watch is not None:
            watch.after_optimizer_step()

    step()  # the first step is always a logging step
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the examples train
    for name, options in MODELS.items():
        steps = {
            "plain": stepper(options, args.batch, None, False),
            "between": stepper(options, args.batch, 10**9, True),
            "logging": stepper(options, args.batch, 1, False),
            "logging + signal": stepper(options, args.batch, 1, True),
        }
        times: dict[str, list[float]] = {key: [] for key in steps}
        for _ in range(args.rounds):
            for key, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.repeats):
                    step()
                times[key].append((time.perf_counter() - start) / args.repeats * 1e3)
        median = {key: statistics.median(values) for key, values in times.items()}
        print(f"\n{name}, batch {args.batch}, {args.rounds} rounds of {args.repeats} steps")
        print(f"{'step':20} {'median ms':>10} {'vs plain':>9}")
        for key, ms in median.items():
            print(f"{key:20} {ms:10.3f} {ms / median['plain'] - 1:+9.1%}")
        cost = (median["logging + signal"] - median["logging"]) / median["plain"]
        print(f"signal cost: {cost:+.1%} of a training step")


if __name__ == "__main__":
    main()
