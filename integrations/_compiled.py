"""The core's pure decision, compiled for the device path.

On a GPU the guard's update is a few dozen tiny operations per step, each a kernel launch when
run eagerly; TorchInductor fuses the same pure code into a few kernels. The update is traced to
a graph of torch operations with fake tensors (``make_fx``: no value can steer the trace, and a
branch on one fails it) and compiled by ``torch._inductor.compile``, once per structure, shapes,
strides and dtypes of its arguments. The compiled graph is then called directly: TorchDynamo's frame
evaluation and guards, and torch's pytree, cost more per call than the decision itself. The
update's arguments and results are (named) tuples of tensors, flattened to lists around the
call. Where tracing or compilation fails, the update runs eagerly, after one warning.

``GRADWATCH_COMPILE=0`` keeps the update eager.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._inductor
from torch.fx.experimental.proxy_tensor import make_fx

from gradwatch.reporting import GradWatchWarning

__all__ = ["Compiled", "compiling"]

MAX_SIGNATURES = 8
"""Compiled versions kept per update: inputs whose shapes keep changing decide eagerly."""


def compiling() -> bool:
    """Whether the device path compiles the update (``GRADWATCH_COMPILE`` is not ``"0"``)."""
    return os.environ.get("GRADWATCH_COMPILE", "1") != "0"


class Compiled:
    """``update(*args)``, compiled once per structure, shapes, strides and dtypes of its arguments;
    eager after a failure. ``compilations`` counts the graphs compiled."""

    def __init__(self, update: Callable[..., Any]) -> None:
        self.update = update
        self.compilations = 0
        self.failed = not compiling()
        self._compiled: dict[Any, tuple[Callable[..., list], Any]] = {}
        self._returned: dict[int, tuple[Any, Any, list[torch.Tensor]]] = {}

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.update(*args)
        leaves: list[torch.Tensor] = []
        spec = self._flatten_args(args, leaves)
        key = (spec, tuple(map(_signature, leaves)))
        try:
            entry = self._compiled.get(key)
            if entry is None:
                if len(self._compiled) == MAX_SIGNATURES:
                    raise RuntimeError(f"its inputs changed shape {MAX_SIGNATURES} times")
                entry = self._compiled[key] = self._compile(spec, leaves)
            compiled, out = entry
            return self._results(out, compiled(*_distinct(leaves)))
        except Exception as error:
            self.failed = True
            warnings.warn(
                f"gradwatch decides eagerly: compiling its update failed ({error!r:.200})",
                GradWatchWarning,
                stacklevel=3,
            )
            return self.update(*args)

    def _flatten_args(self, args: tuple, leaves: list[torch.Tensor]) -> Any:
        """The arguments' structure and tensors; a result of the last call passed back (the
        state, the summary) is not walked again."""
        specs = []
        for arg in args:
            known = self._returned.get(id(arg))
            if known is not None and known[0] is arg:
                specs.append(known[1])
                leaves.extend(known[2])
            else:
                specs.append(_flatten(arg, leaves))
        return tuple, tuple(specs)

    def _results(self, out: Any, flat: list[torch.Tensor]) -> tuple:
        """The compiled graph's flat results as the update's (a tuple), each remembered."""
        results, self._returned, start = [], {}, 0
        for spec, count in out:
            value = _unflatten(spec, iter(flat[start : start + count]))
            self._returned[id(value)] = (value, spec, flat[start : start + count])
            results.append(value)
            start += count
        return tuple(results)

    def _compile(self, spec: Any, leaves: list[torch.Tensor]) -> tuple[Callable[..., list], Any]:
        update, out = self.update, []

        def flat(*tensors: torch.Tensor) -> list[torch.Tensor]:
            results: list[torch.Tensor] = []
            for value in update(*_unflatten(spec, iter(tensors))):
                before = len(results)
                out.append((_flatten(value, results), len(results) - before))
            return results

        leaves = _distinct(leaves)
        with torch.no_grad():
            graph = make_fx(flat, tracing_mode="fake")(*leaves)
            compiled = torch._inductor.compile(graph, leaves, options={"size_asserts": False})
        self.compilations += 1
        return compiled, out


_LEAF = "tensor"
_CONST = object()  # a spec node holding a value that is not a tensor (None, say)


def _flatten(tree: Any, leaves: list[torch.Tensor]) -> Any:
    """Append ``tree``'s tensors to ``leaves``; return its structure (hashable)."""
    if isinstance(tree, torch.Tensor):
        leaves.append(tree)
        return _LEAF
    if isinstance(tree, tuple):
        return type(tree), tuple(_flatten(item, leaves) for item in tree)
    return _CONST, tree


def _unflatten(spec: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if spec is _LEAF:
        return next(leaves)
    kind, items = spec
    if kind is _CONST:
        return items
    values = [_unflatten(item, leaves) for item in items]
    return kind(*values) if hasattr(kind, "_fields") else kind(values)


def _signature(tensor: torch.Tensor) -> tuple:
    """What a compiled graph assumes of an input (so it need not check it on every call)."""
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _distinct(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """``leaves`` with any tensor that appears twice copied (a state whose fields share one
    tensor, a policy's zeros say): a compiled graph takes distinct inputs."""
    if len(set(map(id, leaves))) == len(leaves):
        return leaves
    seen: set[int] = set()
    out = []
    for leaf in leaves:
        out.append(leaf.clone() if id(leaf) in seen else leaf)
        seen.add(id(leaf))
    return out
