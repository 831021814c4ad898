"""What the gradient-flow lab's scripts share: arguments, a training loop, reading the norms
back from a MemorySink, and the report."""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from gradwatch import MemorySink
from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.report import report


def arguments(doc: str, steps: int, log_dir: str) -> argparse.ArgumentParser:
    """``--log-dir``, ``--steps`` and ``--seed``; a script adds its own."""
    torch.set_num_threads(1)  # these small models train fastest on one core
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--log-dir", default=log_dir, help=f"default: {log_dir}")
    parser.add_argument("--steps", type=int, default=steps, help=f"default: {steps}")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def train(
    model: nn.Module,
    loss: Callable[[], torch.Tensor],
    log_dir: Path,
    steps: int,
    optimizer: torch.optim.Optimizer,
    **watch_options: object,
) -> tuple[MemorySink, list[float]]:
    """Train ``steps`` optimizer steps under TorchGradWatch; return its records and the losses.

    Event files go to ``log_dir`` with histograms on, so TensorBoard and the report draw the
    gradient-flow pictures; the forward and backward signal is measured (``track_signal``).
    """
    sink, losses = MemorySink(), []
    # histograms, and with them the pictures (a moment to draw), at the start and mid-run
    options = {
        "log_every_n_steps": 5,
        "histogram_every_n_steps": steps // 2 + 1,
        "track_signal": True,
    }
    options.update(watch_options)
    with TorchGradWatch(model, log_dir, sinks=[sink], **options) as watch:  # type: ignore[arg-type]
        for _ in range(steps):
            watch.before_forward()
            value = loss()
            optimizer.zero_grad()
            value.backward()
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
            losses.append(value.item())
    return sink, losses


def detections(sink: MemorySink) -> str:
    """What gradwatch's detectors flagged, e.g. ``16 vanishing``, or ``none``."""
    kinds = Counter(event["kind"] for record in sink.records for event in record.events)
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"


def norms(sink: MemorySink, step: int = 0) -> dict[str, float]:
    """``grad_norm/<group>`` of every group at ``step``, in depth order."""
    record = next(r for r in sink.records if r.step == step and _has_norms(r.scalars))
    prefix = "grad_norm/"
    return {t[len(prefix) :]: float(v) for t, v in record.scalars.items() if t.startswith(prefix)}


def _has_norms(scalars: dict) -> bool:
    return any(t.startswith("grad_norm/") for t in scalars)


def signal(sink: MemorySink, statistic: str, step: int = 0) -> dict[str, float]:
    """``<statistic>/<group>`` of every group at ``step`` (``act_grad_rms``, ``act_rms``...),
    in depth order."""
    prefix = f"{statistic}/"
    record = next(r for r in sink.records if r.step == step and _has_norms(r.scalars))
    return {t[len(prefix) :]: float(v) for t, v in record.scalars.items() if t.startswith(prefix)}


def sci(x: float) -> str:
    """``3e-07``: a ratio of norms to one significant digit."""
    return "nan" if not math.isfinite(x) else f"{x:.0e}"


def write_report(log_dir: Path) -> Path | None:
    """``gradwatch report LOGDIR -o LOGDIR/report.html``; None without matplotlib."""
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    try:
        (path,) = report(log_dir, log_dir / "report.html", quiet=True)
    except ImportError as error:  # matplotlib is optional: pip install "gradwatch[report]"
        print(f"no report: {error}")
        return None
    print(f"report: {path}")
    return path


def linears(groups: Iterable[str]) -> list[str]:
    """The groups of the hidden ``nn.Linear`` layers, input side first."""
    return [g for g in groups if g.endswith("linear")]


class Block(nn.Module):
    """``activation(linear(norm(x)))``, plus ``x`` when residual."""

    def __init__(self, width: int, activation: type[nn.Module], residual: bool, norm: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.linear = nn.Linear(width, width)
        self.activation = activation()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activation(self.linear(self.norm(x)))
        return x + h if self.residual else h


class DeepMLP(nn.Module):
    """``depth`` blocks of ``width`` units, then a linear head: groups ``blocks.<i>.linear``."""

    def __init__(
        self,
        depth: int = 20,
        width: int = 64,
        activation: type[nn.Module] = nn.ReLU,
        residual: bool = False,
        norm: bool = False,
    ):
        super().__init__()
        self.blocks = nn.Sequential(
            *(Block(width, activation, residual, norm) for _ in range(depth))
        )
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def regression(width: int = 64, size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth synthetic target: ``y = sin(x @ w)``."""
    x = torch.randn(size, width)
    return x, torch.sin(x @ torch.randn(width, 1) / width**0.5)


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64):
    """A loss function over a fresh random batch at every call, for :func:`train`."""

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(x), (size,))
        return x[index], y[index]

    return sample
