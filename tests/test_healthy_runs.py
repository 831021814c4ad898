"""Healthy runs of real architectures raise no detection at the defaults; broken gradients do.

A GPT-2 (LayerNorm, learning induction after a plateau at chance), a narrow ResNet-18
(BatchNorm) and an LSTM language model train for 300 steps under ``TorchGradWatch`` with its
defaults and the signal measured (see ``_architectures.py``): no detection, and no group named
at risk by the report.
Then the same runs, shorter, with a 1000x gradient spike in one module and a NaN in another,
must report each at the step it was injected; and a GPT-2 with one module's gradient zeroed and
another's 10^4 times too large has both named at risk.
"""

from __future__ import annotations

import math
import statistics

import pytest

pytest.importorskip("torch")

import torch
from _architectures import train
from torch import nn

from gradwatch import MemorySink
from gradwatch.pictures.history import FlowHistory
from gradwatch.report.risk import at_risk
from gradwatch.reporting import GradWatchWarning

pytestmark = pytest.mark.slow  # ~1 minute on one CPU core

ARCHITECTURES = ["gpt2", "resnet", "lstm"]


@pytest.fixture(autouse=True)
def one_thread():
    """These small models train fastest on one core, and far slower on cores shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def needs(architecture: str) -> None:
    if architecture == "gpt2":
        pytest.importorskip("transformers")


def describe(events: list[dict]) -> list[str]:
    return [
        f"step {e['step']} {e['kind']} {e['group']} value {e['value']:.4g} "
        f"threshold {e['threshold']:.4g}"
        for e in events
    ]


def named_at_risk(sink: MemorySink) -> tuple[list[str], list[str]]:
    """The groups the report names at risk of vanishing, and of exploding."""
    history = FlowHistory()
    for record in sink.records:
        history.update(record)
    vanishing, exploding = at_risk(history.matrix(), top=100)
    return [r.group for r in vanishing], [r.group for r in exploding]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_healthy_run_raises_no_detection_and_names_no_group_at_risk(architecture, tmp_path):
    needs(architecture)
    sink = MemorySink()
    run = train(architecture, tmp_path, steps=300, sinks=[sink], track_signal=True)
    assert describe(run.events) == []  # the signal's dead units and saturation included
    assert any(tag.startswith("act_gain/") for tag in sink.records[-1].scalars)
    # Its BatchNorms or LayerNorms have ratios a decade or two below its weights': only within
    # their kind are they alike (by raw norm, the report named them all "vanishing").
    assert named_at_risk(sink) == ([], [])
    start, end = statistics.mean(run.losses[:10]), statistics.mean(run.losses[-30:])
    assert start > 0.9 * run.chance  # it starts at chance ...
    assert end < 0.6 * start  # ... and learns


# (module spiked 1000x at step 30, module given a NaN at step 40)
FAULTS = {
    "gpt2": ("transformer.h.1.mlp.c_fc", "transformer.h.2.attn.c_proj"),
    "resnet": ("layer2.0.conv1", "layer3.1.conv2"),
    "lstm": ("lstm", "head"),
}
SPIKE_STEP, NAN_STEP = 30, 40  # after the 20-step warm-up


def break_gradients(spike: str, nan: str):
    def fault(step: int, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            module = name.rpartition(".")[0]
            if step == SPIKE_STEP and module == spike:
                p.grad.mul_(1000.0)
            if step == NAN_STEP and module == nan:
                p.grad.view(-1)[0] = math.nan

    return fault


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_spike_and_a_nan_are_caught_at_the_step_they_happen(architecture, tmp_path):
    needs(architecture)
    spike, nan = FAULTS[architecture]
    # "skip" drops both broken steps, so the run stays healthy around them and every event
    # it raises can be listed
    with pytest.warns(GradWatchWarning):
        run = train(
            architecture,
            tmp_path,
            steps=50,
            fault=break_gradients(spike, nan),
            on_explosion="skip",
            on_nonfinite="skip",
        )
    found = {(e["step"], e["kind"], e["group"]) for e in run.events}
    assert found == {
        (SPIKE_STEP, "explosion", spike),
        (SPIKE_STEP, "explosion", "global"),
        (NAN_STEP, "nonfinite", nan),
        (NAN_STEP, "nonfinite", "global"),
    }, describe(run.events)
    assert all(torch.isfinite(torch.tensor(run.losses)))


def test_the_report_names_a_dead_and_an_exploding_group_at_risk(tmp_path):
    needs("gpt2")
    dead, huge = "transformer.h.1.mlp.c_fc", "transformer.h.2.attn.c_proj"

    def fault(step: int, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            module = name.rpartition(".")[0]
            if module == dead:
                p.grad.zero_()
            if module == huge:  # AdamW's update does not grow with it: training goes on
                p.grad.mul_(1e4)

    sink = MemorySink()
    train(
        "gpt2",
        tmp_path,
        steps=100,
        fault=fault,
        sinks=[sink],
        log_every_n_steps=10,
        on_explosion="ignore",
        on_vanishing="ignore",
    )
    assert named_at_risk(sink) == ([dead], [huge])
