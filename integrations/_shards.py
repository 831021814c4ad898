"""Reductions of per-tensor values across the shards of DTensor gradients (FSDP2, tensor parallel).

For plain tensors every function here is the identity. For DTensors, the per-tensor values an
engine computes on local shards are combined over the mesh dimensions the tensors are sharded
on: sums of squares and counts add up, maxima take the maximum. No host reads: the collectives
run on the tensors' own device (gloo on CPU, NCCL on GPU).

Tensors may be laid out differently on one mesh (tensor parallelism shards one weight by rows,
the next by columns, and replicates a bias; FSDP2 over it adds ``_StridedShard``). A tensor
replicated over a mesh dimension that others are sharded on holds the same values on every
coordinate of that dimension, so in sums it counts on coordinate 0 only; maxima and minima need
no such care. Plain tensors among DTensors count as replicated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.5; older builds keep it under _tensor.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardReducer", "has_dtensors", "local"]

_CACHE_SIZE = 16
# Reducers by (id(mesh), placements, device), each kept beside its mesh so that the id stays
# valid; equal meshes of another process-group incarnation hold other groups, hence the id.
_REDUCERS: dict[tuple, tuple[object, ShardReducer]] = {}


def has_dtensors(tensors: Sequence[torch.Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` held by this process."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def _splits(placement: object) -> bool:
    """Whether a placement divides a tensor's elements among the coordinates of its mesh
    dimension: ``Shard`` and ``_StridedShard`` (whose ``is_shard()`` is False) do."""
    return not placement.is_replicate()  # type: ignore[attr-defined]


class ShardReducer:
    """Combines per-tensor values over the process groups a list of tensors is sharded on.

    ``counted[i]`` says whether this process contributes tensor ``i`` to sums: False where the
    tensor is replicated over a reduced mesh dimension and this process is not at coordinate 0.
    """

    def __init__(
        self,
        groups: Sequence[dist.ProcessGroup],
        counted: Sequence[bool] = (),
        weights: torch.Tensor | None = None,
    ) -> None:
        self.groups = tuple(groups)
        self.counted = tuple(counted)
        self.weights = weights  # `counted` as 1.0 / 0.0 on the device; None where all count

    @classmethod
    def for_tensors(cls, tensors: Sequence[torch.Tensor]) -> ShardReducer:
        """Read the sharding from the tensors; all DTensors must share one device mesh."""
        if not has_dtensors(tensors):
            return cls(())
        meshes = {t.device_mesh for t in tensors if isinstance(t, DTensor)}
        if len(meshes) > 1:
            raise NotImplementedError(
                "gradwatch reduces DTensor gradients that share one device mesh."
                f" Received {len(meshes)} meshes: {sorted(map(str, meshes))}"
            )
        (mesh,) = meshes
        layout = tuple(tuple(t.placements) if isinstance(t, DTensor) else None for t in tensors)
        key = (id(mesh), layout, local(tensors[0]).device)
        cached = _REDUCERS.get(key)
        if cached is None:
            if len(_REDUCERS) >= _CACHE_SIZE:
                _REDUCERS.clear()
            cached = _REDUCERS[key] = (mesh, cls._build(mesh, layout, key[2]))  # keeps id valid
        return cached[1]

    @classmethod
    def _build(cls, mesh, layout: tuple, device: torch.device) -> ShardReducer:
        for placements in layout:
            if placements is not None and any(p.is_partial() for p in placements):
                raise NotImplementedError(
                    "gradwatch needs reduced gradients (Shard or Replicate placements)."
                    f" Received placements={placements}"
                )
        dims = sorted(
            {d for ps in layout if ps is not None for d, p in enumerate(ps) if _splits(p)}
        )
        coordinate = mesh.get_coordinate()
        counted = tuple(
            all((ps is not None and _splits(ps[d])) or coordinate[d] == 0 for d in dims)
            for ps in layout
        )
        weights = None
        if not all(counted):
            weights = torch.tensor(counted, dtype=torch.float32, device=device)
        return cls([mesh.get_group(d) for d in dims], counted, weights)

    @property
    def sharded(self) -> bool:
        return bool(self.groups)

    def _reduce(self, values: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        for group in self.groups:
            dist.all_reduce(values, op=op, group=group)
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sums over the shards of values whose contributions the caller already chose."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def sum_per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """Sums of per-tensor values, one entry per tensor, each tensor's elements counted once."""
        if self.weights is not None:
            values = values * self.weights
        return self.sum(values)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MAX)

    def min(self, values: torch.Tensor) -> torch.Tensor:
        return self._reduce(values, dist.ReduceOp.MIN)

    def combine(self, rule: str, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor values of the local shards combined by a
        :class:`~gradwatch.stats.Measure`'s rule: ``"norm"``, ``"max"`` or ``"sum"``."""
        if not self.sharded:
            return values
        if rule == "norm":
            return self.sum_per_tensor(values.square()).sqrt()
        return self.max(values) if rule == "max" else self.sum_per_tensor(values)

    def counts_here(self, position: int) -> bool:
        """Whether this process contributes the tensor at ``position`` to sums."""
        return not self.counted or self.counted[position]
