"""`gradwatch report` on event files written by TensorBoardSink: output, safety, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

import base64
import io
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_pictures import GROUPS, SPIKE, synthetic_scalars

from gradwatch import keys
from gradwatch.record import Record
from gradwatch.report import main, report
from gradwatch.report.output import ReportError
from gradwatch.report.progress import ByteProgress
from gradwatch.report.reader import read_runs
from gradwatch.reporting import events_markdown
from gradwatch.sinks import TensorBoardSink

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


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """40 steps of 3 groups and the global norm: no clipping scalars, no detections."""
    root = tmp_path_factory.mktemp("small")
    with TensorBoardSink(root / "run") as sink:
        for step in range(40):
            scalars = {keys.group_tag(keys.GRAD_NORM, g): 1.0 + step for g in ("a", "b", "c")}
            scalars[keys.total_tag(keys.GLOBAL)] = 2.0 + step
            sink.write(Record(step, scalars=scalars))
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


def test_progress_is_tqdm_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ReportError, match=r"needs tqdm: pip install 'gradwatch\[report\]'"):
        ByteProgress(10)
    assert ByteProgress(10, quiet=True).bar is None
