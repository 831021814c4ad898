"""Bad arguments every adapter refuses alike: ``(kwargs, error type, message fragment)``.

Each adapter's test module runs its own table: these shared rows plus its own. A fragment is
matched literally (``re.escape``), so it states the exact message.
"""

from __future__ import annotations

import numpy as np

from gradwatch.detectors import Explosion, Vanishing
from gradwatch.policies import AutoClip, ClipByNorm
from gradwatch.sinks import MemorySink

_CLIP = (
    "`clip` must be None, a positive float (the max global norm), or a policy: an object with"
    " init(like) and update(stats, state) methods (ClipByNorm, ClipByValue, AutoClip, ZClip, AGC,"
    " or your own). Received: clip="
)
_DETECTOR = (
    "must be None or a detector: an object with init(like, groups) and update(entries, state)"
    " methods"
)
_SINKS = "`sinks` must be a list or tuple of sinks (objects with write, flush and close)."

COMMON = [
    (
        {"statistics": "max"},
        ValueError,
        "`statistics` must be 'default', 'all', or a list of names from 'grad_norm',"
        " 'grad_to_param', 'grad_max_abs', 'grad_nonfinite', 'param_norm', 'update_to_param'."
        " Received: statistics='max'",
    ),
    (
        {"statistics": ["update_to_param"]},
        ValueError,
        "`statistics` names 'update_to_param', which needs `track_update_ratio=True`.",
    ),
    ({"log_every_n_steps": 0}, ValueError, "Received: log_every_n_steps=0"),
    ({"log_every_n_steps": "10"}, TypeError, "Received: log_every_n_steps='10'"),
    ({"log_every_n_steps": 2.0}, TypeError, "Received: log_every_n_steps=2.0"),
    (
        {"histogram_every_n_steps": -1},
        ValueError,
        "`histogram_every_n_steps` must be an int >= 0 (0 turns it off)."
        " Received: histogram_every_n_steps=-1",
    ),
    (
        {"log_dir": 3},
        TypeError,
        "`log_dir` must be a path, None (the default folder) or False (no event files)."
        " Received: log_dir=3",
    ),
    (
        {"track_update_ratio": "5"},
        TypeError,
        "`track_update_ratio` must be True or False. Received: track_update_ratio='5'",
    ),
    (
        {"track_signal": "5"},
        TypeError,
        "`track_signal` must be True or False. Received: track_signal='5'",
    ),
    (
        {"on_dead_units": "skip"},
        ValueError,
        "`on_dead_units` must be one of 'warn', 'stop', 'ignore'. Received: on_dead_units='skip'",
    ),
    (
        {"saturation": 0.5},
        TypeError,
        "`saturation` must be a Saturation or None. Received: saturation=0.5",
    ),
    (
        {"histogram_bins": 10**12},
        ValueError,
        "`histogram_bins` must be an int from 1 to 10000. Received: histogram_bins=10000" + "0" * 8,
    ),
    ({"histogram_bins": 0}, ValueError, "`histogram_bins` must be an int from 1 to 10000."),
    ({"histogram_bins": 2.5}, TypeError, "Received: histogram_bins=2.5"),
    ({"clip": -1}, ValueError, _CLIP + "-1"),
    ({"clip": float("nan")}, ValueError, _CLIP + "nan"),
    ({"clip": "auto"}, TypeError, _CLIP + "'auto'"),
    ({"clip": True}, TypeError, _CLIP + "True"),
    (
        {"clip": AutoClip},
        TypeError,
        "clip=<class 'gradwatch.policies.AutoClip'>; did you mean AutoClip()?",
    ),
    ({"clip": ClipByNorm}, TypeError, "; did you mean ClipByNorm()?"),
    (
        {"on_vanishing": "skip"},
        ValueError,
        "`on_vanishing` must be one of 'warn', 'stop', 'ignore'. Received: on_vanishing='skip'",
    ),
    (
        {"on_explosion": "explode"},
        ValueError,
        "`on_explosion` must be one of 'warn', 'skip', 'stop', 'ignore'."
        " Received: on_explosion='explode'",
    ),
    ({"on_nonfinite": None}, ValueError, "Received: on_nonfinite=None"),
    (
        {"explosion": 0},
        TypeError,
        f"`explosion` {_DETECTOR} (Explosion, or your own). Received: explosion=0",
    ),
    (
        {"explosion": Vanishing()},
        TypeError,
        "not a built-in detector of another kind. Received: explosion=Vanishing(",
    ),
    ({"explosion": AutoClip()}, TypeError, "Received: explosion=AutoClip("),  # a policy
    ({"clip": Explosion()}, TypeError, _CLIP + "Explosion("),  # a detector
    ({"explosion": Explosion}, TypeError, "; did you mean Explosion()?"),
    (
        {"vanishing": []},
        TypeError,
        f"`vanishing` {_DETECTOR} (Vanishing, or your own). Received: vanishing=[]",
    ),
]
"""Refused by every adapter."""

SINKS = [
    ({"sinks": "5"}, TypeError, f"{_SINKS} Received: sinks='5'"),
    ({"sinks": None}, TypeError, f"{_SINKS} Received: sinks=None"),
    ({"sinks": MemorySink()}, TypeError, "; did you mean sinks=[MemorySink(...)]?"),
    ({"sinks": [MemorySink]}, TypeError, "Received: sinks[0]=<class"),
    ({"sinks": [MemorySink(), 3]}, TypeError, f"{_SINKS} Received: sinks[1]=3"),
]
"""Refused by the adapters that take ``sinks`` (Keras, the plain torch loop)."""

NUMPY = {
    "log_every_n_steps": np.int64(5),
    "histogram_every_n_steps": np.int32(10),
    "histogram_bins": np.uint16(7),
    "track_update_ratio": np.bool_(True),
    "clip": np.float32(0.5),
}
"""numpy scalars where Python numbers are expected: accepted as the numbers they hold."""
