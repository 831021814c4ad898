"""Clipping policies: each one's mathematical property, and the ``clip=`` argument. The contract
every policy meets (purity, determinism, state round trip, reset) is in test_protocols.py."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from _policies import BUILTIN_POLICIES
from gradwatch.policies import (
    AGC,
    AutoClip,
    Clip,
    ClipByNorm,
    ClipByValue,
    ClipStats,
    Policy,
    ZClip,
    as_policy,
    needs_unit_norms,
)

POLICIES = BUILTIN_POLICIES
IDS = [
    type(p).__name__ + ("-percentile" if getattr(p, "mode", "") == "percentile" else "")
    for p in POLICIES
]


def norm_series(seed: int = 0, steps: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    norms = np.abs(rng.normal(1.0, 0.3, steps)).astype(np.float32)
    norms[25] = 40.0  # a spike
    norms[30] = np.nan  # a non-finite step
    return norms


def stats_at(norm, units: int = 4, xp=np):
    unit = xp.asarray(np.linspace(0.1, 2.0, units, dtype=np.float32))
    params = xp.asarray(np.full(units, 3.0, dtype=np.float32))
    return ClipStats(xp.asarray(np.float32(norm)), unit * xp.asarray(np.float32(norm)), params)


def run(policy, norms, xp=np):
    state = policy.init(xp.asarray(np.zeros((), np.float32)))
    decisions = []
    for norm in norms:
        clip, state = policy.update(stats_at(norm, xp=xp), state)
        decisions.append(clip)
    return decisions, state


# -- what every built-in does ----------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_a_nonfinite_norm_is_left_to_the_detectors(policy):
    decisions, _ = run(policy, norm_series())
    assert np.all(decisions[30].scale == 1.0)


# -- the properties --------------------------------------------------------------------------


def test_clip_by_norm_brings_the_norm_to_the_limit_and_is_idempotent():
    policy = ClipByNorm(2.0)
    for norm in [0.5, 2.0, 7.0, 1e6]:
        clip, _ = policy.update(ClipStats(np.float32(norm)), policy.init(np.zeros(())))
        clipped = norm * float(clip.scale)
        assert clipped == pytest.approx(min(norm, 2.0), rel=1e-6)
        again, _ = policy.update(ClipStats(np.float32(clipped)), None)
        assert float(again.scale) == pytest.approx(1.0)


def test_clip_by_value_bounds_every_element():
    clip, _ = ClipByValue(0.5).update(ClipStats(np.float32(3.0)), None)
    grad = np.array([-2.0, 0.1, 0.7])
    clipped = np.clip(grad, -clip.value, clip.value)
    assert clipped.tolist() == [-0.5, 0.1, 0.5]
    assert np.array_equal(np.clip(clipped, -clip.value, clip.value), clipped)  # twice = once


def test_autoclip_threshold_is_numpys_percentile_of_the_history():
    policy = AutoClip(percentile=10.0, history=12)
    norms = norm_series(steps=40)
    decisions, _ = run(policy, norms)
    seen: list[float] = []
    for norm, clip in zip(norms, decisions, strict=True):
        if np.isfinite(norm):
            seen.append(float(norm))
        expected = np.percentile(seen[-12:], 10.0)
        assert float(clip.threshold) == pytest.approx(expected, rel=1e-6)
        if np.isfinite(norm):
            assert norm * float(clip.scale) == pytest.approx(min(norm, expected), rel=1e-5)


def test_autoclip_keeps_its_history_in_order_without_sorting():
    """The ordered copy of the history is updated in place of a sort: after every step, with
    ties, non-finite norms and the history wrapping around many times, it is the sorted
    history."""
    policy = AutoClip(history=7)
    state = policy.init(np.zeros((), dtype=np.float64))
    values = np.random.default_rng(0).choice([0.5, 1.0, 2.0, 3.0], size=60)
    values[[5, 17, 30]] = [np.nan, np.inf, -np.inf]
    for value in values:
        _, state = policy.update(ClipStats(np.float64(value)), state)
        assert np.array_equal(state.ordered, np.sort(state.history))


def test_zclip_percentile_clips_a_spike_to_mean_plus_z_std_and_not_during_warmup():
    policy = ZClip(alpha=0.9, z_threshold=2.0, warmup_steps=10, mode="percentile")
    norms = np.full(30, 1.0, dtype=np.float32) + np.tile([0.1, -0.1], 15).astype(np.float32)
    norms[20] = 50.0
    decisions, _ = run(policy, norms)
    assert all(float(d.scale) == 1.0 for d in decisions[:10])
    state = policy.init(np.zeros((), np.float32))
    for norm in norms[:20]:
        _, state = policy.update(ClipStats(norm), state)
    bound = float(state.mean + 2.0 * np.sqrt(state.variance))
    assert 50.0 * float(decisions[20].scale) == pytest.approx(bound, rel=1e-5)
    assert float(decisions[21].scale) == 1.0  # the spike did not inflate the statistics


# 30 steady norms (0.9 to 1.1), a 10x spike, then steady norms again.
SPIKE_SERIES = [1.0 + 0.05 * ((7 * i) % 5 - 2) for i in range(30)] + [10.0, 1.0, 1.05, 0.95]
SPIKE = 30


def published_zclip(norms, mode, alpha=0.97, z_thres=2.5, warmup=25, eps=1e-6):
    """The norms after ZClip, step by step as Kumar et al. 2025 and their zclip.py state it."""
    seen, mu, var, out = [], None, None, []
    for g in norms:
        if mu is None:  # warm-up: collect, never clip; then plain mean and variance
            seen.append(g)
            if len(seen) == warmup:
                mu = sum(seen) / warmup
                var = sum((x - mu) ** 2 for x in seen) / warmup
            out.append(g)
            continue
        sigma = math.sqrt(var)
        g_used = g
        if mode == "zscore":
            z = (g - mu) / (sigma + eps)
            if z > z_thres:
                g_used = mu + (z_thres**2 / z) * sigma  # reciprocal clipping, xi(z) = z_thres^2 / z
        elif g > mu + z_thres * sigma:
            g_used = mu + z_thres * sigma
        out.append(g_used)
        mu = alpha * mu + (1 - alpha) * g_used  # the EMAs see the clipped norm
        var = alpha * var + (1 - alpha) * (g_used - mu) ** 2  # ...and the updated mean
    return out


def clipped_norms(policy, norms):
    state = policy.init(np.zeros((), np.float64))
    out = []
    for norm in norms:
        clip, state = policy.update(ClipStats(np.float64(norm)), state)
        out.append(norm * float(clip.scale))
    return out


@pytest.mark.parametrize(
    ("policy", "mode", "at_spike"),
    [
        (ZClip(), "zscore", 1.003662206041569),
        (ZClip(mode="percentile"), "percentile", 1.1764284179415503),
    ],
    ids=["default-zscore", "percentile"],
)
def test_zclip_follows_the_published_rule(policy, mode, at_spike):
    got = clipped_norms(policy, SPIKE_SERIES)
    assert got == pytest.approx(published_zclip(SPIKE_SERIES, mode), rel=1e-12)
    assert got[SPIKE] == pytest.approx(at_spike, rel=1e-9)  # written down: a wrong rule fails
    assert got[:SPIKE] == SPIKE_SERIES[:SPIKE] and got[SPIKE + 1 :] == SPIKE_SERIES[SPIKE + 1 :]


def test_zclip_modes_differ_at_a_spike_and_zscore_clips_larger_spikes_harder():
    zscore, percentile = ZClip(), ZClip(mode="percentile")
    assert zscore == ZClip(mode="zscore")
    assert (
        clipped_norms(zscore, SPIKE_SERIES)[SPIKE] < clipped_norms(percentile, SPIKE_SERIES)[SPIKE]
    )
    # Reciprocal scaling: the larger the spike, the lower it is clipped; a fixed bound does not.
    spikes = [2.0, 10.0, 1000.0]
    by_zscore = [clipped_norms(zscore, [*SPIKE_SERIES[:SPIKE], s])[SPIKE] for s in spikes]
    by_percentile = [clipped_norms(percentile, [*SPIKE_SERIES[:SPIKE], s])[SPIKE] for s in spikes]
    assert by_zscore[0] > by_zscore[1] > by_zscore[2] > 1.0
    assert by_percentile[0] == pytest.approx(by_percentile[2], rel=1e-12)


def test_agc_caps_every_unit():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(6, 4)) * np.array([[0.001], [0.01], [1.0], [5.0], [0.0], [2.0]])
    params = rng.normal(size=(6, 4))
    params[5] = 0.0  # a unit whose weights are zero: the cap is clipping * eps
    policy = AGC(clipping=0.02, eps=1e-3)
    unit_grads, unit_params = np.linalg.norm(grads, axis=1), np.linalg.norm(params, axis=1)
    clip, _ = policy.update(ClipStats(np.linalg.norm(grads), unit_grads, unit_params), None)
    clipped = grads * clip.scale[:, None]
    caps = 0.02 * np.maximum(unit_params, 1e-3)
    assert np.all(np.linalg.norm(clipped, axis=1) <= caps * (1 + 1e-6))
    small = unit_grads <= caps
    assert np.allclose(clipped[small], grads[small])  # units under their cap are untouched


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: AutoClip(percentile=-5.0),
            r"`percentile` must be in \(0, 100\]. Received: percentile=-5.0",
        ),
        (
            lambda: AutoClip(history=0),
            r"`history` must be an int from 1 to 10000000. Received: history=0",
        ),
        (  # would need terabytes: refused at construction, not when the state is made
            lambda: AutoClip(history=10**12),
            r"`history` must be an int from 1 to 10000000. Received: history=1000000000000",
        ),
        (lambda: ClipByNorm(0.0), r"`max_norm` must be a positive finite number. Received"),
        (lambda: ClipByValue(float("inf")), r"`max_value` must be a positive finite number"),
        (lambda: ZClip(alpha=1.0), r"`alpha` must be in \(0, 1\). Received: alpha=1.0"),
        (
            lambda: ZClip(mode="mean"),  # type: ignore[arg-type]
            r"`mode` must be one of 'zscore', 'percentile'. Received: mode='mean'",
        ),
        (lambda: AGC(clipping=-1), r"`clipping` must be a positive finite number"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_clip_argument_shortcuts():
    assert as_policy(None) is None
    assert as_policy(1.5) == ClipByNorm(1.5)
    assert as_policy(AutoClip()) == AutoClip()
    assert as_policy(np.float32(2.0)) == ClipByNorm(2.0)
    with pytest.raises(TypeError, match=r"`clip` must be None, a positive float .* clip='x'$"):
        as_policy("x")
    with pytest.raises(ValueError, match=r"`clip` must be None, a positive float .* clip=-1$"):
        as_policy(-1)  # named as passed, not as ClipByNorm's `max_norm`
    with pytest.raises(TypeError, match=re.escape("clip=<class 'gradwatch.policies.ZClip'>;")):
        as_policy(ZClip)
    with pytest.raises(TypeError, match=re.escape("; did you mean AutoClip()?")):
        as_policy(AutoClip)
    with pytest.raises(TypeError):
        ClipByNorm("1")  # type: ignore[arg-type]


class Unclipped:
    def init(self, like):
        return ()

    def update(self, stats, state):
        return Clip(stats.global_norm * 0 + 1, stats.global_norm), state


def test_clip_takes_any_object_meeting_the_policy_protocol():
    mine = Unclipped()
    assert as_policy(mine) is mine and isinstance(mine, Policy)
    assert not needs_unit_norms(mine) and needs_unit_norms(AGC())
    with pytest.raises(TypeError, match=re.escape("Unclipped'>; did you mean Unclipped()?")):
        as_policy(Unclipped)  # the class, uncalled: the hint names it
    with pytest.raises(TypeError, match=r"or a policy: an object with init\(like\) and update"):
        as_policy(object())


def test_numpy_numbers_configure_a_policy_as_python_numbers():
    policy = AutoClip(percentile=np.float32(25.0), history=np.int64(16))
    assert policy == AutoClip(25.0, 16) and repr(policy) == repr(AutoClip(25.0, 16))
    assert type(policy.history) is int
    zclip = ZClip(alpha=np.float64(0.9), warmup_steps=np.int32(3), z_threshold=np.int8(2))
    assert repr(zclip) == repr(ZClip(alpha=0.9, warmup_steps=3, z_threshold=2))
    assert repr(AGC(clipping=np.float32(0.5))) == repr(AGC(clipping=0.5))
