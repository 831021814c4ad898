"""gradwatch in a plain PyTorch loop: two calls around `optimizer.step()`.

A MemorySink keeps the same records in Python for the verdict; `gradwatch report` draws them.

python examples/plain_torch_loop.py --log-dir runs/plain --steps 200
tensorboard --logdir runs/plain     # or open runs/plain/report.html
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from gradwatch import MemorySink
from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.report import report


def main(log_dir: str, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(512, 32), torch.randn(512, 1)
    sink = MemorySink()
    watch = TorchGradWatch(
        model, log_dir, log_every_n_steps=10, histogram_every_n_steps=50, sinks=[sink]
    )
    with watch:
        for _ in range(steps):
            batch = torch.randint(0, len(x), (64,))
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            watch.before_optimizer_step(optimizer)  # 1: after backward, before the step
            optimizer.step()
            watch.after_optimizer_step()  # 2: after the step
    (first, start), *_, (last, end) = sink.scalars("global/grad_norm")
    print(
        f"final loss {loss.item():.4f}; global gradient norm {start:.3g} at step {first}, ", end=""
    )
    print(f"{end:.3g} at step {last}; per layer at step {last}:", end="")
    for tag, value in sink.records[-1].scalars.items():
        if tag.startswith("grad_norm/"):
            print(f" {tag.removeprefix('grad_norm/')}: {value:.2g}", end="")
    print()
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    try:
        print("report:", *report(log_dir, f"{log_dir}/report.html", quiet=True))
    except ImportError as error:  # matplotlib is optional: pip install "gradwatch[report]"
        print(f"no report: {error}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", default="runs/plain")
    parser.add_argument("--steps", type=int, default=200)
    main(**vars(parser.parse_args()))
