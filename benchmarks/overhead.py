"""Step-time overhead of gradient monitoring in Lightning, side by side in one run.

Each variant is a real ``lightning.Trainer.fit`` of the same model on the same synthetic tokens
from the same seed, logging to a TensorBoardLogger with the same ``log_every_n_steps``; only the
gradient monitoring differs:

* ``baseline``: none;
* ``gradwatch``: ``GradWatch()`` at its defaults;
* ``lightning_grad_norm``: Lightning's recipe, ``self.log_dict(grad_norm(self, norm_type=2))``
  in ``LightningModule.on_before_optimizer_step``, every step;
* ``item_loop``: a callback reading ``p.grad.norm().item()`` for every parameter, every step;
* ``clip_grad_norm``: ``clip_grad_norm_(params, 1.0, foreach=True)`` in a callback, every step.

Each fit runs ``--warmup`` untimed steps, then ``--steps`` timed ones, as one wall-clock interval
(on CUDA, one ``torch.cuda.synchronize()`` at each end). Variants run interleaved in rounds
(A B C D E, A B C D E, ...) so drift hits them alike; the report is the median over rounds.

    python benchmarks/overhead.py                          # small LM on CPU
    python benchmarks/overhead.py --model gpt2 --rounds 5  # GPT-2 small, bf16-mixed, CUDA
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader

from gradwatch.integrations.lightning import GradWatch
from gradwatch.policies import AutoClip, ClipByNorm

LOG_EVERY_N_STEPS = 50


# -- model and data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    layers: int
    d_model: int
    heads: int
    seq_len: int
    vocab: int
    batch: int
    precision: str


MODELS = {
    # small enough for a 2-core CPU (benchmarks/README.md has its step times)
    "small": ModelConfig(
        layers=4, d_model=128, heads=4, seq_len=32, vocab=1000, batch=8, precision="32-true"
    ),
    "gpt2": ModelConfig(
        layers=12,
        d_model=768,
        heads=12,
        seq_len=1024,
        vocab=50257,
        batch=8,
        precision="bf16-mixed",
    ),
}


class CausalLM(pl.LightningModule):
    """Pre-norm causal transformer LM from ``torch.nn`` parts, with an untied output head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.d_model
        self.token_embedding = nn.Embedding(config.vocab, d)
        self.position_embedding = nn.Embedding(config.seq_len, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                config.heads,
                dim_feedforward=4 * d,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab, bias=False)
        mask = nn.Transformer.generate_square_subsequent_mask(config.seq_len)
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        mask = self.causal_mask[: tokens.shape[1], : tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.1)


class CausalLMWithGradNorm(CausalLM):
    """Lightning's documented recipe for tracking gradient norms."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log_dict(grad_norm(self, norm_type=2))


def make_tokens(config: ModelConfig, batches: int, seed: int) -> torch.Tensor:
    """Random token batches, shape ``(batches, batch, seq_len + 1)``: inputs plus targets."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batches, config.batch, config.seq_len + 1)
    return torch.randint(config.vocab, shape, generator=generator)


# -- monitoring callbacks ----------------------------------------------------------------------


class ItemLoop(Callback):
    """A per-parameter ``.norm().item()`` loop: one host sync per gradient, every step."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.norms = [p.grad.norm().item() for p in pl_module.parameters() if p.grad is not None]


class ClipGradNorm(Callback):
    """``clip_grad_norm_`` with the foreach kernels, every step."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        torch.nn.utils.clip_grad_norm_(pl_module.parameters(), 1.0, foreach=True)


@dataclass(frozen=True)
class Variant:
    module: type[CausalLM]
    callbacks: Callable[[], list[Callback]]


VARIANTS = {
    "baseline": Variant(CausalLM, list),
    "gradwatch": Variant(CausalLM, lambda: [GradWatch()]),
    # Logs only at step 0 (in the warm-up): the cost of the steps between logging steps.
    "gradwatch_per_step": Variant(CausalLM, lambda: [GradWatch(log_every_n_steps=10**9)]),
    # Clipping policies (issue 3): against clip_grad_norm_ alone.
    "gradwatch_clip_norm": Variant(CausalLM, lambda: [GradWatch(clip=ClipByNorm(1.0))]),
    "gradwatch_autoclip": Variant(CausalLM, lambda: [GradWatch(clip=AutoClip())]),
    # "skip" reads the non-finite flag on the host every step: its honest cost.
    "gradwatch_skip": Variant(CausalLM, lambda: [GradWatch(on_nonfinite="skip")]),
    # Monitoring only: no detector runs (what the defaults cost before detection existed).
    "gradwatch_monitor_only": Variant(
        CausalLM,
        lambda: [GradWatch(on_nonfinite="ignore", on_explosion="ignore", on_vanishing="ignore")],
    ),
    # Logs every 5th step: magnifies the cost of a logging step ten times over the default.
    "gradwatch_log5": Variant(CausalLM, lambda: [GradWatch(log_every_n_steps=5)]),
    "lightning_grad_norm": Variant(CausalLMWithGradNorm, list),
    "item_loop": Variant(CausalLM, lambda: [ItemLoop()]),
    "clip_grad_norm": Variant(CausalLM, lambda: [ClipGradNorm()]),
}


