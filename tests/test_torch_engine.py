"""The torch engine in a plain PyTorch loop: exact values, and no host reads between logs."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import contextlib
import re
import warnings

import numpy as np
import torch
from torch import nn

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.detectors import Explosion
from gradwatch.integrations.torch import TorchEngine, TorchGradWatch
from gradwatch.policies import AGC, AutoClip, ClipByNorm, ClipByValue, ZClip
from gradwatch.reporting import GradWatchWarning
from gradwatch.sinks import MemorySink


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def direct_group_norms(model: nn.Module) -> dict[str, float]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(name.rpartition(".")[0], []).append(p.grad.flatten())
    return {g: torch.cat(v).norm().item() for g, v in groups.items()}


def test_plain_loop_logs_exact_statistics():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = MemorySink()
    watch = TorchGradWatch(
        model,
        log_dir=False,
        log_every_n_steps=2,
        histogram_every_n_steps=4,
        statistics="all",
        sinks=[sink],
    )
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    expected = {}
    for step in range(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        watch.before_optimizer_step(optimizer)
        if step == 4:  # the last step, not a logging step: written at close
            last_norms = direct_group_norms(model)
        if step in (0, 1, 3):  # logging steps: 0, and k with (k + 1) % 2 == 0
            norms = direct_group_norms(model)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            max_abs = max(p.grad.abs().max().item() for p in model.parameters())
        optimizer.step()
        watch.after_optimizer_step()
        if step in (0, 1, 3):  # logging steps: 0, and k with (k + 1) % 2 == 0
            update = torch.cat(
                [
                    (p.detach() - before[n]).flatten()
                    for n, p in model.named_parameters()
                    if n.startswith("0.")
                ]
            ).norm()
            param = torch.cat([before["0.weight"].flatten(), before["0.bias"]]).norm()
            expected[step] = (norms, max_abs, (update / param).item())
    watch.close()

    pictures = [
        r for r in sink.records if r.images
    ]  # drawn in the background: records of their own
    assert [r.step for r in pictures] == [0, 3] and not any(r.scalars for r in pictures)
    records = [r for r in sink.records if not r.images]
    assert [r.step for r in records] == [0, 1, 3, 4]
    *records, last = records
    for group, norm in last_norms.items():  # the run's last step: its gradient norms only
        assert last.scalars[f"grad_norm/{group}"] == pytest.approx(norm, rel=1e-5)
    assert not any(tag.startswith(("grad_max_abs/", "param_norm/")) for tag in last.scalars)
    for record in records:
        norms, max_abs, update_ratio = expected[record.step]
        for group, norm in norms.items():
            assert record.scalars[f"grad_norm/{group}"] == pytest.approx(norm, rel=1e-5)
        total = np.sqrt(sum(n**2 for n in norms.values()))
        assert record.scalars["global/grad_norm"] == pytest.approx(total, rel=1e-5)
        assert max(record.scalars[f"grad_max_abs/{g}"] for g in norms) == pytest.approx(max_abs)
        assert record.scalars["update_to_param/0"] == pytest.approx(update_ratio, rel=1e-4)
        assert record.scalars["grad_nonfinite/0"] == 0.0
    assert set(records[0].histograms) == {"grad_hist/0", "grad_hist/2", "grad_hist/4"}
    assert not records[1].histograms
    hist = records[2].histograms["grad_hist/0"]
    assert hist.num == 6 * 8 + 8


@pytest.mark.slow  # TensorBoard's reader imports TensorFlow: most of 10-15 s
def test_unicode_groups_get_their_own_tags_read_back_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    torch.manual_seed(0)
    model = nn.ModuleDict({"编码": nn.Linear(4, 3), "解码": nn.Linear(3, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    expected = []
    with TorchGradWatch(model, log_dir=tmp_path, log_every_n_steps=1) as watch:
        for _ in range(2):
            optimizer.zero_grad()
            nn.functional.mse_loss(model["解码"](model["编码"](x)), y).backward()
            watch.before_optimizer_step(optimizer)
            expected.append(direct_group_norms(model))
            optimizer.step()
            watch.after_optimizer_step()
    (path,) = tmp_path.glob("*tfevents*")
    accumulator = event_accumulator.EventAccumulator(str(path))
    accumulator.Reload()
    assert {"grad_norm/编码", "grad_norm/解码"} <= set(accumulator.Tags()["scalars"])
    for group in ("编码", "解码"):
        read = [(e.step, e.value) for e in accumulator.Scalars(f"grad_norm/{group}")]
        assert read == [
            (step, pytest.approx(n[group], rel=1e-5)) for step, n in enumerate(expected)
        ]


def test_a_compiled_model_keeps_the_names_of_its_modules():
    class Wrapper(nn.Module):  # a compiled submodule, as in a LightningModule's `self.net`
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            self.head = nn.Linear(1, 1)

        def forward(self, x):
            return self.head(self.net(x))

    def tags(model: nn.Module) -> list[str]:
        sink = MemorySink()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with TorchGradWatch(model, log_dir=False, log_every_n_steps=1, sinks=[sink]) as watch:
            model(torch.randn(4, 6)).sum().backward()
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
        return [t for r in sink.records for t in r.scalars]

    plain, wrapped = tags(make_model()), tags(Wrapper(make_model()))
    assert "grad_norm/2" in plain and "grad_norm/net.2" in wrapped
    assert tags(torch.compile(make_model(), backend="eager")) == plain
    assert tags(Wrapper(torch.compile(make_model(), backend="eager"))) == wrapped


def test_histogram_counts_match_numpy():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = TorchEngine(
        model.named_parameters(),
        cadence=Cadence(1, 1),
        histogram_bins=7,
        group_by="parameter",
        statistics=tags.STATISTICS,
    )
    nn.functional.mse_loss(model(torch.randn(16, 6)), torch.randn(16, 1)).backward()
    model[0].weight.grad[0, 0] = float("nan")
    engine.before_optimizer_step(optimizer)
    (record,) = engine.after_optimizer_step()
    grad = model[0].weight.grad.flatten().numpy()
    finite = grad[np.isfinite(grad)]
    counts, edges = np.histogram(finite, bins=7)
    hist = record.histograms["grad_hist/0.weight"]
    assert hist.counts == pytest.approx(counts.tolist())
    assert hist.bucket_limits == pytest.approx(edges[1:].tolist(), abs=float(1e-6 * np.ptp(finite)))
    assert hist.sum == pytest.approx(finite.sum(), rel=1e-5)
    assert record.scalars["grad_nonfinite/0.weight"] == 1.0
    assert np.isnan(record.scalars["grad_norm/0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [  # the rows every adapter shares, and its own defaults, run in test_adapter_contract.py
        (
            {"scaler": 1},
            TypeError,
            "`scaler` must be a GradScaler or None. Received: scaler=1",
        ),
        ({"scaler": torch.amp.GradScaler}, TypeError, "; did you mean GradScaler()?"),
    ],
)
def test_a_bad_scaler_fails_at_construction(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        TorchGradWatch(make_model(), **{"log_dir": False, **kwargs})


def test_bad_model_fails_at_construction():
    with pytest.raises(TypeError, match=re.escape("`model` must be a torch.nn.Module.")):
        TorchGradWatch("net", log_dir=False)  # type: ignore[arg-type]


@contextlib.contextmanager
def count_host_reads(counter: list[str]):
    """Record every tensor-to-host read: .item(), .tolist(), .cpu(), .numpy(), bool(), float()."""
    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def spy(name):
        def wrapper(self, *args, **kwargs):
            counter.append(name)
            return originals[name](self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("host_on_cpu", [False, True], ids=["torch-decides", "numpy-decides"])
def test_no_host_reads_between_logging_steps(host_on_cpu):
    """The device path (a GPU's, checked here on the CPU) never reads after the first step,
    where it compiles its update (TorchInductor's constant folding reads a few constants it
    made itself, once); on the CPU the default path only takes numpy views of CPU tensors
    (the same memory: nothing to wait for)."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = TorchGradWatch(
        model,
        log_dir=False,
        log_every_n_steps=5,
        histogram_every_n_steps=5,
        track_update_ratio=True,
        sinks=[MemorySink()],
    )
    watch.engine.guard.host_on_cpu = host_on_cpu
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    reads_before, reads_between, reads_at_logs = [], [], []
    for step in range(12):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with count_host_reads(reads_before if step > 0 else []):
            watch.before_optimizer_step(optimizer)
        optimizer.step()
        with count_host_reads(reads_at_logs if step in (0, 4, 9) else reads_between):
            watch.after_optimizer_step()
    views = {"numpy"} if host_on_cpu else set()
    assert set(reads_before) <= views  # measuring never waits for the device
    assert reads_between == []
    # Per logging step, after the optimizer step (where Lightning syncs too): one copy of the
    # statistics and one of the detections (already on the host when numpy decides).
    assert reads_at_logs.count("cpu") == 3 * (1 if host_on_cpu else 2)


