"""Records as JSON-ready dicts, for the dumps of the multi-process test scripts."""

from __future__ import annotations

from gradwatch.record import Record


def as_json(record: Record) -> dict:
    histograms = {
        tag: {
            "min": h.min,
            "max": h.max,
            "num": h.num,
            "sum": h.sum,
            "sum_squares": h.sum_squares,
            "counts": list(h.counts),
        }
        for tag, h in record.histograms.items()
    }
    return {"step": record.step, "scalars": record.scalars, "histograms": histograms}
