"""The Keras callback under real ``model.fit`` runs on CPU (TensorFlow backend)."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import functools
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _arguments import NUMPY
from gradwatch.cadence import Cadence
from gradwatch.integrations.keras import GradWatch
from gradwatch.policies import AGC, AutoClip, ClipByNorm, ClipByValue, ZClip
from gradwatch.reporting import GradWatchWarning
from gradwatch.sinks import MemorySink

SCRIPTS = Path(__file__).parent / "scripts"
MODES = {
    "auto": {},
    "jit": {"jit_compile": True},
    "no_jit": {"jit_compile": False},
    "eager": {"run_eagerly": True},
    "steps_per_execution": {"steps_per_execution": 4},
}


def regression_data(n: int = 256, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (2 * x[:, :1] + 0.1 * rng.normal(size=(n, 1))).astype("float32")


def mlp(
    seed: int = 0, width: int = 32, activation: str = "tanh", built: bool = True
) -> keras.Model:
    """A Sequential; ``built=False`` leaves out ``keras.Input``: Keras builds it at the first
    batch, inside the traced train step."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            *([keras.Input((8,))] if built else []),
            keras.layers.Dense(width, activation=activation, name="hidden"),
            keras.layers.Dense(width, activation=activation, name="middle"),
            keras.layers.Dense(1, name="head"),
        ],
        name="net",
    )


def quiet_fit(model: keras.Model, x, y, callbacks, **kwargs) -> keras.callbacks.History:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        return model.fit(x, y, verbose=0, shuffle=False, callbacks=callbacks, **kwargs)


def tape_norms(model: keras.Model, x, y) -> dict[str, float]:
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(y, model(x)))
    grads = tape.gradient(loss, model.trainable_variables)
    norms = {
        v.path: float(tf.norm(g)) for v, g in zip(model.trainable_variables, grads, strict=True)
    }
    norms["global"] = float(tf.linalg.global_norm(grads))
    return norms


def layer_norm(norms: dict[str, float], layer: str) -> float:
    return math.hypot(norms[f"{layer}/kernel"], norms[f"{layer}/bias"])


# -- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_logged_norms_equal_gradient_tape_norms(mode):
    x, y = regression_data(32)
    model = mlp(width=128)  # the 128x128 kernel takes the large-tensor norm, the rest not
    model.compile(keras.optimizers.SGD(0.0), "mse", **MODES[mode])
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=4, sinks=[sink], statistics="all")
    quiet_fit(model, x, y, [watch], batch_size=32, epochs=12)

    expected = tape_norms(model, x, y)
    assert [r.step for r in sink.records] == [0, 3, 7, 11]  # the steps Lightning logs too
    for record in sink.records:
        scalars = record.scalars
        assert scalars["global/grad_norm"] == pytest.approx(expected["global"], rel=1e-5)
        for layer in ("net/hidden", "net/middle", "net/head"):
            norm = layer_norm(expected, layer)
            assert scalars[f"grad_norm/{layer}"] == pytest.approx(norm, rel=1e-5)
            owner = model.get_layer(layer.rpartition("/")[2])
            param = math.hypot(np.linalg.norm(owner.kernel), np.linalg.norm(owner.bias))
            assert scalars[f"param_norm/{layer}"] == pytest.approx(param, rel=1e-5)
        assert scalars["grad_nonfinite/net/head"] == 0.0
    assert "apply" not in vars(model.optimizer)  # the user's optimizer is its own again


class Regressor(keras.Model):
    """A subclassed model: its layers are built at the first batch."""

    def __init__(self) -> None:
        super().__init__(name="regressor")
        self.hidden = keras.layers.Dense(32, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, x):
        return self.head(self.hidden(x))


class OwnStep(Regressor):
    """A custom ``train_step``, as the Keras guides write it."""

    def __init__(self, call: str) -> None:
        super().__init__()
        self.call_name = call

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        if self.call_name == "apply":
            self.optimizer.apply(grads, self.trainable_variables)
        else:
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


