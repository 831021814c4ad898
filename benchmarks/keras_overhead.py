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
excluded). Variants run interleaved in rounds so drift hits them alike. Each round gives every
variant's ratio to ``plain`` in that round (paired, so a slow round slows all alike); the report
is the median over rounds of the step time and of that ratio, and the spread of the ratios
(largest minus smallest).

On a shared machine separate fits of one variant differ (each has its own compilation and its
own share of the machine) by more than the effects measured. ``--mode step``
times what the variants differ in, the compiled train step, without ``fit``'s loop: each
variant's step (gradwatch's capture installed by its callback, as ``fit`` does) is compiled
once, then blocks of 10 steps run interleaved across variants; the report is the 20th
percentile of the blocks (the steadier figure under bursts of outside load) and the median.

    python benchmarks/keras_overhead.py --rounds 5
    python benchmarks/keras_overhead.py --mode step --blocks 200
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
import tensorflow as tf

from gradwatch.integrations.keras import GradWatch
from gradwatch.policies import AutoClip
from gradwatch.reporting import GradWatchWarning

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


def build(model_name: str, variant: str, batches: int, log_dir: str | None):
    """The compiled model of ``variant``, its callbacks, and ``batches`` batches of data."""
    keras.utils.set_random_seed(0)
    model, shape, batch = MODELS[model_name]()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * batches, *shape)).astype("float32")
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
    return model, callbacks, x, y, batch


def fit_step_time(model_name: str, variant: str, steps: int, warmup: int, log_dir: str) -> float:
    """The median per-batch interval of a real ``fit``, after ``warmup`` batches."""
    model, callbacks, x, y, batch = build(model_name, variant, steps + warmup, log_dir)
    clock = BatchClock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[*callbacks, clock])
    return float(np.median(np.diff(clock.stamps[warmup:])))


def compiled_steps(model_name: str, variant: str):
    """``variant``'s train step compiled as ``fit`` compiles it (gradwatch's capture in
    place), with one batch, for timing without ``fit``'s loop around it."""
    model, callbacks, x, y, batch = build(model_name, variant, 1, None)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # builds the optimizer
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    step = tf.function(model.train_step, jit_compile=True)
    data = (tf.constant(x), tf.constant(y))
    for _ in range(5):  # trace, compile, warm up
        step(data)
    return lambda: step(data), model


def in_graph(args: argparse.Namespace) -> dict:
    """Blocks of 10 compiled steps, the variants interleaved block by block."""
    results = {}
    for name in args.models:
        steps = {v: compiled_steps(name, v) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.blocks):
            for variant, (run, model) in steps.items():
                start = time.perf_counter()
                for _ in range(10):
                    run()
                model.optimizer.iterations.numpy()  # waits for the last step
                times[variant].append((time.perf_counter() - start) / 10)
        plain = np.percentile(times["plain"], 20)
        print(f"\n{name}: compiled train step alone, {args.blocks} blocks of 10 steps per variant")
        print(f"{'variant':<20} {'p20 ms':>9} {'vs plain':>9} {'median ms':>10}")
        results[name] = {}
        for variant in VARIANTS:
            p20, median = np.percentile(times[variant], 20), np.median(times[variant])
            results[name][variant] = {"ms": p20 * 1e3, "ratio": p20 / plain}
            print(f"{variant:<20} {p20 * 1e3:>9.3f} {p20 / plain - 1:>+9.1%} {median * 1e3:>10.3f}")
    return results


def in_fit(args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for name in args.models:
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    times[variant].append(
                        fit_step_time(name, variant, args.steps, args.warmup, log_dir)
                    )
            print(f"\n{name}: {args.rounds} rounds; per round, each variant's median step time")
            print("and its ratio to plain in that round; reported: the medians over rounds")
            print(f"{'variant':<20} {'ms/step':>9} {'vs plain':>9} {'spread':>8}")
            results[name] = {}
            for variant in VARIANTS:
                median = statistics.median(times[variant])
                ratios = [t / p for t, p in zip(times[variant], times["plain"], strict=True)]
                ratio = statistics.median(ratios)
                spread = max(ratios) - min(ratios)
                results[name][variant] = {"ms": median * 1e3, "ratio": ratio}
                print(f"{variant:<20} {median * 1e3:>9.3f} {ratio - 1:>+9.1%} {spread:>8.1%}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("fit", "step"), default="fit")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=200, help="fit: timed batches per fit")
    parser.add_argument("--warmup", type=int, default=20, help="fit: batches not timed")
    parser.add_argument("--rounds", type=int, default=3, help="fit: fits per variant")
    parser.add_argument("--blocks", type=int, default=200, help="step: blocks per variant")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"keras {keras.__version__}, backend {keras.config.backend()}, jit_compile=True, CPU")
    results = in_fit(args) if args.mode == "fit" else in_graph(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
