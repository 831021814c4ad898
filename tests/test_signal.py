"""track_signal: the forward and backward signal at each group's module, against the same
quantities computed by hand with autograd, in a plain loop and in a real Lightning fit; no hook
outside a logging step's forward and backward."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import warnings

import torch
from torch import nn

from gradwatch.integrations.torch import TorchGradWatch
from gradwatch.reporting import GradWatchWarning
from gradwatch.signal import DeadUnits, Saturation
from gradwatch.sinks import MemorySink


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
    )


def by_hand(model: nn.Sequential, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The signal tags computed directly: every layer's output kept with ``retain_grad``,
    over every micro-batch of one optimizer step (each loss divided by their number)."""
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model))}
    for x, y in batches:
        h = x
        for i, layer in enumerate(model):
            h = layer(h)
            h.retain_grad()
            outputs[i].append(h)
        (nn.functional.mse_loss(h, y) / len(batches)).backward()
    model.zero_grad()

    def cat(i: int, grad: bool = False) -> torch.Tensor:
        return torch.cat([(o.grad if grad else o).detach().float().flatten() for o in outputs[i]])

    expected = {}
    activation = {"0": 1, "2": 3}  # Tanh after the first Linear, ReLU after the second
    for group, i in {"0": 0, "2": 2, "4": 4}.items():
        y, grad = cat(i), cat(i, grad=True)
        expected[f"act_rms/{group}"] = y.square().mean().sqrt().item()
        expected[f"act_mean/{group}"] = y.mean().item()
        expected[f"act_grad_rms/{group}"] = grad.square().mean().sqrt().item()
        if group in activation:  # the head has no activation: no dead fraction
            expected[f"act_dead/{group}"] = (cat(activation[group]) == 0).float().mean().item()
    expected["act_saturated/0"] = (cat(1).abs() > 0.99).float().mean().item()
    for group, toward_output in (("0", "2"), ("2", "4")):
        ratio = expected[f"act_grad_rms/{group}"] / expected[f"act_grad_rms/{toward_output}"]
        expected[f"act_gain/{group}"] = ratio
    return expected


def signal_of(record) -> dict[str, float]:
    return {tag: v for tag, v in record.scalars.items() if tag.startswith("act_")}


def test_the_signal_is_what_autograd_gives_in_a_plain_loop():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(32, 6) * 3, torch.randn(32, 1)  # some tanh outputs saturate
    sink = MemorySink()
    watch = TorchGradWatch(model, False, track_signal=True, log_every_n_steps=2, sinks=[sink])
    for _ in range(4):
        watch.before_forward()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        watch.before_optimizer_step(optimizer)
        optimizer.step()
        watch.after_optimizer_step()
    watch.close()
    expected = by_hand(model, [(x, y)])
    assert 0 < expected["act_saturated/0"] < 1 and 0 < expected["act_dead/2"] < 1
    logged = [r for r in sink.records if r.scalars]
    assert [r.step for r in logged] == [0, 1, 3]
    for record in logged:
        assert signal_of(record) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_gradient_accumulation_sums_every_micro_batch():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [(torch.randn(8, 6), torch.randn(8, 1)) for _ in range(3)]
    sink = MemorySink()
    watch = TorchGradWatch(model, False, track_signal=True, sinks=[sink])
    optimizer.zero_grad()
    for x, y in batches:
        watch.before_forward()
        (nn.functional.mse_loss(model(x), y) / len(batches)).backward()
    watch.before_optimizer_step(optimizer)
    optimizer.step()
    watch.after_optimizer_step()
    watch.close()
    assert signal_of(sink.records[0]) == pytest.approx(by_hand(model, batches), rel=1e-5)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_no_hook_outside_a_logging_steps_forward_and_backward():
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = TorchGradWatch(model, False, track_signal=True, log_every_n_steps=5)
    installed = []
    for _ in range(10):
        watch.before_forward()
        installed.append(hooks(model))
        optimizer.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        watch.before_optimizer_step(optimizer)
        assert hooks(model) == 0  # removed at every step, logged or not
        optimizer.step()
        watch.after_optimizer_step()
    watch.close()
    logging = {0, 4, 9}
    assert [n > 0 for n in installed] == [step in logging for step in range(10)]


def lightning_fit(tmp_path, batches: list, **trainer_options) -> tuple[nn.Module, list]:
    """A real Lightning fit of :func:`net` (SGD at learning rate 0) over ``batches`` with
    ``GradWatch(track_signal=True)``; the trained net and the records."""
    pl = pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatch

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    sink = MemorySink()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        callbacks=[GradWatch(log_dir=False, track_signal=True, sinks=[sink])],
        **trainer_options,
    )
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert hooks(module) == 0
    return module.net, sink.records


