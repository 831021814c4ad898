"""`gradwatch report` on event files written by TensorBoardSink: output, safety, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

import base64
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from test_pictures import GROUPS, SPIKE, synthetic_scalars

from gradwatch import keys
from gradwatch.monitor import Monitor
from gradwatch.record import Record
from gradwatch.report import main, report
from gradwatch.report.reader import parse_events, read_runs
from gradwatch.reporting import Reporter, events_markdown
from gradwatch.sinks import MemorySink, TensorBoardSink

EVENTS = [
    {"step": 5, "kind": "vanishing", "group": "embed", "value": 0.0, "threshold": 1e-10,
     "action": "warn"},
    {"step": SPIKE, "kind": "explosion", "group": "global", "value": 250.0, "threshold": 3.0,
     "action": "skip"},
]  # fmt: skip


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    """A 50-group run logged every 5 steps, with clipping scalars and two detections."""
    root = tmp_path_factory.mktemp("logs")
    rng = np.random.default_rng(0)
    with TensorBoardSink(root / "run_a") as sink:
        for step in range(0, 100, 5):
            scalars = synthetic_scalars(step, rng)
            scalars[keys.clip_tag(keys.THRESHOLD)] = 3.0
            scalars[keys.total_tag(keys.CLIPPED)] = min(scalars[keys.total_tag(keys.GLOBAL)], 3.0)
            events = [e for e in EVENTS if step - 5 < e["step"] <= step]
            texts = {keys.EVENTS: events_markdown(events)} if events else {}
            sink.write(Record(step, scalars=scalars, texts=texts))
    (root / "other" / "notes.txt").parent.mkdir()
    (root / "other" / "notes.txt").write_text("not a log")
    return root


def test_the_reader_keeps_depth_order_series_and_events(log_dir):
    (run,) = read_runs(log_dir)
    assert run.name == "run_a" and run.history.groups == tuple(GROUPS)
    steps, threshold = run.steps_and_values(keys.clip_tag(keys.THRESHOLD))
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
    # Norms decay with depth: the deepest groups are the smallest over the run, the first largest.
    smallest, largest = (
        re.findall(r"<tr><td><code>([^<]+)</code>", page.split(title)[1].split("</table>")[0])
        for title in ("Smallest (vanishing)", "Largest (exploding)")
    )
    assert len(smallest) == len(largest) == 3
    assert set(smallest) <= set(GROUPS[-8:]) and set(largest) <= set(GROUPS[:8])
    for data in page.split('src="data:image/png;base64,')[1:]:
        assert base64.b64decode(data.split('"')[0]).startswith(b"\x89PNG")


def test_png_format_writes_the_figures(log_dir, tmp_path):
    written = report(log_dir, tmp_path / "pngs", format="png", quiet=True)
    assert sorted(p.name for p in written) == [
        "run_a_depth_profile.png",
        "run_a_heatmap.png",
        "run_a_timeline.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
    assert report(log_dir, tmp_path / "pngs", format="png", quiet=True) == written  # its own


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
    reporter = Reporter(Monitor([memory, TensorBoardSink(tmp_path)]))
    scalars = {keys.group_tag(keys.GRAD_NORM, "a"): 1.0}
    with pytest.warns(UserWarning, match="stopped at step 3"):
        reporter.stop(Record(3, scalars=scalars, events=[cause]))
    reporter.close()
    ((_, text),) = memory.texts(keys.STOPPED)
    assert "<img" not in text
    (run,) = read_runs(tmp_path)
    assert run.stopped.startswith("stopped at step 3") and NASTY[2] in run.stopped
    assert [e["group"] for e in run.events] == [NASTY[2]]
