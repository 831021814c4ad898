"""Argument checks: one place that says what an argument allows and what it received.

Every check raises at construction, in the style of Keras' own messages: the argument as the
user passed it, what is allowed, then ``Received: name=value``. A wrong kind of value raises
``TypeError``, a value of the right kind out of range ``ValueError``. numpy scalars count as
the Python numbers they hold (``np.int64(5)`` is an int, ``np.float32(0.5)`` a float) and come
back as Python numbers, so configurations compare and print alike however they were written.

Example:
    >>> import numpy as np
    >>> check_count("log_every_n_steps", np.int64(5))
    5
    >>> check_count("histogram_bins", 0)
    Traceback (most recent call last):
    ...
    ValueError: `histogram_bins` must be an int >= 1. Received: histogram_bins=0
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeGuard, TypeVar

import numpy as np

__all__ = [
    "MAX_STEPS",
    "OFF",
    "check_choice",
    "check_count",
    "check_flag",
    "check_instance",
    "check_path",
    "check_positive",
    "check_protocol",
    "check_real",
    "check_sinks",
    "did_you_mean",
    "meets",
    "set_fields",
]

T = TypeVar("T")

MAX_STEPS = 2**63 - 1
"""The largest step count: steps are counted in int64 (inside a compiled Keras step too)."""

OFF = " (0 turns it off)"
"""What 0 means for a cadence that may be off: ``check_count(..., smallest=0, meaning=OFF)``."""


def _received(name: str, value: object) -> str:
    return f"Received: {name}={value!r}"


def did_you_mean(value: object, classes: tuple[type, ...]) -> str:
    """``"; did you mean AutoClip()?"`` when ``value`` is a class itself, not an instance (the
    class passed without calling it), whose instances would be one of ``classes`` (or meet one
    of them, a protocol); else ``""``. Ends a message.

    Example:
        >>> from gradwatch.policies import AutoClip, ZClip
        >>> did_you_mean(AutoClip, (AutoClip, ZClip)), did_you_mean(AutoClip(), (AutoClip,))
        ('; did you mean AutoClip()?', '')
    """
    if isinstance(value, type) and any(_is_kind(value, cls) for cls in classes):
        return f"; did you mean {value.__name__}()?"
    return ""


def _is_kind(value: type, cls: type) -> bool:
    if getattr(cls, "_is_protocol", False):
        return _fits(value, cls, bound=False)
    return issubclass(value, cls)


def meets(value: object, protocol: type) -> bool:
    """Whether ``value`` (an object, not a class) has every method of ``protocol``, each
    callable with the protocol's arguments: ``update(stats, state)``, ``init(like, groups)``.
    So a policy is not taken for a detector, nor a detector for a policy, as a runtime
    ``isinstance`` (which checks names only) would.

    Example:
        >>> from gradwatch.detectors import Detector, Explosion
        >>> from gradwatch.policies import AutoClip, Policy
        >>> meets(AutoClip(), Policy), meets(AutoClip, Policy), meets(AutoClip(), Detector)
        (True, False, False)
        >>> meets(Explosion(), Detector), meets(Explosion(), Policy)
        (True, False)
    """
    return not isinstance(value, type) and _fits(value, protocol, bound=True)


def _methods(protocol: type) -> dict[str, int]:
    """The protocol's public methods and how many arguments each takes (not ``self``)."""
    return {
        name: len(inspect.signature(member).parameters) - 1
        for name, member in vars(protocol).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def _fits(value: object, protocol: type, bound: bool) -> bool:
    for name, arguments in _methods(protocol).items():
        method = getattr(value, name, None)
        if not callable(method):
            return False
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):  # no signature to read (a builtin): taken on trust
            continue
        try:
            signature.bind(*([None] * (arguments + (0 if bound else 1))))
        except TypeError:
            return False
    return True


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return _is_int(value) or isinstance(value, (float, np.floating))


def check_count(
    name: str,
    value: object,
    *,
    smallest: int = 1,
    largest: int = MAX_STEPS,
    meaning: str = "",
) -> int:
    """An int in ``[smallest, largest]``, as a Python int.

    ``meaning`` follows the range in the message (``" (0 turns it off)"``). A ``largest``
    below :data:`MAX_STEPS` is said in every message: it is a limit the user may not guess
    (a size that would not fit in memory); :data:`MAX_STEPS` only to a value above it.

    Example:
        >>> check_count("bins", 10**12, largest=10_000)
        Traceback (most recent call last):
        ...
        ValueError: `bins` must be an int from 1 to 10000. Received: bins=1000000000000
    """
    too_large = _is_int(value) and value > largest
    if largest == MAX_STEPS and not too_large:
        allowed = f"an int >= {smallest}"
    else:
        allowed = f"an int from {smallest} to {largest}"
    message = f"`{name}` must be {allowed}{meaning}. {_received(name, value)}"
    if not _is_int(value):
        raise TypeError(message)
    if not smallest <= value <= largest:
        raise ValueError(message)
    return int(value)


