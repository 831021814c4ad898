"""The core's pure decision, compiled for the device path.

On a GPU the guard's update is a few dozen tiny operations per step, each a kernel launch when
run eagerly. ``torch.compile`` fuses the same pure code into a few kernels. The update's
arguments and results are NamedTuples of tensors; they are flattened into a list of tensors
(what Dynamo guards cheaply) and rebuilt around the compiled call. Where compilation is
unavailable or fails, the update runs eagerly, after one warning.

``GRADWATCH_COMPILE=0`` keeps the update eager.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradwatch.reporting import GradWatchWarning

__all__ = ["Compiled", "compiling"]

_COUNT = 0  # compiled updates made in this process


def compiling() -> bool:
    """Whether the device path compiles the update (``GRADWATCH_COMPILE`` is not ``"0"``)."""
    return os.environ.get("GRADWATCH_COMPILE", "1") != "0"


class Compiled:
    """``update(*args)``, compiled once per structure of its arguments; eager after a failure."""

    def __init__(self, update: Callable[..., Any]) -> None:
        self.update = update
        self._compiled: dict[Any, tuple[Callable[..., list], Any]] = {}
        self.failed = not compiling()

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.update(*args)
        leaves, spec = tree_flatten(args)
        entry = self._compiled.get(spec)
        if entry is None:  # first call: eager, to learn the results' structure
            result = self.update(*args)
            self._compiled[spec] = (self._compile(spec), tree_flatten(result)[1])
            return result
        compiled, out = entry
        try:
            return tree_unflatten(compiled(*_distinct(leaves)), out)
        except Exception as error:
            self.failed = True
            warnings.warn(
                f"gradwatch decides eagerly: torch.compile of its update failed ({error!r:.200})",
                GradWatchWarning,
                stacklevel=3,
            )
            return self.update(*args)

    def _compile(self, spec: Any) -> Callable[..., list]:
        update = self.update

        def flat(*leaves: torch.Tensor) -> list:
            return tree_flatten(update(*tree_unflatten(list(leaves), spec)))[0]

        # Dynamo keeps its compiled code per code object, and at most a few entries each: a
        # code object of its own per compiled update keeps engines and tests from sharing one.
        global _COUNT
        _COUNT += 1
        flat.__code__ = flat.__code__.replace(co_name=f"gradwatch_update_{_COUNT}")
        return torch.compile(flat, fullgraph=True, dynamic=False)


def _distinct(leaves: list) -> list:
    """``leaves`` with any tensor that appears twice copied: a state whose fields share one
    tensor (a policy's zeros, say) would otherwise recompile once its fields part."""
    seen: set[int] = set()
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and id(leaf) in seen:
            leaf = leaf.clone()
        seen.add(id(leaf))
        out.append(leaf)
    return out
