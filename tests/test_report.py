"""`gradwatch report` on event files written by TensorBoardSink: output, safety, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

import base64
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from test_pictures import GROUPS, NAN, SPIKE, synthetic_scalars

from gradwatch import tags
from gradwatch.pictures import png_bytes, timeline
from gradwatch.pictures.history import FlowMatrix
from gradwatch.record import Record
from gradwatch.report import main, report
from gradwatch.report.html import HEAD
from gradwatch.report.progress import ByteProgress
from gradwatch.report.reader import event_files, parse_events, read_runs
from gradwatch.report.risk import ALL_GROUPS, at_risk
from gradwatch.reporting import Reporter, events_markdown
from gradwatch.sinks import MemorySink, TensorBoardSink
from gradwatch.sinks.fanout import Fanout

EVENTS = [
    {"step": 5, "kind": "vanishing", "group": "embed", "value": 0.0, "threshold": 1e-10,
     "action": "warn"},
    {"step": SPIKE, "kind": "explosion", "group": "global", "value": 250.0, "threshold": 3.0,
     "action": "skip"},
]  # fmt: skip


_RISK_HEADINGS = ("<h4>Vanishing</h4>", "<h4>Exploding</h4>")


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    """A 50-group run logged every 5 steps, with clipping scalars and two detections."""
    root = tmp_path_factory.mktemp("logs")
    rng = np.random.default_rng(0)
    with TensorBoardSink(root / "run_a") as sink:
        for step in range(0, 100, 5):
            scalars = synthetic_scalars(step, rng)
            scalars[tags.clip_tag(tags.THRESHOLD)] = 3.0
            scalars[tags.total_tag(tags.CLIPPED)] = min(scalars[tags.total_tag(tags.GLOBAL)], 3.0)
            events = [e for e in EVENTS if step - 5 < e["step"] <= step]
            texts = {tags.EVENTS: events_markdown(events)} if events else {}
            sink.write(Record(step, scalars=scalars, texts=texts))
    (root / "other" / "notes.txt").parent.mkdir()
    (root / "other" / "notes.txt").write_text("not a log")
    return root


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """40 steps of 3 groups and the global norm: no clipping scalars, no detections."""
    root = tmp_path_factory.mktemp("small")
    with TensorBoardSink(root / "run") as sink:
        for step in range(40):
            scalars = {tags.group_tag(tags.GRAD_NORM, g): 1.0 + step for g in ("a", "b", "c")}
            scalars[tags.total_tag(tags.GLOBAL)] = 2.0 + step
            sink.write(Record(step, scalars=scalars))
    return root


def test_the_reader_keeps_depth_order_series_and_events(log_dir):
    (run,) = read_runs(log_dir)
    assert run.name == "run_a" and run.history.groups == tuple(GROUPS)
    steps, threshold = run.steps_and_values(tags.clip_tag(tags.THRESHOLD))
    assert steps.tolist() == list(range(0, 100, 5)) and set(threshold) == {3.0}
    assert [(e["step"], e["kind"], e["group"], e["action"]) for e in run.events] == [
        (5, "vanishing", "embed", "warn"),
        (SPIKE, "explosion", "global", "skip"),
    ]


def test_html_report_is_self_contained(log_dir, tmp_path):
    (path,) = report(log_dir, tmp_path / "out" / "r.html", steps=[0, SPIKE], top=3, quiet=True)
    page = path.read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "<script" not in page and "http" not in page.replace('name="generator"', "")
    assert '<td class="num">60</td><td>explosion</td><td><code>global</code>' in page
    # Ratios decay with depth by two decades (one each side of the median, less than the 2.5
    # that name a group): only the group that was NaN at a logged step is at risk.
    vanishing, exploding = (page.split(title)[1].split("<h")[0] for title in _RISK_HEADINGS)
    assert vanishing.strip().startswith(
        '<p class="no-risk">None: no group more than 2.5 decades below'
    )
    assert re.findall(r"<tr><td><code>([^<]+)</code></td><td><code>([^<]+)</code>", exploding) == [
        (GROUPS[NAN[1]], "encoder.layers.#.mlp")
    ]
    for data in page.split('src="data:image/png;base64,')[1:]:
        assert base64.b64decode(data.split('"')[0]).startswith(b"\x89PNG")


def resnet_ratios(steps: int = 8) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """A healthy ResNet's groups, ratios and norms: as measured, a BatchNorm's ratio is ~1
    decade below its convolution's, its raw norm smaller still."""
    groups = ["conv1", "bn1"]
    for stage in range(1, 5):
        for block in range(2):
            groups += [f"layer{stage}.{block}.{name}" for name in ("conv1", "bn1", "conv2", "bn2")]
    groups.append("fc")
    rng = np.random.default_rng(0)
    ratio = np.array([-1.2 if ".conv" in g or g == "conv1" else -2.2 for g in groups])
    ratio = 10 ** (ratio[:, None] + 0.3 * rng.normal(size=(len(groups), steps)))
    return tuple(groups), ratio, ratio * 30


