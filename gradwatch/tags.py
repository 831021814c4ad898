"""Every tag gradwatch writes is named here, and only here.

TensorBoard groups charts by the part of a tag before the first ``/``, so each statistic is
a prefix (``grad_norm``) and each group a suffix (``grad_norm/blocks.0.attn``). Tags never
contain floats (Lightning's own ``grad_2.0_norm`` keys cannot collide with ours). A group's
suffix is its name, in any script, with what TensorFlow's summary ops and MLflow's metric names
would refuse replaced (:func:`sanitize`); distinct groups always get distinct suffixes
(:func:`group_names`).

The table of tags in the README is generated from :data:`TAGS` by :func:`markdown_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

__all__ = [
    "DEFAULT_STATISTICS",
    "DEPTH_PROFILE",
    "GLOBAL",
    "HEATMAP",
    "LAYOUT",
    "SIGNAL_HEATMAP",
    "SIGNAL_PROFILE",
    "SIGNAL_STATISTICS",
    "STATISTICS",
    "TAGS",
    "TagSpec",
    "amp_tag",
    "clip_tag",
    "group_names",
    "group_tag",
    "markdown_table",
    "sanitize",
    "total_tag",
]

Kind = Literal["scalar", "histogram", "text", "image", "layout"]


class TagSpec(NamedTuple):
    """One family of tags: its pattern, what kind of summary it is, and what it means."""

    pattern: str
    kind: Kind
    cadence: str
    meaning: str


# Per-group statistics (a group is a module, a parameter, or what `group_by` returns).
GRAD_NORM = "grad_norm"
GRAD_MAX_ABS = "grad_max_abs"
GRAD_NONFINITE = "grad_nonfinite"
PARAM_NORM = "param_norm"
GRAD_TO_PARAM = "grad_to_param"
UPDATE_TO_PARAM = "update_to_param"
GRAD_HISTOGRAM = "grad_hist"
# The forward and backward signal at each group's module, with `track_signal=True`.
ACT_RMS = "act_rms"
ACT_MEAN = "act_mean"
ACT_GRAD_RMS = "act_grad_rms"
ACT_GAIN = "act_gain"
ACT_DEAD = "act_dead"
ACT_SATURATED = "act_saturated"
SIGNAL_STATISTICS = (ACT_GRAD_RMS, ACT_GAIN, ACT_RMS, ACT_MEAN, ACT_DEAD, ACT_SATURATED)
# Which per-group statistics are written: the first two at the defaults (two charts a group),
# the others on request (`statistics=`). Non-finite values are reported through the events
# whatever is chosen.
DEFAULT_STATISTICS = (GRAD_NORM, GRAD_TO_PARAM)
STATISTICS = (GRAD_NORM, GRAD_TO_PARAM, GRAD_MAX_ABS, GRAD_NONFINITE, PARAM_NORM, UPDATE_TO_PARAM)
# Whole-model statistics.
TOTAL = "global"  # whole-model statistics: the section TensorBoard lists before the groups
GLOBAL = "grad_norm"
MAX_SINCE_LAST_LOG = "max_since_last_log"
NONFINITE_STEPS = "nonfinite_steps"
SKIPPED_STEPS = "skipped_steps"
CLIPPED = "clipped_norm"
# Clipping.
CLIP = "clip"
THRESHOLD = "threshold"
COEFFICIENT = "coefficient"
# Loss scaling (mixed precision).
AMP_SKIPPED = "amp/skipped_steps"
# Whole-model tags of a model with several optimizers end in `_optimizer<index>`.
OPTIMIZER = "_optimizer"
# Text events.
EVENTS = "gradwatch/events"
STOPPED = "gradwatch/stopped"
# Pictures of gradient flow, and TensorBoard's Custom Scalars layout.
FLOW = "grad_flow"
HEATMAP = f"{FLOW}/heatmap"
DEPTH_PROFILE = f"{FLOW}/depth_profile"
SIGNAL_HEATMAP = f"{FLOW}/signal_heatmap"
SIGNAL_PROFILE = f"{FLOW}/signal_profile"
LAYOUT = "custom_scalars__config__"  # the tag TensorBoard's custom_scalars plugin reads

LOGGING = "every `log_every_n_steps`"
SIGNAL = f"{LOGGING}, with `track_signal=True`"

TAGS: tuple[TagSpec, ...] = (
    TagSpec(f"{GRAD_NORM}/<group>", "scalar", LOGGING, "L2 norm of the group's gradient"),
    TagSpec(f"{GRAD_TO_PARAM}/<group>", "scalar", LOGGING, "gradient norm / parameter norm"),
    TagSpec(
        f"{GRAD_MAX_ABS}/<group>",
        "scalar",
        f"{LOGGING}, with `statistics=`",
        "largest absolute gradient value",
    ),
    TagSpec(
        f"{GRAD_NONFINITE}/<group>",
        "scalar",
        f"{LOGGING}, with `statistics=`",
        "count of NaN/Inf gradient values",
    ),
    TagSpec(
        f"{PARAM_NORM}/<group>",
        "scalar",
        f"{LOGGING}, with `statistics=`",
        "L2 norm of the group's parameters",
    ),
    TagSpec(
        f"{UPDATE_TO_PARAM}/<group>",
        "scalar",
        f"{LOGGING}, with `track_update_ratio=True` or `statistics=`",
        "norm of the optimizer's update / parameter norm",
    ),
    TagSpec(
        f"{ACT_RMS}/<group>",
        "scalar",
        SIGNAL,
        "RMS of the group module's outputs on the logging step's batch (the forward signal)",
    ),
    TagSpec(f"{ACT_MEAN}/<group>", "scalar", SIGNAL, "mean of the group module's outputs"),
    TagSpec(
        f"{ACT_GRAD_RMS}/<group>",
        "scalar",
        SIGNAL,
        "RMS of dL/d(output) of the group's module (the backward signal)",
    ),
    TagSpec(
        f"{ACT_GAIN}/<group>",
        "scalar",
        SIGNAL,
        "backward signal RMS here / at the next group toward the output (about 1: healthy)",
    ),
    TagSpec(
        f"{ACT_DEAD}/<group>",
        "scalar",
        SIGNAL,
        "fraction of outputs exactly zero (of the activation ending or following the module)",
    ),
    TagSpec(
        f"{ACT_SATURATED}/<group>",
        "scalar",
        f"{SIGNAL}, after a bounded activation",
        "fraction of tanh outputs beyond 0.99 in size, of sigmoid outputs outside [0.01, 0.99]",
    ),
    TagSpec(
        f"{TOTAL}/{GLOBAL}<optimizer>",
        "scalar",
        LOGGING,
        "global gradient L2 norm over all groups of the optimizer",
    ),
    TagSpec(
        f"{TOTAL}/{MAX_SINCE_LAST_LOG}<optimizer>",
        "scalar",
        LOGGING,
        "largest finite global norm of any step since the previous logging step",
    ),
    TagSpec(
        f"{TOTAL}/{NONFINITE_STEPS}<optimizer>",
        "scalar",
        LOGGING,
        "steps since the previous logging step whose gradients were not finite",
    ),
    TagSpec(
        f"{TOTAL}/{SKIPPED_STEPS}<optimizer>",
        "scalar",
        f'{LOGGING}, with a `"skip"` or `"stop"` action',
        "optimizer steps gradwatch dropped since the start of the run",
    ),
    TagSpec(
        f"{AMP_SKIPPED}<optimizer>",
        "scalar",
        f"{LOGGING}, with a loss scaler",
        "steps the loss scaler dropped (its overflow checks, not faults) since the start",
    ),
    TagSpec(
        f"{TOTAL}/{CLIPPED}<optimizer>",
        "scalar",
        f"{LOGGING}, with `clip=`",
        "global gradient norm after clipping",
    ),
    TagSpec(
        f"{CLIP}/{THRESHOLD}<optimizer>",
        "scalar",
        f"{LOGGING}, with `clip=`",
        "the policy's bound: max norm, percentile or z-score bound, max value, AGC factor",
    ),
    TagSpec(
        f"{CLIP}/{COEFFICIENT}<optimizer>",
        "scalar",
        f"{LOGGING}, with `clip=`",
        "factor the gradients were scaled by (smallest unit's for AGC; 1: not clipped)",
    ),
    TagSpec(
        f"{GRAD_HISTOGRAM}/<group>",
        "histogram",
        "`histogram_every_n_steps`",
        "distribution of the group's finite gradient values",
    ),
    TagSpec(EVENTS, "text", "when a detector fires", "what was detected, where, and what was done"),
    TagSpec(STOPPED, "text", "when gradwatch stops training", "the step and the cause"),
    TagSpec(
        HEATMAP,
        "image",
        "`histogram_every_n_steps`, with matplotlib",
        "log10 gradient norm / parameter norm of every group (rows, in depth order) at every"
        " logged step",
    ),
    TagSpec(
        DEPTH_PROFILE,
        "image",
        "`histogram_every_n_steps`, with matplotlib",
        "gradient norm / parameter norm per group, in depth order, at the last logged step",
    ),
    TagSpec(
        SIGNAL_HEATMAP,
        "image",
        "`histogram_every_n_steps`, with matplotlib and `track_signal=True`",
        "log10 RMS of dL/d(output) of every group (rows, in depth order) at every logged step",
    ),
    TagSpec(
        SIGNAL_PROFILE,
        "image",
        "`histogram_every_n_steps`, with matplotlib and `track_signal=True`",
        "forward RMS, backward RMS and gain to the next group of every group, in depth order,"
        " at the last logged step",
    ),
    TagSpec(
        LAYOUT,
        "layout",
        "once, with the first scalars",
        "Custom Scalars dashboard: global norm (and clipping, with `clip=`), non-finite counts,"
        " per-group statistics on charts of at most 10 groups",
    ),
)

_KEPT = frozenset("_.-/")


def _kept(character: str) -> bool:
    """Letters, marks and digits of any script (what continues a Python identifier), ``_.-/``."""
    return character in _KEPT or ("a" + character).isidentifier()


def sanitize(name: str) -> str:
    """Make ``name`` safe inside a tag: letters, marks and digits of any script and ``_.-/``
    stay, anything else becomes ``_``.

    TensorBoard itself stores and shows any Unicode tag; the characters replaced are those
    TensorFlow's ``clean_tag`` replaces (``[^-/\\w.]``) and MLflow's metric names refuse
    (Lightning hands the same names to every logger), and lone surrogates, which cannot be
    written as UTF-8.

    Example:
        >>> sanitize("blocks.0.attn[q]"), sanitize("编码器.层")
        ('blocks.0.attn_q_', '编码器.层')
    """
    return "".join(c if _kept(c) else "_" for c in name) or "_"


def group_names(groups: Sequence[str]) -> tuple[str, ...]:
    """Each group's name in tags (:func:`group_tag`), distinct for distinct groups.

    A name is :func:`sanitize`-d. Where several groups would get one name, the group already
    spelled that way (else the first) keeps it and the others, in group order, get the first
    free ``_2``, ``_3``, ...; a name some group gets unchanged is never given to another.

    Example:
        >>> group_names(["a b", "a_b", "a:b", "编码"])
        ('a_b_2', 'a_b', 'a_b_3', '编码')
    """
    names = [sanitize(group) for group in groups]
    taken = set(names)
    owner: dict[str, int] = {}
    for i, (group, name) in enumerate(zip(groups, names, strict=True)):
        if group == name or name not in owner:
            owner[name] = i
    for i, name in enumerate(names):
        if owner[name] != i:
            n = 2
            while f"{name}_{n}" in taken:
                n += 1
            names[i] = f"{name}_{n}"
            taken.add(names[i])
    return tuple(names)


def group_tag(statistic: str, name: str) -> str:
    """The tag of a per-group statistic; ``name`` is the group's entry of :func:`group_names`
    (``Grouping.tags``).

    Example:
        >>> group_tag(GRAD_NORM, "blocks.0.attn")
        'grad_norm/blocks.0.attn'
    """
    return f"{statistic}/{name}"


def clip_tag(statistic: str, optimizer: int | None = None) -> str:
    """The tag of a clipping statistic, suffixed like :func:`total_tag`.

    Example:
        >>> clip_tag(THRESHOLD)
        'clip/threshold'
    """
    return f"{CLIP}/{statistic}{_optimizer_suffix(optimizer)}"


def total_tag(statistic: str, optimizer: int | None = None) -> str:
    """The tag of a whole-model statistic; ``optimizer`` is set only when there are several.

    Example:
        >>> total_tag(GLOBAL)
        'global/grad_norm'
        >>> total_tag(GLOBAL, optimizer=1)
        'global/grad_norm_optimizer1'
    """
    return f"{TOTAL}/{statistic}{_optimizer_suffix(optimizer)}"


def amp_tag(optimizer: int | None = None) -> str:
    """The tag of the loss scaler's dropped steps, suffixed like :func:`total_tag`.

    Example:
        >>> amp_tag()
        'amp/skipped_steps'
    """
    return f"{AMP_SKIPPED}{_optimizer_suffix(optimizer)}"


def _optimizer_suffix(optimizer: int | None) -> str:
    return "" if optimizer is None else f"{OPTIMIZER}{optimizer}"


def markdown_table() -> str:
    """The README's table of tags."""
    lines = ["| tag | kind | written | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{t.pattern}` | {t.kind} | {t.cadence} | {t.meaning} |" for t in TAGS]
    return "\n".join(lines)
