"""The core's :class:`~gradwatch.guard.Guard` on torch tensors: decide, clip, skip, stop.

The decision is the core's pure array code, run on the gradients' device. This module only
gathers its inputs (per-group norms, AGC's per-unit norms) and applies its outputs with torch
kernels: scaling or clamping gradients in place, and dropping a step by setting every
``p.grad = None`` (torch optimizers then leave those parameters and their state untouched,
bit for bit). Host reads: every step only when an action is ``"skip"`` (the step cannot be
dropped without knowing); ``"stop"`` is read one step late from a non-blocking copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gradwatch.detectors import DetectStats, Latch, new_latch
from gradwatch.grouping import Grouping
from gradwatch.guard import Decision, Guard, GuardState
from gradwatch.integrations._shards import local
from gradwatch.policies import AGC, ClipStats

__all__ = ["GuardRun", "TorchGuard"]


class _LaggedFlag:
    """A device bool read on the host one step later: on a GPU through a non-blocking copy
    into pinned memory (the next step finds it done), on the CPU at once."""

    def __init__(self) -> None:
        self._copies: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def push(self, flag: torch.Tensor) -> None:
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._copies.append((host, event))
        else:
            self._copies.append((flag.clone(), None))

    def read(self) -> bool:
        """Whether a flag pushed before the newest was set (on the CPU: any flag pushed)."""
        in_flight = bool(self._copies) and self._copies[-1][1] is not None
        ready = self._copies[:-1] if in_flight else self._copies
        self._copies = self._copies[len(ready) :]
        fired = False
        for host, event in ready:
            if event is not None:
                event.synchronize()  # pushed a step ago: done by now, in practice
            fired = fired or bool(host)
        return fired


@dataclass
class GuardRun:
    """One optimizer's guard: its decision state and what the host learnt from it."""

    state: GuardState
    group_index: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    stop_flag: _LaggedFlag = field(default_factory=_LaggedFlag)
    last: Decision | None = None


class TorchGuard:
    """Runs a :class:`Guard` for the optimizers of one engine."""

    def __init__(self, guard: Guard, grouping: Grouping) -> None:
        self.guard = guard
        self.grouping = grouping

    def start(self, like: torch.Tensor) -> GuardRun:
        return GuardRun(self.guard.init(like, len(self.grouping.groups)))

    def step(
        self,
        run: GuardRun,
        indices: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        global_norm: torch.Tensor,
        step: int,
    ) -> bool:
        """Decide for this step and apply the decision; return whether the step is skipped."""
        guard = self.guard
        if guard.active:
            stats = DetectStats(global_norm, self._group_norms(run, indices, norms))
            step_value = torch.full((), step, dtype=torch.int64, device=norms.device)
        else:  # no detector looks at the groups or the step
            stats, step_value = DetectStats(global_norm, norms[:0]), None
        decision, run.state = guard.update(
            stats, self._clip_stats(grads, params, global_norm), run.state, step_value
        )
        run.last = decision
        if guard.can_stop:
            run.stop_flag.push(decision.stop)
        if guard.reads_every_step and bool(decision.skip):
            return True
        if decision.clip is not None:
            _apply(decision, grads)
        return False

    def state_dict(self, run: GuardRun) -> dict[str, list]:
        """The policy's and detectors' state as plain lists (loads with weights_only=True)."""
        return {
            "policy": [] if run.state.policy is None else [v.tolist() for v in run.state.policy],
            "detectors": [[v.tolist() for v in d] for d in run.state.detectors],
        }

    def load_state_dict(self, run: GuardRun, saved: dict[str, list]) -> None:
        """Put saved state into a freshly started run (same configuration)."""

        def restore(template, values):
            return type(template)(
                *(
                    torch.as_tensor(v, dtype=t.dtype, device=t.device)
                    for t, v in zip(template, values, strict=True)
                )
            )

        policy = run.state.policy
        if policy is not None:
            policy = restore(policy, saved["policy"])
        detectors = tuple(
            restore(t, v) for t, v in zip(run.state.detectors, saved["detectors"], strict=True)
        )
        run.state = run.state._replace(policy=policy, detectors=detectors)

    def should_stop(self, run: GuardRun) -> bool:
        return run.stop_flag.read()

    def drain(self, run: GuardRun) -> list[dict]:
        """Read and reset the latched detections (one small host copy)."""
        state = run.state.latch
        if state.fired.shape[0] == 0:  # no detector
            return []
        parts = [state.fired.double(), state.step.double(), state.value.double()]
        host = (
            torch.stack([*parts, state.threshold.double()]).cpu().numpy()
        )  # [4, detectors, entries]
        latches = tuple(
            Latch(host[0, row] > 0, host[1, row], host[2, row], host[3, row])
            for row in range(host.shape[1])
        )
        run.state = run.state._replace(latch=new_latch(state.value, tuple(state.fired.shape)))
        return self.guard.events(latches, self.grouping.groups)

    def clip_values(self, run: GuardRun, clipped_norm: torch.Tensor) -> torch.Tensor | None:
        """[threshold, coefficient, clipped norm] of the last decision, on the device."""
        if run.last is None or run.last.clip is None:
            return None
        clip = run.last.clip
        return torch.stack([clip.threshold.float(), clip.scale.min().float(), clipped_norm])

    def _group_norms(self, run: GuardRun, indices: list[int], norms: torch.Tensor) -> torch.Tensor:
        key = tuple(indices)
        index = run.group_index.get(key)
        if index is None:  # once per set of tensors: a host-to-device copy outside the loop
            groups = torch.from_numpy(self.grouping.index[np.asarray(indices)])
            index = run.group_index[key] = groups.to(norms.device)
        squares = torch.zeros(len(self.grouping.groups), device=norms.device)
        return squares.index_add_(0, index, norms.square()).sqrt()

    def _clip_stats(
        self, grads: list[torch.Tensor], params: list[torch.Tensor], global_norm: torch.Tensor
    ) -> ClipStats:
        if not isinstance(self.guard.policy, AGC):
            return ClipStats(global_norm)
        return ClipStats(
            global_norm,
            torch.cat([_unit_norms(g) for g in grads]),
            torch.cat([_unit_norms(local(p).detach()) for p in params]),
        )


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
            g.clamp_(min=-clip.value.to(g.dtype), max=clip.value.to(g.dtype))
    elif clip.scale.ndim == 0:
        torch._foreach_mul_(grads, clip.scale)
    else:  # one scale per unit (AGC), in the order of _unit_norms
        offset = 0
        for g in grads:
            units = g.shape[0] if g.ndim > 1 else 1
            scale = clip.scale[offset : offset + units]
            g.mul_(scale.reshape(-1, *([1] * (g.ndim - 1))) if g.ndim > 1 else scale)
            offset += units
