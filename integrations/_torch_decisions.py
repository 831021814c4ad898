"""The core's :class:`~gradwatch.guard.Guard` on torch tensors: decide, clip, skip, stop.

The decision is the core's pure array code, run where the gradients are: on a GPU on torch
tensors (no host synchronisation), on the CPU on numpy views of the same memory (on arrays of a
few dozen numbers, numpy's per-operation cost is a fraction of torch's dispatch, which made the
decision cost more than the norms: see benchmarks/README.md); on a device the whole decision is
one compiled function (:mod:`gradwatch.integrations._compiled`). This module gathers the
decision's inputs (the group of each tensor, AGC's per-unit norms), folds the step into the
summary, and applies the decision with torch kernels: scaling or clamping gradients in place,
and dropping a step by setting every ``p.grad = None`` (torch optimizers then leave those
parameters and their state untouched, bit for bit). Host reads: every step only when an
action is ``"skip"`` or ``"stop"`` (the step cannot be dropped without knowing; a stop drops
the offending step too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradwatch.array_api import namespace_of
from gradwatch.detectors import DetectStats, Latch, new_latch
from gradwatch.grouping import Grouping
from gradwatch.guard import Decision, Guard, GuardState
from gradwatch.integrations import _torch_namespace
from gradwatch.integrations._compiled import Compiled
from gradwatch.integrations._shards import local
from gradwatch.integrations._units import UnitLayout
from gradwatch.policies import Clip, ClipStats, needs_unit_norms
from gradwatch.stats import StepSummary, global_norm, group_norms, update_summary

__all__ = ["GuardRun", "TorchDecisions"]

Array = Any  # a torch tensor, or a numpy view of a CPU tensor


@dataclass
class _TensorSet:
    """What one set of stepped tensors needs, worked out at its first step: each tensor's
    group (on the run's device), and for AGC where each tensor's output units sit."""

    group_index: Array
    layout: UnitLayout | None = None


@dataclass
class GuardRun:
    """One optimizer's guard: its decision state and what the host learnt from it."""

    state: GuardState
    on_host: bool  # the core runs on numpy views of CPU tensors
    tensor_sets: dict[tuple[int, ...], _TensorSet] = field(default_factory=dict)
    last: Decision | None = None
    following: tuple[int, Array | None] = (-1, None)  # the next step's number, and as an array


_torch_namespace.install()  # the core's array code on torch tensors: plain torch calls

DEVICE_DECISIONS = "GRADWATCH_DEVICE_DECISIONS"
"""Set to ``"1"``, the core decides on torch tensors on the CPU too: the path every other device
takes (compiled, see :mod:`gradwatch.integrations._compiled`), for tests and benchmarks."""


class TorchDecisions:
    """Runs a :class:`Guard` for the optimizers of one engine.

    ``host_on_cpu=False`` keeps the core on torch tensors on the CPU too: the path every other
    device takes. Default: numpy on the CPU unless ``GRADWATCH_DEVICE_DECISIONS=1``.
    """

    def __init__(self, guard: Guard, grouping: Grouping, host_on_cpu: bool | None = None) -> None:
        self.guard = guard
        self.grouping = grouping
        if host_on_cpu is None:
            host_on_cpu = os.environ.get(DEVICE_DECISIONS, "0") != "1"
        self.host_on_cpu = host_on_cpu
        self.compiled = Compiled(self._decide)

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
        step: int,
        summary: StepSummary,
        scaler_skipped: torch.Tensor | None = None,
    ) -> tuple[Decision, bool, Array, StepSummary]:
        """Decide for this step, fold it into ``summary``, and clip; return the decision,
        whether to drop the step, the global norm and the summary (where the run decides).

        Whether to drop is read on the host (the one read per step) only when an action may
        drop the step; the caller drops it.
        """
        guard, on_host = self.guard, run.on_host
        step_value = self._step(run, step, norms) if guard.active else None  # else unused
        tensors = self._tensor_set(run, indices, norms)
        layout = units = None
        if needs_unit_norms(guard.policy):
            if tensors.layout is None:
                tensors.layout = UnitLayout([g.shape for g in grads])
            layout = tensors.layout
            with torch.no_grad():
                units = (
                    view(layout.norms(grads, norms), on_host),
                    view(layout.norms([local(p) for p in params]), on_host),
                )
        decide = self._decide if on_host else self.compiled
        decision, run.state, summary, total, following = decide(
            view(norms, on_host),
            tensors.group_index,
            step_value,
            None if scaler_skipped is None else view(scaler_skipped, on_host),
            units,
            run.state,
            summary,
        )
        run.last, run.following = decision, (step + 1, following)
        dropped = guard.reads_every_step and bool(decision.skip)
        if not dropped and decision.clip is not None:
            _apply(decision.clip, grads, layout)
        return decision, dropped, total, summary

    def _decide(
        self,
        norms: Array,
        group_index: Array,
        step: Array | None,
        scaler_skipped: Array | None,
        units: tuple[Array, Array] | None,
        state: GuardState,
        summary: StepSummary,
    ) -> tuple[Decision, GuardState, StepSummary, Array, Array | None]:
        """The whole per-step decision as pure array code (compiled on the device path):
        the global and per-group norms, the guard's update and the summary; last, the next
        step's number (made here, it costs no operation of its own on a device)."""
        guard = self.guard
        total = global_norm(norms)
        if guard.active:
            stats = DetectStats(total, _group_norms(norms, group_index, len(self.grouping.groups)))
        else:  # no detector looks at the groups or the step
            stats = DetectStats(total, total[None][:0])
        clip_stats = ClipStats(total) if units is None else ClipStats(total, *units)
        decision, state = guard.update(stats, clip_stats, state, step, scaler_skipped)
        skips = decision.skip if guard.reads_every_step else None
        summary = update_summary(summary, total, skips, scaler_skipped)
        return decision, state, summary, total, None if step is None else step + 1

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

    def _step(self, run: GuardRun, step: int, norms: torch.Tensor) -> Array:
        """The step's number as the decision takes it: the one the last decision made when
        steps follow each other, else a new tensor."""
        if run.on_host:
            return np.asarray(step, dtype=np.int64)
        number, following = run.following
        if number == step and following is not None:
            return following
        return torch.full((), step, dtype=torch.int64, device=norms.device)

    def _tensor_set(self, run: GuardRun, indices: list[int], norms: torch.Tensor) -> _TensorSet:
        """What the decision needs of this set of tensors, made once per set (the group index
        is a host-to-device copy outside the per-step path)."""
        key = tuple(indices)
        tensors = run.tensor_sets.get(key)
        if tensors is None:
            groups = self.grouping.index[np.asarray(indices)]
            index = groups if run.on_host else torch.from_numpy(groups).to(norms.device)
            tensors = run.tensor_sets[key] = _TensorSet(index)
        return tensors


