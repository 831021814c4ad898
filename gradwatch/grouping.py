"""Which tensors form a group: a parameter, the module that owns it, or a user's rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["GroupBy", "Grouping", "ROOT", "check_group_by"]

GroupBy = Literal["module", "parameter"] | Callable[[str], str]

ROOT = "root"
"""Group name of parameters owned directly by the top-level module (``"weight"``)."""

_NAMED_RULES = ("module", "parameter")


def check_group_by(
    group_by: object, rules: tuple[str, ...] = _NAMED_RULES, member: str = "parameter name"
) -> GroupBy:
    """Validate a ``group_by`` argument, raising an error that says what is allowed.

    ``rules`` are the named rules an adapter accepts; ``member`` names what a callable maps.
    """
    if callable(group_by) or group_by in rules:
        return group_by  # type: ignore[return-value]
    named = ", ".join(repr(r) for r in rules)
    raise ValueError(
        f"`group_by` must be one of {named}, or a callable from {member} to group name."
        f" Received: group_by={group_by!r}"
    )


def _group_of(name: str, group_by: GroupBy) -> str:
    if group_by == "parameter":
        return name
    if group_by == "module":
        owner, _, _ = name.rpartition(".")
        return owner or ROOT
    group = group_by(name)  # type: ignore[operator]
    if not isinstance(group, str) or not group:
        raise TypeError(
            "`group_by` must return a non-empty string group name. Received: "
            f"group_by({name!r}) -> {group!r}"
        )
    return group


@dataclass(frozen=True)
class Grouping:
    """Tensors assigned to groups, groups in order of first appearance (depth order).

    Example:
        >>> g = Grouping.build(["emb.weight", "blocks.0.w", "blocks.0.b", "head"], "module")
        >>> g.groups
        ('emb', 'blocks.0', 'root')
        >>> g.index.tolist()
        [0, 1, 1, 2]
    """

    tensors: tuple[str, ...]
    groups: tuple[str, ...]
    index: np.ndarray  # [tensors] -> position in `groups`

    @classmethod
    def build(cls, tensor_names: Sequence[str], group_by: GroupBy) -> Grouping:
        check_group_by(group_by)
        groups: dict[str, int] = {}
        index = [groups.setdefault(_group_of(n, group_by), len(groups)) for n in tensor_names]
        return cls(tuple(tensor_names), tuple(groups), np.asarray(index, dtype=np.int64))

    def membership(self) -> np.ndarray:
        """A ``[groups, tensors]`` 0/1 matrix: ``membership() @ x`` sums ``x`` by group."""
        matrix = np.zeros((len(self.groups), len(self.tensors)), dtype=np.float32)
        matrix[self.index, np.arange(len(self.tensors))] = 1.0
        return matrix