def in_lightning(expected: dict[str, float]) -> dict[str, float]:
    """``expected``'s tags as a module holding the net as ``net`` names them (a
    LightningModule, a wrapper)."""
    return {tag.replace("/", "/net.", 1): v for tag, v in expected.items()}


def test_a_lightning_fit_logs_the_signal_autograd_gives(tmp_path):
    x, y = torch.randn(16, 6) * 3, torch.randn(16, 1)
    trained, records = lightning_fit(tmp_path, [(x, y)] * 6, max_steps=6, log_every_n_steps=3)
    expected = in_lightning(by_hand(trained, [(x, y)]))
    logged = [r for r in records if r.scalars]
    assert [r.step for r in logged] == [0, 2, 5]
    for record in logged:
        assert signal_of(record) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_the_keras_callback_says_it_has_no_signal_yet():
    pytest.importorskip("keras")
    from gradwatch.integrations.keras import GradWatch

    with pytest.raises(ValueError, match=r"`track_signal=True` is not available in the Keras"):
        GradWatch(False, track_signal=True)


def one_logged_step(model: nn.Module, params: nn.Module, x, y, **options) -> dict[str, float]:
    """The signal of one logged step of ``model`` (whose parameters are ``params``')."""
    optimizer = torch.optim.SGD(params.parameters(), lr=0.0)
    scaler = options.pop("scaler", None)
    sink = MemorySink()
    watch = TorchGradWatch(model, False, track_signal=True, sinks=[sink], scaler=scaler, **options)
    watch.before_forward()
    loss = nn.functional.mse_loss(model(x), y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    watch.before_optimizer_step(optimizer)
    optimizer.step()
    watch.after_optimizer_step()
    watch.close()
    return signal_of(sink.records[0])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_counts_each_forward_once(reentrant):
    """The checkpointed part runs its forward again inside backward: its hooks add nothing
    then, and the backward signal still reaches them (registered on the recomputed outputs
    where the first forward kept no graph)."""
    from torch.utils.checkpoint import checkpoint

    inner = net()

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net[3:](checkpoint(self.net[:3], x, use_reentrant=reentrant))

    x, y = torch.randn(32, 6) * 3, torch.randn(32, 1)
    logged = one_logged_step(Checkpointed(), inner, x.requires_grad_(reentrant), y)
    expected = by_hand(inner, [(x.detach(), y)])
    assert logged == pytest.approx(in_lightning(expected))


def test_the_backward_signal_is_unscaled_with_a_loss_scaler():
    model = net()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    logged = one_logged_step(model, model, x, y, scaler=scaler)
    assert logged == pytest.approx(by_hand(model, [(x, y)]), rel=1e-5)


def compiled_run(steps: int, track_signal: bool) -> tuple[int, dict[str, float], dict]:
    """A compiled model trained ``steps`` steps, logging every third: Dynamo's graph count,
    the signal of the last logging step, and what autograd gives on the same batch."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = net()
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sink = MemorySink()
    watch = TorchGradWatch(
        compiled, False, track_signal=track_signal, log_every_n_steps=3, sinks=[sink]
    )
    x, y = torch.randn(32, 6) * 3, torch.randn(32, 1)
    for _ in range(steps):
        watch.before_forward()
        optimizer.zero_grad()
        nn.functional.mse_loss(compiled(x), y).backward()
        watch.before_optimizer_step(optimizer)
        optimizer.step()
        watch.after_optimizer_step()
    watch.close()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    logged = [signal_of(r) for r in sink.records if "act_rms/0" in r.scalars]
    return graphs, logged[-1] if logged else {}, by_hand(model, [(x, y)])


def test_a_compiled_model_is_never_recompiled_for_the_signal():
    """On a logging step the hooks run eagerly between graphs; the graphs with them are
    compiled at the first logging step and reused at every later one, and the steps between
    run the model's one graph."""

    plain, _, _ = compiled_run(12, track_signal=False)
    first, values, expected = compiled_run(4, track_signal=True)  # logging steps 0 and 2
    many, _, _ = compiled_run(31, track_signal=True)  # eleven logging steps
    assert plain == 1 and many == first
    assert values == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_dead_units_are_counted_on_the_activation_registered_after_the_module():
    """A block that is not a Sequential: its ReLU, registered after its Linear, is where the
    Linear's dead fraction is taken (the Linear's own outputs are never exactly zero)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 32)
            self.activation = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1, keepdim=True) + self.activation(self.linear(x)).mean(1, keepdim=True)

    torch.manual_seed(0)
    model = Block()
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    logged = one_logged_step(model, model, x, y)
    dead = (model.activation(model.linear(x)) == 0).float().mean().item()
    assert 0.2 < dead < 0.8
    assert logged["act_dead/linear"] == pytest.approx(dead)


def broken(kind: str) -> nn.Sequential:
    """A first layer whose ReLU outputs are all zero (dead), or whose tanh is pinned at its
    bounds (saturated)."""
    torch.manual_seed(0)
    activation = nn.ReLU() if kind == "dead" else nn.Tanh()
    model = nn.Sequential(nn.Linear(6, 16), activation, nn.Linear(16, 1))
    with torch.no_grad():
        if kind == "dead":
            model[0].bias.fill_(-100.0)
        else:
            model[0].weight.mul_(100.0)
    return model


def alarmed_loop(model: nn.Module, steps: int = 6, **options) -> TorchGradWatch:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    watch = TorchGradWatch(model, False, track_signal=True, log_every_n_steps=1, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradWatchWarning)
        for _ in range(steps):
            watch.before_forward()
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            watch.before_optimizer_step(optimizer)
            optimizer.step()
            watch.after_optimizer_step()
            if watch.should_stop:
                break
        watch.close()
    return watch


@pytest.mark.parametrize(
    ("kind", "option", "rule"),
    [
        ("dead", "dead_units", DeadUnits(patience=3)),
        ("saturated", "saturation", Saturation(patience=3)),
    ],
)
def test_dead_and_saturated_outputs_are_found_after_patience_logging_steps(kind, option, rule):
    watch = alarmed_loop(broken(kind), **{option: rule})
    assert [(e["step"], e["kind"], e["group"], e["action"]) for e in watch.events] == [
        (2, option, "0", "warn")  # once, at the third logging step in a row
    ]
    assert watch.events[0]["value"] > 0.9 and not watch.should_stop


def test_a_dead_layer_stops_training_after_its_step():
    watch = alarmed_loop(broken("dead"), on_dead_units="stop", dead_units=DeadUnits(patience=2))
    assert watch.stopped_at == 1 and watch.should_stop
    assert watch.events[-1]["action"] == "stop"
    assert watch.engine.skipped == []  # the step was taken: the finding comes after it


def test_alarms_are_quiet_where_the_signal_is_healthy_and_can_be_ignored():
    assert alarmed_loop(net()).events == []  # half the ReLU outputs zero, tanh in range
    assert alarmed_loop(broken("dead"), on_dead_units="ignore").events == []


def test_the_dashboard_charts_the_signal_when_it_is_measured():
    def titles(**options) -> list[str]:
        watch = TorchGradWatch(net(), False, **options)
        layout = watch.options.dashboard(watch.engine.grouping)
        return [category.title for category in layout.categories]

    assert not any("signal" in t for t in titles())
    assert "gradwatch: backward signal RMS (dL/d output) per group" in titles(track_signal=True)


def test_the_signal_under_autocast_is_measured_in_float32():
    """bf16 outputs under ``torch.autocast``: reduced in float32, as autograd's own bf16
    outputs and gradients reduced by hand in float32."""
    model = net()
    x, y = torch.randn(32, 6) * 3, torch.randn(32, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = by_hand(model, [(x, y)])
        logged = one_logged_step(model, model, x, y)
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_lightning_gradient_accumulation_measures_every_micro_batch_of_a_logged_step(tmp_path):
    batches = [(torch.randn(8, 6), torch.randn(8, 1)) for _ in range(8)]
    trained, records = lightning_fit(
        tmp_path, batches, max_steps=4, accumulate_grad_batches=2, log_every_n_steps=2
    )
    logged = {r.step: signal_of(r) for r in records if "act_rms/net.0" in r.scalars}
    assert sorted(logged) == [0, 1, 3]
    for step, values in logged.items():  # optimizer step k took micro-batches 2k and 2k + 1
        expected = in_lightning(by_hand(trained, batches[2 * step : 2 * step + 2]))
        assert values == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_a_float64_model_has_its_signal_measured():
    model = net().double()
    x, y = torch.randn(32, 6, dtype=torch.float64) * 3, torch.randn(32, 1, dtype=torch.float64)
    logged = one_logged_step(model, model, x, y)
    assert logged == pytest.approx(by_hand(model, [(x, y)]), rel=1e-5, abs=1e-7)
