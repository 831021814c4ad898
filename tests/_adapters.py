"""One driver per adapter, all with the same interface, for the adapter contract suite.

A driver trains the same tiny network (three dense layers, 6 -> 16 -> 16 -> 1, on one fixed
batch of 8) for real with its adapter: a real ``lightning.Trainer``, a real plain PyTorch loop,
a real Keras ``model.fit`` (TensorFlow backend, compiled as by default). It uses the adapters'
public API only: options, ``events``, ``stopped_at`` / ``should_stop``, ``state_dict`` /
``load_state_dict`` and the event files, read back by TensorBoard's own reader. It papers over
where each adapter writes (Keras: ``<log_dir>/train``) and how each tells that it stopped.

Frameworks are imported inside the drivers: ``driver(name)`` skips (``pytest.importorskip``)
when that adapter's framework is missing, and only that adapter's tests.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradwatch.reporting import GradWatchWarning

FEATURES, BATCH, WIDTH = 6, 8, 16
NAMES = ("lightning", "torch", "keras")


def fixed_batch() -> tuple[np.ndarray, np.ndarray]:
    """The one batch every step trains on (so with learning rate 0 every step is alike)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, FEATURES)).astype("float32")
    return x, rng.normal(size=(BATCH, 1)).astype("float32")


@contextlib.contextmanager
def told(run: Run):
    """Keep the run's GradWatchWarning lines on ``run.warnings`` instead of showing them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GradWatchWarning)
        yield
    run.warnings += [str(w.message) for w in caught if issubclass(w.category, GradWatchWarning)]


@dataclass
class Run:
    """What one training run left behind.

    ``weights[i]`` and ``optimizer[i]`` are copies of every weight and every optimizer tensor
    after ``i`` batches (``weights[0]``: before training); ``batches`` is how many batches ran;
    ``warnings``, the GradWatchWarning lines told during training.
    """

    watch: Any
    log_dir: Path
    weights: list[list[np.ndarray]] = field(default_factory=list)
    optimizer: list[list[np.ndarray]] = field(default_factory=list)
    stopped_at: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def batches(self) -> int:
        return len(self.weights) - 1

    def events(self):
        """TensorBoard's reader over the event files gradwatch wrote."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        guidance = {"scalars": 0, "histograms": 0, "tensors": 0, "images": 0}
        accumulator = EventAccumulator(str(self.log_dir), size_guidance=guidance)
        accumulator.Reload()
        return accumulator

    def scalars(self, tag: str) -> dict[int, float]:
        return {e.step: e.value for e in self.events().Scalars(tag)}


class Driver:
    """The interface every adapter's driver has."""

    name: str
    groups: tuple[str, str, str]  # the three layers' group names, input to output
    #: the directory below a ``log_dir`` where the event files land
    subdirectory: str = ""
    #: what ``log_every_n_steps=None`` stands for, as the adapter's messages say it
    log_every_default: str = "50"
    #: the named ``group_by`` rules, and what a ``group_by`` callable maps
    group_rules: tuple[str, str] = ("module", "parameter")
    group_member: str = "parameter name"

    def make(self, **options: Any) -> Any:
        """The adapter, built as a user builds it (no event files unless ``log_dir`` is
        given)."""
        raise NotImplementedError

    def train(
        self,
        log_dir: Path,
        steps: int,
        *,
        optimizer: str = "sgd",
        lr: float = 0.0,
        faults: dict[int, float] | None = None,
        scale: float = 1.0,
        state: dict | None = None,
        **options: Any,
    ) -> Run:
        """Train ``steps`` batches with ``make(log_dir=log_dir, **options)``.

        ``optimizer``: ``"sgd"`` or ``"adamw"`` (weight decay 0.1: it moves the weights even
        where the gradient is zero). ``faults``: the loss at step k is multiplied by
        ``faults[k]`` (``nan``: every gradient non-finite; ``1e6``: a spike). ``scale``
        multiplies every step's loss. ``state``: an earlier run's ``state_dict`` loaded into
        the new adapter before training (a resume).
        """
        watch = self.make(log_dir=log_dir, **options)
        if state is not None:
            watch.load_state_dict(state)
        run = Run(watch, Path(log_dir) / self.subdirectory)
        self._train(run, Path(log_dir), steps, optimizer, lr, faults, scale)
        return run

    def _train(self, run: Run, log_dir: Path, steps: int, optimizer, lr, faults, scale) -> None:
        """Train the framework's way, with ``run.watch`` watching."""
        raise NotImplementedError

    def resume(self, log_dir: Path, first: int, steps: int, **kwargs: Any) -> tuple[Run, Run]:
        """Train ``first`` steps, save the adapter's state, and go on to ``steps`` with a new
        adapter that loaded it (and the model's and optimizer's state): both runs."""
        raise NotImplementedError


