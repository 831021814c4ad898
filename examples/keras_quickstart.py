"""gradwatch in Keras' model.fit: one callback, beside Keras' own TensorBoard callback.

A MemorySink keeps the same records in Python for the verdict; `gradwatch report` draws them.

python examples/keras_quickstart.py --log-dir logs/keras --epochs 5
tensorboard --logdir logs/keras     # or open logs/keras/report.html
"""

from __future__ import annotations

import argparse

import keras
import numpy as np

from gradwatch import MemorySink
from gradwatch.integrations.keras import GradWatch
from gradwatch.policies import AutoClip
from gradwatch.report import report


def main(log_dir: str, epochs: int) -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 32)).astype("float32")
    y = (x[:, :4].sum(axis=1, keepdims=True) + 0.1 * rng.normal(size=(2048, 1))).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, activation="relu", name="hidden1"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(1, name="head"),
        ],
        name="regressor",
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    sink = MemorySink()
    watch = GradWatch(
        log_every_n_steps=10, histogram_every_n_steps=50, clip=AutoClip(), sinks=[sink]
    )
    board = keras.callbacks.TensorBoard(log_dir=log_dir, update_freq=10)  # gradwatch joins it
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=2, callbacks=[board, watch])
    norms = dict(sink.scalars("global/grad_norm"))
    clipped = dict(sink.scalars("global/clipped_norm"))  # at logging steps
    scaled = sum(c < norms[step] for step, c in clipped.items())  # AutoClip's 10th percentile
    first, last = norms[min(norms)], norms[max(norms)]
    print(f"global gradient norm {first:.3g} at the start, {last:.3g} at the end; ", end="")
    print(f"clipped at {scaled} of {len(clipped)} logged steps; detections: {len(watch.events)}")
    print(f"TensorBoard: tensorboard --logdir {log_dir}")
    try:
        print("report:", *report(log_dir, f"{log_dir}/report.html", quiet=True))
    except ImportError as error:  # matplotlib is optional: pip install "gradwatch[report]"
        print(f"no report: {error}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="logs/keras")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    main(args.log_dir, args.epochs)
