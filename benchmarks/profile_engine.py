"""Where gradwatch's time goes, part by part, on the benchmark's models (not a test).

    python benchmarks/profile_engine.py --model gpt2   # on a GPU
    python benchmarks/profile_engine.py --model small  # on the CPU

Prints, in milliseconds: the per-step call (host time, and device time measured with CUDA
events), a bare ``torch._foreach_norm`` for reference, each part of a logging step, and the
cost of writing one record through Lightning's TensorBoardLogger and through gradwatch's sink.
Then the per-step call for each guard configuration against ``clip_grad_norm_(foreach=True)``,
interleaved over ``--rounds`` rounds (median and min of the rounds: on a busy machine the min
is the steadier figure).
With CUDA it also runs the per-step calls under ``torch.cuda.set_sync_debug_mode("error")``,
which raises on any host synchronisation.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from overhead import MODELS, CausalLM
from torch.nn.utils import clip_grad_norm_

from gradwatch.cadence import Cadence
from gradwatch.guard import Guard
from gradwatch.integrations.torch import TorchEngine
from gradwatch.policies import AutoClip, ClipByNorm
from gradwatch.sinks import TensorBoardSink


def timed(fn: Callable[[], object], repeats: int, cuda: bool) -> tuple[float, float]:
    """Mean host ms per call (no sync inside) and mean device ms per call (CUDA events)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = (time.perf_counter() - t0) / repeats * 1e3
    if not cuda:
        return host, host
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = MODELS[args.model]
    model = CausalLM(config).to(device)
    tokens = torch.randint(0, config.vocab, (config.batch, config.seq_len + 1), device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=config.precision == "bf16-mixed"):
        logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = [p.grad for p in model.parameters()]
    size = sum(g.numel() * g.element_size() for g in grads) / 1e6
    print(f"model {args.model} on {device}: {len(grads)} gradients, {size:.0f} MB")

    engine = TorchEngine(model.named_parameters(), cadence=Cadence(10**9))
    engine.before_optimizer_step(optimizer)  # count 0: a logging step
    engine.after_optimizer_step()
    rows = {
        "bare torch._foreach_norm": timed(lambda: torch._foreach_norm(grads), args.repeats, cuda),
        "per-step call": timed(lambda: engine.before_optimizer_step(optimizer), args.repeats, cuda),
    }
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(5):
            engine.before_optimizer_step(optimizer)
            engine.after_optimizer_step()
        torch.cuda.set_sync_debug_mode(0)
        print("per-step calls under set_sync_debug_mode('error'): no synchronisation")

    logging = TorchEngine(model.named_parameters(), cadence=Cadence(1))

    def logging_step():
        logging.before_optimizer_step(optimizer)
        return logging.after_optimizer_step()

    rows["logging step (measure + host copy + names)"] = timed(logging_step, 10, cuda)
    (record,) = logging_step()
    with tempfile.TemporaryDirectory() as tmp:
        logger = TensorBoardLogger(tmp, name="")
        rows[f"TensorBoardLogger.log_metrics ({len(record.scalars)} scalars)"] = timed(
            lambda: logger.log_metrics(record.scalars, step=0), 10, False
        )
        logger.finalize("success")
        sink = TensorBoardSink(tmp)
        rows["gradwatch TensorBoardSink.write (same record)"] = timed(
            lambda: sink.write(record), 10, False
        )
        sink.close()
    print(f"{'part':58} {'host ms':>9} {'device ms':>10}")
    for name, (host, dev) in rows.items():
        print(f"{name:58} {host:9.3f} {dev:10.3f}")
    per_step(model, optimizer, args, cuda)


def per_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace, cuda: bool
) -> None:
    """The per-step call by guard configuration, against clip_grad_norm_, rounds interleaved."""
    params = list(model.parameters())
    off = {"on_nonfinite": "ignore", "on_explosion": "ignore", "on_vanishing": "ignore"}
    guards = {
        "detection off": Guard(**off),
        "defaults (3 detectors, warn)": Guard(),
        "defaults + ClipByNorm": Guard(policy=ClipByNorm(1e9)),
        "defaults + AutoClip": Guard(policy=AutoClip()),
        "ClipByNorm, detection off": Guard(policy=ClipByNorm(1e9), **off),
    }

    def engine_call(guard: Guard) -> Callable[[], object]:
        engine = TorchEngine(model.named_parameters(), cadence=Cadence(10**9), guard=guard)
        engine.before_optimizer_step(optimizer)  # count 0: the logging step
        engine.after_optimizer_step()

        def call() -> None:
            engine.before_optimizer_step(optimizer)

        return call

    calls = {"clip_grad_norm_(foreach=True)": lambda: clip_grad_norm_(params, 1e9, foreach=True)}
    calls.update({name: engine_call(guard) for name, guard in guards.items()})
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, fn in calls.items():
            times[name].append(timed(fn, args.repeats, cuda)[1])
    print(f"\nper-step call, {args.rounds} interleaved rounds of {args.repeats} calls")
    print(f"{'configuration':58} {'median ms':>9} {'min ms':>10}")
    for name, ms in times.items():
        print(f"{name:58} {statistics.median(ms):9.3f} {min(ms):10.3f}")


if __name__ == "__main__":
    main()