def driver(name: str) -> Driver:
    if name == "lightning":
        pytest.importorskip("lightning")
        return LightningDriver()
    if name == "torch":
        pytest.importorskip("torch")
        return TorchDriver()
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    return KerasDriver()


def _loss_factor(faults: dict[int, float] | None, step: int, scale: float) -> float:
    return scale * (faults or {}).get(step, 1.0)


# -- torch: a plain loop and Lightning -------------------------------------------------------


def _torch_net():
    import torch
    from torch import nn

    class Net(nn.Module):  # `self.net`, as in a LightningModule: groups net.0, net.2, net.4
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Linear(FEATURES, WIDTH),
                nn.Tanh(),
                nn.Linear(WIDTH, WIDTH),
                nn.Tanh(),
                nn.Linear(WIDTH, 1),
            )

        def forward(self, x):
            return self.net(x)

    return Net()


def _torch_optimizer(parameters, optimizer: str, lr: float):
    import torch

    if optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.1)
    return torch.optim.SGD(parameters, lr=lr)


def _torch_snapshot(run: Run, parameters, optimizer) -> None:
    import torch

    run.weights.append([p.detach().numpy().copy() for p in parameters])
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    run.optimizer.append([t.detach().numpy().copy() for t in state])


class TorchDriver(Driver):
    name = "torch"
    groups = ("net.0", "net.2", "net.4")

    def make(self, model=None, **options: Any) -> Any:
        from gradwatch.integrations.torch import TorchGradWatch

        return TorchGradWatch(
            _torch_net() if model is None else model, **{"log_dir": False, **options}
        )

    def train(
        self,
        log_dir,
        steps,
        *,
        optimizer="sgd",
        lr=0.0,
        faults=None,
        scale=1.0,
        state=None,
        model=None,
        opt=None,
        start=0,
        **options,
    ):
        import torch
        from torch import nn

        model = _torch_net() if model is None else model
        opt = _torch_optimizer(model.parameters(), optimizer, lr) if opt is None else opt
        watch = self.make(model, log_dir=log_dir, **options)
        if state is not None:
            watch.load_state_dict(state)
        x, y = (torch.from_numpy(a) for a in fixed_batch())
        run = Run(watch, Path(log_dir))
        _torch_snapshot(run, model.parameters(), opt)
        with told(run), watch:
            for step in range(start, steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y) * _loss_factor(faults, step, scale)
                loss.backward()
                watch.before_optimizer_step(opt)
                opt.step()
                watch.after_optimizer_step()
                _torch_snapshot(run, model.parameters(), opt)
                if watch.should_stop:
                    break
        run.stopped_at = getattr(watch, "stopped_at", None)
        run.model, run.opt = model, opt
        return run

    def resume(self, log_dir, first, steps, *, optimizer="sgd", lr=0.0, **kwargs):
        before = self.train(log_dir / "first", first, optimizer=optimizer, lr=lr, **kwargs)
        state = before.watch.state_dict()
        after = self.train(
            log_dir / "second",
            steps,
            state=state,
            model=before.model,
            opt=before.opt,
            start=first,
            **kwargs,
        )
        return before, after


class LightningDriver(Driver):
    name = "lightning"
    groups = ("net.0", "net.2", "net.4")
    log_every_default = "the Trainer's log_every_n_steps"

    def make(self, **options: Any) -> Any:
        from gradwatch.integrations.lightning import GradWatch

        return GradWatch(**options)

    def _module(self, optimizer: str, lr: float, faults, scale: float):
        import lightning as L
        from torch import nn

        class Module(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.net = _torch_net().net

            def training_step(self, batch, batch_idx):
                x, y = batch
                factor = _loss_factor(faults, self.global_step, scale)
                return nn.functional.mse_loss(self.net(x), y) * factor

            def configure_optimizers(self):
                return _torch_optimizer(self.parameters(), optimizer, lr)

        return Module()

    def _fit(self, root: Path, run: Run, module, steps: int, ckpt_path=None) -> Any:
        import lightning as L
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Snapshots(L.Callback):
            def on_train_start(self, trainer, pl_module):
                _torch_snapshot(run, pl_module.parameters(), trainer.optimizers[0])

            def on_train_batch_end(self, trainer, pl_module, *args):
                _torch_snapshot(run, pl_module.parameters(), trainer.optimizers[0])

        class Fixed(Dataset):
            def __init__(self) -> None:
                self.batch = tuple(torch.from_numpy(a) for a in fixed_batch())

            def __len__(self) -> int:
                return steps

            def __getitem__(self, index: int):
                return self.batch

        trainer = L.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[run.watch, Snapshots()],
        )
        with told(run):
            trainer.fit(module, DataLoader(Fixed(), batch_size=None), ckpt_path=ckpt_path)
        run.stopped_at = run.watch.stopped_at
        return trainer

    def _train(self, run, log_dir, steps, optimizer, lr, faults, scale):
        self._fit(log_dir.parent, run, self._module(optimizer, lr, faults, scale), steps)

    def resume(
        self, log_dir, first, steps, *, optimizer="sgd", lr=0.0, faults=None, scale=1.0, **options
    ):
        """Through a real checkpoint: ``trainer.save_checkpoint``, then ``fit(ckpt_path=...)``.

        Both callbacks keep the default ``log_dir`` (a new ``gradwatch_logs/version_N`` per
        fit): the checkpoint's state is found by a key that holds ``log_dir``."""
        log_dir = Path(log_dir)
        module = self._module(optimizer, lr, faults, scale)
        before = Run(self.make(**options), log_dir / "gradwatch_logs" / "version_0")
        trainer = self._fit(log_dir, before, module, first)
        checkpoint = log_dir / "first.ckpt"
        trainer.save_checkpoint(checkpoint)
        after = Run(self.make(**options), log_dir / "gradwatch_logs" / "version_1")
        module = self._module(optimizer, lr, faults, scale)
        self._fit(log_dir, after, module, steps, ckpt_path=checkpoint)
        return before, after


