"""The Custom Scalars layout of a run: readable charts, and only charts that draw something."""

from __future__ import annotations

import re
import warnings

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from gradwatch import tags
from gradwatch.dashboard import MAX_LINES, Layout, build_dashboard
from gradwatch.grouping import Grouping
from gradwatch.reporting import GradWatchWarning

PER_GROUP = tags.DEFAULT_STATISTICS  # the per-group statistics written at the defaults
# 50 groups in depth order; "blocks.1" is a prefix of "blocks.10" to "blocks.19".
GROUPS = [f"blocks.{i}" for i in range(49)] + ["head"]


def charts(layout: Layout) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.title, c.tags) for category in layout.categories for c in category.charts]


def on_charts(layout: Layout, tag: str) -> list[str]:
    """The titles of the charts that draw ``tag`` (TensorBoard matches from the start)."""
    return [t for t, patterns in charts(layout) if any(re.match(p, tag) for p in patterns)]


def per_group_charts(layout: Layout, statistic: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(t, tags) for t, tags in charts(layout) if t.startswith(f"{statistic}: ")]


@pytest.mark.parametrize("statistic", tags.STATISTICS)
def test_fifty_groups_are_split_in_depth_order_into_charts_of_at_most_ten(statistic):
    layout = build_dashboard(Grouping.build(GROUPS, "parameter"), statistics=tags.STATISTICS)
    split = per_group_charts(layout, statistic)
    assert len(split) == 5 and all(len(tags) <= MAX_LINES for _, tags in split)
    drawn = [
        g for _, tags in split for g in GROUPS if any(re.match(p, f"{statistic}/{g}") for p in tags)
    ]
    assert drawn == GROUPS  # each group on exactly one chart, in depth order
    for group in GROUPS:
        assert len(on_charts(layout, f"{statistic}/{group}")) == 1
    assert split[0][0] == f"{statistic}: groups 1-10 of 50 (blocks.0 … blocks.9)"
    assert split[-1][0] == f"{statistic}: groups 41-50 of 50 (blocks.40 … head)"


def test_only_the_statistics_written_get_charts():
    grouping = Grouping.build(GROUPS, "parameter")
    assert not per_group_charts(build_dashboard(grouping), tags.GRAD_NONFINITE)  # not at defaults
    chosen = build_dashboard(grouping, statistics=(tags.GRAD_NORM, tags.PARAM_NORM))
    assert per_group_charts(chosen, tags.PARAM_NORM)
    assert not per_group_charts(chosen, tags.GRAD_TO_PARAM)


def test_groups_are_split_evenly_and_named_by_their_tags():
    with pytest.warns(GradWatchWarning, match="carry a suffix"):
        grouping = Grouping.build(["a b.w", "a_b.w"] + [f"l{i}.w" for i in range(9)], "module")
    split = per_group_charts(build_dashboard(grouping), tags.GRAD_NORM)
    assert [len(tags) for _, tags in split] == [6, 5]  # not 10 and 1
    assert split[0][1][:2] == ("^grad_norm/a_b_2$", "^grad_norm/a_b$")  # Grouping.tags
    assert split[0][0] == "grad_norm: groups 1-6 of 11 (a b … l3)"  # titles: group names
    (one,) = per_group_charts(build_dashboard(Grouping.build(["w"], "module")), tags.GRAD_NORM)
    assert one == ("grad_norm: group 1 of 1 (root)", ("^grad_norm/root$",))


@pytest.mark.parametrize("tag", ["clip/threshold", "clip/coefficient", "global/clipped_norm"])
def test_clipping_charts_only_with_a_clip_policy(tag):
    grouping = Grouping.build(GROUPS, "parameter")
    without, with_clip = build_dashboard(grouping), build_dashboard(grouping, clipping=True)
    assert not [t for t, tags in charts(without) if any("clip" in p for p in tags)]
    assert on_charts(without, tag) == []
    assert len(on_charts(with_clip, tag)) == 1
    for layout in (without, with_clip):
        assert on_charts(layout, "global/grad_norm") == [charts(layout)[0][0]]
        assert len(on_charts(layout, "global/nonfinite_steps")) == 1
        assert all(tags for _, tags in charts(layout))


