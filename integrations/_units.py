"""Output units of a list of torch tensors, measured and scaled in a few kernels for all of them.

A unit (what :class:`gradwatch.policies.AGC` clips) is a slice along a tensor's first dimension
(a row of a Linear weight, an output channel of a Conv kernel); a vector or a scalar is one unit.
Tensors with the same shape after their first dimension are catenated along it and measured by
one norm (those of ``ALONE`` elements or more are measured where they are); vectors and scalars
by one foreach norm. Scaling is one foreach multiply per such
family, with each tensor's scales shaped to broadcast over its units (in float32, as the
tensors' own multiply would promote them).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["UnitLayout"]

ALONE = 2**20
"""Elements from which a tensor is measured on its own: copying it would cost more than the
launch a catenation saves."""


class UnitLayout:
    """Where each tensor's units sit in the vector of unit norms, for tensors of given shapes."""

    def __init__(self, shapes: list[torch.Size]) -> None:
        families: dict[Any, list[int]] = {}
        self.vectors: list[int] = []
        for position, shape in enumerate(shapes):
            if len(shape) < 2:
                self.vectors.append(position)
            elif shape.numel() < ALONE:
                families.setdefault(shape[1:], []).append(position)
            else:  # a tensor this large is measured where it is, not copied
                families[position] = [position]
        self.families = [
            (positions, [shapes[p][0] for p in positions], len(shapes[positions[0]]) - 1)
            for positions in families.values()
        ]
        self._vector_indices: dict[torch.device, torch.Tensor] = {}
        self.units = sum(sum(rows) for _, rows, _ in self.families) + len(self.vectors)

    def norms(self, tensors: list[torch.Tensor], whole: torch.Tensor | None = None) -> torch.Tensor:
        """Every unit's norm in float32, in the layout's order. ``whole``: the tensors' own
        norms where the caller has them (a vector's one unit is the whole vector)."""
        parts = []
        for positions, _, trailing in self.families:
            stacked = (
                torch.cat([tensors[p] for p in positions])
                if positions[1:]
                else tensors[positions[0]]
            )
            dims = tuple(range(1, trailing + 1))
            parts.append(torch.linalg.vector_norm(stacked, dim=dims, dtype=torch.float32))
        if self.vectors and whole is not None:
            parts.append(whole[self._vector_index(whole.device)])
        elif self.vectors:
            vectors = [tensors[p] for p in self.vectors]
            parts.append(torch.stack(torch._foreach_norm(vectors, dtype=torch.float32)))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _vector_index(self, device: torch.device) -> torch.Tensor:
        index = self._vector_indices.get(device)
        if index is None:
            index = self._vector_indices[device] = torch.tensor(self.vectors, device=device)
        return index

    def scale_(self, tensors: list[torch.Tensor], scales: torch.Tensor) -> None:
        """Multiply each unit of ``tensors`` in place by its entry of ``scales``."""
        offset = 0
        for positions, rows, trailing in self.families:
            count = sum(rows)
            shaped = scales[offset : offset + count].reshape(-1, *[1] * trailing)
            torch._foreach_mul_([tensors[p] for p in positions], list(shaped.split(rows)))
            offset += count
        if self.vectors:
            torch._foreach_mul_([tensors[p] for p in self.vectors], list(scales[offset:].unbind()))