LATE = {
    "sequential": lambda: mlp(built=False),
    "subclassed": Regressor,
    "train_step_apply": lambda: OwnStep("apply"),
    "train_step_apply_gradients": lambda: OwnStep("apply_gradients"),
}


@pytest.mark.parametrize(
    ("form", "mode"),
    [(form, "auto") for form in LATE] + [("sequential", mode) for mode in MODES if mode != "auto"],
)
def test_models_built_at_their_first_batch_are_measured(form, mode):
    x, y = regression_data(32)
    keras.utils.set_random_seed(0)
    model = LATE[form]()
    assert not model.trainable_variables  # no variables until the first batch
    model.compile(keras.optimizers.SGD(0.0), "mse", **MODES[mode])
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=2, sinks=[sink])
    quiet_fit(model, x, y, [watch], batch_size=32, epochs=3)

    expected = tape_norms(model, x, y)
    assert [r.step for r in sink.records] == [0, 1, 2]  # logging steps 0 and 1, the last
    for record in sink.records:
        groups = {tag.partition("/")[2] for tag in record.scalars if tag.startswith("grad_norm/")}
        assert groups == {layer.path for layer in model.layers}
        assert record.scalars["global/grad_norm"] == pytest.approx(expected["global"], rel=1e-5)
        for layer in groups:
            norm = layer_norm(expected, layer)
            assert record.scalars[f"grad_norm/{layer}"] == pytest.approx(norm, rel=1e-5)
    assert "apply" not in vars(model.optimizer)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_the_layout_names_the_layers_of_a_model_built_at_its_first_batch(clip):
    x, y = regression_data(32)
    model = mlp(built=False)  # its groups are known only inside the first train step
    model.compile(keras.optimizers.SGD(0.0), "mse")
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=1, clip=clip, sinks=[sink])
    quiet_fit(model, x, y, [watch], batch_size=32, epochs=2)

    layout = sink.records[0].layout
    assert layout is not None and all(r.layout is None for r in sink.records[1:])
    charts = {c.title: c.tags for category in layout.categories for c in category.charts}
    tags = charts["grad_norm: groups 1-3 of 3 (net/hidden … net/head)"]
    layers = ["net/hidden", "net/middle", "net/head"]
    assert [next(g for g in layers if re.match(p, f"grad_norm/{g}")) for p in tags] == layers
    assert ("clip coefficient (1: not clipped)" in charts) == (clip is not None)