def _group_norms(norms: Array, group_index: Array, groups: int) -> Array:
    """Per group, the root of its tensors' summed squared norms, in the norms' dtype."""
    if isinstance(norms, np.ndarray):
        return group_norms(norms, group_index, groups).astype(norms.dtype)
    squares = torch.zeros(groups, dtype=norms.dtype, device=norms.device)
    return squares.index_add(0, group_index, norms.square()).sqrt()


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


def _apply(clip: Clip, grads: list[torch.Tensor], layout: UnitLayout | None) -> None:
    if clip.value is not None:  # one bound per dtype and device, two foreach kernels
        kinds = {(g.dtype, g.device) for g in grads}
        bounds = {}
        for dtype, device in kinds:
            high = torch.as_tensor(clip.value, dtype=dtype, device=device)
            bounds[dtype, device] = (high, -high)
        if len(kinds) == 1:  # the usual case: the same two bounds for every tensor
            highs, lows = ([bound] * len(grads) for bound in bounds[kinds.pop()])
        else:
            highs, lows = (
                list(b) for b in zip(*(bounds[g.dtype, g.device] for g in grads), strict=True)
            )
        torch._foreach_clamp_max_(grads, highs)
        torch._foreach_clamp_min_(grads, lows)
        return
    scales = torch.as_tensor(clip.scale)  # the same memory, for a numpy decision
    if scales.ndim == 0:
        torch._foreach_mul_(grads, scales)
    else:  # one scale per unit (AGC), in the layout's order
        assert layout is not None
        layout.scale_(grads, scales)
