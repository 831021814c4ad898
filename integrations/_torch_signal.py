"""The forward and backward signal at each group's module, measured with hooks on one batch.

:class:`SignalProbe` installs forward hooks on the group's modules before a logging step's
forward, and a gradient hook on each output they see; :meth:`SignalProbe.collect`, at that
optimizer step, removes them all and returns the sums of :data:`gradwatch.signal.SIGNAL_ROW`
per group, on the device (read with the step's other values, in one copy). Between logging
steps no hook is installed. A group's module is the smallest module holding all of its
parameters. Its dead and saturated fractions are taken on the activation module that ends it
(its last child, for a ``Sequential``) or is registered right after it in the module holding
both (a ``ReLU`` after a ``Linear``), else on its own outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.grouping import Grouping
from gradwatch.signal import SIGNAL_ROW

__all__ = ["SignalProbe"]

Saturation = Callable[[torch.Tensor], torch.Tensor] | None

_BOUNDED: dict[type[nn.Module], Saturation] = {
    nn.Tanh: lambda y: y.abs() > 0.99,
    nn.Sigmoid: lambda y: (y < 0.01) | (y > 0.99),
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
_ROW = len(SIGNAL_ROW)
_GRAD_SQUARES = SIGNAL_ROW.index("grad_sum_squares")


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


class SignalProbe:
    """Sums of the forward and backward signal per group, taken while installed."""

    def __init__(self, model: nn.Module, grouping: Grouping, names: list[str]) -> None:
        """``names``: each of ``grouping``'s tensors' names in ``model`` (as
        ``named_parameters`` gives them)."""
        modules = dict(model.named_modules())
        members: dict[int, list[str]] = {}
        for name, group in zip(names, grouping.index, strict=True):
            members.setdefault(int(group), []).append(name.split(".")[:-1])
        self.groups = len(grouping.groups)
        self._targets: list[tuple[int, nn.Module, nn.Module]] = []  # group, module, activation
        for group, paths in sorted(members.items()):
            module = modules[".".join(_common_prefix(paths))]
            activation = _ending_activation(module) or _following(modules, module) or module
            self._targets.append((group, module, activation))
        self._handles: list[RemovableHandle] = []
        self._sums: dict[int, list[torch.Tensor]] = {}
        # The same hook objects at every logging step, run eagerly where the model is
        # compiled: Dynamo then keeps one graph with them and one without, and recompiles
        # neither (see tests/test_signal.py).
        self._hooks = [
            (
                module,
                _eager(self._signal_hook(group)),
                activation,
                _eager(self._activation_hook(group, _BOUNDED.get(type(activation)))),
            )
            for group, module, activation in self._targets
        ]

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        """Hook every group's module (again for each micro-batch: the sums add up)."""
        if self.installed:
            return
        for module, signal, activation, dead in self._hooks:
            self._handles.append(module.register_forward_hook(signal))
            self._handles.append(activation.register_forward_hook(dead))

    def remove(self) -> None:
        """Remove every hook and forget the sums."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sums.clear()

    def collect(self, loss_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The sums since :meth:`install`, ``[groups, len(SIGNAL_ROW)]`` (zeros for a group
        not seen), on the device; None when nothing was seen. Removes the hooks.

        ``loss_scale``: the loss scaler's factor, which the backward signal is divided by.
        """
        sums = self._sums
        self._sums = {}
        self.remove()
        if not sums:
            return None
        device = next(iter(sums.values()))[0].device
        rows = torch.zeros(self.groups, _ROW, dtype=torch.float32, device=device)
        for group, parts in sums.items():
            rows[group] = torch.stack(parts).sum(0)
        if loss_scale is not None:
            rows[:, _GRAD_SQUARES] /= loss_scale.to(device).float().square()
        return rows

    def _add(self, group: int, columns: dict[str, torch.Tensor]) -> None:
        zero = torch.zeros((), dtype=torch.float32, device=next(iter(columns.values())).device)
        row = torch.stack([columns.get(name, zero) for name in SIGNAL_ROW])
        self._sums.setdefault(group, []).append(row)

    def _signal_hook(self, group: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            y = _first_tensor(output)
            if y is None:
                return
            if not _recomputing():  # activation checkpointing runs a forward twice
                with torch.no_grad():
                    values = y.detach().float()
                    count = torch.tensor(float(values.numel()), device=values.device)
                    sums = {"sum_squares": values.square().sum(), "sum": values.sum()}
                    self._add(group, {**sums, "count": count})
            if y.requires_grad:
                y.register_hook(self._gradient_hook(group))

        return hook

    def _gradient_hook(self, group: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                values = grad.detach().float()
                count = torch.tensor(float(values.numel()), device=values.device)
                self._add(group, {"grad_sum_squares": values.square().sum(), "grad_count": count})

        return hook

    def _activation_hook(self, group: int, saturation: Saturation) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            y = _first_tensor(output)
            if y is None or _recomputing():
                return
            with torch.no_grad():
                values = y.detach()
                count = torch.tensor(float(values.numel()), device=values.device)
                columns = {"outputs": count, "zeros": (values == 0).sum().float()}
                if saturation is not None:
                    columns["bounded"] = count
                    columns["saturated"] = saturation(values.float()).sum().float()
                self._add(group, columns)

        return hook


def _recomputing() -> bool:
    """Whether a forward runs inside backward: activation checkpointing recomputing it."""
    return torch._C._current_graph_task_id() != -1


def _eager(hook: Callable[..., None]) -> Callable[..., None]:
    """``hook``, never traced by Dynamo (it keeps Python state)."""
    return torch._dynamo.disable(hook, recursive=True)


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