def test_event_files_are_in_the_train_folder_beside_keras_tensorboard(tmp_path):
    x, y = regression_data(64)
    model = mlp()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"), update_freq=1)
    watch = GradWatch(log_every_n_steps=2, histogram_every_n_steps=4, clip=1.0)
    quiet_fit(model, x, y, [board, watch], batch_size=16, epochs=2)

    events = EventAccumulator(str(tmp_path / "tb" / "train"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "global/grad_norm" in tags["scalars"]
    assert "clip/threshold" in tags["scalars"] and "clip/coefficient" in tags["scalars"]
    assert "grad_hist/net/hidden" in tags["histograms"]
    assert "batch_loss" in tags["tensors"] or "batch_loss" in tags["scalars"]  # Keras' own
    steps = [e.step for e in events.Scalars("global/grad_norm")]
    assert steps == [0, 1, 3, 5, 7]
    histogram = events.Histograms("grad_hist/net/hidden")[0].histogram_value
    assert histogram.num == 8 * 32 + 32  # the hidden layer's kernel and bias


@pytest.mark.parametrize("mode", ["auto", "eager"])
def test_update_ratio_is_the_sgd_step_over_the_parameter_norm(mode):
    x, y = regression_data(32)
    model = mlp()
    model.compile(keras.optimizers.SGD(0.1), "mse", **MODES[mode])
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=1, statistics="all", sinks=[sink])
    quiet_fit(model, x, y, [watch], batch_size=32, epochs=3)
    for record in sink.records:
        s = record.scalars
        for layer in ("net/hidden", "net/head"):
            expected = 0.1 * s[f"grad_norm/{layer}"] / s[f"param_norm/{layer}"]
            assert s[f"update_to_param/{layer}"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    "shape", [(3,), (5000,), (784, 512), (4097,), (3, 3, 16, 32), (640, 1), (2, 0)]
)
def test_the_capture_norm_of_any_shape_is_the_l2_norm(shape):
    from gradwatch.integrations._keras_capture import _norm

    values = np.random.default_rng(0).normal(size=shape).astype("float32") * 1e3
    expected = np.linalg.norm(values.astype("float64"))
    for compile_ in (tf.function(_norm, jit_compile=True), _norm):
        assert float(compile_(tf.constant(values))) == pytest.approx(expected, rel=1e-6)
    if values.size:
        for bad in (np.inf, np.nan):
            values.flat[-1] = bad
            result = float(_norm(tf.constant(values)))
            assert result == np.inf if bad == np.inf else np.isnan(result)


def test_group_by_variable_and_callable():
    x, y = regression_data(32)
    for group_by, expected in [
        ("variable", "grad_norm/net/head/bias"),
        (lambda path: path.split("/")[1], "grad_norm/head"),
    ]:
        model = mlp()
        model.compile(keras.optimizers.SGD(0.0), "mse")
        sink = MemorySink()
        watch = GradWatch(log_dir=False, log_every_n_steps=1, group_by=group_by, sinks=[sink])
        quiet_fit(model, x, y, [watch], batch_size=32, epochs=1)
        assert expected in sink.records[0].scalars


def test_a_spike_inside_an_execution_is_kept():
    x, y = regression_data(64)
    y[16:32] *= 1000.0  # the second batch of each epoch has huge gradients
    model = mlp()
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=4)
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=4, sinks=[sink], on_explosion="ignore")
    quiet_fit(model, x, y, [watch], batch_size=16, epochs=2)
    last = sink.records[-1].scalars  # logs step 7; the spike was at step 5
    assert last["global/max_since_last_log"] > 100 * last["global/grad_norm"]


@pytest.mark.parametrize("built", [True, False])
def test_mixed_float16_statistics_are_on_unscaled_gradients(built):
    x, y = regression_data(32)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp(built=built)
        model.compile(keras.optimizers.SGD(0.0), "mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        sink = MemorySink()
        watch = GradWatch(log_dir=False, log_every_n_steps=1, sinks=[sink])
        quiet_fit(model, x, y, [watch], batch_size=32, epochs=2)
        expected = tape_norms(model, x, y)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    logged = sink.records[-1].scalars["global/grad_norm"]
    assert logged == pytest.approx(expected["global"], rel=2e-2)  # float16 arithmetic
    assert float(model.optimizer.dynamic_scale.numpy()) > 1000  # the loss really was scaled


@pytest.mark.parametrize("mode", ["jit", "steps_per_execution"])
def test_the_loss_scalers_own_skipped_steps_are_counted_never_reported(mode):
    """A loss scale far above float16's range: the LossScaleOptimizer drops the first steps
    itself (and probes again as it grows); with "stop" configured, training goes on."""
    x, y = regression_data(32 * 24)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp()
        inner = keras.optimizers.SGD(1e-2)
        scaled = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**24)
        model.compile(scaled, "mse", **MODES[mode])
        sink = MemorySink()
        watch = GradWatch(log_dir=False, log_every_n_steps=4, on_nonfinite="stop", sinks=[sink])
        quiet_fit(model, x, y, [watch], batch_size=32, epochs=1)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    applied = int(inner.iterations.numpy())
    assert watch.events == [] and watch.stopped_at is None and not model.stop_training
    assert 0 < applied < 24  # the scaler dropped 24 - applied steps
    (_, counted), *_ = reversed(sink.scalars("amp/skipped_steps"))
    assert counted == 24 - applied
    assert all(v == 0 for _, v in sink.scalars("global/nonfinite_steps"))


# -- policies and actions --------------------------------------------------------------------

SPIKE = 30


