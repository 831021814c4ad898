"""Gradient-flow pictures on synthetic records: history, heatmap, profile, layout, sink."""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gradwatch import tags
from gradwatch.dashboard import Chart, build_dashboard
from gradwatch.grouping import Grouping
from gradwatch.pictures import FlowPictures
from gradwatch.pictures.history import FlowHistory, FlowMatrix
from gradwatch.record import Histogram, Image, Record
from gradwatch.sinks import MemorySink, TensorBoardSink
from gradwatch.sinks.fanout import Fanout

GROUPS = ["embed"] + [f"encoder.layers.{i // 2}.{('attn', 'mlp')[i % 2]}" for i in range(48)]
GROUPS += ["head"]
LAYOUT = build_dashboard(Grouping.build(GROUPS, "parameter"))
DEAD, SPIKE, NAN = range(0, 12), 60, (75, 30)  # dead early layers (steps < 30), a spike, a NaN


def synthetic_scalars(step: int, rng: np.random.Generator) -> dict[str, float]:
    """A 50-group record: decay across depth, early layers dead at first, one spike, one NaN."""
    log_norm = np.linspace(-1, -3, len(GROUPS)) + 0.2 * rng.normal(size=len(GROUPS))
    if step < 30:
        log_norm[list(DEAD)] = -9.0
    if step == SPIKE:
        log_norm += 3.5
    norm = 10**log_norm
    if step < 15:
        norm[0] = 0.0
    if step == NAN[0]:
        norm[NAN[1]] = np.nan
    scalars = {
        tags.group_tag(tags.GRAD_NORM, g): float(v) for g, v in zip(GROUPS, norm, strict=True)
    }
    scalars.update(
        {
            tags.group_tag(tags.GRAD_TO_PARAM, g): float(v) / 3
            for g, v in zip(GROUPS, norm, strict=True)
        }
    )
    scalars[tags.total_tag(tags.GLOBAL)] = float(np.sqrt(np.nansum(norm**2)))
    return scalars


def histogram() -> Histogram:
    return Histogram.from_counts(-1.0, 1.0, np.array([1.0, 2.0]), 0.0, 1.0)


def history(steps=range(100)) -> FlowHistory:
    rng = np.random.default_rng(0)
    flow = FlowHistory()
    for step in steps:
        flow.add(step, synthetic_scalars(step, rng))
    return flow


# --- history -----------------------------------------------------------------------------------


def test_history_keeps_depth_order_and_marks_zero_nan_and_missing():
    flow = history().matrix()
    assert flow.groups == tuple(GROUPS)
    assert flow.norm.shape == (50, 100)
    assert (flow.norm[0, :15] == 0).all()
    assert np.isinf(flow.norm[NAN[1], NAN[0]])
    flow = FlowHistory()
    flow.add(0, {"grad_norm/a": 1.0})
    flow.add(1, {"grad_norm/a": 1.0, "grad_norm/b": 2.0})
    assert np.isnan(flow.matrix().norm[1, 0])  # "b" was not logged at step 0


def test_a_ratio_of_zero_parameters_is_missing_and_of_a_nan_gradient_infinite():
    flow = FlowHistory()
    nan = float("nan")
    flow.add(0, {"grad_norm/a": 1.0, "grad_to_param/a": nan, "grad_norm/b": nan})
    flow.add(1, {"grad_norm/a": nan, "grad_to_param/a": nan, "grad_to_param/b": 0.5})
    ratio = flow.matrix().ratio
    assert np.isnan(ratio[0, 0]) and np.isinf(ratio[0, 1])  # a's parameters were zero at 0
    assert np.isnan(ratio[1, 0]) and ratio[1, 1] == 0.5


