"""Which tensors form a group: a parameter, the module that owns it, or a user's rule."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from gradwatch import tags

__all__ = ["GroupBy", "Grouping", "ROOT", "check_group_by"]

GroupBy = Literal["module", "parameter", "layer", "variable"] | Callable[[str], str]

ROOT = "root"
"""Group name of parameters owned directly by the top-level module (``"weight"``)."""

_NAMED_RULES = ("module", "parameter")
_OWNERS = {"module": ".", "layer": "/"}  # torch names `blocks.0.attn.weight`, Keras paths
# `model/dense/kernel`: a tensor's owner is the prefix before the last separator.
_ITSELF = ("parameter", "variable")
_ALL_RULES = (*_OWNERS, *_ITSELF)


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
    if group_by in _ITSELF:
        return name
    if isinstance(group_by, str):
        owner, _, _ = name.rpartition(_OWNERS[group_by])
        return owner or ROOT
    group = group_by(name)
    if not isinstance(group, str) or not group:
        raise TypeError(
            "`group_by` must return a non-empty string group name. Received: "
            f"group_by({name!r}) -> {group!r}"
        )
    return group


@dataclass(frozen=True)
class Grouping:
    """Tensors assigned to groups, groups in order of first appearance (depth order).

    ``tags`` holds each group's name in tags (see :func:`gradwatch.tags.group_names`), made
    once here, so that every tag of a group is spelled the same; groups whose names would
    share one are told apart by a suffix, with one :class:`GradWatchWarning` naming them.

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
    tags: tuple[str, ...] = field(init=False)  # [groups] -> the group's name in tags

    def __post_init__(self) -> None:
        names = tags.group_names(self.groups)
        object.__setattr__(self, "tags", names)
        _warn_of_shared_names(self.groups, names)

    @classmethod
    def build(cls, tensor_names: Sequence[str], group_by: GroupBy) -> Grouping:
        check_group_by(group_by, _ALL_RULES)
        groups: dict[str, int] = {}
        index = [groups.setdefault(_group_of(n, group_by), len(groups)) for n in tensor_names]
        return cls(tuple(tensor_names), tuple(groups), np.asarray(index, dtype=np.int64))

    def tag_names(self) -> dict[str, str]:
        """Group name -> its name in tags."""
        return dict(zip(self.groups, self.tags, strict=True))


def _warn_of_shared_names(groups: tuple[str, ...], names: tuple[str, ...]) -> None:
    """One warning naming the groups whose tags needed a suffix to stay apart."""
    shared: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        shared.setdefault(tags.sanitize(group), []).append(i)
    clashes = [members for members in shared.values() if len(members) > 1]
    if not clashes:
        return
    from gradwatch.reporting import GradWatchWarning  # reporting imports this module

    told = "; ".join(
        ", ".join(f"{groups[i]!r} -> {names[i]}" for i in members) for members in clashes
    )
    warnings.warn(
        "gradwatch: these groups' names differ only in characters tags leave out, so their "
        f"tags carry a suffix: {told}",
        GradWatchWarning,
        stacklevel=5,
    )