def test_statistics_are_taken_on_unscaled_gradients_with_a_grad_scaler():
    model = make_model()
    reference = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    engine = TorchEngine(model.named_parameters(), cadence=Cadence(1))
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.unscale_(optimizer)
    engine.before_optimizer_step(optimizer)
    scaler.step(optimizer)
    scaler.update()
    (record,) = engine.after_optimizer_step()
    nn.functional.mse_loss(reference(x), y).backward()
    for group, norm in direct_group_norms(reference).items():
        assert record.scalars[f"grad_norm/{group}"] == pytest.approx(norm, rel=1e-5)


def test_several_optimizers_get_their_own_total_tags():
    model = make_model()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.SGD(model[2:].parameters(), lr=0.1)
    engine = TorchEngine(model.named_parameters(), cadence=Cadence(1))
    nn.functional.mse_loss(model(torch.randn(4, 6)), torch.randn(4, 1)).backward()
    engine.before_optimizer_step(first)
    engine.before_optimizer_step(second)
    one, two = engine.after_optimizer_step()
    assert "global/grad_norm" in one.scalars and "grad_norm/2" not in one.scalars
    assert "global/grad_norm_optimizer1" in two.scalars and "grad_norm/0" not in two.scalars
    assert engine.state_dict()["optimizer_steps"] == [1, 1]


