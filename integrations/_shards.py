"""Reductions of per-tensor values across the shards of DTensor gradients (FSDP2, tensor parallel).

For plain tensors every function here is the identity. For DTensors, the per-tensor values an
engine computes on local shards are combined over the mesh dimensions the tensors are sharded
on: sums of squares and counts add up, maxima take the maximum. No host reads: the collectives
run on the tensors' own device (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5; older builds keep it under _tensor.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardReducer", "local"]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` held by this process."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


class ShardReducer:
    """Combines per-tensor values over the process groups a list of tensors is sharded on."""

    def __init__(self, groups: Sequence[dist.ProcessGroup]) -> None:
        self.groups = tuple(groups)

    @classmethod
    def for_tensors(cls, tensors: Sequence[torch.Tensor]) -> ShardReducer:
        """Read the sharding from the tensors; all DTensors must share mesh and placements."""
        layouts = {
            (t.device_mesh, tuple(t.placements))
            for t in tensors
            if DTensor is not None and isinstance(t, DTensor)
        }
        if not layouts:
            return cls(())
        if len(layouts) > 1:
            raise NotImplementedError(
                "gradwatch reduces DTensor gradients that share one device mesh and one"
                f" placement. Received {len(layouts)} layouts: {sorted(map(str, layouts))}"
            )
        ((mesh, placements),) = layouts
        if any(p.is_partial() for p in placements):
            raise NotImplementedError(
                "gradwatch needs reduced gradients (Shard or Replicate placements)."
                f" Received placements={placements}"
            )
        groups = [mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard()]
        return cls(groups)

    @property
    def sharded(self) -> bool:
        return bool(self.groups)

    def _reduce(self, values: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        for group in self.groups:
            dist.all_reduce(values, op=op, group=group)
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MAX)

    def min(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MIN)

    def norms(self, local_norms: torch.Tensor) -> torch.Tensor:
        """Global L2 norms of sharded tensors from the L2 norms of their local shards."""
        if not self.sharded:
            return local_norms
        return self.sum(local_norms.square()).sqrt()
