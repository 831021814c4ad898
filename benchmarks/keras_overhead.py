"""Step time of Keras ``fit`` with and without gradwatch, side by side in one run (CPU).

Variants, each a real ``model.fit`` of the same model on the same synthetic data from the same
seed, compiled with ``jit_compile=True``:

* ``plain``: no clipping, no monitoring;
* ``global_clipnorm``: the optimizer's own ``global_clipnorm=1.0``;
* ``gradwatch``: ``GradWatch()`` at its defaults (statistics every 50 steps, the three
  detectors every step, in the graph);
* ``gradwatch_autoclip``: ``GradWatch(clip=AutoClip())``.

A timing callback placed last stamps the end of every batch; the step time of a fit is the
median of its per-batch intervals after ``--warmup`` batches (tracing and XLA compilation
excluded). Variants run interleaved in rounds so drift hits them alike; the report is the median
over rounds, and the ratio to ``plain``.

    python benchmarks/keras_overhead.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from gradwatch.guard import GradWatchWarning
from gradwatch.integrations.keras import GradWatch
from gradwatch.policies import AutoClip

VARIANTS = ("plain", "global_clipnorm", "gradwatch", "gradwatch_autoclip")


def cnn() -> tuple[keras.Model, tuple[int, ...], int]:
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", padding="same"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    return model, (28, 28, 1), 64


def mlp() -> tuple[keras.Model, tuple[int, ...], int]:
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    return model, (784,), 128


MODELS = {"cnn": cnn, "mlp": mlp}


class BatchClock(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.stamps.append(time.perf_counter())


def step_time(model_name: str, variant: str, steps: int, warmup: int, log_dir: str) -> float:
    keras.utils.set_random_seed(0)
    model, shape, batch = MODELS[model_name]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * (steps + warmup), *shape)).astype("float32")
    y = rng.integers(0, 10, size=(len(x),))
    clip = {"global_clipnorm": 1.0} if variant == "global_clipnorm" else {}
    model.compile(
        keras.optimizers.Adam(1e-3, **clip),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    callbacks: list[keras.callbacks.Callback] = []
    if variant.startswith("gradwatch"):
        policy = AutoClip() if variant == "gradwatch_autoclip" else None
        callbacks.append(GradWatch(log_dir=log_dir, clip=policy))
    clock = BatchClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[*callbacks, clock])
    intervals = np.diff(clock.stamps[warmup:])
    return float(np.median(intervals))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"keras {keras.__version__}, backend {keras.config.backend()}, jit_compile=True, CPU")
    results = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for name in args.models:
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    times[variant].append(
                        step_time(name, variant, args.steps, args.warmup, log_dir)
                    )
            plain = statistics.median(times["plain"])
            print(f"\n{name}: median over {args.rounds} rounds of the median step time")
            print(f"{'variant':<20} {'ms/step':>9} {'vs plain':>9} {'spread':>8}")
            results[name] = {}
            for variant in VARIANTS:
                median = statistics.median(times[variant])
                spread = (max(times[variant]) - min(times[variant])) / median
                results[name][variant] = {"ms": median * 1e3, "ratio": median / plain}
                print(
                    f"{variant:<20} {median * 1e3:>9.3f} {median / plain - 1:>+9.1%} {spread:>8.1%}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
