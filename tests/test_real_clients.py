"""A real Lightning run, served by a real TensorBoard, reported by `gradwatch report`, and the
report opened in headless Chromium (where Chromium is installed)."""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")
pytest.importorskip("matplotlib")

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from _models import Regressor, loader, trainer
from gradwatch import tags
from gradwatch.detectors import Explosion
from gradwatch.integrations.lightning import GradWatch, GradWatchWarning
from gradwatch.policies import ClipByNorm

pytestmark = pytest.mark.slow  # a Lightning run, TensorBoard, report processes, Chromium

GROUPS = ["net.0", "net.2", "net.4"]
RUN = "tb/version_0/gradwatch"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    """Twelve steps, histograms (and so pictures) every 4, clipping, an explosion every step."""
    root = tmp_path_factory.mktemp("run")
    watch = GradWatch(
        log_every_n_steps=2,
        histogram_every_n_steps=4,
        clip=ClipByNorm(0.05),
        explosion=Explosion(max_norm=1e-6),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        run = trainer(
            root, logger=TensorBoardLogger(root, name="tb"), callbacks=[watch], max_steps=12
        )
        run.fit(Regressor(lr=0.01), loader())
    assert watch.events, "the explosion detector must fire for the events table"
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(log_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--load_fast=false",
                "--reload_interval=1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **query: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def json(self, path: str, **query: str):
        return json.loads(self.get(path, **query))

    def wait_for(self, path: str, ready, timeout: float = 120.0):
        """Poll ``path`` until ``ready(json)`` (TensorBoard loads event files in the background)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode(errors="replace")
                pytest.fail(f"tensorboard exited with {self.process.returncode}:\n{output}")
            try:
                last = self.json(path)
                if ready(last):
                    return last
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        pytest.fail(f"tensorboard did not serve {path} in {timeout}s; last answer: {last}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def tensorboard(log_dir):
    server = TensorBoard(log_dir)
    yield server
    server.stop()
    assert server.process.poll() is not None


def test_tensorboard_serves_every_kind_of_summary(tensorboard):
    scalars = tensorboard.wait_for("/data/plugin/scalars/tags", lambda j: RUN in j)[RUN]
    for group in GROUPS:
        assert f"grad_norm/{group}" in scalars
    for tag in ("global/grad_norm", "global/clipped_norm", "clip/threshold"):
        assert tag in scalars

    listing = tensorboard.json("/data/plugins_listing")
    for plugin in ("scalars", "histograms", "images", "text", "custom_scalars"):
        assert listing[plugin]["enabled"], plugin

    histograms = tensorboard.json("/data/plugin/histograms/tags")[RUN]
    assert sorted(histograms) == [f"grad_hist/{g}" for g in GROUPS]

    images = tensorboard.json("/data/plugin/images/tags")[RUN]
    assert set(images) == {tags.HEATMAP, tags.DEPTH_PROFILE}
    entries = tensorboard.json("/data/plugin/images/images", run=RUN, tag=tags.HEATMAP)
    assert [e["step"] for e in entries] == [0, 3, 7, 11]  # the histogram cadence
    png = tensorboard.get("/data/plugin/images/individualImage?" + entries[-1]["query"])
    assert png.startswith(PNG)

    assert tensorboard.json("/data/plugin/text/tags")[RUN] == [tags.EVENTS]
    texts = tensorboard.json("/data/plugin/text/text", run=RUN, tag=tags.EVENTS)
    assert texts and "<table>" in texts[0]["text"]  # Markdown rendered as an HTML table
    assert "explosion" in texts[0]["text"]


def test_tensorboard_serves_the_custom_scalars_layout(tensorboard):
    tensorboard.wait_for("/data/plugin/scalars/tags", lambda j: RUN in j)
    layout = tensorboard.wait_for("/data/plugin/custom_scalars/layout", lambda j: bool(j))
    charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
    global_chart = charts["global gradient norm: before and after clipping, threshold"]
    patterns = global_chart["multiline"]["tag"]
    assert any(re.search(p, "global/clipped_norm") for p in patterns)
    assert any(re.search(p, "clip/threshold") for p in patterns)
    assert any(re.search(p, "global/grad_norm") for p in patterns)
    per_group = charts["grad_norm: groups 1-3 of 3 (net.0 … net.4)"]["multiline"]["tag"]
    assert [next(g for g in GROUPS if re.match(p, f"grad_norm/{g}")) for p in per_group] == GROUPS
    assert not any(re.match(p, "global/grad_norm") for p in per_group)
    assert "clip coefficient (1: not clipped)" in charts  # the run clips


def _report(log_dir: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("gradwatch")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gradwatch.cli"]
    return subprocess.run(
        [*command, "report", str(log_dir), "-o", str(output), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def report_html(log_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("report") / "report.html"
    done = _report(log_dir, output)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(output)
    return output


def test_the_report_of_a_lightning_run(report_html):
    page = report_html.read_text()
    assert 'content="gradwatch report"' in page
    assert f"<code>{RUN}</code>" in page
    images = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [name for name, _ in images] == ["timeline", "heatmap", "depth_profile"]
    assert all(base64.b64decode(data).startswith(PNG) for _, data in images)
    assert "http://" not in page and "https://" not in page and "<script" not in page  # offline
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>explosion</td>", page)
    assert rows and [int(r) for r in rows] == sorted(int(r) for r in rows)


def test_report_in_headless_chromium(report_html, tmp_path):
    browser = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None
    )
    if browser is None:
        pytest.skip("Chromium is not on PATH (Debian: apt-get install chromium)")
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--allow-file-access-from-files",
        # No network here: no background connections, no component or sync updates.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", report_html.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr
    assert dom.stdout.count("data:image/png;base64,") == 3
    shot = tmp_path / "page.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,2400", report_html.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    # The heatmap's viridis colours fill a block of the page: the images were decoded and
    # drawn (text, axes and the white page are all but colourless).
    colourful = pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3
    assert colourful.mean() > 0.01
