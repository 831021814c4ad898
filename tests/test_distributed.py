"""GradWatch in real multi-process runs on CPU (gloo): DDP, FSDP2, and FSDP2 over tensor parallel.

The Lightning tests run ``scripts/distributed_gradwatch.py`` in a subprocess (Lightning starts
rank 1 from it); the 2-D test runs ``scripts/fsdp_tp_engine.py`` (four processes, the torch
engine in a plain loop). Every rank dumps what its engine produced, and the tests compare that
with statistics computed here, in one process, from the full model and the gradient averaged
over both data-parallel batches.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lightning")

import glob
import importlib.util
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _models import read_events
from gradwatch.cadence import Cadence

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "distributed_gradwatch.py"
_spec = importlib.util.spec_from_file_location("distributed_gradwatch", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

GROUPS = {
    "net.0": ["net.0.weight", "net.0.bias"],
    "net.2": ["net.2.weight", "net.2.bias"],
    "net.4": ["net.4.weight", "net.4.bias"],
}
_CADENCE = Cadence(script.LOG_EVERY, script.HISTOGRAM_EVERY)  # the cadence is tested elsewhere
LOG_STEPS = [k for k in range(script.STEPS) if _CADENCE.logs(k)]
HISTOGRAM_STEPS = [k for k in range(script.STEPS) if _CADENCE.histograms(k)]
PER_GROUP = [
    "grad_norm",
    "grad_max_abs",
    "grad_nonfinite",
    "param_norm",
    "grad_to_param",
    "update_to_param",
]
TOTALS = ["grad_norm", "max_since_last_log", "nonfinite_steps"]
SCALAR_TAGS = sorted(
    [f"{s}/{g}" for s in PER_GROUP for g in GROUPS] + [f"global/{t}" for t in TOTALS]
)
HISTOGRAM_TAGS = sorted(f"grad_hist/{g}" for g in GROUPS)
_DISTRIBUTED_ENV = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(arguments: list[str], out: Path, ranks: int = 2, timeout: float = 150) -> list[dict]:
    """Run a script; return each rank's dump. A hang kills the whole process group."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DISTRIBUTED_ENV and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",  # no GPU: the CPU accelerator and gloo
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
    )
    process = subprocess.Popen(
        [sys.executable, *arguments, str(out)],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 is a child of rank 0: one group to kill on a hang
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{arguments} timed out after {timeout} s:\n{output[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(ranks)]


def reference(lr: float) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Plain torch in one process: per step, the gradient averaged over both ranks' batches,
    the parameters it was taken at, and the SGD update that followed."""
    net = script.make_net()
    batches = [script.rank_batch(rank) for rank in (0, 1)]
    steps = []
    for _ in range(script.STEPS):
        net.zero_grad()
        loss = sum(nn.functional.mse_loss(net(x), y) for x, y in batches) / 2
        loss.backward()
        named = {f"net.{n}": p for n, p in net.named_parameters()}
        params = {n: p.detach().clone() for n, p in named.items()}
        grads = {n: p.grad.detach().clone() for n, p in named.items()}
        with torch.no_grad():
            for p in named.values():
                p -= lr * p.grad
        updates = {n: params[n] - p.detach() for n, p in named.items()}
        steps.append({"grads": grads, "params": params, "updates": updates})
    return steps


def cat(tensors: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([tensors[n].flatten() for n in names]).double()


def global_norm(step: dict) -> float:
    return cat(step["grads"], step["grads"]).norm().item()


def expected_scalars(steps: list[dict], at: int) -> dict[str, float]:
    step = steps[at]
    out = {}
    for group, names in GROUPS.items():
        grad, param = cat(step["grads"], names), cat(step["params"], names)
        update = cat(step["updates"], names)
        out[f"grad_norm/{group}"] = grad.norm().item()
        out[f"grad_max_abs/{group}"] = grad.abs().max().item()
        out[f"grad_nonfinite/{group}"] = 0.0
        out[f"param_norm/{group}"] = param.norm().item()
        out[f"grad_to_param/{group}"] = (grad.norm() / param.norm()).item()
        out[f"update_to_param/{group}"] = (update.norm() / param.norm()).item()
    previous = max((s for s in LOG_STEPS if s < at), default=-1)
    out["global/grad_norm"] = global_norm(step)
    out["global/max_since_last_log"] = max(global_norm(s) for s in steps[previous + 1 : at + 1])
    out["global/nonfinite_steps"] = 0.0
    return out


def buckets(values: torch.Tensor, bins: int) -> list[float]:
    """The engine's bucketing (float32, equal widths over [min, max]) of one full tensor."""
    lo, hi = values.min(), values.max()
    width = torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
    index = ((values - lo) / width * bins).long().clamp(0, bins - 1)
    return torch.bincount(index, minlength=bins).double().tolist()


def check_records(ranks: list[dict], lr: float) -> dict[int, dict]:
    """Every rank's engine produced the same records, and they match one process's numbers."""
    assert [rank["rank"] for rank in ranks] == list(range(len(ranks)))
    # The runs are long enough for a step between logs and a step with a histogram only.
    assert any(b - a > 1 for a, b in itertools.pairwise(LOG_STEPS))
    assert set(HISTOGRAM_STEPS) - set(LOG_STEPS)
    steps = reference(lr)

    # What the ranks held before each optimizer step is the averaged gradient.
    for rank in ranks:
        assert len(rank["gradients"]) == script.STEPS
        for held, expected in zip(rank["gradients"], steps, strict=True):
            for name, values in held.items():
                torch.testing.assert_close(
                    torch.tensor(values), expected["grads"][name].flatten(), rtol=1e-5, atol=1e-7
                )

    # All ranks' engines produced the same records, at the expected steps.
    for rank in ranks[1:]:
        assert rank["records"] == ranks[0]["records"]
    records = {r["step"]: r for r in ranks[0]["records"]}
    assert sorted(records) == sorted(set(LOG_STEPS) | set(HISTOGRAM_STEPS))
    for step, record in records.items():
        assert sorted(record["scalars"]) == (SCALAR_TAGS if step in LOG_STEPS else [])
        assert sorted(record["histograms"]) == (HISTOGRAM_TAGS if step in HISTOGRAM_STEPS else [])

    # The scalars equal a single-process computation on the full model.
    for step in LOG_STEPS:
        expected = expected_scalars(steps, step)
        for tag, value in records[step]["scalars"].items():
            assert value == pytest.approx(expected[tag], rel=1e-5, abs=1e-9), (step, tag)

    # Histograms count every element of the full gradient once, in the right buckets.
    for step in HISTOGRAM_STEPS:
        held = ranks[0]["gradients"][step]
        for group, names in GROUPS.items():
            histogram = records[step]["histograms"][f"grad_hist/{group}"]
            grad = cat(steps[step]["grads"], names)
            assert histogram["num"] == sum(histogram["counts"]) == grad.numel()
            assert histogram["min"] == pytest.approx(grad.min().item(), rel=1e-5)
            assert histogram["max"] == pytest.approx(grad.max().item(), rel=1e-5)
            assert histogram["sum"] == pytest.approx(grad.sum().item(), rel=1e-4, abs=1e-7)
            assert histogram["sum_squares"] == pytest.approx((grad**2).sum().item(), rel=1e-5)
            values = torch.cat([torch.tensor(held[n], dtype=torch.float32) for n in names])
            assert histogram["counts"] == buckets(values, script.BINS)
    return records


def check_lightning_run(ranks: list[dict], out: Path, lr: float) -> None:
    rank0, rank1 = ranks
    assert rank0["seen"] == [0] * script.STEPS and rank1["seen"] == [1] * script.STEPS
    records = check_records(ranks, lr)

    # Only rank 0 wrote event files: the TensorBoardLogger's run and one gradwatch run in it.
    files = sorted(glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True))
    assert len(files) == 2, files
    for path in files:
        assert f".{rank0['pid']}." in os.path.basename(path)
    user_run, gradwatch_run = files
    assert Path(gradwatch_run).parent == out / "tb" / "version_0" / "gradwatch"
    assert Path(user_run).parent == out / "tb" / "version_0"

    scalars = read_events(gradwatch_run)  # gradwatch writes TensorBoard scalars itself
    assert not [t for t in read_events(user_run).Tags()["scalars"] if t in SCALAR_TAGS]
    assert sorted(scalars.Tags()["scalars"]) == SCALAR_TAGS
    for tag in SCALAR_TAGS:
        events = scalars.Scalars(tag)
        assert [e.step for e in events] == LOG_STEPS
        for e in events:
            assert e.value == pytest.approx(records[e.step]["scalars"][tag], rel=1e-6, abs=1e-12)
    histograms = scalars
    assert sorted(histograms.Tags()["histograms"]) == HISTOGRAM_TAGS
    for tag in HISTOGRAM_TAGS:
        events = histograms.Histograms(tag)
        assert [e.step for e in events] == HISTOGRAM_STEPS
        for e in events:
            counts = records[e.step]["histograms"][tag]["counts"]
            assert list(e.histogram_value.bucket) == counts
            assert e.histogram_value.num == sum(counts)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    ranks = launch([str(SCRIPT), "ddp"], tmp_path)
    for rank in ranks:
        assert set(rank["placements"].values()) == {"plain tensor"}
    check_lightning_run(ranks, tmp_path, script.LEARNING_RATE["ddp"])


def signal_by_hand(rank: int) -> dict[str, float]:
    """The signal tags of one rank's batch, computed directly: its Linear outputs kept with
    ``retain_grad``, and the Tanh after the first two."""
    net = script.make_net()
    x, y = script.rank_batch(rank)
    outputs, h = [], x
    for layer in net:
        h = layer(h)
        h.retain_grad()
        outputs.append(h)
    nn.functional.mse_loss(h, y).backward()
    expected, backward = {}, []
    for i in (0, 2, 4):
        out, group = outputs[i], f"net.{i}"
        expected[f"act_rms/{group}"] = out.square().mean().sqrt().item()
        expected[f"act_mean/{group}"] = out.mean().item()
        backward.append(out.grad.square().mean().sqrt().item())
        expected[f"act_grad_rms/{group}"] = backward[-1]
        if i < 4:  # a Tanh follows
            tanh = outputs[i + 1]
            expected[f"act_dead/{group}"] = (tanh == 0).float().mean().item()
            expected[f"act_saturated/{group}"] = (tanh.abs() > 0.99).float().mean().item()
    expected["act_gain/net.0"] = backward[0] / backward[1]
    expected["act_gain/net.2"] = backward[1] / backward[2]
    return expected


@pytest.mark.slow
def test_ddp_each_rank_measures_the_signal_of_its_own_batch_and_rank_zero_writes_it(tmp_path):
    ranks = launch([str(SCRIPT), "ddp-signal"], tmp_path, timeout=120)
    for rank in ranks:
        for record in rank["records"]:
            if record["step"] not in LOG_STEPS:
                continue
            signal = {t: v for t, v in record["scalars"].items() if t.startswith("act_")}
            assert signal == pytest.approx(signal_by_hand(rank["rank"]), rel=1e-5, abs=1e-7)
    files = glob.glob(str(tmp_path / "**" / "gradwatch" / "events.out.tfevents.*"), recursive=True)
    (path,) = files
    assert f".{ranks[0]['pid']}." in os.path.basename(path)
    written = read_events(path)
    for e in written.Scalars("act_grad_rms/net.0"):
        assert e.value == pytest.approx(signal_by_hand(0)["act_grad_rms/net.0"], rel=1e-5)
    assert signal_by_hand(0)["act_rms/net.0"] != pytest.approx(signal_by_hand(1)["act_rms/net.0"])


@pytest.mark.slow
def test_ddp_without_a_logger_writes_scalars_from_rank_zero(tmp_path):
    # Resolving the default directory is a collective in Lightning: every rank must take part.
    ranks = launch([str(SCRIPT), "ddp-no-logger"], tmp_path, timeout=120)
    records = check_records(ranks, script.LEARNING_RATE["ddp"])
    (path,) = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert f".{ranks[0]['pid']}." in os.path.basename(path)
    events = read_events(path)
    assert sorted(events.Tags()["scalars"]) == SCALAR_TAGS
    assert [e.step for e in events.Scalars(SCALAR_TAGS[0])] == LOG_STEPS
    assert records  # the ranks agreed (checked above)


@pytest.mark.slow
def test_fsdp2_sharded_gradients(tmp_path):
    ranks = launch([str(SCRIPT), "fsdp"], tmp_path)
    rank0, rank1 = ranks
    # The engine saw sharded DTensor gradients, and rank 1 held empty shards of the last layer.
    for rank in ranks:
        assert set(rank["placements"].values()) == {"(Shard(dim=0),)"}
    full = {n: len(v) for n, v in rank0["gradients"][0].items()}
    assert {n: rank0["local_sizes"][n] + rank1["local_sizes"][n] for n in full} == full
    assert rank1["local_sizes"]["net.4.weight"] == rank1["local_sizes"]["net.4.bias"] == 0
    assert rank0["local_sizes"]["net.2.weight"] == 48 and rank1["local_sizes"]["net.2.weight"] == 32
    # The learning rate is not 0: parameters moved, so the update ratios are not trivial.
    steps = reference(script.LEARNING_RATE["fsdp"])
    assert not torch.equal(steps[0]["params"]["net.0.weight"], steps[2]["params"]["net.0.weight"])
    for rank in ranks:
        for held, expected in zip(rank["parameters"], steps, strict=True):
            for name, values in held.items():
                torch.testing.assert_close(
                    torch.tensor(values), expected["params"][name].flatten(), rtol=1e-5, atol=1e-7
                )
    check_lightning_run(ranks, tmp_path, script.LEARNING_RATE["fsdp"])


@pytest.mark.slow
def test_engine_on_fsdp2_over_tensor_parallel(tmp_path):
    """Four processes, mesh (data_parallel=2, tensor_parallel=2): mixed placements on one mesh."""
    ranks = launch([str(SCRIPTS / "fsdp_tp_engine.py")], tmp_path, ranks=4, timeout=200)
    placements = ranks[0]["placements"]
    # FSDP2 over a row-sharded weight: _StridedShard in torch 2.13 (its is_shard() is False).
    assert placements["net.0.weight"].startswith(("(_StridedShard(dim=0", "(Shard(dim=0)"))
    assert placements["net.0.weight"].endswith(", Shard(dim=0))")
    assert placements["net.2.weight"] == "(Shard(dim=0), Shard(dim=1))"
    assert placements["net.2.bias"] == placements["net.4.bias"] == "(Shard(dim=0), Replicate())"
    # Ranks 2 and 3 (data-parallel coordinate 1) hold empty shards of the last layer.
    assert [r["local_sizes"]["net.4.bias"] for r in ranks] == [1, 1, 0, 0]
    check_records(ranks, script.LEARNING_RATE["fsdp"])


def test_reference_is_not_one_ranks_gradient():
    """The two batches give different gradients, so matching their average means something."""
    net = script.make_net()
    norms = []
    for rank in (0, 1):
        net.zero_grad()
        x, y = script.rank_batch(rank)
        nn.functional.mse_loss(net(x), y).backward()
        norms.append(net[0].weight.grad.norm().item())
    both = reference(0.0)[0]["grads"]["net.0.weight"].norm().item()
    assert len({round(n, 4) for n in [*norms, both]}) == 3
    assert np.isfinite(norms).all()


@pytest.mark.slow
@pytest.mark.parametrize("action", ["skip", "stop"])
def test_ddp_ranks_take_the_same_decision_on_nonfinite_gradients(tmp_path, action):
    # NaN in rank 1's loss at step 3 reaches both ranks through DDP's all-reduce.
    rank0, rank1 = launch([str(SCRIPTS / "ddp_decisions.py"), action], tmp_path, timeout=120)
    for key in ("skipped", "stopped_at", "global_step", "parameters", "events"):
        assert rank0[key] == rank1[key], key
    assert ["nonfinite", "global", action] in rank0["events"]
    assert rank0["skipped"] == [3]  # a stop drops the offending step too
    assert all(np.isfinite(p).all() for p in rank0["parameters"])
    if action == "skip":
        assert rank0["global_step"] == 6
    else:
        assert rank0["stopped_at"] == 3 and rank0["global_step"] == 4