def check_flag(name: str, value: object) -> bool:
    """True or False (a numpy bool too), as a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False. {_received(name, value)}")
    return bool(value)


def check_real(name: str, value: object, rule: str, ok: Callable[[float], bool]) -> int | float:
    """A finite real number for which ``ok(value)`` holds; ``rule`` says which, for the message
    (``"in (0, 1)"``). Returned as a Python int or float, as it was given.

    Example:
        >>> check_real("beta", 1.5, "in (0, 1)", lambda b: 0 < b < 1)
        Traceback (most recent call last):
        ...
        ValueError: `beta` must be in (0, 1). Received: beta=1.5
    """
    message = f"`{name}` must be {rule}. {_received(name, value)}"
    if not _is_real(value):
        raise TypeError(message)
    number = int(value) if _is_int(value) else float(value)
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(message)
    return number


def check_positive(name: str, value: object) -> float:
    """A positive finite number, as a Python float."""
    return float(check_real(name, value, "a positive finite number", lambda v: v > 0))


def check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    """One of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {names}. {_received(name, value)}")
    return value


def check_path(name: str, value: object) -> str | None:
    """A path (``str`` or ``os.PathLike``) as a string, or None."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a path or None. {_received(name, value)}")
    path = os.fspath(value)
    if not isinstance(path, str):  # a PathLike of bytes
        raise TypeError(f"`{name}` must be a path or None. {_received(name, value)}")
    return path


def check_log_dir(value: object) -> str | Literal[False] | None:
    """``log_dir``: a path as a string, None (the adapter's default folder) or False (no event
    files)."""
    if value is False:
        return False
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            "`log_dir` must be a path, None (the default folder) or False (no event files)."
            f" {_received('log_dir', value)}"
        )
    return check_path("log_dir", value)


def check_instance(name: str, value: object, cls: type[T], default: Callable[[], T]) -> T:
    """An instance of ``cls``, or ``default()`` for None; never a falsy stand-in for None.

    Example:
        >>> from gradwatch.detectors import Vanishing
        >>> check_instance("vanishing", [], Vanishing, Vanishing)
        Traceback (most recent call last):
        ...
        TypeError: `vanishing` must be a Vanishing or None. Received: vanishing=[]
    """
    if value is None:
        return default()
    if not isinstance(value, cls):
        article = "an" if cls.__name__[0] in "AEIOU" else "a"
        raise TypeError(
            f"`{name}` must be {article} {cls.__name__} or None. {_received(name, value)}"
            f"{did_you_mean(value, (cls,))}"
        )
    return value


def check_protocol(
    name: str, value: object, protocol: type, allowed: str, default: Callable[[], T]
) -> T:
    """An object meeting ``protocol`` (see :func:`meets`), or ``default()`` for None.

    ``allowed`` says what is allowed besides None, for the message.

    Example:
        >>> from gradwatch.detectors import Detector, Vanishing
        >>> check_protocol("vanishing", [], Detector, "a detector", Vanishing)
        Traceback (most recent call last):
        ...
        TypeError: `vanishing` must be None or a detector. Received: vanishing=[]
    """
    if value is None:
        return default()
    if not meets(value, protocol):
        raise TypeError(
            f"`{name}` must be None or {allowed}. {_received(name, value)}"
            f"{did_you_mean(value, (protocol,))}"
        )
    return value  # type: ignore[return-value]


_SINK_METHODS = ("write", "flush", "close")


def check_sinks(name: str, value: object) -> tuple[Any, ...]:
    """A list or tuple of sinks (objects with ``write``, ``flush`` and ``close``), as a tuple.

    A single sink gets a hint to put it in a list; a sink class, to call it.

    Example:
        >>> check_sinks("sinks", "5")
        Traceback (most recent call last):
        ...
        TypeError: `sinks` must be a list or tuple of sinks (objects with write, flush and \
close). Received: sinks='5'
    """
    allowed = "a list or tuple of sinks (objects with write, flush and close)"
    if not isinstance(value, (list, tuple)):
        hint = ""
        if _is_sink(value) and not isinstance(value, type):
            hint = f"; did you mean {name}=[{type(value).__name__}(...)]?"
        raise TypeError(f"`{name}` must be {allowed}. {_received(name, value)}{hint}")
    for k, sink in enumerate(value):
        if isinstance(sink, type) or not _is_sink(sink):
            hint = f"; did you mean {sink.__name__}()?" if isinstance(sink, type) else ""
            raise TypeError(f"`{name}` must be {allowed}. {_received(f'{name}[{k}]', sink)}{hint}")
    return tuple(value)


def _is_sink(value: object) -> bool:
    return all(callable(getattr(value, method, None)) for method in _SINK_METHODS)


def set_fields(instance: object, **values: object) -> None:
    """Store checked values on a frozen dataclass, from its ``__post_init__``: the instance then
    holds Python numbers, so two configurations written differently compare and print alike."""
    for name, value in values.items():
        object.__setattr__(instance, name, value)
