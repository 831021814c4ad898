"""The forward and backward signal at each group's module, measured with hooks on one batch.

:class:`SignalProbe` installs forward hooks on the group's modules before a logging step's
forward, and a gradient hook on each output they see; :meth:`SignalProbe.collect`, at that
optimizer step, removes them all and returns what they took: one number per hook call, on the
device, read with the step's other values in one copy and folded into sums per group on the
host (:func:`gradwatch.signal.fold`). Between logging
steps no hook is installed. A group's module is the smallest module holding all of its
parameters. Its dead and saturated fractions are taken on the activation module that ends it
(its last child, for a ``Sequential``) or is registered right after it in the module holding
both (a ``ReLU`` after a ``Linear``); a module with neither (a norm, the head) has none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule
from torch.utils.hooks import RemovableHandle

from gradwatch.grouping import Grouping
from gradwatch.signal import GRAD_NORM, LOSS_SCALE, NONZERO, NORM, SATURATED, SUM, Entry

__all__ = ["SignalProbe", "Taken"]

Saturation = Callable[[torch.Tensor], torch.Tensor] | None

_BOUNDED: dict[type[nn.Module], Saturation] = {
    nn.Tanh: lambda y: y.abs() > 0.99,
    nn.Sigmoid: lambda y: (y - 0.5).abs() > 0.49,
}
_UNBOUNDED = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, (*_BOUNDED, *_UNBOUNDED))


def _ending_activation(module: nn.Module) -> nn.Module | None:
    """The activation whose outputs are ``module``'s own: itself, or a Sequential's last."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module if _is_activation(module) else None


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A module's output tensor: the output, or the first element of a tuple or list."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output
    return None


class Taken(NamedTuple):
    """What a probe took on one logging step: its values on the device, and what each is."""

    values: torch.Tensor  # [len(entries)], float32
    entries: list[Entry]


class SignalProbe:
    """The forward and backward signal per group, taken while installed: one reduction per
    hook call, each to one number on the device (see :func:`gradwatch.signal.fold`)."""

    def __init__(self, model: nn.Module, grouping: Grouping, names: list[str]) -> None:
        """``names``: each of ``grouping``'s tensors' names in ``model`` (as
        ``named_parameters`` gives them)."""
        modules = dict(model.named_modules())
        members: dict[int, list[list[str]]] = {}
        for name, group in zip(names, grouping.index, strict=True):
            members.setdefault(int(group), []).append(name.split(".")[:-1])
        self._floats: list[tuple[torch.Tensor, Entry]] = []
        self._counts: list[tuple[torch.Tensor, Entry]] = []  # int64, count_nonzero's
        self._handles: list[RemovableHandle] = []
        self._gradient_hooks: dict[int, Callable[[torch.Tensor], None]] = {}
        # The same hook objects at every logging step, kept out of Dynamo's graphs where the
        # model holds a compiled module: Dynamo then keeps one set of graphs with them and one
        # without, and recompiles neither (see tests/test_signal.py).
        compiled = any(isinstance(m, OptimizedModule) for m in modules.values())
        wrap = _eager if compiled else _as_is
        self._hooks: list[tuple[nn.Module, Callable[..., None]]] = []
        for group, paths in sorted(members.items()):
            module = modules[".".join(_common_prefix(paths))]
            self._gradient_hooks[group] = self._gradient_hook(group)
            self._hooks.append((module, wrap(self._signal_hook(group))))
            activation = _ending_activation(module) or _following(modules, module)
            if activation is not None:  # dead and saturated outputs are an activation's
                saturation = _BOUNDED.get(type(activation))
                self._hooks.append((activation, wrap(self._activation_hook(group, saturation))))

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Hook every group's module (again for each micro-batch: the sums add up)."""
        if self.installed:
            return
        for module, hook in self._hooks:
            self._handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        """Remove every hook and forget what was taken."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._floats, self._counts = [], []

    def collect(self, loss_scale: torch.Tensor | None = None) -> Taken | None:
        """What was taken since :meth:`install`, or None; removes the hooks.

        ``loss_scale``: the loss scaler's factor (the backward signal is divided by it).
        """
        floats, counts = self._floats, self._counts
        self.remove()
        if not floats and not counts:
            return None
        if loss_scale is not None and floats:
            scale = loss_scale.to(floats[0][0].device).float().reshape(())
            floats.append((scale, (-1, LOSS_SCALE, 0.0)))
        parts = [torch.stack([v for v, _ in floats]).float()] if floats else []
        if counts:
            parts.append(torch.stack([v for v, _ in counts]).float())
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        return Taken(values, [e for _, e in floats] + [e for _, e in counts])

    def _take(self, value: torch.Tensor, entry: Entry) -> None:
        (self._counts if value.dtype == torch.int64 else self._floats).append((value, entry))

    def _signal_hook(self, group: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            y = _first_tensor(output)
            if y is None:
                return
            if not _recomputing():  # activation checkpointing runs a forward twice
                with torch.no_grad():
                    values, count = y.detach(), float(y.numel())
                    wide = _reduced_in(values)
                    norm = torch.linalg.vector_norm(values, dtype=wide)
                    self._take(norm, (group, NORM, count))
                    self._take(values.sum(dtype=wide), (group, SUM, count))
            if y.requires_grad:
                y.register_hook(self._gradient_hooks[group])

        return hook

    def _gradient_hook(self, group: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(grad.detach(), dtype=_reduced_in(grad))
                self._take(norm, (group, GRAD_NORM, float(grad.numel())))

        return hook

    def _activation_hook(self, group: int, saturation: Saturation) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            y = _first_tensor(output)
            if y is None or _recomputing():
                return
            with torch.no_grad():
                values = y.detach()
                count = float(values.numel())
                self._take(torch.count_nonzero(values), (group, NONZERO, count))
                if saturation is not None:
                    saturated = torch.count_nonzero(saturation(values))
                    self._take(saturated, (group, SATURATED, count))

        return hook


def _reduced_in(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a reduction of ``tensor`` runs in: float32, or float64 for a float64 tensor
    (which torch will not narrow)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _recomputing() -> bool:
    """Whether a forward runs inside backward: activation checkpointing recomputing it."""
    return torch._C._current_graph_task_id() != -1


def _eager(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook``, never traced by Dynamo (it keeps Python state)."""
    return torch._dynamo.disable(hook, recursive=True)


def _as_is(hook: Callable[..., None]) -> Callable[..., None]:
    return hook


def _common_prefix(paths: list[list[str]]) -> list[str]:
    prefix = paths[0]
    for path in paths[1:]:
        size = 0
        while size < min(len(prefix), len(path)) and prefix[size] == path[size]:
            size += 1
        prefix = prefix[:size]
    return prefix


def _following(modules: dict[str, nn.Module], module: nn.Module) -> nn.Module | None:
    """The activation registered right after ``module`` in the module that holds it, if any
    (children are usually registered in the order forward runs them)."""
    for parent in modules.values():
        children = list(parent.children())
        for position, child in enumerate(children[:-1]):
            if child is module and _is_activation(children[position + 1]):
                return children[position + 1]
    return None
