"""The core's :class:`~gradwatch.guard.Guard` on torch tensors: decide, clip, skip, stop.

The decision is the core's pure array code, run where the gradients are: on a GPU on torch
tensors (no host synchronisation), on the CPU on numpy views of the same memory (on arrays of a
few dozen numbers, numpy's per-operation cost is a fraction of torch's dispatch, which made the
decision cost more than the norms: see benchmarks/README.md). This module only gathers
the decision's inputs (per-group norms, AGC's per-unit norms) and applies its outputs with torch
kernels: scaling or clamping gradients in place, and dropping a step by setting every
``p.grad = None`` (torch optimizers then leave those parameters and their state untouched,
bit for bit). Host reads: every step only when an action is ``"skip"`` or ``"stop"`` (the
step cannot be dropped without knowing; a stop drops the offending step too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradwatch.array_api import namespace_of
from gradwatch.detectors import DetectStats, Latch, new_latch
from gradwatch.grouping import Grouping
from gradwatch.guard import Decision, Guard, GuardState
from gradwatch.integrations._shards import local
from gradwatch.policies import ClipStats, needs_unit_norms
from gradwatch.stats import group_norms

__all__ = ["GuardRun", "TorchDecisions"]

Array = Any  # a torch tensor, or a numpy view of a CPU tensor


@dataclass
class GuardRun:
    """One optimizer's guard: its decision state and what the host learnt from it."""

    state: GuardState
    on_host: bool  # the core runs on numpy views of CPU tensors
    group_index: dict[tuple[int, ...], Array] = field(default_factory=dict)
    last: Decision | None = None


class TorchDecisions:
    """Runs a :class:`Guard` for the optimizers of one engine.

    ``host_on_cpu=False`` keeps the core on torch tensors on the CPU too: the path every other
    device takes, so that the CPU tests can check it.
    """

    def __init__(self, guard: Guard, grouping: Grouping, host_on_cpu: bool = True) -> None:
        self.guard = guard
        self.grouping = grouping
        self.host_on_cpu = host_on_cpu

    def start(self, like: torch.Tensor) -> GuardRun:
        on_host = self.host_on_cpu and like.device.type == "cpu"
        return GuardRun(self.guard.init(view(like, on_host), len(self.grouping.groups)), on_host)

    def step(
        self,
        run: GuardRun,
        indices: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        global_norm: Array,
        step: int,
        scaler_skipped: Array | None = None,
    ) -> tuple[Decision, bool]:
        """Decide for this step and clip; return the decision and whether to drop the step.

        ``global_norm`` and ``scaler_skipped`` are already where the run decides (see
        :func:`view`). Whether to drop is read on the host (the one read per step) only when
        an action may drop the step; the caller drops it.
        """
        guard, on_host = self.guard, run.on_host
        if guard.active:
            stats = DetectStats(global_norm, self._group_norms(run, indices, norms))
            step_value = (
                np.asarray(step, dtype=np.int64)
                if on_host
                else torch.full((), step, dtype=torch.int64, device=norms.device)
            )
        else:  # no detector looks at the groups or the step
            stats, step_value = DetectStats(global_norm, global_norm[None][:0]), None
        decision, run.state = guard.update(
            stats,
            self._clip_stats(grads, params, global_norm, on_host),
            run.state,
            step_value,
            scaler_skipped,
        )
        run.last = decision
        dropped = guard.reads_every_step and bool(decision.skip)
        if not dropped and decision.clip is not None:
            _apply(decision, grads)
        return decision, dropped

    def state_dict(self, run: GuardRun) -> dict[str, Any]:
        """The policy's and detectors' state as plain lists (loads with weights_only=True)."""
        return self.guard.state_dict(run.state)

    def load_state_dict(self, run: GuardRun, saved: dict[str, Any]) -> None:
        """Put saved state into a freshly started run (parts saved under another
        configuration start afresh, with a warning)."""
        run.state = self.guard.restore(run.state, saved, _like)

    def drain(self, run: GuardRun) -> Latch:
        """Read and reset the latched detections: a host copy (one small transfer)."""
        state = run.state.latch
        xp = namespace_of(state.value)
        host = _numpy(xp.stack([xp.astype(p, xp.float64) for p in state]))
        run.state = run.state._replace(latch=new_latch(state.value, tuple(state.fired.shape)))
        return Latch(host[0] > 0, host[1], host[2], host[3])

    def clip_values(self, run: GuardRun, clipped_norm: torch.Tensor) -> torch.Tensor | None:
        """[threshold, coefficient, clipped norm] of the last decision, on the device."""
        if run.last is None or run.last.clip is None:
            return None
        clip = run.last.clip
        threshold, scale = torch.as_tensor(clip.threshold), torch.as_tensor(clip.scale)
        return torch.stack([threshold.float(), scale.min().float(), clipped_norm])

    def _group_norms(self, run: GuardRun, indices: list[int], norms: torch.Tensor) -> Array:
        key = tuple(indices)
        index = run.group_index.get(key)
        if index is None:  # once per set of tensors: a host-to-device copy outside the loop
            groups = self.grouping.index[np.asarray(indices)]
            index = run.group_index[key] = (
                groups if run.on_host else torch.from_numpy(groups).to(norms.device)
            )
        if run.on_host:
            groups = len(self.grouping.groups)
            return group_norms(view(norms, True), index, groups).astype(np.float32)
        squares = torch.zeros(len(self.grouping.groups), device=norms.device)
        return squares.index_add_(0, index, norms.square()).sqrt()

    def _clip_stats(
        self,
        grads: list[torch.Tensor],
        params: list[torch.Tensor],
        global_norm: Array,
        on_host: bool,
    ) -> ClipStats:
        if not needs_unit_norms(self.guard.policy):
            return ClipStats(global_norm)
        return ClipStats(
            global_norm,
            view(torch.cat([_unit_norms(g) for g in grads]), on_host),
            view(torch.cat([_unit_norms(local(p).detach()) for p in params]), on_host),
        )


def view(tensor: torch.Tensor, on_host: bool) -> Array:
    """What the core computes on: a numpy view of a CPU tensor (no copy), else the tensor."""
    return tensor.detach().numpy() if on_host else tensor


def _numpy(array: Array) -> np.ndarray:
    return array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _like(template: Array, values: list) -> Array:
    """``values`` as an array of the kind, dtype and device of ``template``."""
    if isinstance(template, torch.Tensor):
        return torch.as_tensor(values, dtype=template.dtype, device=template.device)
    return np.asarray(values, dtype=template.dtype)


def _unit_norms(tensor: torch.Tensor) -> torch.Tensor:
    """Norms of a tensor's output units: rows along dim 0; a vector or scalar is one unit."""
    if tensor.ndim > 1:
        return tensor.float().flatten(1).norm(dim=1)
    return tensor.float().norm().reshape(1)


def _apply(decision: Decision, grads: list[torch.Tensor]) -> None:
    clip = decision.clip
    assert clip is not None
    if clip.value is not None:
        for g in grads:
            limit = torch.as_tensor(clip.value, dtype=g.dtype, device=g.device)
            g.clamp_(min=-limit, max=limit)
        return
    scales = torch.as_tensor(clip.scale)  # the same memory, for a numpy decision
    if scales.ndim == 0:
        torch._foreach_mul_(grads, scales)
    else:  # one scale per unit (AGC), in the order of _unit_norms
        offset = 0
        for g in grads:
            units = g.shape[0] if g.ndim > 1 else 1
            scale = scales[offset : offset + units]
            g.mul_(scale.reshape(-1, *([1] * (g.ndim - 1))) if g.ndim > 1 else scale)
            offset += units
