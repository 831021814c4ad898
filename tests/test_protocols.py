"""The contract every policy and detector meets, built-in or a user's own: one harness for all.

As torchmetrics runs every metric through one tester, every :class:`~gradwatch.policies.Policy`
and :class:`~gradwatch.detectors.Detector` here goes through the same checks: it meets its
protocol (and not the other); ``update`` is pure (inputs and state unchanged, the same inputs
give the same outputs) and deterministic; it decides alike on numpy float32 and float64, torch
and TensorFlow tensors, keeping the dtype it is given; its state survives
``Guard.state_dict`` -> JSON -> ``Guard.load_state_dict`` into a new guard of an equal
configuration; a fresh ``init`` is the initial state, and the object itself holds no state.
Each one's own mathematical property is tested in test_policies.py and test_detectors.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from _custom import ClipToMean, HalveAbove, Streak, UnitCap
from _policies import BUILTIN_POLICIES
from gradwatch.checks import meets
from gradwatch.detectors import (
    Detector,
    DetectStats,
    Explosion,
    NonFinite,
    Vanishing,
    entries_of,
)
from gradwatch.guard import Guard, describe
from gradwatch.policies import (
    AGC,
    ClipStats,
    Policy,
    needs_unit_norms,
)

POLICIES = [
    *BUILTIN_POLICIES,
    HalveAbove(1.5),  # a user's: stateless, no dataclass repr
    ClipToMean(),  # a user's: its state a plain tuple
    UnitCap(0.5),  # a user's: declares needs_unit_norms
]
DETECTORS = [
    NonFinite(),
    Explosion(warmup_steps=5),
    Explosion(warmup_steps=5, max_norm=20.0),
    Vanishing(patience=3),
    Streak(bound=1.5),  # a user's
]
CASES = POLICIES + DETECTORS


def case_id(case: object) -> str:
    settings = "-percentile" if getattr(case, "mode", "") == "percentile" else ""
    settings += "-max_norm" if isinstance(case, Explosion) and case.max_norm else ""
    return type(case).__name__ + settings


GROUPS = 3
STEPS = 40
SAVED_AT = 20


def norm_series() -> np.ndarray:
    """``[steps, 1 + groups]``: the global norm, then each group's; log-normal noise, a
    vanishing run, a spike, a NaN. float32 values, so that every dtype sees the same inputs."""
    rng = np.random.default_rng(0)
    groups = np.array([1.0, 0.5, 2.0]) * np.exp(rng.normal(0.0, 0.1, (STEPS, GROUPS)))
    groups[10:16, 1] = 1e-7  # the middle group vanishes for six steps
    groups[25, 0] *= 50.0  # a spike
    groups[30, 2] = np.nan  # a non-finite step
    total = np.sqrt(np.sum(np.square(groups), axis=1))
    return np.column_stack([total, groups]).astype(np.float32)


SERIES = norm_series()

# -- backends: what the core computes on inside each adapter ---------------------------------


def _numpy(dtype):
    return lambda values: np.asarray(values, dtype=dtype)


def _torch(values):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float32))


BACKENDS = {"numpy-float32": _numpy(np.float32), "numpy-float64": _numpy(np.float64)}


@pytest.fixture(params=[*BACKENDS, "torch"])
def backend(request):
    """``asarray(values)`` of one backend the harness runs on."""
    if request.param == "torch":
        pytest.importorskip("torch")
        return _torch
    return BACKENDS[request.param]


def host(value):
    """A numpy copy of an array of any backend; None stays None; tuples recurse."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(host(v) for v in value)
    return np.array(value.numpy() if hasattr(value, "numpy") else value, copy=True)


def same(a, b) -> bool:
    """Bit for bit the same (NaN equal to NaN), through nested tuples."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def close(a, b, rtol: float) -> None:
    if a is None or b is None:
        assert a is None and b is None
    elif isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            close(x, y, rtol)
    elif a.dtype == np.bool_:
        assert np.array_equal(a, b)
    else:
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol)


def is_policy(case) -> bool:
    return meets(case, Policy)


def init(case, asarray):
    like = asarray(0.0)
    return case.init(like) if is_policy(case) else case.init(like, GROUPS)


def inputs(case, row, asarray):
    """A step's inputs: ClipStats for a policy (units: the groups), Entries for a detector."""
    norms = asarray(row)
    if is_policy(case):
        return ClipStats(norms[0], norms[1:], asarray(np.full(GROUPS, 3.0)))
    return entries_of(DetectStats(norms[0], norms[1:]))


