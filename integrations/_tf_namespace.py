"""A thin Array-API-style namespace over TensorFlow, for the core's pure array code.

The core's policies and detectors call ``xp.where``, ``xp.maximum``, ... on whatever arrays
they are given. Inside Keras' compiled train step those are TensorFlow tensors, which have no
Array-API namespace; this module supplies the handful of functions the core uses, with the
Array-API's promotion of Python scalars to the other argument's dtype. Registering it with
:func:`gradwatch.array_api.register` makes ``namespace_of(tf_tensor)`` return it.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from gradwatch import array_api

__all__ = ["install"]

bool = tf.bool
int64 = tf.int64
float32 = tf.float32
float64 = tf.float64


def _pair(a: Any, b: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Both as tensors, a Python scalar taking the dtype of the tensor beside it."""
    if isinstance(a, tf.Tensor | tf.Variable):
        a = tf.convert_to_tensor(a)
        return a, tf.convert_to_tensor(b, dtype=a.dtype)
    b = tf.convert_to_tensor(b)
    return tf.convert_to_tensor(a, dtype=b.dtype), b


def asarray(value: Any, dtype: Any = None) -> tf.Tensor:
    return tf.convert_to_tensor(value, dtype=dtype)


def maximum(a: Any, b: Any) -> tf.Tensor:
    return tf.maximum(*_pair(a, b))


def minimum(a: Any, b: Any) -> tf.Tensor:
    return tf.minimum(*_pair(a, b))


def where(condition: Any, a: Any, b: Any) -> tf.Tensor:
    a, b = _pair(a, b)
    return tf.where(condition, a, b)


def zeros(shape: Any, dtype: Any = tf.float32, device: Any = None) -> tf.Tensor:
    return tf.zeros(shape, dtype=dtype)


def full(shape: Any, value: Any, dtype: Any = tf.float32, device: Any = None) -> tf.Tensor:
    return tf.fill(shape, tf.constant(value, dtype=dtype))


def zeros_like(a: Any) -> tf.Tensor:
    return tf.zeros_like(a)


def ones_like(a: Any) -> tf.Tensor:
    return tf.ones_like(a)


def full_like(a: Any, value: Any) -> tf.Tensor:
    return tf.fill(tf.shape(a), tf.constant(value, dtype=a.dtype))


def arange(stop: int, device: Any = None) -> tf.Tensor:
    return tf.range(stop, dtype=tf.int64)


def astype(a: Any, dtype: Any) -> tf.Tensor:
    return tf.cast(a, dtype)


def reshape(a: Any, shape: Any) -> tf.Tensor:
    return tf.reshape(a, shape)


def concat(arrays: Any, axis: int = 0) -> tf.Tensor:
    return tf.concat(list(arrays), axis=axis)


def stack(arrays: Any, axis: int = 0) -> tf.Tensor:
    return tf.stack(list(arrays), axis=axis)


def take(a: Any, indices: Any, axis: int | None = None) -> tf.Tensor:
    return tf.gather(a, indices, axis=axis or 0)


def isfinite(a: Any) -> tf.Tensor:
    return tf.math.is_finite(a)


def any(a: Any) -> tf.Tensor:
    return tf.reduce_any(a)


def max(a: Any) -> tf.Tensor:
    return tf.reduce_max(a)


def sum(a: Any) -> tf.Tensor:
    return tf.reduce_sum(a)


log, exp, sqrt, floor = tf.math.log, tf.math.exp, tf.math.sqrt, tf.math.floor


def _is_tensorflow(array: Any) -> bool:
    return isinstance(array, tf.Tensor | tf.Variable)


def install() -> None:
    """Let the core run on TensorFlow tensors (safe to call more than once)."""
    import sys

    array_api.register(_is_tensorflow, sys.modules[__name__])
