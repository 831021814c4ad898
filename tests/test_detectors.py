"""Detectors and the guard: each detector's property. The contract every detector meets (purity,
determinism, verdict shape, state round trip, reset) is in test_protocols.py."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

from gradwatch.detectors import (
    DetectStats,
    Entries,
    Explosion,
    Latch,
    NonFinite,
    Vanishing,
    Verdict,
    entries_of,
    latch,
    new_latch,
)
from gradwatch.guard import Guard, check_action
from gradwatch.policies import ClipStats
from gradwatch.reporting import events_markdown

GROUPS = ("encoder", "middle", "head")
LIKE = np.zeros((), np.float32)


def norms_at(group_norms, xp=np) -> DetectStats:
    group_norms = np.asarray(group_norms, dtype=np.float32)
    global_norm = np.float32(np.sqrt(np.sum(np.square(group_norms))))
    return DetectStats(xp.asarray(global_norm), xp.asarray(group_norms))


def entries_at(group_norms, xp=np) -> Entries:
    """What a detector looks at, for these group norms."""
    return entries_of(norms_at(group_norms, xp=xp))


def run(detector, norms, xp=np):
    state = detector.init(xp.asarray(LIKE), norms.shape[1])
    verdicts = []
    for row in norms:
        verdict, state = detector.update(entries_at(row, xp=xp), state)
        verdicts.append(verdict)
    return verdicts, state


def flags(verdicts) -> np.ndarray:
    return np.stack([np.asarray(v.flag) for v in verdicts])


def steady(seed: int, steps: int, base=(1.0, 1.0, 1.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = np.exp(rng.normal(0.0, 0.1, (steps, len(base))))
    return (np.asarray(base) * noise).astype(np.float32)


# -- NonFinite -------------------------------------------------------------------------------


def test_nonfinite_flags_exactly_the_nan_and_inf_entries():
    stats = DetectStats(np.float32(np.inf), np.array([1.0, np.nan, -np.inf, 0.0], np.float32))
    verdict, state = NonFinite().update(entries_of(stats), NonFinite().init(LIKE, 4))
    assert verdict.flag.tolist() == [True, False, True, True, False]  # global first, then groups
    assert np.all(verdict.threshold == np.inf)
    assert state == ()
    finite, _ = NonFinite().update(entries_at([1.0, 2.0, 0.0]), state)
    assert not np.any(finite.flag)


# -- Explosion -------------------------------------------------------------------------------


def test_explosion_never_fires_during_warmup():
    detector = Explosion(factor=10.0, warmup_steps=8)
    norms = steady(seed=0, steps=8)
    norms[3] *= 1000.0  # even a huge step is only learned from during warm-up
    verdicts, _ = run(detector, norms)
    assert not flags(verdicts).any()


def test_explosion_is_quiet_on_a_steady_series_and_fires_on_a_spike():
    detector = Explosion(factor=10.0, warmup_steps=10)
    norms = steady(seed=1, steps=60)
    norms[45, 1] *= 50.0  # the middle group spikes; the global norm follows (sqrt(3) -> ~50)
    verdicts, _ = run(detector, norms)
    fired = flags(verdicts)
    assert not fired[:45].any() and not fired[46:].any()
    assert fired[45].tolist() == [True, False, True, False]  # global and the spiking group only
    assert verdicts[45].value[2] > verdicts[45].threshold[2]


def test_explosion_does_not_learn_from_a_spike():
    detector = Explosion(factor=10.0, warmup_steps=10)
    norms = steady(seed=2, steps=40)
    _, before = run(detector, norms[:30])
    spike = norms[30] * 500.0  # every group fires too: each rose factor times beyond the rest
    verdict, after = detector.update(entries_at(spike), before)
    assert verdict.flag.all()
    assert np.array_equal(np.exp(after.log_mean), np.exp(before.log_mean))  # baseline unmoved
    assert np.array_equal(after.count, before.count)
    next_verdict, _ = detector.update(entries_at(norms[31]), after)
    assert not next_verdict.flag.any()


def test_explosion_a_group_rising_with_the_whole_gradient_is_judged_on_the_global_norm():
    detector = Explosion(factor=10.0, warmup_steps=10)
    norms = steady(seed=8, steps=30)
    _, state = run(detector, norms[:29])
    together, _ = detector.update(entries_at(norms[29] * 50.0), state)
    assert together.flag.tolist() == [True, False, False, False]  # one event: the whole's
    beyond, _ = detector.update(entries_at(norms[29] * [50.0, 50.0, 2000.0]), state)
    assert beyond.flag.tolist() == [True, False, False, True]  # the head rose 40x beyond the rest


def test_explosion_a_group_leaping_while_the_whole_gradient_is_quiet_must_rise_further():
    detector = Explosion(factor=10.0, warmup_steps=10)
    norms = steady(seed=9, steps=30, base=(10.0, 10.0, 0.01))  # the head: a sliver of the whole
    _, state = run(detector, norms[:29])
    for rise, fires in [(20.0, False), (50.0, True), (1000.0, True)]:  # factor**1.5 is ~32
        row = norms[29].copy()
        row[2] *= rise
        verdict, _ = detector.update(entries_at(row), state)
        assert verdict.flag.tolist() == [False, False, False, fires], rise


def test_explosion_a_group_settling_at_a_new_level_is_learnt_not_flagged_at_every_step():
    detector = Explosion(factor=10.0, warmup_steps=10)
    norms = steady(seed=10, steps=200, base=(10.0, 10.0, 0.01))
    norms[30:, 2] *= 20.0  # the head comes back from a dip, say, and stays there
    verdicts, state = run(detector, norms)
    assert not flags(verdicts).any()
    assert np.exp(state.log_mean[3]) > 0.1  # its baseline has moved up to the new level (0.2)


def test_explosion_baseline_is_the_geometric_mean_during_warmup():
    norms = steady(seed=3, steps=6)
    _, state = run(Explosion(warmup_steps=10), norms)
    global_norms = np.sqrt(np.sum(np.square(norms), axis=1))
    expected = np.exp(np.mean(np.log(np.column_stack([global_norms, norms])), axis=0))
    np.testing.assert_allclose(np.exp(state.log_mean), expected, rtol=1e-5)
    assert state.count.tolist() == [6.0] * 4


def test_explosion_max_norm_fires_from_step_zero():
    detector = Explosion(warmup_steps=50, max_norm=5.0)
    verdicts, _ = run(detector, np.array([[1.0, 6.0, 1.0], [1.0, 1.0, 1.0]], np.float32))
    assert verdicts[0].flag.tolist() == [True, False, True, False]  # global ~6.2, middle 6.0
    assert np.all(verdicts[0].threshold == 5.0)
    assert not verdicts[1].flag.any()


def test_explosion_threshold_is_the_smaller_of_max_norm_and_factor_times_baseline():
    detector = Explosion(factor=10.0, warmup_steps=3, max_norm=2.0)
    verdicts, _ = run(detector, np.full((5, 3), 0.1, np.float32))
    # the global norm: 10x its baseline; the groups (the whole gradient is quiet, so their bound
    # is 10**1.5 times their baseline, 3.16): max_norm
    expected = np.array([10.0 * 0.1 * math.sqrt(3), 2.0, 2.0, 2.0], np.float32)
    np.testing.assert_allclose(verdicts[4].threshold, expected, rtol=1e-5)


# -- Vanishing -------------------------------------------------------------------------------


def test_vanishing_group_fires_once_when_its_run_reaches_patience_and_again_after_recovery():
    detector = Vanishing(ratio=1e-3, patience=3)
    small = 1e-4  # under 1e-3 * the largest norm (1.0), above the floor
    middle = [small] * 5 + [0.5] + [small] * 3
    norms = np.array([[1.0, m, 0.8] for m in middle], np.float32)
    verdicts, _ = run(detector, norms)
    fired = flags(verdicts)
    assert np.flatnonzero(fired[:, 2]).tolist() == [2, 8]
    assert not fired[:, [0, 1, 3]].any()  # the healthy groups and the global norm never fire


def test_vanishing_fires_on_an_exactly_zero_group():
    detector = Vanishing(floor=0.0, ratio=0.0, patience=2)
    verdicts, _ = run(detector, np.array([[1.0, 0.0, 1.0]] * 3, np.float32))
    assert flags(verdicts)[:, 2].tolist() == [False, True, False]


def test_vanishing_healthy_groups_never_fire():
    verdicts, _ = run(Vanishing(patience=1), steady(seed=4, steps=50, base=(1.0, 1e-2, 10.0)))
    assert not flags(verdicts).any()


def test_vanishing_floor_applies_to_groups_and_to_the_global_norm():
    detector = Vanishing(floor=1e-3, ratio=0.0, patience=1)
    verdict, _ = detector.update(entries_at([1e-4, 1.0]), detector.init(LIKE, 2))
    assert verdict.flag.tolist() == [False, True, False]  # ratio 0: only the floor applies
    assert verdict.threshold.tolist() == pytest.approx([1e-3, 1e-3, 1e-3])
    verdict, _ = detector.update(entries_at([1e-4, 1e-4]), detector.init(LIKE, 2))
    assert verdict.flag.tolist() == [True, True, True]  # the whole gradient is below the floor


def test_vanishing_reports_a_finite_bound_for_an_infinite_group_without_warning():
    detector = Vanishing(ratio=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdict, _ = detector.update(entries_at([1.0, np.inf]), detector.init(LIKE, 2))
    assert not verdict.flag.any()
    assert verdict.threshold[1:].tolist() == pytest.approx([1e-4, 1e-4])


# -- latch -----------------------------------------------------------------------------------


def verdict_of(flag, value, threshold) -> Verdict:
    return Verdict(np.array(flag), np.array(value, np.float32), np.array(threshold, np.float32))


def test_latch_keeps_the_first_firing_between_reads_and_ors_the_flags():
    state = new_latch(LIKE, 3)
    assert state.fired.tolist() == [False] * 3 and state.fired.dtype == np.bool_
    steps = [
        verdict_of([False, True, False], [1.0, 7.0, 1.0], [5.0, 5.0, 5.0]),
        verdict_of([False, False, False], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]),
        verdict_of([True, True, False], [9.0, 8.0, 1.0], [6.0, 6.0, 6.0]),
    ]
    for step, verdict in enumerate(steps, start=4):
        state = latch(state, verdict, np.float32(step))
    assert state.fired.tolist() == [True, True, False]
    assert state.step.tolist() == [6.0, 4.0, 0.0]
    assert state.value.tolist() == [9.0, 7.0, 0.0]  # the value when it first fired
    assert state.threshold.tolist() == [6.0, 5.0, 0.0]


def test_latch_is_pure():
    state = new_latch(LIKE, 2)
    updated = latch(state, verdict_of([True, False], [3.0, 1.0], [2.0, 2.0]), np.float32(1))
    assert state.fired.tolist() == [False, False] and updated.fired.tolist() == [True, False]


# -- Guard -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "action", "message"),
    [
        (
            "vanishing",
            "skip",
            "`on_vanishing` must be one of 'warn', 'stop', 'ignore'. Received: on_vanishing='skip'",
        ),
        (
            "explosion",
            "halt",
            "`on_explosion` must be one of 'warn', 'skip', 'stop', 'ignore'. "
            "Received: on_explosion='halt'",
        ),
        (
            "nonfinite",
            None,
            "`on_nonfinite` must be one of 'warn', 'skip', 'stop', 'ignore'. "
            "Received: on_nonfinite=None",
        ),
    ],
)
def test_unknown_or_refused_actions_are_rejected_naming_the_argument(kind, action, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_action(kind, action)
    with pytest.raises(ValueError, match=re.escape(message)):
        Guard(**{f"on_{kind}": action})


def test_allowed_actions_are_accepted():
    assert check_action("explosion", "skip") == "skip"
    assert check_action("vanishing", "stop") == "stop"
    with pytest.raises(TypeError, match="not a built-in detector of another kind"):
        Guard(explosion=Vanishing())
    with pytest.raises(TypeError, match=re.escape("Received: explosion=0")):  # not the default
        Guard(explosion=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("vanishing=[]")):
        Guard(vanishing=[])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("; did you mean Vanishing()?")):
        Guard(vanishing=Vanishing)  # type: ignore[arg-type]
    assert Guard(explosion=None).explosion == Explosion()  # None: the default settings


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: Explosion(factor=1), ValueError, "`factor` must be a number > 1. Received"),
        (lambda: Explosion(warmup_steps=2.0), TypeError, "`warmup_steps` must be an int >= 1."),
        (lambda: Explosion(beta=1), ValueError, "`beta` must be in (0, 1). Received: beta=1"),
        (lambda: Explosion(max_norm=0), ValueError, "`max_norm` must be None or a number > 0."),
        (lambda: Explosion(accept_after=1), ValueError, "an int >= 2 (or None: never)."),
        (lambda: Vanishing(floor=-1), ValueError, "`floor` must be a number >= 0. Received"),
        (lambda: Vanishing(ratio="0"), TypeError, "`ratio` must be in [0, 1). Received"),
        (lambda: Vanishing(patience=0), ValueError, "`patience` must be an int >= 1. Received"),
    ],
)
def test_bad_detector_settings_fail_naming_the_argument(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_numpy_numbers_configure_a_detector_as_python_numbers():
    explosion = Explosion(factor=np.float32(4.0), warmup_steps=np.int64(5), accept_after=np.int8(3))
    assert repr(explosion) == repr(Explosion(factor=4.0, warmup_steps=5, accept_after=3))
    assert repr(Vanishing(patience=np.int64(3))) == repr(Vanishing(patience=3))


def test_ignored_kinds_are_not_evaluated():
    guard = Guard(on_nonfinite="ignore", on_vanishing="ignore")
    assert [kind for kind, _, _ in guard.active] == ["explosion"]
    assert len(guard.init(LIKE, 3).detectors) == 1
    assert not guard.reads_every_step and Guard(on_explosion="skip").reads_every_step


def run_guard(guard, norms):
    state = guard.init(LIKE, norms.shape[1])
    decisions = []
    for step, row in enumerate(norms):
        stats = norms_at(row)
        decision, state = guard.update(stats, ClipStats(stats.global_norm), state, np.float32(step))
        decisions.append(decision)
    return decisions, state


def test_guard_skips_only_when_a_skip_detector_fires_on_the_global_norm():
    guard = Guard(on_nonfinite="skip", on_explosion="skip", explosion=Explosion(warmup_steps=5))
    norms = steady(seed=5, steps=14, base=(10.0, 10.0, 0.1))
    norms[8, 2] *= 50.0  # a small group's spike: global ~14.1 -> ~15
    norms[10, 0] *= 50.0  # the whole gradient's spike
    norms[12, 1] = np.nan
    decisions, state = run_guard(guard, norms)
    assert [i for i, d in enumerate(decisions) if bool(d.skip)] == [10, 12]
    assert not any(bool(d.stop) for d in decisions)
    assert all(d.clip is None for d in decisions)
    explosion_latch = Latch(*(part[1] for part in state.latch))
    assert explosion_latch.fired.tolist() == [True, True, False, True]  # the group is reported
    assert explosion_latch.step.tolist() == [10.0, 10.0, 0.0, 8.0]


def test_group_only_explosion_neither_skips_nor_stops():
    for action in ("skip", "stop"):
        guard = Guard(on_explosion=action, explosion=Explosion(warmup_steps=5))
        norms = steady(seed=6, steps=8, base=(10.0, 10.0, 0.1))
        norms[7, 2] *= 50.0
        decisions, state = run_guard(guard, norms)
        assert state.latch.fired[1].tolist() == [False, False, False, True]
        assert not any(bool(d.skip) or bool(d.stop) for d in decisions)


def test_a_vanishing_group_with_action_stop_stops():
    guard = Guard(on_vanishing="stop", vanishing=Vanishing(ratio=1e-4, patience=3))
    norms = np.array([[1.0, 1e-6, 1.0]] * 4, np.float32)
    decisions, _ = run_guard(guard, norms)
    assert [bool(d.stop) for d in decisions] == [False, False, True, False]
    # a stop drops the step that caused it, as a skip does
    assert [bool(d.skip) for d in decisions] == [False, False, True, False]


def test_guard_events_are_sorted_records_of_the_latches():
    guard = Guard(
        on_explosion="skip",
        on_vanishing="stop",
        explosion=Explosion(warmup_steps=5),
        vanishing=Vanishing(ratio=1e-4, patience=2),
    )
    norms = steady(seed=7, steps=10)
    norms[3:, 2] = 1e-7  # the head vanishes from step 3: fires at step 4
    norms[7, 0] *= 100.0  # the encoder spikes at step 7
    norms[8, 1] = np.nan
    _, state = run_guard(guard, norms)
    events = guard.events(state.latch, GROUPS)
    assert [(e["step"], e["kind"], e["group"], e["action"]) for e in events] == [
        (4, "vanishing", "head", "stop"),
        (7, "explosion", "global", "skip"),  # the whole gradient first; it acted
        (7, "explosion", "encoder", "warn"),  # a group's spike is only reported
        (8, "nonfinite", "global", "warn"),
        (8, "nonfinite", "middle", "warn"),
    ]
    assert all(set(e) == {"step", "kind", "group", "value", "threshold", "action"} for e in events)
    vanishing = events[0]
    assert vanishing["value"] == pytest.approx(1e-7)
    assert vanishing["threshold"] == pytest.approx(1e-4 * float(norms[4, :2].max()), rel=1e-5)
    assert isinstance(events[0]["step"], int) and isinstance(events[0]["value"], float)
    assert guard.events(guard.init(LIKE, 3).latch, GROUPS) == []


def test_events_markdown_renders_one_row_per_event():
    events = [
        {"step": 3, "kind": "explosion", "group": "global", "value": 123.456,
         "threshold": 10.0, "action": "skip"},
        {"step": 5, "kind": "nonfinite", "group": "head", "value": math.nan,
         "threshold": math.inf, "action": "warn"},
    ]  # fmt: skip
    lines = events_markdown(events).splitlines()
    assert lines[0] == "| step | kind | group | value | threshold | action |"
    assert len(lines) == 2 + len(events)
    assert lines[2] == "| 3 | explosion | <code>global</code> | 123.5 | 10 | skip |"
    assert lines[3] == "| 5 | nonfinite | <code>head</code> | nan | inf | warn |"
    assert events_markdown([]).count("\n") == 1


def test_latched_steps_are_exact_beyond_float32_precision():
    step = np.int64(2**24 + 1)  # float32 would round it to 2**24
    verdict = Verdict(np.array([True, False]), np.array([3.0, 1.0]), np.array([1.0, 1.0]))
    state = latch(new_latch(np.zeros((), np.float32), 2), verdict, step)
    assert int(state.step[0]) == 2**24 + 1
