"""The per-step decision on the device path and on the host path, against clip_grad_norm_.

    python benchmarks/decision_path.py             # 50- and 150-tensor models, on the CPU
    python benchmarks/decision_path.py --rounds 11

For each configuration, one row per path:

* ``host``: the core decides on numpy views of CPU tensors (the CPU default);
* ``device``: the core decides on torch tensors, its update compiled (a GPU's path; on the CPU
  with ``GRADWATCH_DEVICE_DECISIONS=1``);
* ``device eager``: the same path not compiled (``GRADWATCH_COMPILE=0``): what a GPU ran before.

``ops`` counts what one step launches: aten operations (the profiler's top-level ones, views
and no-op conversions left out), plus the loops the compiler generated for the update (on the
CPU they sit in one C++ function; on a GPU each is about one kernel). On a GPU each operation is
a kernel launch. ``ratio`` is the step's time over ``clip_grad_norm_(foreach=True)``'s, measured
side by side in interleaved rounds (the minimum of each configuration's rounds). Two more
references: ``clip_grad_value_(foreach=True)`` (what ClipByValue does) and AGC one parameter at
a time (timm's ``adaptive_clip_grad``). Last, the cost of a logging step and of a histogram step
at the defaults. Not a test.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch._inductor.metrics
from torch import nn
from torch.profiler import ProfilerActivity, profile

from gradwatch.cadence import Cadence
from gradwatch.guard import Guard
from gradwatch.integrations.torch_engine import TorchEngine
from gradwatch.policies import AGC, AutoClip, ClipByNorm, ClipByValue, ZClip

OFF = {"on_nonfinite": "ignore", "on_explosion": "ignore", "on_vanishing": "ignore"}
GUARDS = {
    "detection off": lambda: Guard(**OFF),
    "defaults (3 detectors)": Guard,
    "+ ClipByNorm": lambda: Guard(policy=ClipByNorm(1e9)),
    "+ ClipByValue": lambda: Guard(policy=ClipByValue(1e9)),
    "+ AutoClip": lambda: Guard(policy=AutoClip()),
    "+ ZClip": lambda: Guard(policy=ZClip()),
    "+ AGC": lambda: Guard(policy=AGC()),
}
PATHS = {"host": (True, "1"), "device": (False, "1"), "device eager": (False, "0")}


def model(tensors: int) -> nn.Module:
    """Blocks of Linear + LayerNorm (four tensors each), then a Linear head: ``tensors``
    parameters (50 or 150)."""
    blocks = (tensors - 2) // 4
    layers = [m for _ in range(blocks) for m in (nn.Linear(64, 64), nn.LayerNorm(64))]
    return nn.Sequential(*layers, nn.Linear(64, 1))


# Operations that make no kernel: views, and conversions or reshapes that copy nothing.
VIEWS = {
    f"aten::{name}"
    for name in [
        "detach",
        "alias",
        "view",
        "as_strided",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "expand",
        "resolve_conj",
        "resolve_neg",
        "lift_fresh",
        "_reshape_alias",
        "t",
        "transpose",
        "permute",
        "unbind",
        "split",
        "narrow",
        "view_as",
        "expand_as",
        "_unsafe_view",
    ]
}
NO_COPY = {"aten::to", "aten::reshape", "aten::flatten", "aten::contiguous"}


def ops(step: Callable[[], object]) -> int:
    """Operations one call launches: aten operations at the top level, and those a compiled
    graph calls (``sort``, say), views and no-op conversions left out."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    count = 0
    for event in prof.events():
        parent = event.cpu_parent
        top = parent is None or parent.name.startswith("## Call CompiledFxGraph")
        if not top or not event.name.startswith("aten::") or event.name in VIEWS:
            continue
        if event.name in NO_COPY and not event.cpu_children:
            continue
        count += 1
    return count


def engine_step(net: nn.Module, optimizer, make_guard, host: bool, compile_flag: str):
    os.environ["GRADWATCH_COMPILE"] = compile_flag
    engine = TorchEngine(net.named_parameters(), cadence=Cadence(10**9), guard=make_guard())
    engine.guard.host_on_cpu = host
    torch._inductor.metrics.reset()
    for _ in range(3):  # the first (eager) and the second (compiled) call, then warm
        engine.before_optimizer_step(optimizer)
    kernels = torch._inductor.metrics.generated_kernel_count

    def step() -> None:
        engine.before_optimizer_step(optimizer)

    return step, kernels


def timed(fn: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def clipping(params: list[torch.Tensor]) -> Callable[[], object]:
    return lambda: nn.utils.clip_grad_norm_(params, 1e9, foreach=True)


def value_clipping(params: list[torch.Tensor]) -> Callable[[], object]:
    return lambda: nn.utils.clip_grad_value_(params, 1e9, foreach=True)


def agc_loop(params: list[torch.Tensor], clipping: float = 0.01, eps: float = 1e-3):
    """AGC as timm's ``adaptive_clip_grad`` computes it: one parameter at a time."""

    def units(t: torch.Tensor) -> torch.Tensor:
        return t.norm(dim=tuple(range(1, t.ndim)), keepdim=True) if t.ndim > 1 else t.norm()

    @torch.no_grad()
    def step() -> None:
        for p in params:
            limit = units(p).clamp_(min=eps) * clipping
            norm = units(p.grad)
            scaled = p.grad * (limit / norm.clamp(min=1e-6))
            p.grad.copy_(torch.where(norm < limit, p.grad, scaled))

    return step


def logging_steps(net: nn.Module, optimizer, repeats: int) -> dict[str, float]:
    """ms per logging step (measures, one host copy, the record) and per histogram step,
    at the defaults on the host path, writing nowhere."""
    rows = {}
    for label, cadence in (("logging step", Cadence(1)), ("histogram step", Cadence(10**9, 1))):
        engine = TorchEngine(net.named_parameters(), cadence=cadence)

        def step(engine: TorchEngine = engine) -> None:
            engine.before_optimizer_step(optimizer)
            engine.after_optimizer_step()

        step()
        rows[label] = timed(step, repeats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[50, 150])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    for tensors in args.tensors:
        net = model(tensors)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        net(torch.randn(8, 64)).square().mean().backward()
        params = list(net.parameters())
        calls = {
            ("clip_grad_norm_(foreach=True)", ""): (clipping(params), 0),
            ("clip_grad_value_(foreach=True)", ""): (value_clipping(params), 0),
            ("AGC one parameter at a time", ""): (agc_loop(params, clipping=1e9), 0),
        }
        for name, make_guard in GUARDS.items():
            for path, (host, flag) in PATHS.items():
                calls[(name, path)] = engine_step(net, optimizer, make_guard, host, flag)
        counts = {key: ops(fn) + kernels for key, (fn, kernels) in calls.items()}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, (fn, _) in calls.items():
                fn()
                times[key].append(timed(fn, args.repeats))
        base = min(times[("clip_grad_norm_(foreach=True)", "")])
        print(f"\n{tensors} tensors, {args.rounds} interleaved rounds of {args.repeats} calls")
        print(f"{'configuration':32} {'path':13} {'ops':>5} {'min ms':>8} {'ratio':>6}")
        for (name, path), ms in times.items():
            best = min(ms)
            print(f"{name:32} {path:13} {counts[(name, path)]:5d} {best:8.3f} {best / base:6.2f}")
        for label, ms in logging_steps(net, optimizer, args.repeats).items():
            print(f"{label} (defaults, host path, no sink): {ms:.3f} ms")


if __name__ == "__main__":
    main()