# -- Keras -----------------------------------------------------------------------------------


class KerasDriver(Driver):
    name = "keras"
    groups = ("net/hidden", "net/middle", "net/head")
    group_rules = ("layer", "variable")
    group_member = "variable path"
    subdirectory = "train"  # Keras' GradWatch writes to <log_dir>/train

    def make(self, **options: Any) -> Any:
        from gradwatch.integrations.keras import GradWatch

        return GradWatch(**{"log_dir": False, **options})

    @staticmethod
    def _model(optimizer: str, lr: float):
        import keras

        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(WIDTH, activation="tanh", name="hidden"),
                keras.layers.Dense(WIDTH, activation="tanh", name="middle"),
                keras.layers.Dense(1, name="head"),
            ],
            name="net",
        )
        if optimizer == "adamw":
            opt = keras.optimizers.AdamW(lr, weight_decay=0.1)
        else:
            opt = keras.optimizers.SGD(lr)
        # jit_compile="auto": a graph without XLA on a CPU-only machine, XLA on a GPU
        # (test_keras runs jit, eager, late-built models and steps_per_execution)
        model.compile(opt, "mse")
        return model

    def _fit(self, run: Run, model, steps: int, faults, scale: float, start: int = 0) -> None:
        import keras

        class Snapshots(keras.callbacks.Callback):
            def _take(self) -> None:
                run.weights.append([np.array(w.numpy(), copy=True) for w in self.model.weights])
                variables = self.model.optimizer.variables
                run.optimizer.append([np.array(v.numpy(), copy=True) for v in variables])

            def on_train_begin(self, logs=None):
                self._take()

            def on_train_batch_end(self, batch, logs=None):
                self._take()

        x, y = fixed_batch()
        count = steps - start
        weights = np.array(
            [_loss_factor(faults, start + k, scale) for k in range(count)], dtype="float32"
        )
        with told(run):
            model.fit(
                np.tile(x, (count, 1)),
                np.tile(y, (count, 1)),
                sample_weight=np.repeat(weights, BATCH),  # the loss of batch k times weights[k]
                batch_size=BATCH,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[run.watch, Snapshots()],
            )
        run.stopped_at = run.watch.stopped_at

    def _train(self, run, log_dir, steps, optimizer, lr, faults, scale):
        self._fit(run, self._model(optimizer, lr), steps, faults, scale)

    def resume(
        self, log_dir, first, steps, *, optimizer="sgd", lr=0.0, faults=None, scale=1.0, **options
    ):
        """The same model fits again (its weights and optimizer go on), with a new callback
        that loaded the first one's ``state_dict``."""
        model = self._model(optimizer, lr)
        before = Run(
            self.make(log_dir=str(log_dir / "first"), **options), log_dir / "first" / "train"
        )
        self._fit(before, model, first, faults, scale)
        after_watch = self.make(log_dir=str(log_dir / "second"), **options)
        after_watch.load_state_dict(before.watch.state_dict())
        after = Run(after_watch, log_dir / "second" / "train")
        self._fit(after, model, steps, faults, scale, start=first)
        return before, after


def finite(arrays: list[np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Bit for bit."""
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def change(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The L2 norm of the difference of two weight lists."""
    pairs = zip(a, b, strict=True)
    return math.sqrt(sum(float(np.sum((y.astype("float64") - x) ** 2)) for x, y in pairs))