def test_history_merges_a_second_optimizer_and_halves_keeping_spikes():
    flow = FlowHistory(max_columns=4)
    flow.add(0, {"grad_norm/a": 1.0})
    flow.add(0, {"grad_norm/b": 2.0})  # another optimizer's record of the same step
    assert len(flow) == 1 and flow.matrix().norm[:, 0].tolist() == [1.0, 2.0]
    for step, value in [(1, 50.0), (2, 1.0), (3, float("nan")), (4, 1.0)]:
        flow.add(step, {"grad_norm/a": value})
    m = flow.matrix()
    assert m.steps.tolist() == [1, 3, 4]
    assert m.norm[0].tolist() == [50.0, np.inf, 1.0]


def test_history_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"`max_columns` must be >= 2. Received: max_columns=1"):
        FlowHistory(max_columns=1)


# --- figures -----------------------------------------------------------------------------------


def test_heatmap_of_fifty_groups_labels_every_other_row_and_shows_the_anomalies():
    pytest.importorskip("matplotlib")
    from gradwatch.pictures import heatmap

    figure = heatmap(history().matrix())
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == GROUPS[::2]
    shown = axes.images[0]
    values, (lo, hi) = shown.get_array(), shown.get_clim()
    assert (values[0, :15] < lo).all()  # zero: drawn in the "under" colour
    assert values[DEAD.start, 10] < values[DEAD.stop, 10] - 5  # dead layers: 5+ decades darker
    spike = values[:, SPIKE].mean()
    assert spike > np.ma.median(values) + 3 and hi >= values[:, SPIKE].max()
    red = axes.images[1].get_array()
    assert not np.ma.is_masked(red[NAN[1], NAN[0]]) and red.count() == 1  # one NaN cell


def ratio_and_norm(groups=("conv", "bn", "conv2", "bn2"), ratio=True) -> FlowMatrix:
    """Equal gradient/parameter ratios, raw norms 100x apart (a conv and a BatchNorm)."""
    norm = np.array([[1.0, 1.0], [0.01, 0.01], [1.0, 1.0], [0.01, 0.01]])
    ratios = np.full((4, 2), 1e-3) if ratio else np.full((4, 2), np.nan)
    return FlowMatrix(groups, np.array([0, 1]), norm, ratios)


def test_both_pictures_draw_the_size_free_ratio_and_say_so():
    pytest.importorskip("matplotlib")
    from gradwatch.pictures import depth_profile, heatmap

    figure = heatmap(ratio_and_norm())
    values = figure.axes[0].images[0].get_array()
    assert np.ptp(values) == 0  # the BatchNorms are no stripes: like is compared with like
    assert figure.texts[0].get_text() == "gradient norm / parameter norm per group"
    assert figure.axes[1].get_xlabel() == "log10 ‖grad‖ / ‖param‖"  # the colour bar
    profile = depth_profile(ratio_and_norm())
    (line,) = profile.axes[0].lines
    assert set(line.get_xdata()) == {1e-3}
    assert profile.texts[0].get_text() == "gradient norm / parameter norm per group"
    assert profile.axes[0].get_xlabel() == "‖grad‖ / ‖param‖ (log scale)"
    # Records without the ratio: the raw norm, named as such.
    figure = heatmap(ratio_and_norm(ratio=False))
    assert figure.texts[0].get_text() == "gradient norm (not size-free) per group"
    assert np.ptp(figure.axes[0].images[0].get_array()) == 2


def test_heatmap_bins_long_histories_without_losing_a_spike():
    from gradwatch.pictures.heatmap import bin_columns

    values = np.ones((2, 1000))
    values[1, 777] = 1e6
    steps, binned = bin_columns(np.arange(1000) * 10, values, max_columns=100)
    assert binned.shape == (2, 100) and binned[1].max() == 1e6 and steps[-1] == 9990