def test_a_healthy_run_names_no_group_though_kinds_differ_by_decades():
    groups, ratio, norm = resnet_ratios()
    flow = FlowMatrix(groups, np.arange(8), norm, ratio)
    assert at_risk(flow) == ([], [])
    assert at_risk(flow, decades=1.0) == ([], [])  # each is within a decade of its own kind


def test_a_dead_and_an_exploding_group_are_named_against_their_kind():
    groups, ratio, norm = resnet_ratios()
    dead, huge, nan = groups.index("layer2.0.conv2"), groups.index("layer3.1.bn1"), 1
    ratio[dead] = 0.0
    ratio[huge] *= 1e4
    ratio[nan, 3] = np.inf
    vanishing, exploding = at_risk(FlowMatrix(groups, np.arange(8), norm, ratio))
    assert [(r.group, r.kind, r.zero_steps) for r in vanishing] == [
        ("layer2.0.conv2", "layer#.#.conv#", 8)
    ]
    assert [(r.group, r.kind, r.nonfinite_steps) for r in exploding] == [
        ("bn1", ALL_GROUPS, 1),  # a kind of its own (with conv1 it is in no stack): all groups
        ("layer3.1.bn1", "layer#.#.bn#", 0),
    ]
    assert 3.5 < exploding[1].decades < 4.5


def test_a_depth_trend_names_its_small_end_vanishing_and_nothing_exploding():
    """A deep sigmoid net: each layer's ratio 0.7 decades below the next one's."""
    groups = (*(f"blocks.{i}.linear" for i in range(20)), "head")
    ratio = (10 ** np.linspace(-14, 0, 21))[:, None].repeat(4, axis=1)
    vanishing, exploding = at_risk(FlowMatrix(groups, np.arange(4), ratio, ratio), top=20)
    assert [r.group for r in vanishing] == list(groups[:6]) and exploding == []


def test_a_kind_mostly_dead_does_not_make_its_living_members_exploding():
    groups = tuple(f"blocks.{i}.linear" for i in range(10))
    ratio = np.full((10, 4), 1e-3)
    ratio[:6] = 0.0
    vanishing, exploding = at_risk(FlowMatrix(groups, np.arange(4), ratio, ratio), top=10)
    assert [r.group for r in vanishing] == list(groups[:6]) and exploding == []


def test_png_format_writes_the_figures(log_dir, tmp_path):
    written = report(log_dir, tmp_path / "pngs", format="png", quiet=True)
    assert sorted(p.name for p in written) == [
        "run_a_depth_profile.png",
        "run_a_heatmap.png",
        "run_a_timeline.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert report(log_dir, tmp_path / "pngs", format="png", quiet=True) == written  # its own


def test_a_run_with_the_signal_gets_a_signal_propagation_section(tmp_path):
    """Written with track_signal (act_grad_rms per group): the report draws the backward
    signal's heatmap under its own heading, and says how far it fell from output to input."""
    with TensorBoardSink(tmp_path / "logs" / "run") as sink:
        for step in range(0, 40, 5):
            scalars = {tags.group_tag(tags.GRAD_NORM, g): 1.0 for g in ("a", "b", "c")}
            backward = {"a": 1e-9, "b": 1e-4, "c": 1.0}  # vanishing toward the input
            for group, value in backward.items():
                scalars[tags.group_tag(tags.ACT_GRAD_RMS, group)] = value
            scalars[tags.total_tag(tags.GLOBAL)] = 2.0
            sink.write(Record(step, scalars=scalars))
    (page,) = report(tmp_path / "logs", tmp_path / "report.html", quiet=True)
    text = page.read_text()
    assert "<h3>Signal propagation</h3>" in text and 'alt="signal_heatmap"' in text
    assert "it is 1e-09 at the first group of its value at the last" in text
    pngs = report(tmp_path / "logs", tmp_path / "pngs", format="png", quiet=True)
    assert {"run_signal_heatmap.png", "run_signal_profile.png"} <= {p.name for p in pngs}


def test_never_replaces_a_file_it_did_not_write(log_dir, tmp_path, capsys):
    mine = tmp_path / "report.html"
    mine.write_text("<html>my notes</html>")
    assert main([str(log_dir), "-o", str(mine), "-q"]) == 2
    error = capsys.readouterr().err
    assert "-o/--output" in error and "was not written by gradwatch" in error
    assert mine.read_text() == "<html>my notes</html>"
    png = tmp_path / "pngs" / "run_a_heatmap.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG\r\n\x1a\n someone else's")
    assert main([str(log_dir), "--format", "png", "-o", str(png.parent), "-q"]) == 2
    assert png.read_bytes() == b"\x89PNG\r\n\x1a\n someone else's"
    assert main([str(log_dir), "-o", str(tmp_path / "again.html"), "-q"]) == 0
    assert main([str(log_dir), "-o", str(tmp_path / "again.html"), "-q"]) == 0  # replaces its own


