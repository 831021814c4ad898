"""The contract every adapter keeps: one suite run against Lightning, a plain loop and Keras.

Each test trains the same tiny network for real through ``tests/_adapters.py`` (a real
``lightning.Trainer``, a real PyTorch loop, a real Keras ``fit``) and checks what a user sees:
the event files read back by TensorBoard's reader, ``events``, ``stopped_at``, the weights and
the optimizer state. Public API only: the engines behind the adapters are free to change.

Where one adapter lacks what the others have, its case is ``xfail(strict=True)`` with the
reason: the day it is added, the suite says so.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import _adapters
from _adapters import change, equal, finite
from _arguments import COMMON, SINKS
from gradwatch.detectors import Explosion
from gradwatch.policies import AutoClip


@pytest.fixture(params=_adapters.NAMES)
def adapter(request: pytest.FixtureRequest) -> _adapters.Driver:
    return _adapters.driver(request.param)


def lacks(request: pytest.FixtureRequest, adapter: _adapters.Driver, names: set, reason: str):
    """Mark this case an expected failure (strict) for the adapters in ``names``."""
    if adapter.name in names:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def families(tags: list[str], groups: tuple[str, ...]) -> set[str]:
    """Tags with the group names replaced by ``<group>``: the same set for every adapter."""
    pattern = re.compile("/(" + "|".join(map(re.escape, groups)) + ")$")
    return {pattern.sub("/<group>", t) for t in tags}


# -- what is written, and when ---------------------------------------------------------------


DEFAULT_SCALARS = {
    "global/grad_norm",
    "global/max_since_last_log",
    "global/nonfinite_steps",
    "grad_norm/<group>",
    "grad_to_param/<group>",
}


def test_the_default_tags_and_the_logging_and_histogram_cadence(adapter, tmp_path):
    # numpy numbers where Python numbers are expected act as the numbers they hold
    run = adapter.train(
        tmp_path / "logs",
        8,
        log_every_n_steps=np.int64(3),
        histogram_every_n_steps=np.int32(4),
        histogram_bins=np.uint16(7),
    )
    events = run.events()
    tags = events.Tags()
    assert families(tags["scalars"], adapter.groups) == DEFAULT_SCALARS
    for group in adapter.groups:  # one group per layer, named as the framework names it
        assert f"grad_norm/{group}" in tags["scalars"]
    assert families(tags["histograms"], adapter.groups) == {"grad_hist/<group>"}
    assert set(tags["images"]) == {"grad_flow/depth_profile", "grad_flow/heatmap"}
    assert tags["tensors"] == ["custom_scalars__config__"]  # the custom-scalars layout
    for group in adapter.groups:
        # step 0, then every third step (k + 1 divisible by 3), and the run's last step
        norms = run.scalars(f"grad_norm/{group}")
        assert sorted(norms) == [0, 2, 5, 7]
        assert len(set(norms.values())) == 1  # learning rate 0: every step is the same
        histograms = events.Histograms(f"grad_hist/{group}")
        assert [e.step for e in histograms] == [0, 3, 7]
        assert all(len(e.histogram_value.bucket) == 7 for e in histograms)
    first = events.Histograms(f"grad_hist/{adapter.groups[0]}")[0].histogram_value
    assert first.num == _adapters.FEATURES * _adapters.WIDTH + _adapters.WIDTH  # kernel, bias
    total = run.scalars("global/grad_norm")
    assert sorted(total) == [0, 2, 5, 7]
    per_group = [run.scalars(f"grad_norm/{g}")[0] for g in adapter.groups]
    assert total[0] == pytest.approx(math.hypot(*per_group), rel=1e-5)
    assert [e.step for e in events.Images("grad_flow/heatmap")] == [0, 3, 7]


# -- actions ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """``trained(adapter, name)``: the run ``RUNS[name]`` of that adapter, trained once per
    module and shared by the tests that read it (Keras fits are slow)."""
    cache: dict[tuple[str, str], _adapters.Run] = {}

    def get(adapter: _adapters.Driver, name: str) -> _adapters.Run:
        if (adapter.name, name) not in cache:
            directory = tmp_path_factory.mktemp(f"{adapter.name}-{name}")
            steps, options = RUNS[name]
            cache[adapter.name, name] = adapter.train(directory / "logs", steps, **options)
        return cache[adapter.name, name]

    return get


RUNS = {
    "skip": (
        8,
        dict(
            optimizer="adamw",  # weight decay moves the weights even without a gradient
            lr=1e-2,
            faults={5: float("nan")},
            log_every_n_steps=3,
            on_nonfinite="skip",
        ),
    ),
    "stop": (
        12,
        dict(
            lr=1e-2,
            faults={5: 1e6},
            log_every_n_steps=4,
            on_explosion="stop",
            explosion=Explosion(warmup_steps=3),
            statistics=["param_norm"],
        ),
    ),
}


def test_skip_leaves_weights_and_optimizer_state_bit_for_bit(adapter, trained):
    run = trained(adapter, "skip")
    assert run.batches == 8  # training went on
    assert equal(run.weights[5], run.weights[6])  # step 5 changed nothing
    assert len(run.optimizer[6]) > 0 and equal(run.optimizer[5], run.optimizer[6])
    assert not equal(run.weights[6], run.weights[7])  # the next step is taken
    assert finite(run.weights[-1]) and finite(run.optimizer[-1])
    found = [(e["kind"], e["group"], e["step"], e["action"]) for e in run.watch.events]
    assert ("nonfinite", "global", 5, "skip") in found  # what was done, on its cause
    for group in adapter.groups:  # where the NaN values were: reported
        assert ("nonfinite", group, 5, "warn") in found
    assert any("non-finite" in line for line in run.warnings)  # told as it happened
    assert run.stopped_at is None
    nonfinite = run.scalars("global/nonfinite_steps")  # counted since the last logging step
    assert nonfinite[5] == 1.0  # the skipped step is written at once
    assert sum(nonfinite.values()) == 1.0
    assert list(run.scalars("global/skipped_steps").values())[-1] == 1.0  # counted in all
    (text,) = run.events().Tensors("gradwatch/events")
    assert b"nonfinite" in text.tensor_proto.string_val[0]


def test_steps_count_batches_after_a_skip(adapter, request, trained):
    lacks(
        request,
        adapter,
        {"keras"},
        "Keras numbers steps by optimizer.iterations, which a skipped step does not advance:"
        " after one skip in 8 batches the last step written is 6, not 7",
    )
    run = trained(adapter, "skip")
    assert sorted(run.scalars("global/grad_norm")) == [0, 2, 5, 7]


def test_stop_ends_training_and_drops_the_stop_step(adapter, trained):
    run = trained(adapter, "stop")
    assert run.batches == 6  # steps 0 to 5, then training ended
    assert equal(run.weights[5], run.weights[6])  # the stop step was dropped
    assert equal(run.optimizer[5], run.optimizer[6])  # Keras' `iterations` did not count it
    (first,) = [e for e in run.watch.events if e["group"] == "global"]
    assert (first["kind"], first["step"], first["action"]) == ("explosion", 5, "stop")
    assert first["value"] > first["threshold"]
    events = run.events()
    (stopped,) = events.Tensors("gradwatch/stopped")
    assert stopped.step == 5
    assert stopped.tensor_proto.string_val[0].startswith(b"stopped at step 5: explosion")
    totals = run.scalars("global/grad_norm")
    assert sorted(totals) == [0, 3, 5]  # the stop step is written, with its norm
    assert totals[5] == pytest.approx(first["value"], rel=1e-5) and totals[5] > 1e4
    assert finite(run.weights[-1])


def test_chosen_statistics_and_no_histograms_by_default(adapter, trained):
    tags = trained(adapter, "stop").events().Tags()
    chosen = {"grad_norm/<group>", "param_norm/<group>"}  # grad_norm is always written
    dropped = {"global/skipped_steps"}  # the stop step was dropped
    default_globals = {t for t in DEFAULT_SCALARS if t.startswith("global/")}
    assert families(tags["scalars"], adapter.groups) == default_globals | dropped | chosen
    assert tags["histograms"] == [] and tags["images"] == []  # histograms are opt-in


def test_stopped_at_and_should_stop_say_a_stop_fired(adapter, trained):
    watch = trained(adapter, "stop").watch
    assert watch.stopped_at == 5 and watch.should_stop is True


def test_clip_bounds_the_applied_gradient_and_all_statistics_are_written(adapter, tmp_path):
    lr = 0.1
    run = adapter.train(
        tmp_path / "logs",
        3,
        lr=lr,
        scale=100.0,  # gradient norms far above 1
        log_every_n_steps=1,
        clip=np.float32(1.0),  # a numpy number: the float it holds
        statistics="all",
        track_update_ratio=np.bool_(True),  # a numpy bool: True
    )
    statistics = (
        "grad_norm",
        "grad_to_param",
        "grad_max_abs",
        "grad_nonfinite",
        "param_norm",
        "update_to_param",
    )
    assert families(run.events().Tags()["scalars"], adapter.groups) == {
        "global/grad_norm",
        "global/max_since_last_log",
        "global/nonfinite_steps",
        "global/clipped_norm",
        "clip/threshold",
        "clip/coefficient",
        *(f"{statistic}/<group>" for statistic in statistics),
    }
    before = run.scalars("global/grad_norm")
    after = run.scalars("global/clipped_norm")
    coefficient = run.scalars("clip/coefficient")
    assert sorted(before) == sorted(after) == sorted(coefficient) == [0, 1, 2]
    for step in before:
        assert before[step] > 10
        assert after[step] <= 1 + 1e-5
        assert coefficient[step] < 1
        assert coefficient[step] == pytest.approx(after[step] / before[step], rel=1e-4)
    assert set(run.scalars("clip/threshold").values()) == {1.0}
    for step in range(3):  # the optimizer applied the clipped gradient: SGD moves lr * g
        moved = change(run.weights[step], run.weights[step + 1])
        assert moved == pytest.approx(lr * after[step], rel=1e-4)


# -- state -----------------------------------------------------------------------------------


def test_state_round_trips_into_a_new_instance(adapter, tmp_path):
    """A run resumed at step 4 from the saved state goes on as the straight run: the same
    logging steps, the same AutoClip thresholds, the explosion detector past its warmup."""
    options = dict(
        lr=0.05,
        faults={4: 1e3},  # a spike at the first resumed step, past the detector's warmup
        log_every_n_steps=3,
        clip=AutoClip(percentile=50.0),
        explosion=Explosion(warmup_steps=3),
    )
    fresh = adapter.make()
    fresh.load_state_dict(fresh.state_dict())  # the API first: where it is missing, fail fast
    straight = adapter.train(tmp_path / "straight", 8, **options)
    first, resumed = adapter.resume(tmp_path / "resumed", 4, 8, **options)
    assert sorted(first.scalars("global/grad_norm")) == [0, 2, 3]
    assert sorted(resumed.scalars("global/grad_norm")) == [5, 7]  # the cadence goes on
    expected = straight.scalars("clip/threshold")
    thresholds = resumed.scalars("clip/threshold")
    assert 5 in thresholds and thresholds.keys() <= expected.keys()
    for step, value in thresholds.items():
        assert value == pytest.approx(expected[step], rel=1e-6)
    spikes = [(e["kind"], e["step"]) for e in resumed.watch.events if e["group"] == "global"]
    assert spikes == [("explosion", 4)]
    assert spikes == [
        (e["kind"], e["step"]) for e in straight.watch.events if e["group"] == "global"
    ]


# -- arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [*COMMON, *SINKS],
)
def test_bad_arguments_fail_at_construction(adapter, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        adapter.make(**kwargs)


def test_messages_name_the_adapters_own_defaults_and_rules(adapter):
    every = (
        f"`log_every_n_steps` must be an int >= 1 or None ({adapter.log_every_default})."
        " Received: log_every_n_steps=0"
    )
    with pytest.raises(ValueError, match=re.escape(every)):
        adapter.make(log_every_n_steps=0)
    other = "module" if "layer" in adapter.group_rules else "layer"  # the other framework's
    rules = ", ".join(repr(r) for r in adapter.group_rules)
    group = (
        f"`group_by` must be one of {rules}, or a callable from {adapter.group_member} to group"
        f" name. Received: group_by={other!r}"
    )
    with pytest.raises(ValueError, match=re.escape(group)):
        adapter.make(group_by=other)
