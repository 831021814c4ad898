"""Which array namespace runs the core's pure array code for a given array.

numpy and torch arrays get their Array-API namespace from ``array_api_compat``. An adapter whose
framework has no such namespace (TensorFlow, inside Keras' compiled train step) registers a thin
one here; the core then runs unchanged on that framework's tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace

__all__ = ["namespace_of", "register"]

_registered: list[tuple[Callable[[Any], bool], Any]] = []
_by_type: dict[type, Any] = {}  # the core asks several times a step: the lookup is cached


def register(is_array: Callable[[Any], bool], namespace: Any) -> None:
    """Use ``namespace`` for every array for which ``is_array`` is true (idempotent)."""
    if not any(namespace is known for _, known in _registered):
        _registered.append((is_array, namespace))
        _by_type.clear()


def namespace_of(array: Any) -> Any:
    """The namespace of ``array``: a registered one first, else ``array_api_compat``'s."""
    kind = type(array)
    namespace = _by_type.get(kind)
    if namespace is None:
        namespace = _by_type[kind] = _lookup(array)
    return namespace


def _lookup(array: Any) -> Any:
    for is_array, namespace in _registered:
        if is_array(array):
            return namespace
    return array_namespace(array)
