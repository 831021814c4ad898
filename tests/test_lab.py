"""The gradient-flow lab (examples/): each lesson holds in a tiny configuration.

The scripts' `main()` runs in this process (torch is imported once, not per script); the
quickstarts run as a user runs them in test_examples.py and test_keras.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import importlib.util
import sys
from pathlib import Path

import torch

pytestmark = pytest.mark.slow  # each lesson trains its networks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture
def example(monkeypatch):
    """Import an example script by name, with examples/ on the path for `_lab`, on one thread."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the scripts do: these small models are fastest on one core

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"lab_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)
    sys.modules.pop("_lab", None)


def reported(log_dir: Path, runs: list[str]) -> None:
    """Every run wrote event files, and the report covers them all (with matplotlib)."""
    for run in runs:
        assert list((log_dir / run).glob("events.out.tfevents.*")), run
    if HAS_MATPLOTLIB:
        page = (log_dir / "report.html").read_text()
        assert all(run in page for run in runs)


def test_depth_the_sigmoid_nets_first_layer_vanishes(example, tmp_path):
    found = example("depth_activations").main(str(tmp_path), steps=2)
    ratios = {name: f["gradient"] for name, f in found.items()}
    assert ratios["sigmoid"] < 1e-10  # layer 1 gets nothing
    assert ratios["relu_residual"] > 1e-3 and ratios["relu_layernorm"] > 1e-2
    assert ratios["sigmoid"] < 1e-8 * ratios["relu_residual"]
    assert ratios["sigmoid"] < ratios["relu"] < ratios["tanh"]
    # The backward signal dL/dy: through 20 sigmoid layers it collapses by many orders of
    # magnitude; pre-norm residual ReLU blocks keep it within one; LayerNorm holds the
    # forward RMS across depth.
    assert found["sigmoid"]["backward"] < 1e-12
    assert 0.1 < found["relu_prenorm_residual"]["backward"] < 10
    for normed in ("relu_layernorm", "sigmoid_layernorm", "relu_prenorm_residual"):
        assert 0.5 < found[normed]["forward"] < 2, normed
    reported(tmp_path, list(found))


def test_initialization_too_large_explodes_too_small_vanishes_he_is_stable(example, tmp_path):
    found = example("initialization").main(str(tmp_path), steps=2)
    assert found["too_large"]["global"] > 1e6 * found["he"]["global"]
    assert found["too_small"]["ratio"] < 1e-5
    for stable in ("he", "xavier_tanh"):
        assert 1e-2 < found[stable]["ratio"] < 1e2 and 1e-2 < found[stable]["global"] < 1e2
    reported(tmp_path, list(found))


def test_recurrent_the_plain_rnns_gradient_decays_fastest_through_time(example, tmp_path):
    found = example("recurrent").main(str(tmp_path), steps=2)
    rnn, lstm, gru = (found[name][0] for name in ("rnn", "lstm", "gru"))
    assert rnn < 1e-2 * lstm and rnn < 1e-2 * gru  # at the start, 50 steps back
    reported(tmp_path, list(found))
    from _models import read_events

    by_time = read_events(str(next((tmp_path / "rnn" / "by_time_step").glob("events.*"))))
    assert len(by_time.Scalars("input_grad/start")) == 50
    assert (tmp_path / "by_time_step.png").exists() == HAS_MATPLOTLIB


def test_transformers_post_norm_starves_the_early_blocks(example, tmp_path):
    found = example("transformers_depth").main(str(tmp_path), steps=10)
    assert found["post_norm"]["end"] < 1e-2 < found["pre_norm"]["end"]
    assert found["pre_norm"]["end"] > 0.3
    reported(tmp_path, list(found))


def test_rescue_clipping_keeps_the_run_finite_and_stop_ends_it(example, tmp_path):
    pytest.importorskip("lightning")
    found = example("rescue").main(str(tmp_path), steps=60)
    spike = 30
    assert found["unprotected"]["nonfinite_at"] is not None
    assert found["unprotected"]["nonfinite_at"] >= spike
    for clipped in ("autoclip", "zclip"):
        assert found[clipped]["nonfinite_at"] is None, clipped
    assert found["stop"]["nonfinite_at"] is None
    assert spike <= found["stop"]["stopped_at"] <= spike + 5
    reported(tmp_path, list(found))