def test_whole_model_tags_of_each_optimizer():
    grouping = Grouping.build(GROUPS, "parameter")
    one = build_dashboard(grouping, clipping=True)
    assert on_charts(one, "global/grad_norm_optimizer1") == []  # exact tags
    two = build_dashboard(grouping, clipping=True, optimizers=(0, 1))
    for label in (0, 1):
        title = f"global gradient norm: before and after clipping, threshold (optimizer {label})"
        for tag in (tags.total_tag(tags.GLOBAL, label), tags.clip_tag(tags.THRESHOLD, label)):
            assert on_charts(two, tag) == [title]
        assert on_charts(two, tags.total_tag(tags.NONFINITE_STEPS, label)) != []
    unknown = build_dashboard(grouping, optimizers=None)  # a plain loop: any label
    for tag in ("global/grad_norm", "global/grad_norm_optimizer12"):
        assert on_charts(unknown, tag) == ["global gradient norm"]
    assert on_charts(unknown, "global/grad_norm_max") == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"grouping": ["a"]},
            TypeError,
            r"`grouping` must be a Grouping. Received: grouping=\['a'\]",
        ),
        ({"clipping": 1}, TypeError, r"`clipping` must be True or False"),
        ({"optimizers": ()}, ValueError, r"`optimizers` must be a non-empty sequence"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    kwargs = {"grouping": Grouping.build(["a.w"], "module"), **kwargs}
    with pytest.raises(error, match=message):
        build_dashboard(**kwargs)


# --- a real run ----------------------------------------------------------------------------------


def read_layout(log_dir) -> tuple[layout_pb2.Layout, set[str]]:
    """The layout TensorBoard's custom_scalars plugin reads from a run, and its scalar tags."""
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    (config,) = accumulator.Tensors(tags.LAYOUT)  # written once
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    return layout, set(accumulator.Tags()["scalars"])


@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_torch_run_writes_the_layout_of_its_groups(tmp_path, clip):
    torch = pytest.importorskip("torch")
    from gradwatch.integrations.torch import TorchGradWatch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[m for _ in range(25) for m in (torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))]
    )
    generator, critic = (
        torch.optim.SGD(model[:25].parameters(), lr=0.01),
        torch.optim.SGD(model[25:].parameters(), lr=0.01),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # detections are not what this test is about
        with TorchGradWatch(model, tmp_path, log_every_n_steps=1, clip=clip) as watch:
            for _ in range(3):
                for optimizer in (generator, critic):
                    model(torch.randn(8, 4)).pow(2).mean().backward()
                    watch.before_optimizer_step(optimizer)
                    optimizer.step()
                    watch.after_optimizer_step()
                    optimizer.zero_grad()

    layout, written = read_layout(tmp_path)
    groups = watch.engine.grouping.groups
    assert len(groups) == 50
    titled = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for statistic in PER_GROUP:
        split = [tags for title, tags in titled.items() if title.startswith(f"{statistic}: ")]
        assert len(split) == 5 and all(len(tags) <= MAX_LINES for tags in split)
        order = [t for tags in split for t in tags]
        assert order == [f"^{re.escape(tags.group_tag(statistic, g))}$" for g in groups]
    assert written >= {tags.group_tag(tags.GRAD_NORM, g) for g in groups}
    for tag in written:  # every chart draws something; every tag is on at most one chart
        on = [t for t, found in titled.items() if any(re.match(p, tag) for p in found)]
        assert len(on) <= 1, (tag, on)
    for title, patterns in titled.items():
        assert any(re.match(p, tag) for p in patterns for tag in written), title
    assert ("clip/threshold_optimizer1" in written) == (clip is not None)
    assert any("clip" in p for tags in titled.values() for p in tags) == (clip is not None)
    (global_chart,) = [tags for title, tags in titled.items() if title.startswith("global")]
    for tag in ("global/grad_norm", "global/grad_norm_optimizer1"):
        assert tag in written and any(re.match(p, tag) for p in global_chart)
    closed = {cat.title: cat.closed for cat in layout.category}
    assert set(closed) == {
        "gradwatch: global",
        "gradwatch: gradient norm per group",
        "gradwatch: gradient / parameter norm per group",
    }
    assert not closed["gradwatch: gradient norm per group"]
