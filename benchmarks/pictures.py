"""What the gradient-flow pictures cost at a histogram step (not a test).

    python benchmarks/pictures.py                  # 50 groups, 200 logged steps, 7 repeats
    python benchmarks/pictures.py --groups 200 --repeats 11

Feeds :class:`~gradwatch.pictures.FlowPictures` ``--steps`` logged steps of a ``--groups``-group
model (norms decaying over depth, one spike, one NaN, dead first group at the start), then
times, in milliseconds of wall clock (median, min, max over ``--repeats``, after one untimed
warm-up) and of the calling thread's CPU (median):

- ``draw``: drawing and encoding both pictures, as the training thread did before they moved to
  a worker (``FlowPictures(background=False)``);
- ``heatmap`` and ``depth_profile``: each picture on its own;
- ``on the training thread``: what a histogram step costs the caller with the default
  background drawing (the history snapshot and the hand-off); the worker is waited for outside
  the timed part, as training steps between histogram steps would.

``--save DIR`` also writes the two PNGs. Wall-clock times on a busy machine are noisy: compare
medians from runs made one after the other; the CPU column is steadier.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gradwatch import pictures, tags
from gradwatch.pictures import FlowPictures
from gradwatch.record import Histogram, Record


def feed(pictures: FlowPictures, groups: int, steps: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}.mlp" for i in range(groups)]
    for k in range(steps):
        step = 10 * k
        norms = np.exp(np.linspace(-12, 0, groups) + rng.normal(0, 0.2, groups))
        norms *= 50 if k == int(0.6 * steps) else 1
        if k == int(0.15 * steps):
            norms[groups // 2] = np.nan
        if k < steps // 20:
            norms[0] = 0.0
        scalars = {}
        for name, norm in zip(names, norms, strict=True):
            scalars[tags.group_tag(tags.GRAD_NORM, name)] = float(norm)
            scalars[tags.group_tag(tags.GRAD_TO_PARAM, name)] = float(norm) / 3
        pictures(Record(step, scalars=scalars))


def timed(
    fn: Callable[[], object], repeats: int, after: Callable[[], object] = list
) -> tuple[list[float], list[float]]:
    """Wall and calling-thread CPU milliseconds of ``repeats`` calls, after one untimed call.

    Each call starts from a collected heap: the figures left behind are cyclic garbage, and
    whichever call met the collector would otherwise pay for the ones before it.
    """
    fn()
    after()
    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(1e3 * (time.thread_time() - start_cpu))
        wall.append(1e3 * (time.perf_counter() - start))
        after()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    histogram = {"grad_hist/x": Histogram.from_counts(0, 1, np.ones(30), 1, 1)}
    rows = {}

    synchronous = FlowPictures(background=False)
    feed(synchronous, args.groups, args.steps)
    step = 10 * args.steps
    rows["draw (both pictures)"] = timed(
        lambda: synchronous(Record(step, histograms=histogram)), args.repeats
    )
    flow = synchronous.history.matrix()
    rows["heatmap"] = timed(lambda: pictures.png_bytes(pictures.heatmap(flow)), args.repeats)
    profile = pictures.depth_profile
    rows["depth_profile"] = timed(lambda: pictures.png_bytes(profile(flow)), args.repeats)

    background = FlowPictures()
    feed(background, args.groups, args.steps)
    rows["on the training thread"] = timed(
        lambda: background(Record(step, histograms=histogram)), args.repeats, background.finish
    )

    print(f"{'ms':24} {'median':>8} {'min':>8} {'max':>8} {'CPU median':>11}")
    for name, (wall, cpu) in rows.items():
        print(
            f"{name:24} {statistics.median(wall):8.1f} {min(wall):8.1f} {max(wall):8.1f}"
            f" {statistics.median(cpu):11.1f}"
        )
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for tag, image in synchronous.draw().items():
            (args.save / f"{tag.split('/')[-1]}.png").write_bytes(image.png)
    print("command: python", *sys.argv)


if __name__ == "__main__":
    main()
