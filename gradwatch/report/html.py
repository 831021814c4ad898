"""One self-contained HTML page: images inline as base64, no scripts, no network."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence

from gradwatch.report.figures import captions
from gradwatch.report.reader import Run
from gradwatch.report.risk import DECADES, MIN_KIND, GroupRisk

__all__ = ["HEAD", "page"]

# Every page starts with exactly these bytes: the mark by which gradwatch tells its own pages
# from other files (see gradwatch.report.output). Changing them orphans the pages written before.
HEAD = (
    "<!DOCTYPE html>\n"
    '<html lang="en"><head><meta charset="utf-8">\n'
    '<meta name="generator" content="gradwatch report">\n'
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figure.half { display: inline-block; width: 48.5%; margin-right: 1%; vertical-align: top; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f3f3f3; }
p.stopped, p.damaged { color: #b00020; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.95em; }
"""


def page(
    log_dir: str,
    runs: Sequence[Run],
    figures: Mapping[str, Mapping[str, bytes]],
    risks: Mapping[str, tuple[list[GroupRisk], list[GroupRisk]]],
) -> str:
    """The report of ``runs``: per run, its figures, detections and groups most at risk."""
    parts = [
        f"<title>gradwatch report: {_e(log_dir)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>gradwatch report</h1><p>Log directory: <code>{_e(log_dir)}</code></p>",
    ]
    parts += [
        f'<p class="stopped"><strong>Run <code>{_e(run.name)}</code>: {_e(run.stopped)}</strong>'
        "</p>"
        for run in runs
        if run.stopped
    ]
    for run in runs:
        vanishing, exploding = risks[run.name]
        matrix = run.history.matrix()
        parts += [
            f'<section class="run"><h2>Run <code>{_e(run.name)}</code></h2>',
            f"<p>{len(matrix.groups)} groups, {len(matrix.steps)} logged steps"
            f" ({int(matrix.steps[0])} to {int(matrix.steps[-1])}).</p>",
        ]
        if run.stopped:
            parts.append(f'<p class="stopped">gradwatch {_e(run.stopped)}.</p>')
        parts += [f'<p class="damaged">{_e(file.damage())}</p>' for file in run.damaged]
        texts = captions(run)
        for name, png in figures[run.name].items():
            if name == "signal_heatmap":
                parts.append("<h3>Signal propagation</h3>")
            encoded = base64.b64encode(png).decode("ascii")
            half = ' class="half"' if name in _SIDE_BY_SIDE else ""
            parts.append(
                f'<figure{half}><img alt="{_e(name)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption>{_e(texts.get(name, name))}</figcaption></figure>"
            )
        parts += [
            "<h3>Detections</h3>",
            _events_table(run.events),
            "<h3>Groups at risk</h3>",
            _RISK_RULE,
            "<h4>Vanishing</h4>",
            _risk_table(vanishing, "below its kind, nor zero at half its logged steps or more"),
            "<h4>Exploding</h4>",
            _risk_table(exploding, "above the rest of its kind, nor NaN/Inf at any logged step"),
            "</section>",
        ]
    parts.append("</body></html>")
    return HEAD + "\n".join(parts)


# narrow pictures, drawn for TensorBoard's cards
_SIDE_BY_SIDE = ("heatmap", "depth_profile", "signal_heatmap", "signal_profile")
_RISK_RULE = (
    "<p>Groups are compared by their median gradient norm / parameter norm over the run, which"
    " does not grow with a group's size, and each with the groups of its kind: those whose names"
    " differ from its own only in their numbers (<code>layer#.#.bn#</code>, the same layer in"
    f" every block), or with all groups when its kind has fewer than {MIN_KIND}. A group is"
    f" vanishing when it is more than {DECADES:g} decades ({10**DECADES:,.0f} times) below its"
    " kind's median, or its gradient was zero at half its logged steps or more; exploding when"
    f" it stands more than {DECADES:g} decades above all the rest of its kind (with fewer than"
    " half of it), or its gradient was NaN/Inf at any logged step.</p>"
)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _events_table(events: Sequence[dict]) -> str:
    if not events:
        return '<p class="no-events">No detections.</p>'
    head = "".join(
        f"<th>{h}</th>" for h in ("step", "kind", "group", "value", "threshold", "action")
    )
    rows = [
        f'<tr><td class="num">{e["step"]}</td><td>{_e(e["kind"])}</td>'
        f'<td><code>{_e(e["group"])}</code></td><td class="num">{_number(e["value"])}</td>'
        f'<td class="num">{_number(e["threshold"])}</td><td>{_e(e["action"])}</td></tr>'
        for e in events
    ]
    return f'<table class="events"><tr>{head}</tr>{"".join(rows)}</table>'


def _risk_table(risks: Sequence[GroupRisk], none: str) -> str:
    if not risks:
        return f'<p class="no-risk">None: no group more than {DECADES:g} decades {none}.</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "group",
            "compared with",
            "median ratio",
            "decades from its kind",
            "zero steps",
            "NaN/Inf steps",
        )
    )
    rows = [
        f"<tr><td><code>{_e(r.group)}</code></td><td><code>{_e(r.kind)}</code></td>"
        f'<td class="num">{_number(r.median)}</td><td class="num">{_signed(r.decades)}</td>'
        f'<td class="num">{r.zero_steps} of {r.logged_steps}</td>'
        f'<td class="num">{r.nonfinite_steps}</td></tr>'
        for r in risks
    ]
    return f'<table class="risk"><tr>{head}</tr>{"".join(rows)}</table>'


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "n/a"