class Spiking(keras.optimizers.schedules.LearningRateSchedule):
    """0.05, then 200 times that from step SPIKE: the run diverges unless rescued."""

    def __call__(self, step):
        return tf.where(step < SPIKE, 0.05, 10.0)

    def get_config(self):
        return {}


def spiking_run(watch: GradWatch | None, steps: int = 60) -> keras.Model:
    x, y = regression_data(32 * steps)
    model = mlp()
    model.compile(keras.optimizers.SGD(Spiking()), "mse")
    quiet_fit(model, x, y, [watch] if watch else [], batch_size=32, epochs=1)
    return model


def finite(model: keras.Model) -> bool:
    return all(np.isfinite(v.numpy()).all() for v in model.weights)


# Three steps per execution: the stop step (31) is not the last of its execution (30-32), so
# the step after it runs in the same graph call and must be dropped too. ("auto" runs in
# test_adapter_contract.py.)
@pytest.mark.parametrize(
    "compiled", [MODES["jit"], {"steps_per_execution": 3}], ids=["jit", "spe3"]
)
def test_explosion_stops_training_dropping_that_step_and_logs_it(tmp_path, compiled):
    checkpoint = tmp_path / "last.weights.h5"
    saves = keras.callbacks.ModelCheckpoint(str(checkpoint), save_weights_only=True, save_freq=1)
    watch = GradWatch(log_dir=str(tmp_path), log_every_n_steps=10, on_explosion="stop")
    x, y = regression_data(32 * 60)
    model = mlp()
    model.compile(keras.optimizers.SGD(Spiking()), "mse", **compiled)
    quiet_fit(model, x, y, [watch, saves], batch_size=32, epochs=1)
    (first,) = [e for e in watch.events if e["kind"] == "explosion" and e["group"] == "global"]
    assert first["step"] == SPIKE + 1 and first["action"] == "stop"
    assert watch.stopped_at == SPIKE + 1  # that step was dropped: the optimizer did not count it
    assert int(model.optimizer.iterations.numpy()) == SPIKE + 1
    assert finite(model)
    model.load_weights(str(checkpoint))  # the checkpoint written after the stopping batch
    assert finite(model)
    events = EventAccumulator(str(tmp_path / "train"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("gradwatch/events")
    assert any(b"explosion" in t.tensor_proto.string_val[0] for t in text)
    (stopped,) = events.Tensors("gradwatch/stopped")
    assert stopped.step == SPIKE + 1
    assert stopped.tensor_proto.string_val[0].startswith(b"stopped at step 31: explosion")
    logged = {e.step: e.value for e in events.Scalars("global/grad_norm")}
    assert logged[SPIKE + 1] == pytest.approx(first["value"], rel=1e-5)  # the stop step's norm


@functools.cache
def unguarded_run_diverges() -> bool:
    return not finite(spiking_run(None))


@pytest.mark.parametrize("policy", [AutoClip(), ZClip(), ClipByValue(0.05), AGC(0.01)])
def test_clipping_keeps_the_spiking_run_finite(policy):
    assert unguarded_run_diverges()  # once for every policy
    sink = MemorySink()
    watch = GradWatch(log_dir=False, log_every_n_steps=5, clip=policy, sinks=[sink])
    assert finite(spiking_run(watch))
    clipped = [r.scalars["global/clipped_norm"] for r in sink.records]
    before = [r.scalars["global/grad_norm"] for r in sink.records]
    assert any(c < 0.99 * b for c, b in zip(clipped, before, strict=True))  # it did clip


class Snapshots(keras.callbacks.Callback):
    """Every weight and optimizer variable at the end of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):
        variables = [*self.model.weights, *self.model.optimizer.variables]
        self.taken.append([np.array(v.numpy(), copy=True) for v in variables])


# "auto" with a built model runs in test_adapter_contract.py.
@pytest.mark.parametrize(("mode", "built"), [("jit", True), ("eager", True), ("jit", False)])
def test_a_nonfinite_step_is_skipped_bit_for_bit(mode, built):
    x, y = regression_data(32 * 8)
    x[32 * 5] = np.nan  # batch 5 has non-finite gradients
    model = mlp(built=built)
    model.compile(keras.optimizers.AdamW(1e-2, weight_decay=0.1), "mse", **MODES[mode])
    snapshots = Snapshots()
    watch = GradWatch(log_dir=False, log_every_n_steps=2, on_nonfinite="skip")
    quiet_fit(model, x, y, [watch, snapshots], batch_size=32, epochs=1)

    before, skipped, after = snapshots.taken[4:7]
    assert all(np.array_equal(a, b) for a, b in zip(before, skipped, strict=True))  # iterations too
    assert not all(
        np.array_equal(a, b) for a, b in zip(skipped, after, strict=True)
    )  # training goes on
    assert finite(model)
    assert [(e["kind"], e["step"], e["action"]) for e in watch.events][:1] == [
        ("nonfinite", 5, "skip")
    ]


class CountingReads(GradWatch):
    reads = 0

    def _collect(self, stop: bool = False) -> None:
        self.reads += 1
        super()._collect(stop)


@pytest.mark.parametrize("mode", ["jit", "steps_per_execution"])
def test_the_host_reads_only_near_logging_steps_and_misses_none_after_skips(mode):
    x, y = regression_data(32 * 24)
    x[32 * 2] = x[32 * 9] = np.nan  # two skipped steps: `iterations` lags the batches by two
    model = mlp()
    model.compile(keras.optimizers.SGD(1e-2), "mse", **MODES[mode])
    sink = MemorySink()
    watch = CountingReads(log_dir=False, log_every_n_steps=4, on_nonfinite="skip", sinks=[sink])
    quiet_fit(model, x, y, [watch], batch_size=32, epochs=1)

    assert int(model.optimizer.iterations.numpy()) == 22
    assert [r.step for r in sink.records] == [0, 3, 7, 11, 15, 19, 21]  # and the last step
    if mode == "jit":  # 24 batches; executions of 4 steps hold a logging step each
        # each skip may cost one read of a batch with nothing new; one more read at the end
        assert watch.reads <= 6 + 2 + 1
    found = [(e["kind"], e["step"]) for e in watch.events if e["group"] == "global"]
    assert found == [("nonfinite", 2), ("nonfinite", 8)]


def test_vanishing_is_reported_for_a_deep_sigmoid_net_not_for_relu_residual():
    def deep(residual: bool) -> keras.Model:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16,))
        h = inputs
        for i in range(20):
            out = keras.layers.Dense(
                16, activation="relu" if residual else "sigmoid", name=f"layer{i:02d}"
            )(h)
            h = keras.layers.Add()([h, out]) if residual else out
        return keras.Model(inputs, keras.layers.Dense(1, name="head")(h))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype("float32")
    y = x[:, :1].copy()
    reported = {}
    for residual in (False, True):
        model = deep(residual)
        model.compile(keras.optimizers.SGD(1e-3), "mse")
        watch = GradWatch(log_dir=False, log_every_n_steps=10)
        quiet_fit(model, x, y, [watch], batch_size=16, epochs=2)
        reported[residual] = {e["group"] for e in watch.events if e["kind"] == "vanishing"}
    assert "layer00" in reported[False]  # the first layers learn far slower than the head
    assert reported[True] == set()


def test_keras_own_clipping_alongside_gradwatch_warns():
    x, y = regression_data(32)
    model = mlp()
    model.compile(keras.optimizers.SGD(0.01, global_clipnorm=1.0), "mse")
    with pytest.warns(GradWatchWarning, match="global_clipnorm"):
        model.fit(x, y, verbose=0, callbacks=[GradWatch(log_dir=False, clip=1.0)])


def test_the_optimizer_works_without_gradwatch_after_fit(tmp_path):
    x, y = regression_data(64)
    model = mlp()
    model.compile(keras.optimizers.SGD(0.01), "mse")
    watch = GradWatch(log_dir=False, on_nonfinite="skip", clip=AutoClip())
    quiet_fit(model, x, y, [watch], batch_size=16, epochs=1)
    before = int(model.optimizer.iterations.numpy())
    quiet_fit(model, x, y, [], batch_size=16, epochs=1)
    assert int(model.optimizer.iterations.numpy()) == before + 4
    model.save(tmp_path / "model.keras")
    restored = keras.models.load_model(tmp_path / "model.keras")
    assert np.array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


class FailsAtBatch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            raise KeyboardInterrupt  # the user stops the run; Keras skips on_train_end


def test_a_fit_that_raises_leaves_the_next_fit_without_gradwatch_clean(tmp_path):
    x, y = regression_data(64)
    model = mlp()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = GradWatch(log_dir=tmp_path, clip=ClipByValue(1e-9))  # would all but stop learning
    with pytest.raises(KeyboardInterrupt):
        quiet_fit(model, x, y, [watch, FailsAtBatch()], batch_size=16, epochs=1)
    assert "apply" in vars(model.optimizer)  # nothing could undo it yet

    before = [w.numpy().copy() for w in model.trainable_weights]
    quiet_fit(model, x, y, [], batch_size=16, epochs=1)
    assert "apply" not in vars(model.optimizer) and "make_train_function" not in vars(model)
    weights = zip(model.trainable_weights, before, strict=True)
    moved = max(np.abs(w.numpy() - b).max() for w, b in weights)
    assert moved > 1e-4  # the user's own step, not gradwatch's clipped one
    assert watch.reporter.closed

    quiet_fit(model, x, y, [watch], batch_size=16, epochs=1)  # and gradwatch works again
    assert "apply" not in vars(model.optimizer)


def test_numpy_numbers_are_accepted_as_python_numbers():
    watch = GradWatch(**NUMPY)
    options = watch.options
    assert options.cadence() == Cadence(5, 10) and type(options.log_every_n_steps) is int
    assert options.histogram_bins == 7 and type(options.histogram_bins) is int
    assert options.track_update_ratio is True and options.guard.policy == ClipByNorm(0.5)


# -- distribution and backends (fresh processes: devices and backends are fixed per process) --


def run_script(name: str, *args: str, env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mirrored_strategy_statistics_and_clipping_are_those_of_the_aggregated_gradient():
    found = run_script("keras_mirrored.py")
    single, mirrored = found["single"], found["mirrored"]
    for tag, value in single.items():
        assert mirrored[tag] == pytest.approx(value, rel=1e-5), tag
        # without keras.Input, built by Keras' `fit` under the strategy before training
        assert found["late_mirrored"][tag] == pytest.approx(value, rel=1e-5), tag
    # the same under mixed_float16, where the capture sits in a LossScaleOptimizer
    single, mirrored = found["mixed_single"], found["mixed_mirrored"]
    assert single.keys() == mirrored.keys() and "grad_norm/net/hidden" in single
    for tag, value in single.items():
        assert mirrored[tag] == pytest.approx(value, rel=1e-3), tag  # float16 forward passes
    assert found["gradwatch_update_norm"] == pytest.approx(1.0, rel=1e-5)
    assert found["keras_update_norm"] > 1.05  # Keras' own clips each replica's half
    assert found["skip_identical"]


def test_other_backends_get_a_clear_error():
    pytest.importorskip("torch")  # the one other backend installed with gradwatch[all]
    found = run_script("keras_backend.py", env={"KERAS_BACKEND": "torch"})
    assert "TensorFlow backend" in found["error"] and "torch" in found["error"]


def test_the_quickstart_example_runs_as_a_user_runs_it(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "keras_quickstart.py"
    command = [sys.executable, str(example), "--log-dir", str(tmp_path), "--epochs", "1"]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    events = EventAccumulator(str(tmp_path / "train"))
    events.Reload()
    assert [e.step for e in events.Scalars("grad_norm/regressor/head")] == [0, 9, 19, 29, 31]
    assert "grad_hist/regressor/hidden1" in events.Tags()["histograms"]
    assert "clip/threshold" in events.Tags()["scalars"]