# -- timing ------------------------------------------------------------------------------------


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else lambda: None


class StepTimer(Callback):
    """Wall time over steps ``[warmup, warmup + steps)``, synchronizing only at the two ends."""

    def __init__(self, warmup: int, steps: int, synchronize: Callable[[], None]) -> None:
        self.first, self.last = warmup, warmup + steps - 1
        self.steps = steps
        self.synchronize = synchronize
        self.start: float | None = None
        self.stop: float | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.first:
            self.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx == self.last:
            self.synchronize()
            self.stop = time.perf_counter()

    def ms_per_step(self) -> float:
        if self.start is None or self.stop is None:
            raise RuntimeError("the timed steps did not all run")
        return (self.stop - self.start) / self.steps * 1e3


def time_fit(
    variant: Variant, config: ModelConfig, tokens: torch.Tensor, args: argparse.Namespace
) -> float:
    """One ``Trainer.fit`` from the seed; milliseconds per timed step."""
    torch.manual_seed(args.seed)
    model = variant.module(config)
    timer = StepTimer(args.warmup, args.steps, synchronizer(args.device))
    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as log_dir:
        trainer = pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision=config.precision,
            max_steps=args.warmup + args.steps,
            max_epochs=1,
            logger=TensorBoardLogger(log_dir, name="", default_hp_metric=False),
            log_every_n_steps=LOG_EVERY_N_STEPS,
            callbacks=[*variant.callbacks(), timer],  # the timer last: it ends each step
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, DataLoader(tokens, batch_size=None))
    del trainer, model
    gc.collect()
    return timer.ms_per_step()


# -- driver and report -------------------------------------------------------------------------


def run_rounds(
    names: Sequence[str], config: ModelConfig, tokens: torch.Tensor, args: argparse.Namespace
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(1, args.rounds + 1):
        for name in names:
            ms = time_fit(VARIANTS[name], config, tokens, args)
            times[name].append(ms)
            print(f"round {round_index}/{args.rounds}  {name:<20} {ms:8.2f} ms/step", flush=True)
    return times


def percent(value: float, reference: float) -> str:
    return f"{(value / reference - 1) * 100:+.1f}%"


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    reference = medians.get("baseline")
    return {
        name: {
            "ms_per_step": ms,
            "median_ms": medians[name],
            "vs_baseline": None if reference is None else percent(medians[name], reference),
        }
        for name, ms in times.items()
    }


def table(summary: dict[str, dict[str, Any]]) -> str:
    rows = [("variant", "median ms/step", "min", "max", "vs baseline")]
    for name, result in summary.items():
        ms = result["ms_per_step"]
        rows.append(
            (
                name,
                f"{result['median_ms']:.2f}",
                f"{min(ms):.2f}",
                f"{max(ms):.2f}",
                result["vs_baseline"] or "n/a",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def describe(config: ModelConfig, args: argparse.Namespace) -> str:
    model = CausalLM(config)
    tensors = list(model.parameters())
    count = sum(p.numel() for p in tensors)
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    return (
        f"model {args.model}: {count / 1e6:.1f}M parameters in {len(tensors)} tensors, "
        f"batch {config.batch} x seq {config.seq_len}, {config.precision}, on {device}\n"
        f"torch {torch.__version__}, lightning {lightning.__version__}; "
        f"{args.rounds} rounds x ({args.warmup} warm-up + {args.steps} timed steps), "
        f"log_every_n_steps={LOG_EVERY_N_STEPS}"
    )


def quiet_lightning() -> None:
    """Keep the output to the benchmark's own lines."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


# -- command line ------------------------------------------------------------------------------


def parse_variants(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", type=parse_variants, default=list(VARIANTS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be at least 1")
    if args.device is None:
        gpu = args.model == "gpt2" and torch.cuda.is_available()
        args.device = "cuda" if gpu else "cpu"
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv])
    quiet_lightning()
    config = MODELS[args.model]
    header = describe(config, args)
    print(header, flush=True)
    tokens = make_tokens(config, args.warmup + args.steps, args.seed)
    summary = summarize(run_rounds(args.variants, config, tokens, args))
    print(f"\n{header}\n\n{table(summary)}\n\ncommand: {command}")
    if args.json is not None:
        report = {"command": command, "config": asdict(config), "header": header}
        report["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report["results"] = summary
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
