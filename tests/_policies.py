"""The built-in clipping policies, each in a configuration small enough for quick tests."""

from __future__ import annotations

from gradwatch.policies import AGC, AutoClip, ClipByNorm, ClipByValue, ZClip

BUILTIN_POLICIES = [
    ClipByNorm(1.0),
    ClipByValue(0.5),
    AutoClip(percentile=25.0, history=16),
    ZClip(warmup_steps=5),
    ZClip(warmup_steps=5, mode="percentile"),
    AGC(clipping=0.05),
]
