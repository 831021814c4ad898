"""The framework-free core: names, groups, statistics, cadence."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.checks import (
    check_choice,
    check_count,
    check_flag,
    check_path,
    check_positive,
    check_real,
    check_sinks,
)
from gradwatch.grouping import Grouping, check_group_by
from gradwatch.record import Histogram
from gradwatch.recording import build_histogram_record, build_record
from gradwatch.reporting import GradWatchWarning
from gradwatch.sinks import MemorySink
from gradwatch.stats import (
    StepSummary,
    TensorStats,
    aggregate,
    global_norm,
    init_summary,
    update_summary,
)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_gradwatch_loads_no_framework():
    code = (
        "import sys, gradwatch, gradwatch.tags, gradwatch.stats, gradwatch.cadence,"
        " gradwatch.sinks, gradwatch.grouping, gradwatch.record, gradwatch.options\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'lightning')"
        " if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_readme_table_of_tags_is_the_generated_one():
    assert tags.markdown_table() in (ROOT / "README.md").read_text()


def test_tags_hold_no_floats_and_no_lightning_keys():
    for spec in tags.TAGS:
        assert not re.search(r"\d\.\d", spec.pattern)
        assert not spec.pattern.startswith("grad_2.0_norm")
    assert tags.group_tag(tags.GRAD_NORM, "blocks.0.attn") == "grad_norm/blocks.0.attn"
    assert tags.sanitize("a b[0]") == "a_b_0_"
    assert tags.sanitize("编码.слой.परत") == "编码.слой.परत"  # letters and marks of any script
    assert tags.total_tag(tags.GLOBAL, 2) == "global/grad_norm_optimizer2"


@pytest.mark.parametrize(
    ("group_by", "groups"),
    [
        ("module", ("emb", "blocks.0.attn", "root")),
        ("parameter", ("emb.weight", "blocks.0.attn.w", "blocks.0.attn.b", "bias")),
        (lambda name: name.split(".")[0], ("emb", "blocks", "bias")),
    ],
)
def test_grouping_rules(group_by, groups):
    names = ["emb.weight", "blocks.0.attn.w", "blocks.0.attn.b", "bias"]
    grouping = Grouping.build(names, group_by)
    assert grouping.groups == groups
    # each tensor's group, groups numbered in order of first appearance
    assert list(grouping.index) == sorted(grouping.index)
    assert set(grouping.index) == set(range(len(groups)))


def test_keras_rules_group_variable_paths():
    paths = ["model/dense/kernel", "model/dense/bias", "model/out/kernel", "scale"]
    assert Grouping.build(paths, "layer").groups == ("model/dense", "model/out", "root")
    assert Grouping.build(paths, "variable").groups == tuple(paths)


@pytest.mark.parametrize("bad", ["layer", 3, None])
def test_group_by_rejects_unknown_rules(bad):
    allowed = r"`group_by` must be one of 'module', 'parameter'.*Received"
    with pytest.raises(ValueError, match=allowed):
        check_group_by(bad)


def test_group_by_callable_must_return_a_name():
    with pytest.raises(TypeError, match=r"group_by\('w'\) -> 3"):
        Grouping.build(["w"], lambda name: 3)


def test_aggregate_matches_direct_computation():
    rng = np.random.default_rng(0)
    tensors = [rng.normal(size=s) for s in [(4, 3), (3,), (5, 5), (2,)]]
    params = [rng.normal(size=t.shape) for t in tensors]
    tensors[2][1, 1] = np.inf
    grouping = Grouping.build(["a.w", "a.b", "b.w", "b.b"], "module")
    stats = TensorStats(
        np.array([True, True, True, False]),
        {
            "grad_norm": np.array([np.linalg.norm(t) for t in tensors]),
            "grad_max_abs": np.array([np.abs(t).max() for t in tensors]),
            "grad_nonfinite": np.array([(~np.isfinite(t)).sum() for t in tensors], dtype=float),
            "param_norm": np.array([np.linalg.norm(p) for p in params]),
        },
    )
    present, groups = aggregate(grouping, stats)
    a = np.concatenate([tensors[0].ravel(), tensors[1]])
    pa = np.concatenate([params[0].ravel(), params[1]])
    assert groups["grad_norm"][0] == pytest.approx(np.linalg.norm(a))
    assert groups["grad_max_abs"][0] == pytest.approx(np.abs(a).max())
    assert groups["grad_to_param"][0] == pytest.approx(np.linalg.norm(a) / np.linalg.norm(pa))
    # group b: only b.w had a gradient, and it holds an inf
    assert groups["grad_nonfinite"].tolist() == [0.0, 1.0]
    assert groups["grad_norm"][1] == np.inf
    assert present.tolist() == [True, True]
    assert "update_to_param" not in groups


def test_step_summary_keeps_the_largest_finite_norm_and_counts_nonfinite_steps():
    summary = init_summary(np.zeros((), dtype=np.float32))
    for norm in [2.0, np.inf, 9.0, np.nan, 1.0]:
        summary = update_summary(summary, np.asarray(norm, dtype=np.float32))
    assert float(summary.max_global_norm) == 9.0
    assert float(summary.nonfinite_steps) == 2.0
    assert float(global_norm(np.array([3.0, 4.0, 12.0]))) == 13.0


def test_cadence_and_its_validation():
    cadence = Cadence(log_every_n_steps=3, histogram_every_n_steps=0)
    assert [k for k in range(7) if cadence.logs(k)] == [0, 2, 5]  # as Lightning: (k + 1) % n
    assert not any(cadence.histograms(k) for k in range(7))
    with pytest.raises(
        ValueError, match=r"`log_every_n_steps` must be an int >= 1. Received: .*=0"
    ):
        Cadence(log_every_n_steps=0)
    with pytest.raises(TypeError, match=r"`histogram_every_n_steps` must be an int"):
        Cadence(histogram_every_n_steps=2.5)
    numpy = Cadence(np.int64(4), histogram_every_n_steps=np.int64(5))  # accepted as 4 and 5
    assert numpy == Cadence(4, 5) and repr(numpy) == repr(Cadence(4, 5))
    assert type(numpy.histogram_every_n_steps) is int


@pytest.mark.parametrize(
    ("check", "error", "message"),
    [
        (lambda: check_count("n", True), TypeError, "`n` must be an int >= 1. Received: n=True"),
        (lambda: check_count("n", np.float64(2)), TypeError, "Received: n=np.float64(2.0)"),
        (lambda: check_count("n", -1, smallest=0), ValueError, "an int >= 0. Received: n=-1"),
        (lambda: check_count("n", 11, largest=10), ValueError, "an int from 1 to 10. Received"),
        (lambda: check_count("n", 2**63), ValueError, f"an int from 1 to {2**63 - 1}. Received"),
        (lambda: check_flag("on", 1), TypeError, "`on` must be True or False. Received: on=1"),
        (lambda: check_real("x", "1", "> 0", bool), TypeError, "`x` must be > 0. Received"),
        (lambda: check_real("x", math.inf, "> 0", bool), ValueError, "Received: x=inf"),
        (lambda: check_positive("x", 0), ValueError, "`x` must be a positive finite number."),
        (lambda: check_choice("a", "b", ("c",)), ValueError, "`a` must be one of 'c'. Received"),
        (lambda: check_path("p", 3), TypeError, "`p` must be a path or None. Received: p=3"),
    ],
)
def test_argument_checks_name_the_argument(check, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check()


def test_argument_checks_return_python_values():
    assert check_count("n", np.uint8(3)) == 3 and type(check_count("n", np.uint8(3))) is int
    assert check_flag("on", np.bool_(False)) is False
    assert type(check_real("x", np.float32(0.5), "> 0", lambda v: v > 0)) is float
    assert type(check_real("x", np.int16(2), "> 0", lambda v: v > 0)) is int
    assert (
        check_path("p", Path("a") / "b") == str(Path("a") / "b") and check_path("p", None) is None
    )
    assert check_sinks("sinks", [MemorySink()])[0].records == []


@pytest.mark.parametrize("logs, histograms", [(1, 0), (3, 0), (4, 6), (5, 2), (7, 7)])
def test_next_due_is_the_first_step_the_cadence_logs_or_draws_after(logs, histograms):
    cadence = Cadence(logs, histograms)
    for step in range(-1, 50):
        due = next(k for k in range(step + 1, 100) if cadence.logs(k) or cadence.histograms(k))
        assert cadence.next_due(step) == due, step


def test_groups_whose_names_would_share_a_tag_get_distinct_tags_and_one_warning():
    names = ["a b.w", "a_b.w", "编码.w", "a:b.w", "解码.w", "x y.w", "x+y.w"]
    with pytest.warns(GradWatchWarning) as told:
        grouping = Grouping.build(names, "module")
    assert len(told) == 1
    message = str(told[0].message)
    assert all(repr(group) in message for group in ("a b", "a_b", "a:b", "x y", "x+y"))
    assert "编码" not in message
    # The group spelled like the tag keeps it; the others get suffixes, in group order.
    assert grouping.tags == ("a_b_2", "a_b", "编码", "a_b_3", "解码", "x_y", "x_y_2")
    n = len(names)
    stats = TensorStats(
        np.ones(n, bool),
        {
            "grad_norm": np.arange(1.0, n + 1),
            "grad_max_abs": np.ones(n),
            "grad_nonfinite": np.zeros(n),
            "param_norm": np.ones(n),
        },
    )
    record = build_record(0, grouping, stats, summary=StepSummary(0.0, 0.0, 0.0, 0.0))
    norms = {t: v for t, v in record.scalars.items() if t.startswith("grad_norm/")}
    assert list(norms.values()) == list(range(1, n + 1))  # no group's statistics lost
    hist = Histogram.from_counts(0.0, 1.0, np.ones(2), 1.0, 1.0)
    histograms = build_histogram_record(0, grouping, dict.fromkeys(grouping.groups, hist))
    assert [t.partition("/")[2] for t in histograms.histograms] == list(grouping.tags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Grouping.build(["a/b.w", "a_b.w", "a.b.w"], "module")  # no clash, no warning


def test_build_record_names_every_statistic():
    grouping = Grouping.build(["a.w", "b.w"], "module")
    stats = TensorStats(
        np.array([True, False]),
        {
            "grad_norm": np.array([3.0, 0.0]),
            "grad_max_abs": np.array([1.0, 0.0]),
            "grad_nonfinite": np.array([0.0, 0.0]),
            "param_norm": np.array([6.0, 0.0]),
        },
    )
    summary = StepSummary(4.0, 1.0, 2.0, 3.0)
    record = build_record(7, grouping, stats, summary=summary, skips=True, scaler=True)
    assert record.step == 7
    assert record.scalars == {
        "grad_norm/a": 3.0,
        "grad_max_abs/a": 1.0,
        "grad_nonfinite/a": 0.0,
        "param_norm/a": 6.0,
        "grad_to_param/a": 0.5,
        "global/grad_norm": 3.0,
        "global/max_since_last_log": 4.0,
        "global/nonfinite_steps": 1.0,
        "global/skipped_steps": 2.0,
        "amp/skipped_steps": 3.0,
    }


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and test", 1)[1]
    commands = section.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd ", "export "))
    ]
    assert ci == commands
