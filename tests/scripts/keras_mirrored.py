"""MirroredStrategy over two logical CPUs against one device: prints one JSON line.

Run in its own process: logical devices must be set before TensorFlow starts.
"""

from __future__ import annotations

import json
import warnings

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gradwatch.integrations.keras import GradWatch  # noqa: E402
from gradwatch.policies import ClipByNorm  # noqa: E402
from gradwatch.reporting import GradWatchWarning  # noqa: E402
from gradwatch.sinks import MemorySink  # noqa: E402

warnings.simplefilter("ignore", GradWatchWarning)
rng = np.random.default_rng(1)
X = rng.normal(size=(64, 8)).astype("float32")
Y = (2 * X[:, :1] + 0.1 * rng.normal(size=(64, 1))).astype("float32")
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def model(optimizer, built: bool = True) -> keras.Model:
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            *([keras.Input((8,))] if built else []),
            keras.layers.Dense(32, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="head", dtype="float32"),
        ],
        name="net",
    )
    net.compile(optimizer, "mse", jit_compile=False)  # Keras fails with XLA here on CPU
    return net


def logged(distributed: bool, built: bool = True) -> dict[str, float]:
    sink = MemorySink()
    with STRATEGY.scope() if distributed else tf.device("/cpu:0"):
        net = model(keras.optimizers.SGD(0.0), built)
    watch = GradWatch(log_dir=False, log_every_n_steps=1, sinks=[sink])
    net.fit(X, Y, batch_size=64, epochs=1, verbose=0, shuffle=False, callbacks=[watch])
    return sink.records[0].scalars


def logged_mixed(distributed: bool) -> dict[str, float]:
    """``logged`` under ``mixed_float16``: the capture sits inside a LossScaleOptimizer."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return logged(distributed)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def update_norm(optimizer, callbacks) -> float:
    with STRATEGY.scope():
        net = model(optimizer)
    before = [v.numpy() for v in net.trainable_variables]
    net.fit(X, Y, batch_size=64, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    after = [v.numpy() for v in net.trainable_variables]
    return float(np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before, strict=True))))


def skip_identical() -> bool:
    x = X.copy()
    x[3] = np.nan
    with STRATEGY.scope():
        net = model(keras.optimizers.Adam(0.01))
        net.optimizer.build(net.trainable_variables)
    before = [v.numpy().copy() for v in [*net.weights, *net.optimizer.variables]]
    watch = GradWatch(log_dir=False, on_nonfinite="skip")
    net.fit(x, Y, batch_size=64, epochs=1, verbose=0, shuffle=False, callbacks=[watch])
    after = [v.numpy() for v in [*net.weights, *net.optimizer.variables]]
    return (
        all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        and len(watch.events) > 0
    )


print(
    json.dumps(
        {
            "single": logged(distributed=False),
            "mirrored": logged(distributed=True),
            "late_mirrored": logged(distributed=True, built=False),
            "mixed_single": logged_mixed(distributed=False),
            "mixed_mirrored": logged_mixed(distributed=True),
            "gradwatch_update_norm": update_norm(
                keras.optimizers.SGD(1.0), [GradWatch(log_dir=False, clip=ClipByNorm(1.0))]
            ),
            "keras_update_norm": update_norm(keras.optimizers.SGD(1.0, global_clipnorm=1.0), []),
            "skip_identical": skip_identical(),
        }
    )
)