STATE = ("policy", "detectors")  # the arrays of a saved guard state (beside its "config")


@pytest.mark.parametrize(
    "clip", [None, ClipByNorm(0.5), ClipByValue(0.01), AutoClip(), ZClip(), AGC(0.05)], ids=repr
)
def test_numpy_and_torch_decisions_agree_on_the_cpu(clip):
    """On the CPU the core decides on numpy views by default; a GPU's torch path must agree:
    same clipping, same skipped step, same detections, same records."""

    def run(host_on_cpu: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        sink = MemorySink()
        watch = TorchGradWatch(
            model,
            False,
            log_every_n_steps=3,
            sinks=[sink],
            clip=clip,
            on_nonfinite="skip",
            on_explosion="warn",
            explosion=Explosion(warmup_steps=3),
        )
        watch.engine.guard.host_on_cpu = host_on_cpu
        for step in range(14):
            optimizer.zero_grad()
            scale = 1e4 if step == 9 else 1.0
            nn.functional.mse_loss(model(x * scale), y * scale).backward()
            if step == 5:
                model[2].weight.grad[0, 0] = float("nan")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", GradWatchWarning)
                watch.before_optimizer_step(optimizer)
                optimizer.step()
                watch.after_optimizer_step()
        state = watch.engine.state_dict()
        watch.close()
        return model, watch, sink.records, state

    model_t, watch_t, records_t, state_t = run(False)
    model_n, watch_n, records_n, state_n = run(True)
    assert watch_t.engine.skipped == watch_n.engine.skipped == [5]
    assert [(e["step"], e["kind"], e["group"]) for e in watch_t.events] == [
        (e["step"], e["kind"], e["group"]) for e in watch_n.events
    ]
    assert {e["kind"] for e in watch_n.events} >= {"nonfinite", "explosion"}
    for a, b in zip(model_t.parameters(), model_n.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert [r.step for r in records_t] == [r.step for r in records_n]
    for a, b in zip(records_t, records_n, strict=True):
        assert a.scalars.keys() == b.scalars.keys()
        np.testing.assert_allclose(list(a.scalars.values()), list(b.scalars.values()), rtol=1e-5)
    np.testing.assert_allclose(
        np.concatenate([np.ravel(v) for g in state_t["guards"] for k in STATE for v in g[k]]),
        np.concatenate([np.ravel(v) for g in state_n["guards"] for k in STATE for v in g[k]]),
        rtol=1e-5,
    )


@pytest.mark.parametrize("host_on_cpu", [True, False], ids=["numpy-decides", "torch-decides"])
def test_a_float64_model_is_measured_and_clipped(host_on_cpu):
    """float64 gradients are reduced in float64 (torch refuses to narrow them in a norm)."""
    model = make_model().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sink = MemorySink()
    watch = TorchGradWatch(model, log_dir=False, clip=ClipByNorm(1e-3), sinks=[sink])
    watch.engine.guard.host_on_cpu = host_on_cpu
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    nn.functional.mse_loss(model(x), y).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    watch.before_optimizer_step(optimizer)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    watch.after_optimizer_step()
    watch.close()
    assert sink.records[0].scalars["global/grad_norm"] == pytest.approx(expected, rel=1e-6)
    assert clipped == pytest.approx(1e-3, rel=1e-5)