def run(case, asarray, rows=SERIES, state=None):
    state = init(case, asarray) if state is None else state
    outputs = []
    for row in rows:
        out, state = case.update(inputs(case, row, asarray), state)
        outputs.append(host(tuple(out)))
    return outputs, state


# -- the contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_meets_its_protocol_and_not_the_other(case):
    policy = case in POLICIES
    assert meets(case, Policy) is policy and isinstance(case, Policy)
    assert meets(case, Detector) is not policy and isinstance(case, Detector)  # names only
    assert not meets(type(case), Policy) and not meets(type(case), Detector)  # a class, uncalled
    if policy:
        assert Guard.configure(clip=case).policy is case
        assert needs_unit_norms(case) == isinstance(case, (AGC, UnitCap))
    elif not isinstance(case, NonFinite):
        slot = "vanishing" if isinstance(case, Vanishing) else "explosion"
        assert getattr(Guard(**{slot: case}), slot) is case


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_update_is_pure(case, backend):
    _, state = run(case, backend, SERIES[:12])
    step = inputs(case, SERIES[25], backend)  # the spike
    inputs_before, state_before = host(tuple(step)), host(tuple(state))
    first, state_a = case.update(step, state)
    second, state_b = case.update(step, state)
    assert same(host(tuple(step)), inputs_before)  # inputs not mutated
    assert same(host(tuple(state)), state_before)  # state not mutated
    assert same(host(tuple(first)), host(tuple(second)))
    assert same(host(tuple(state_a)), host(tuple(state_b)))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_update_is_deterministic(case, backend):
    before = describe(case)
    first, state_a = run(case, backend)
    second, state_b = run(case, backend)
    assert all(same(a, b) for a, b in zip(first, second, strict=True))
    assert same(host(tuple(state_a)), host(tuple(state_b)))
    assert describe(case) == before  # the object keeps nothing of a run


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decisions_keep_the_dtype_and_agree_across_dtypes(case):
    on_32, state_32 = run(case, BACKENDS["numpy-float32"])
    on_64, state_64 = run(case, BACKENDS["numpy-float64"])
    for a, b in zip(on_32, on_64, strict=True):
        close(a, b, rtol=1e-5)
        for part_32, part_64 in zip(a, b, strict=True):
            if part_32 is not None and part_32.dtype != np.bool_:
                assert (part_32.dtype, part_64.dtype) == (np.float32, np.float64)
    for part_32, part_64 in zip(host(tuple(state_32)), host(tuple(state_64)), strict=True):
        assert part_32.dtype.kind == part_64.dtype.kind  # float state follows the input's dtype
        if part_32.dtype.kind == "f":
            assert (part_32.dtype, part_64.dtype) == (np.float32, np.float64)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_decisions_on_framework_tensors(case, framework_xp):
    on_numpy, _ = run(case, BACKENDS["numpy-float32"])
    on_framework, _ = run(case, lambda values: framework_xp.asarray(np.float32(values)))
    for a, b in zip(on_numpy, on_framework, strict=True):
        close(a, b, rtol=1e-5)


@pytest.mark.parametrize("case", POLICIES, ids=case_id)
def test_a_policy_decides_a_scale_per_step_or_per_unit(case):
    for clip in run(case, BACKENDS["numpy-float32"])[0]:
        scale, threshold, value = clip
        assert scale.shape == ((GROUPS,) if needs_unit_norms(case) else ())
        assert threshold.shape == () and (value is None or value.shape == ())


@pytest.mark.parametrize("case", DETECTORS, ids=case_id)
def test_a_verdict_has_one_entry_for_the_global_norm_and_one_per_group(case):
    verdicts, state = run(case, BACKENDS["numpy-float32"], SERIES[:31])  # ends on the NaN step
    for verdict in verdicts:
        assert all(part.shape == (1 + GROUPS,) for part in verdict)
        assert verdict[0].dtype == np.bool_
    assert all(np.all(np.isfinite(part)) for part in host(tuple(state)))  # NaN not learnt