def test_depth_profile_draws_the_chosen_steps_and_marks_zero_and_nan():
    pytest.importorskip("matplotlib")
    from gradwatch.pictures import depth_profile

    figure = depth_profile(history().matrix(), steps=[0, SPIKE, NAN[0]])
    (axes,) = figure.axes
    assert [line.get_label() for line in axes.lines] == ["step 0", f"step {SPIKE}", "step 75"]
    assert axes.get_xscale() == "log"
    assert axes.get_ylim()[0] > axes.get_ylim()[1]  # first group on top
    labels = {t.get_text() for t in figure.legends[0].get_texts()}
    assert {"zero", "NaN / Inf"} <= labels


def tensorboard_pixels(figure, size: float) -> float:
    """Pixels a font of ``size`` points takes in TensorBoard's Images tab (350 px wide)."""
    return size / 72 * figure.dpi * 350 / (figure.get_size_inches()[0] * figure.dpi)


@pytest.mark.parametrize("groups", [3, 50, 500])
def test_pictures_are_legible_in_tensorboards_images_tab(groups):
    """TensorBoard shows an image 350 px wide (up to 1024 px tall without scrolling) until
    "Show actual image size" is ticked: text must be legible at that size."""
    pytest.importorskip("matplotlib")
    from gradwatch.pictures import depth_profile, heatmap

    names = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(groups))
    rng = np.random.default_rng(0)
    values = 10 ** rng.normal(-3, 1, (groups, 300))
    flow = FlowMatrix(names, np.arange(300) * 10, values, values)
    for figure in (heatmap(flow), depth_profile(flow)):
        width, height = figure.get_size_inches() * figure.dpi
        assert width == 700 and height * 350 / width <= 1024  # drawn at twice the size shown
        axes = figure.axes[0]
        labels = [t.get_text() for t in axes.get_yticklabels()]
        assert labels[0] == "0.mlp.down_proj"  # without the prefix all groups share
        assert 3 <= len(labels) <= 31
        rows = axes.get_position().height * height * 350 / width / groups
        assert rows * (groups // max(len(labels) - 1, 1)) >= 12  # pixels between labels
        texts = [*axes.get_yticklabels(), *axes.get_xticklabels(), *figure.texts]
        assert min(tensorboard_pixels(figure, t.get_fontsize()) for t in texts) >= 11


def test_pictures_are_pngs_at_twice_the_size_tensorboard_shows():
    pytest.importorskip("matplotlib")
    pictures = FlowPictures()
    rng = np.random.default_rng(1)
    for step in range(10):
        pictures(Record(step, scalars=synthetic_scalars(step, rng)))
    images = pictures.draw()
    assert set(images) == {tags.HEATMAP, tags.DEPTH_PROFILE}
    for image in images.values():
        assert image.width == 700 and 900 <= image.height <= 2048  # 50 rows


def test_a_run_measuring_the_signal_also_gets_the_backward_signal_heatmap():
    pictures = FlowPictures()
    rng = np.random.default_rng(1)
    for step in range(10):
        scalars = synthetic_scalars(step, rng)
        backward = np.logspace(-12, -2, len(GROUPS))  # vanishing toward the input
        for group, value in zip(GROUPS, backward, strict=True):
            scalars[tags.group_tag(tags.ACT_GRAD_RMS, group)] = float(value)
        pictures(Record(step, scalars=scalars))
    images = pictures.draw()
    assert set(images) == {
        tags.HEATMAP,
        tags.DEPTH_PROFILE,
        tags.SIGNAL_HEATMAP,
        tags.SIGNAL_PROFILE,
    }
    flow = pictures.history.matrix()
    assert flow.backward is not None and flow.backward[0, 0] == pytest.approx(1e-12)
    assert history().matrix().backward is None  # no signal measured: no third picture


# --- FlowPictures in a monitor -----------------------------------------------------------------


def test_images_only_at_histogram_records_and_the_layout_once():
    pytest.importorskip("matplotlib")
    sink = MemorySink()
    monitor = Fanout([sink], pictures=FlowPictures(background=False, layout=LAYOUT))
    rng = np.random.default_rng(2)
    first = Record(
        0, scalars=synthetic_scalars(0, rng), histograms={"grad_hist/embed": histogram()}
    )
    monitor.write(first)
    monitor.write(Record(1, scalars=synthetic_scalars(1, rng)))
    monitor.write(Record(2, histograms={"grad_hist/embed": histogram()}))  # between logging steps
    assert [bool(r.images) for r in sink.records] == [True, False, True]
    assert [r.layout for r in sink.records] == [LAYOUT, None, None]
    assert not first.images and first.layout is None  # the adapter's record is not changed


def test_a_layout_function_is_called_once_at_the_first_record_holding_scalars():
    calls = []
    pictures = FlowPictures(images=False, layout=lambda: calls.append(1) or LAYOUT)
    assert calls == []  # an adapter may learn its groups only at the first step
    pictures(Record(0, histograms={"grad_hist/embed": histogram()}))
    assert calls == []
    records = [pictures(Record(step, scalars={"loss": 1.0})) for step in (1, 2)]
    assert calls == [1] and [r.layout for r in records] == [LAYOUT, None]


class ThreadSink(MemorySink):
    """A memory sink that remembers which thread wrote each record."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def write(self, record: Record) -> None:
        self.threads.append(threading.get_ident())
        super().write(record)


def write_run(monitor: Fanout, steps=range(12), every=4) -> None:
    rng = np.random.default_rng(4)
    for step in steps:
        hist = {"grad_hist/embed": histogram()} if (step + 1) % every == 0 else {}
        monitor.write(Record(step, scalars=synthetic_scalars(step, rng), histograms=hist))


def test_background_pictures_are_written_by_the_caller_at_their_steps_and_all_by_close():
    pytest.importorskip("matplotlib")
    sink, pictures = ThreadSink(), FlowPictures()
    monitor = Fanout([sink], pictures=pictures)
    write_run(monitor)
    monitor.close()
    assert pictures.pending == 0 and sink._closed
    drawn = [r for r in sink.records if r.images]
    assert [r.step for r in drawn] == [3, 7, 11]  # the histogram steps, in order
    assert all(set(r.images) == {tags.HEATMAP, tags.DEPTH_PROFILE} for r in drawn)
    assert all(not r.scalars and not r.histograms for r in drawn)  # records of their own
    assert set(sink.threads) == {threading.get_ident()}  # never written by the worker

    synchronous = MemorySink()
    write_run(Fanout([synchronous], pictures=FlowPictures(background=False)))
    same = {r.step: r.images for r in synchronous.records if r.images}
    assert {r.step: r.images for r in drawn} == same  # the same PNG bytes


def gated_draw(monkeypatch) -> threading.Event:
    """Make the worker wait for the returned event before drawing."""
    import gradwatch.pictures

    gate, real = threading.Event(), gradwatch.pictures.drawing._draw

    def draw(flow, steps=None):
        gate.wait()
        return real(flow, steps)

    monkeypatch.setattr(gradwatch.pictures.drawing, "_draw", draw)
    return gate


def test_finished_pictures_are_written_at_the_next_write(monkeypatch):
    pytest.importorskip("matplotlib")
    gate = gated_draw(monkeypatch)
    sink, pictures = MemorySink(), FlowPictures()
    monitor = Fanout([sink], pictures=pictures)
    write_run(monitor, steps=range(4))
    assert pictures.pending == 1 and not any(r.images for r in sink.records)
    gate.set()
    concurrent.futures.wait([future for _, future in pictures._pending])
    write_run(monitor, steps=[4])
    assert pictures.pending == 0 and [r.step for r in sink.records if r.images] == [3]
    monitor.close()


def test_closing_never_waits_past_the_timeout_and_failures_only_warn(monkeypatch):
    pytest.importorskip("matplotlib")
    import gradwatch.pictures

    release = gated_draw(monkeypatch)
    pictures = FlowPictures()
    monitor = Fanout([MemorySink()], pictures=pictures)
    write_run(monitor, steps=range(4))
    with pytest.warns(UserWarning, match=r"dropped the gradient-flow pictures of step 3"):
        assert pictures.finish(timeout=0.01) == []
    release.set()

    def broken(flow, steps=None):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(gradwatch.pictures.drawing, "_draw", broken)
    sink = MemorySink()
    monitor = Fanout([sink], pictures=FlowPictures())
    # Reported at the write after the failure, or at close: whichever sees it first.
    with pytest.warns(UserWarning, match=r"could not draw .* step 3: RuntimeError\('no fonts'\)"):
        write_run(monitor, steps=range(4))
        monitor.close()
    assert sink._closed and not any(r.images for r in sink.records)


def test_the_worker_never_runs_more_than_two_pictures_behind(monkeypatch):
    pytest.importorskip("matplotlib")
    release = gated_draw(monkeypatch)
    pictures = FlowPictures()
    rng = np.random.default_rng(5)
    for step in range(2):
        pictures(Record(step, scalars=synthetic_scalars(step, rng), histograms={"h": histogram()}))
    assert pictures.pending == 2
    threading.Timer(0.05, release.set).start()  # the third waits for the first to finish
    pictures(Record(2, scalars=synthetic_scalars(2, rng), histograms={"h": histogram()}))
    assert pictures.pending == 3 and pictures._pending[0][1].done()
    assert [r.step for r in pictures.finish()] == [0, 1, 2]


def test_without_matplotlib_images_are_off_with_a_warning(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    with pytest.warns(UserWarning, match=r"pip install 'gradwatch\[report\]'"):
        pictures = FlowPictures(images=True, layout=LAYOUT)
    record = pictures(Record(0, scalars={"grad_norm/a": 1.0}, histograms={"h": histogram()}))
    assert not record.images and record.layout is not None


def test_no_sinks_no_pictures():
    calls = []
    Fanout([], pictures=lambda r: calls.append(r) or r).write(Record(0, scalars={"a": 1.0}))
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": "yes"}, r"`images` must be True or False"),
        ({"layout": {}}, r"`layout` must be a Layout, a function returning one, or None"),
        ({"background": 1}, r"`background` must be True or False. Received: background=1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(TypeError, match=message):
        FlowPictures(**kwargs)


def test_chart_patterns_must_be_regular_expressions():
    with pytest.raises(ValueError, match=r"regular expressions. Received: '\('"):
        Chart("bad", ("(",))


# --- the TensorBoard sink ----------------------------------------------------------------------


def test_images_and_layout_read_back_by_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    pictures = FlowPictures(background=False, layout=LAYOUT)
    rng = np.random.default_rng(3)
    with TensorBoardSink(tmp_path) as sink:
        for step in range(3):
            hist = {"grad_hist/embed": histogram()} if step == 2 else {}
            sink.write(
                pictures(Record(step, scalars=synthetic_scalars(step, rng), histograms=hist))
            )
    accumulator = event_accumulator.EventAccumulator(str(sink.path), size_guidance={"images": 0})
    accumulator.Reload()
    (heatmap,) = accumulator.Images(tags.HEATMAP)
    assert heatmap.step == 2 and heatmap.width == 700
    assert heatmap.encoded_image_string.startswith(b"\x89PNG")
    (config,) = accumulator.Tensors(tags.LAYOUT)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == [c.title for c in LAYOUT.categories]
    assert [c.closed for c in layout.category] == [c.closed for c in LAYOUT.categories]
    assert list(layout.category[1].chart[0].multiline.tag) == list(
        LAYOUT.categories[1].charts[0].tags
    )


def test_bad_images_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"PNG-encoded bytes. Received: b'GIF89a"):
        Image.from_png(b"GIF89a" + bytes(30))
    sink = TensorBoardSink(tmp_path)
    with pytest.raises(TypeError, match=r"Images must be gradwatch.record.Image"):
        sink.write(Record(0, images={"x": b"\x89PNG"}))
    assert sink.path is None and not list(tmp_path.iterdir())