def test_a_directory_without_gradwatch_data(tmp_path, capsys):
    assert main([str(tmp_path), "-q", "-o", str(tmp_path / "r.html")]) == 1
    assert "No TensorBoard event files below" in capsys.readouterr().err
    with TensorBoardSink(tmp_path / "tb") as sink:
        sink.write(Record(0, scalars={"loss": 1.0}))
    assert main([str(tmp_path), "-q", "-o", str(tmp_path / "r.html")]) == 1
    assert "No gradwatch data" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing_dir"], "LOGDIR must be an existing directory. Received: 'missing_dir'"),
        (["{log_dir}", "--steps", "a,b"], "argument --steps: must be comma-separated steps"),
        (["{log_dir}", "--top", "0"], "argument --top: must be an integer >= 1. Received: '0'"),
        (["{log_dir}", "--format", "svg"], "argument --format: invalid choice: 'svg'"),
    ],
)
def test_bad_arguments_name_the_argument(log_dir, args, message, capsys):
    args = [a.format(log_dir=log_dir) for a in args]
    try:
        status = main(args)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # two report processes, each importing TensorFlow through TensorBoard's reader
def test_console_script_and_module_entry_point(log_dir, tmp_path):
    script = Path(sys.executable).with_name("gradwatch")
    commands = [[sys.executable, "-m", "gradwatch.report", str(log_dir)]]
    if script.exists():
        commands.append([str(script), "report", str(log_dir)])
    for i, command in enumerate(commands):
        output = tmp_path / f"r{i}.html"
        done = subprocess.run(
            [*command, "-o", str(output)], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        assert "reading" in done.stderr and "100" in done.stderr  # the progress bar
        assert output.read_text().count("data:image/png;base64,") == 3


NASTY = [
    "a`b",
    "x | y",
    '<img src="http://example.com/x.png">',
    "<script>alert(1)</script>",
    "*bold* _it_ ~~del~~",
    "[x](http://example.com)",
    "a\\`b &amp; &#96;",
    " 编码 ",
    "line\nbreak\u2028",
    "# heading",
]


class _Page(HTMLParser):
    """The elements of an HTML page and the text of its ``<code>`` elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: set[str] = set()
        self.code: list[str] = []
        self._in_code = False

    def handle_starttag(self, tag, attrs) -> None:
        self.elements.add(tag)
        if tag == "code":
            self._in_code = True
            self.code.append("")

    def handle_endtag(self, tag) -> None:
        self._in_code = self._in_code and tag != "code"

    def handle_data(self, data) -> None:
        if self._in_code:
            self.code[-1] += data


def test_group_names_in_the_events_table_are_text_and_read_back():
    events = [
        {"step": i, "kind": "explosion", "group": name, "value": 2.5, "threshold": 1.0,
         "action": "warn"}
        for i, name in enumerate(NASTY)
    ]  # fmt: skip
    markdown = events_markdown(events)
    assert "<img" not in markdown and "<script" not in markdown and "`" not in markdown
    assert list(parse_events(markdown)) == events
    # What TensorBoard's text dashboard makes of it: Markdown, then its HTML sanitizer.
    from tensorboard.plugin_util import markdown_to_safe_html

    page = _Page()
    page.feed(markdown_to_safe_html(markdown))
    assert page.elements == {"table", "thead", "tbody", "tr", "th", "td", "code"}
    assert page.code == NASTY  # every name shown as it is


def test_the_stop_text_is_text_and_read_back(tmp_path):
    cause = {"step": 3, "kind": "nonfinite", "group": NASTY[2], "value": float("nan"),
             "threshold": float("inf"), "action": "stop"}  # fmt: skip
    memory = MemorySink()
    reporter = Reporter(Fanout([memory, TensorBoardSink(tmp_path)]))
    scalars = {tags.group_tag(tags.GRAD_NORM, "a"): 1.0}
    with pytest.warns(UserWarning, match="stopped at step 3"):
        reporter.stop(Record(3, scalars=scalars, events=[cause]))
    reporter.close()
    ((_, text),) = memory.texts(tags.STOPPED)
    assert "<img" not in text
    (run,) = read_runs(tmp_path)
    assert run.stopped.startswith("stopped at step 3") and NASTY[2] in run.stopped
    assert [e["group"] for e in run.events] == [NASTY[2]]


def _one_line(error: str) -> str:
    lines = error.strip().splitlines()
    assert len(lines) == 1, error
    return lines[0]


def test_a_file_that_only_mentions_gradwatch_report_is_refused(small_run, tmp_path, capsys):
    notes = tmp_path / "NOTES.md"
    text = (
        "# Notes\nRun `gradwatch report logs -o NOTES.md`; its pages start with\n"
        '<meta name="generator" content="gradwatch report">\n'
    )
    notes.write_text(text)
    assert main([str(small_run), "-q", "-o", str(notes)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "was not written by gradwatch" in line and "--force" in line
    assert notes.read_text() == text
    assert main([str(small_run), "-q", "-o", str(notes), "--force"]) == 0
    assert notes.read_text().startswith(HEAD)


def test_a_png_is_replaced_only_with_gradwatchs_own_text_chunk(small_run, tmp_path):
    figure = timeline({"global": (np.arange(3), np.ones(3))})
    other = png_bytes(figure, Software="matplotlib", Comment="drawn for gradwatch")
    assert b"gradwatch" in other[:4096]  # the word, not gradwatch's chunk
    folder = tmp_path / "pngs"
    folder.mkdir()
    (folder / "run_heatmap.png").write_bytes(other)
    assert main([str(small_run), "-q", "--format", "png", "-o", str(folder)]) == 2
    assert (folder / "run_heatmap.png").read_bytes() == other
    (folder / "run_heatmap.png").write_bytes(png_bytes(figure))  # one gradwatch drew
    assert main([str(small_run), "-q", "--format", "png", "-o", str(folder)]) == 0
    assert (folder / "run_heatmap.png").read_bytes() != png_bytes(figure)


def test_a_report_gradwatch_wrote_is_replaced_without_force(small_run, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(HEAD + "<p>an older report</p>")
    assert main([str(small_run), "-q", "-o", str(page)]) == 0
    assert "an older report" not in page.read_text()


def test_a_symbolic_link_is_never_replaced_silently(small_run, tmp_path, capsys):
    target = tmp_path / "site" / "report.html"
    target.parent.mkdir()
    target.write_text(HEAD + "<p>an older report</p>")
    link = tmp_path / "report.html"
    link.symlink_to(target)
    assert main([str(small_run), "-q", "-o", str(link)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "is a symbolic link" in line and "--force" in line
    assert link.is_symlink() and "an older report" in target.read_text()
    assert main([str(small_run), "-q", "-o", str(link), "--force"]) == 0
    assert capsys.readouterr().out.strip() == str(target)  # --force writes to the link's target
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert "an older report" not in target.read_text()


@pytest.mark.parametrize("format", ["html", "png"])
def test_an_output_below_a_regular_file_is_one_line(small_run, tmp_path, capsys, format):
    (tmp_path / "file").write_text("a file")
    output = tmp_path / "file" / "sub" / "out"
    assert main([str(small_run), "-q", "--format", format, "-o", str(output)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("gradwatch report: error: -o/--output: cannot write ")
    assert line.endswith(f"{tmp_path / 'file'} is not a directory")


def test_a_read_only_directory_is_one_line(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes into any directory unless it gives up that capability
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root, setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set=-dac_override", "--"]
    code = (
        "import sys; from pathlib import Path\n"
        "from gradwatch.report.output import ReportError, html_mark, write_safely\n"
        "try:\n"
        "    write_safely(Path(sys.argv[1]), b'page', html_mark('x'), '-o/--output')\n"
        "except ReportError as error:\n"
        "    print(error)\n"
    )
    output = folder / "report.html"
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(output)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        folder.chmod(0o755)
    if prefix and done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"setpriv cannot drop CAP_DAC_OVERRIDE here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"-o/--output: cannot write {output}: permission denied"
    assert not output.exists()


def _record_starts(data: bytes) -> list[int]:
    starts, offset = [], 0
    while offset < len(data):
        starts.append(offset)
        offset += 16 + struct.unpack("<Q", data[offset : offset + 8])[0]
    return starts


def _flip_middle(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    return bytes(damaged)


def _flip_a_length(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[_record_starts(data)[20]] ^= 0x01
    return bytes(damaged)


@pytest.mark.parametrize(
    "damage",
    [_flip_middle, lambda data: data[:-10], _flip_a_length],
    ids=["flipped byte", "truncated", "flipped length"],
)
def test_damaged_event_files_are_read_around_the_damage(small_run, tmp_path, capsys, damage):
    log_dir = tmp_path / "logs"
    shutil.copytree(small_run, log_dir)
    (file,) = event_files(log_dir)
    file.write_bytes(damage(file.read_bytes()))
    output = tmp_path / "report.html"
    assert main([str(log_dir), "-q", "-o", str(output)]) == 0  # a warning, not a failure
    warning = _one_line(capsys.readouterr().err)
    assert warning.startswith(f"gradwatch report: warning: {file}: skipped 1 damaged or trunc")
    assert warning.endswith("read 40 intact ones.")  # the file-version event and 39 steps
    page = output.read_text()
    assert "3 groups, 39 logged steps" in page and '<p class="damaged">' in page


def test_a_file_of_garbage_is_one_damaged_record(small_run, tmp_path):
    log_dir = tmp_path / "logs"
    shutil.copytree(small_run, log_dir)
    garbage = log_dir / "run" / "events.out.tfevents.0.garbage"
    garbage.write_bytes(np.random.default_rng(0).bytes(300_000))
    (run,) = read_runs(log_dir)
    assert len(run.history) == 40
    ((damaged),) = run.damaged
    assert (damaged.path, damaged.damaged, damaged.damaged_bytes) == (garbage, 1, 300_000)


def test_captions_name_only_what_the_timeline_draws(small_run, log_dir, tmp_path):
    (plain,) = report(small_run, tmp_path / "plain.html", quiet=True)
    caption = re.findall("<figcaption>(.*?)</figcaption>", plain.read_text())[0]
    assert caption == "Global gradient norm over time."  # no clip scalars, no detections
    (full,) = report(log_dir, tmp_path / "full.html", quiet=True)
    caption = re.findall("<figcaption>(.*?)</figcaption>", full.read_text())[0]
    assert caption == (
        "Global gradient norm over time, with the clip threshold, the norm after clipping and "
        "detections marked."
    )


def test_progress_shows_no_time_left_before_it_has_a_rate():
    with ByteProgress(1_000_000, stream=io.StringIO()) as progress:
        time.sleep(0.5)  # TensorBoard's reader importing TensorFlow
        progress(1_000)
        assert progress.bar.format_dict["elapsed"] < 0.5  # the clock starts at the first bytes
        assert "<" not in str(progress.bar)  # no time left at 0.1%
        progress(100_000)
        assert "<" in str(progress.bar)  # [elapsed<remaining, rate] from 5% on


def test_progress_is_tqdm_or_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = io.StringIO()
    with ByteProgress(10, stream=stream) as progress:
        progress(10)
    assert progress.bar is None and progress.done == 10 and stream.getvalue() == ""


def test_two_writers_in_one_folder_are_two_runs(tmp_path):
    """Two processes (or two fits) given the same log_dir: the report keeps them apart."""
    rng = np.random.default_rng(0)
    for _ in range(2):
        with TensorBoardSink(tmp_path / "shared") as sink:
            for step in range(3):
                sink.write(Record(step, scalars=synthetic_scalars(step, rng)))
    runs = read_runs(tmp_path)
    assert len(runs) == 2 and all(len(run.history) == 3 for run in runs)
    assert runs[0].name != runs[1].name and all(r.name.startswith("shared (") for r in runs)