def guard_of(case) -> Guard:
    """A guard that runs ``case``, every detector acting (skip, stop) where it can."""
    if is_policy(case):
        return Guard(policy=case)
    if isinstance(case, NonFinite):
        return Guard(on_nonfinite="skip", on_explosion="ignore", on_vanishing="ignore")
    if isinstance(case, Vanishing):
        return Guard(on_vanishing="stop", on_explosion="ignore", vanishing=case)
    return Guard(on_explosion="skip", on_vanishing="ignore", explosion=case)


def like_of(template, values):
    """What an adapter passes to ``load_state_dict``: values as an array like the template."""
    if isinstance(template, np.ndarray):
        return np.asarray(values, dtype=template.dtype)
    import torch

    return torch.as_tensor(values, dtype=template.dtype, device=template.device)


def run_guard(guard, state, rows, asarray, start):
    decisions = []
    for step, row in enumerate(rows, start=start):
        norms = asarray(row)
        clip_stats = ClipStats(norms[0], norms[1:], asarray(np.full(GROUPS, 3.0)))
        stamp = asarray(step).to(dtype=int) if hasattr(norms, "to") else np.int64(step)
        decision, state = guard.update(DetectStats(norms[0], norms[1:]), clip_stats, state, stamp)
        decisions.append(host(tuple(decision)))
    return decisions, state


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("on", ["numpy", "torch"])
def test_state_survives_guard_state_dict_and_load_state_dict(case, on):
    asarray = _numpy(np.float32) if on == "numpy" else _torch
    if on == "torch":
        pytest.importorskip("torch")
    guard = guard_of(case)
    _, state = run_guard(guard, guard.init(asarray(0.0), GROUPS), SERIES[:SAVED_AT], asarray, 0)
    saved = json.loads(json.dumps(guard.state_dict(state)))  # plain lists: as a checkpoint
    other = guard_of(copy.deepcopy(case))  # a new object of the same configuration
    restored, afresh = other.load_state_dict(other.init(asarray(0.0), GROUPS), saved, like_of)
    assert afresh == []
    assert same(host(restored.policy), host(state.policy))  # the latch is read, not saved
    assert same(host(restored.detectors), host(state.detectors))
    rest = SERIES[SAVED_AT:]
    going_on, _ = run_guard(guard, state, rest, asarray, SAVED_AT)
    resumed, _ = run_guard(other, restored, rest, asarray, SAVED_AT)
    assert all(same(a, b) for a, b in zip(going_on, resumed, strict=True))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_init_resets(case, backend):
    fresh = init(case, backend)
    run(case, backend)
    again = init(case, backend)
    assert type(fresh) is type(again)
    assert same(host(tuple(fresh)), host(tuple(again)))


# -- saved configurations of a user's objects -----------------------------------------------


def test_a_users_object_is_saved_by_class_and_attributes_and_resumes_only_under_the_same():
    assert describe(HalveAbove(1.5)) == describe(HalveAbove(1.5)) == "HalveAbove(limit=1.5)"
    assert describe(Streak(1.5)) == "Streak(bound=1.5, patience=2)"
    asarray = _numpy(np.float32)
    guard = Guard(policy=ClipToMean(2.0))
    _, state = run_guard(guard, guard.init(asarray(0.0), GROUPS), SERIES[:5], asarray, 0)
    saved = guard.state_dict(state)
    other = Guard(policy=ClipToMean(3.0))
    fresh = other.init(asarray(0.0), GROUPS)
    restored, afresh = other.load_state_dict(fresh, saved, like_of)
    assert afresh == ["clipping policy ClipToMean(factor=3.0)"]
    assert same(host(restored.policy), host(fresh.policy))


def test_a_state_that_is_not_a_tuple_is_refused_naming_the_argument():
    class Bare(HalveAbove):
        def init(self, like):
            return like  # an array, not a tuple of arrays

    with pytest.raises(TypeError, match=r"The state of `clip` must be a tuple \(a NamedTuple\)"):
        Guard(policy=Bare(1.0)).init(np.float32(0.0), GROUPS)
