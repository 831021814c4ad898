"""The torch engine: per-tensor gradient reductions on the tensors' own device.

Every optimizer step costs one ``torch._foreach_norm`` over the gradients plus a handful of
scalar kernels, and no host read. At the logging cadence the engine also gathers max-abs values,
non-finite counts, parameter norms, optionally update norms and histograms, and copies them to
the host in one transfer after the optimizer step.

In a plain PyTorch loop, two calls are all it takes::

    watch = TorchGradWatch(model, log_dir="runs/demo")
    for batch in loader:
        loss = model(batch).mean()
        loss.backward()
        watch.before_optimizer_step(optimizer)  # after backward (and scaler.unscale_)
        optimizer.step()
        watch.after_optimizer_step()
        optimizer.zero_grad()
    watch.close()
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.amp.grad_scaler import OptState

from gradwatch import keys
from gradwatch.checks import check_instance
from gradwatch.detectors import Explosion, Vanishing
from gradwatch.grouping import GroupBy, Grouping
from gradwatch.guard import Guard
from gradwatch.integrations._shards import ShardReducer, has_dtensors, local
from gradwatch.integrations._torch_guard import GuardRun, TorchGuard, view
from gradwatch.layout import build_layout
from gradwatch.monitor import Cadence, Monitor, build_histogram_record, build_record
from gradwatch.options import check_histogram_bins, check_options
from gradwatch.pictures import FlowPictures
from gradwatch.policies import Policy
from gradwatch.record import Histogram, Record, Sink
from gradwatch.reporting import GradWatchWarning, Reporter, count_nonfinite
from gradwatch.sinks import TensorBoardSink
from gradwatch.stats import (
    StepSummary,
    TensorStats,
    global_norm,
    init_summary,
    nonzero_sums,
    reset_summary,
    update_summary,
)

log = logging.getLogger(__name__)

__all__ = ["TorchEngine", "TorchGradWatch"]

_INF = float("inf")
_NOT_SHARDED = ShardReducer(())
_STEPPED_KEPT = 8  # sets of parameters with gradients remembered per optimizer
_KEPT = 1000  # dropped steps remembered (all are counted)


@dataclass(frozen=True)
class _Stepped:
    """The watched parameters that one optimizer steps with gradients, in its order."""

    indices: list[int]  # positions among the engine's parameters
    params: list[torch.Tensor]
    sharded: bool  # some are DTensors
    nonempty: bool  # none is sharded or empty, so neither is any gradient


@dataclass
class _Last:
    """The newest step of an optimizer: enough to write it when the run ends before it is
    logged (its gradient norms; the gradients themselves may be gone by then)."""

    step: int
    indices: list[int]
    norms: torch.Tensor
    logged: bool


@dataclass
class _OptimizerState:
    index: int
    calls: int = 0
    summary: StepSummary | None = None
    guard: GuardRun | None = None
    stepped: dict[tuple[int, ...], _Stepped] = field(default_factory=dict)  # by parameter ids
    last: _Last | None = None


@dataclass
class _Pending:
    """A logging step measured on the device, read on the host after the optimizer step.

    Reading after the step puts gradwatch's one host synchronisation where Lightning makes
    its own on the same steps, so the two cost one pipeline drain.
    """

    step: int
    optimizer: _OptimizerState
    indices: list[int]
    logs: bool
    parts: list[torch.Tensor]
    grads: list[torch.Tensor]
    reducer: ShardReducer
    histogram_groups: list[str] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    snapshot: list[torch.Tensor] | None = None
    clipped: bool = False  # clip values come after the summary in `parts`


_COMPILED = "_orig_mod"  # the attribute through which torch.compile's wrapper holds the module


def _original_name(name: str) -> str:
    """A parameter's name in the module that ``torch.compile`` wrapped: without the
    ``_orig_mod`` components it inserts, wherever a compiled module sits in the model.

    Example:
        >>> _original_name("net._orig_mod.0.weight")
        'net.0.weight'
    """
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def _float_norms(
    tensors: Sequence[torch.Tensor], order: float, nonempty: bool = False
) -> Sequence[torch.Tensor]:
    """Per-tensor norms in float32; empty tensors (empty shards) count as 0.

    ``nonempty``: the caller knows that no tensor is empty (one kernel, no bookkeeping).
    """
    if nonempty or all(t.numel() > 0 for t in tensors):
        return torch._foreach_norm(tensors, order, dtype=torch.float32)
    nonempty = [t for t in tensors if t.numel() > 0]
    norms = iter(torch._foreach_norm(nonempty, order, dtype=torch.float32) if nonempty else ())
    zero = None
    out = []
    for t in tensors:
        if t.numel() > 0:
            out.append(next(norms))
        else:
            zero = torch.zeros((), dtype=torch.float32, device=t.device) if zero is None else zero
            out.append(zero)
    return out


class TorchEngine:
    """Gathers gradient statistics for a set of named parameters, one optimizer step at a time.

    The engine holds no sink: :meth:`after_optimizer_step` returns the finished records.

    Args:
        named_parameters: ``model.named_parameters()``; parameters without ``requires_grad``
            are left out. A module compiled with ``torch.compile`` keeps its own names (the
            ``_orig_mod.`` its wrapper adds is dropped).
        group_by: ``"module"`` (default), ``"parameter"`` or a callable from parameter name to
            group name.
        cadence: when to gather the logging-step statistics and histograms.
        track_update_ratio: also measure ``|update| / |param|`` at logging steps (keeps a copy
            of the parameters from before the step until after it).
        label_optimizers: name whole-model tags by optimizer index even for the first
            optimizer (the second and later always are).
        histogram_bins: buckets per histogram (at most 10,000).
        statistics: the per-group statistics written (``gradwatch.keys.STATISTICS``).
        guard: detectors, their actions and a clipping policy (default: warn on every kind,
            no clipping).
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]],
        *,
        group_by: GroupBy = "module",
        cadence: Cadence | None = None,
        track_update_ratio: bool = False,
        label_optimizers: bool = False,
        histogram_bins: int = 30,
        guard: Guard | None = None,
        scaler: torch.amp.GradScaler | None = None,
        statistics: Sequence[str] = keys.DEFAULT_STATISTICS,
    ) -> None:
        named = [(_original_name(n), p) for n, p in named_parameters if p.requires_grad]
        self.params = [p for _, p in named]
        self.grouping = Grouping.build([n for n, _ in named], group_by)
        self.cadence = cadence or Cadence()
        self.track_update_ratio = track_update_ratio
        self.label_optimizers = label_optimizers
        self.histogram_bins = check_histogram_bins(histogram_bins)
        self.scaler = scaler
        self.statistics = tuple(statistics)
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._optimizers: dict[int, _OptimizerState] = {}
        self._pending: list[_Pending] = []
        self._restored: dict[str, list] = {}
        self.guard = TorchGuard(guard or Guard(), self.grouping)
        self._skipped: deque[int] = deque(maxlen=_KEPT)
        self._counts: dict[int, dict[str, float]] = {}  # NaN/Inf values by group, at a step
        self.skipped_count = 0  # optimizer steps dropped by a "skip" or "stop" action, in all
        self.stopped_at: int | None = None  # the step a "stop" action dropped

    @property
    def skipped(self) -> list[int]:
        """The most recent steps dropped by a ``"skip"`` or ``"stop"`` action, oldest first."""
        return list(self._skipped)

    # -- the two calls ---------------------------------------------------------------------

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, step: int | None = None
    ) -> None:
        """Measure the gradients ``optimizer`` is about to apply, decide, and act.

        Call after backward (with a loss scaler, the engine unscales the gradients itself
        when ``scaler.unscale_`` was not called). A dropped step (``"skip"``, ``"stop"``)
        leaves every ``p.grad`` the optimizer holds at None, so ``optimizer.step()`` changes
        neither the parameters nor its state.
        """
        state = self._state(optimizer)
        scaler_skipped = _scaler_skipped(self.scaler, optimizer)
        stepped = self._stepped(state, optimizer)
        indices, params = stepped.indices, stepped.params
        grads = [p.grad for p in params]
        count, state.calls = state.calls, state.calls + 1
        if not grads:
            return
        if stepped.sharded:
            reducer, local_grads = ShardReducer.for_tensors(grads), [local(g) for g in grads]
        else:
            reducer, local_grads = _NOT_SHARDED, grads
        norms = reducer.norms(torch.stack(_float_norms(local_grads, 2.0, stepped.nonempty)))
        if state.guard is None:
            state.guard = self.guard.start(norms)
            self._restore(state)
        on_host = state.guard.on_host
        if on_host:
            norms = _without_overflow(norms, local_grads, stepped.sharded)
        total = global_norm(view(norms, on_host))  # where the guard decides
        if scaler_skipped is not None:
            scaler_skipped = view(scaler_skipped, on_host)
        number = count if step is None else step
        decision, dropped = self.guard.step(
            state.guard, indices, params, local_grads, norms, total, number, scaler_skipped
        )
        if state.summary is None:
            state.summary = init_summary(total)
        skips = decision.skip if self.guard.guard.reads_every_step else None
        state.summary = update_summary(state.summary, total, skips, scaler_skipped)
        stop = False
        if (on_host or dropped) and self._nonfinite_finding(total, scaler_skipped):
            # How many NaN/Inf values, counted while they are here, where the host knows the
            # step already (on the CPU, or a step dropped after its one read on a GPU).
            host = view(norms, True) if on_host else norms.cpu().numpy()
            counts = self._nonfinite(local_grads, host, reducer)
            self._counts[number] = nonzero_sums(self.grouping, np.asarray(indices), counts)
        if dropped:
            self._skipped.append(number)
            self.skipped_count += 1
            stop = bool(decision.stop)
            if stop and self.stopped_at is None:
                self.stopped_at = number
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # the whole step: watched or not, no parameter moves
        logs = self.cadence.logs(count) or stop
        histograms = self.cadence.histograms(count)
        state.last = _Last(number, indices, norms, logs)
        if logs or histograms:
            pending = self._measure(state, indices, params, local_grads, norms, reducer, logs)
            pending.step = number
            if histograms:
                pending.histogram_groups, rows = self._histograms(indices, local_grads, reducer)
                pending.parts.append(rows.flatten())
            if logs and self.track_update_ratio:
                pending.params = params
                pending.snapshot = [local(p).detach().clone() for p in params]
            self._pending.append(pending)

    def after_optimizer_step(self) -> list[Record]:
        """Finish the logging steps measured since the last call and return their records,
        with their detections on ``record.events``."""
        records = [self._record(p) for p in self._pending]
        self._pending.clear()
        return records

    def finish(self) -> list[Record]:
        """Records of each optimizer's last step when it was not a logging step: its gradient
        norms (the gradients may be gone when a run ends) and the detections not yet read."""
        records = []
        for state in sorted(self._optimizers.values(), key=lambda s: s.index):
            last = state.last
            if last is None or last.logged or state.guard is None or state.summary is None:
                continue
            norms = last.norms.float().cpu().numpy().astype(np.float64)
            summary = StepSummary(*(float(v) for v in state.summary))
            stats = TensorStats(
                present=self._scatter(last.indices, np.ones(len(last.indices))).astype(bool),
                grad_norm=self._scatter(last.indices, norms),
            )
            record = self._build(last.step, state, stats, summary, {})
            record.events = self._drain(state)
            last.logged = True
            records.append(record)
        return records

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, list]:
        """Plain lists: step counts and, per optimizer, the clipping and detector state."""
        ordered = sorted(self._optimizers.values(), key=lambda s: s.index)
        return {
            "optimizer_steps": [s.calls for s in ordered],
            "guards": [self.guard.state_dict(s.guard) for s in ordered if s.guard is not None],
        }

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Resume from :meth:`state_dict`; parts saved under another configuration start
        afresh with one warning naming them (applied at each optimizer's first step)."""
        self._restored = dict(state) if isinstance(state, dict) else {}

    # -- internals ---------------------------------------------------------------------------

    def _state(self, optimizer: torch.optim.Optimizer) -> _OptimizerState:
        state = self._optimizers.get(id(optimizer))
        if state is None:
            index = len(self._optimizers)
            restored = self._restored.get("optimizer_steps", [])
            calls = restored[index] if index < len(restored) else 0
            if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
                calls = 0
            state = self._optimizers[id(optimizer)] = _OptimizerState(index=index, calls=calls)
        return state

    def _restore(self, state: _OptimizerState) -> None:
        """Put the saved guard state of this optimizer into its freshly started run."""
        guards = self._restored.get("guards", [])
        if not self._restored or state.guard is None:
            return
        saved = guards[state.index] if state.index < len(guards) else {}
        afresh = self.guard.load_state_dict(state.guard, saved)
        if afresh:
            warnings.warn(
                "gradwatch: the checkpoint's state does not match this configuration; starting"
                f" afresh: {', '.join(afresh)}",
                GradWatchWarning,
                stacklevel=4,
            )

    def _stepped(self, state: _OptimizerState, optimizer: torch.optim.Optimizer) -> _Stepped:
        """The parameters with gradients this step, worked out once per set of them."""
        with_grad = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        key = tuple(map(id, with_grad))
        stepped = state.stepped.get(key)
        if stepped is None:
            if len(state.stepped) >= _STEPPED_KEPT:
                state.stepped.clear()
            watched = [(self._position[id(p)], p) for p in with_grad if id(p) in self._position]
            params = [p for _, p in watched]
            sharded = has_dtensors(params)
            stepped = state.stepped[key] = _Stepped(
                [i for i, _ in watched],
                params,
                sharded,
                not sharded and all(p.numel() > 0 for p in params),
            )
        return stepped

    def _measure(
        self,
        state: _OptimizerState,
        indices: list[int],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        reducer: ShardReducer,
        logs: bool,
    ) -> _Pending:
        """Launch the logging step's reductions on the device; nothing is read yet."""
        parts: list[torch.Tensor] = []
        if logs:
            assert state.summary is not None  # updated by this step
            parts += [
                norms,
                reducer.max(torch.stack(_float_norms(grads, _INF))),
                reducer.norms(torch.stack(_float_norms([local(p).detach() for p in params], 2.0))),
                torch.stack([torch.as_tensor(v) for v in state.summary]),
            ]
            state.summary = reset_summary(state.summary)
        pending = _Pending(0, state, indices, logs, parts, grads, reducer)
        clip = None
        if logs and state.guard is not None and self.guard.guard.policy is not None:
            clipped = reducer.norms(torch.stack(_float_norms(grads, 2.0)))  # after clipping
            clip = self.guard.clip_values(state.guard, global_norm(clipped))
        if clip is not None:
            pending.clipped = True
            parts.append(clip)
        return pending

    @staticmethod
    def _nonfinite_finding(total: object, scaler_skipped: object) -> bool:
        """Whether this step's gradient is non-finite and that is a finding (not the loss
        scaler's own overflow check)."""
        return not np.isfinite(float(total)) and not (
            scaler_skipped is not None and bool(scaler_skipped)
        )

    def _nonfinite(
        self, grads: list[torch.Tensor], norms: np.ndarray, reducer: ShardReducer
    ) -> np.ndarray:
        """Count NaN/Inf values, only when some norm says there are any (read on the host now).

        The norms are already reduced across processes, so every rank takes the same branch.
        """
        if np.isfinite(norms).all():
            return np.zeros(len(grads))
        counts = torch.stack([(~torch.isfinite(g)).sum(dtype=torch.float32) for g in grads])
        return reducer.sum_per_tensor(counts).cpu().numpy().astype(np.float64)

    def _scatter(self, indices: list[int], values: np.ndarray) -> np.ndarray:
        """Per-optimizer values placed at their tensors' positions among all tensors."""
        full = np.zeros(len(self.grouping.tensors), dtype=np.float64)
        full[indices] = values
        return full

    def _histograms(
        self, indices: list[int], grads: list[torch.Tensor], reducer: ShardReducer
    ) -> tuple[list[str], torch.Tensor]:
        """Per group: [lo, hi, sum, sum of squares, counts...] over finite gradient values."""
        by_group: dict[int, list[torch.Tensor]] = {}
        for k, (i, g) in enumerate(zip(indices, grads, strict=True)):
            part = g.detach().flatten()
            if not reducer.counts_here(k):  # a replica counted on another process
                part = part[:0]
            by_group.setdefault(int(self.grouping.index[i]), []).append(part)
        names, rows = [], []
        bins = self.histogram_bins
        for group, parts in by_group.items():
            values = torch.cat(parts).float()
            if values.numel() == 0:  # an empty shard: neutral elements for the reductions
                values = torch.full((1,), torch.nan, device=values.device)
            finite = torch.isfinite(values)
            lo = reducer.min(torch.where(finite, values, _INF).amin(dim=0, keepdim=True))
            hi = reducer.max(torch.where(finite, values, -_INF).amax(dim=0, keepdim=True))
            safe = torch.where(finite, values, 0.0)
            width = torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
            bucket = ((safe - lo) / width * bins).long().clamp(0, bins - 1)
            counts = torch.zeros(bins, device=values.device).index_add_(0, bucket, finite.float())
            moments = torch.stack([safe.sum(), safe.square().sum()])
            rows.append(torch.cat([lo, hi, reducer.sum(moments), reducer.sum(counts)]))
            names.append(self.grouping.groups[group])
        return names, torch.stack(rows)

    def _record(self, pending: _Pending) -> Record:
        """Read a logging step on the host, in one copy, and name its statistics."""
        parts = pending.parts
        if pending.snapshot is not None:
            current = [local(p).detach() for p in pending.params]
            torch._foreach_sub_(pending.snapshot, current)
            updates = torch.stack(_float_norms(pending.snapshot, 2.0))
            parts = [*parts, ShardReducer.for_tensors(pending.params).norms(updates)]
        host = iter(_split(torch.cat([p.float().flatten() for p in parts]), parts))
        histograms = {}
        if pending.logs:
            grad_norm, max_abs, param_norm, summary = next(host), next(host), next(host), next(host)
            clip = next(host) if pending.clipped else None
        if pending.histogram_groups:
            width = self.histogram_bins + 4
            rows = next(host).reshape(-1, width)
            for name, row in zip(pending.histogram_groups, rows, strict=True):
                histograms[name] = Histogram.from_counts(row[0], row[1], row[4:], row[2], row[3])
        if not pending.logs:  # a histogram step between logging steps
            return build_histogram_record(pending.step, self.grouping, histograms)
        indices = pending.indices
        nonfinite = self._nonfinite(pending.grads, grad_norm, pending.reducer)
        stats = TensorStats(
            present=self._scatter(indices, np.ones(len(indices))).astype(bool),
            grad_norm=self._scatter(indices, grad_norm),
            grad_max_abs=self._scatter(indices, max_abs),
            grad_nonfinite=self._scatter(indices, nonfinite),
            param_norm=self._scatter(indices, param_norm),
            update_norm=None if pending.snapshot is None else self._scatter(indices, next(host)),
        )
        state = pending.optimizer
        record = self._build(pending.step, state, stats, StepSummary(*summary), histograms)
        if clip is not None:
            optimizer = self._label(state)
            record.scalars[keys.clip_tag(keys.THRESHOLD, optimizer)] = float(clip[0])
            record.scalars[keys.clip_tag(keys.COEFFICIENT, optimizer)] = float(clip[1])
            record.scalars[keys.total_tag(keys.CLIPPED, optimizer)] = float(clip[2])
        assert state.guard is not None
        self._counts[pending.step] = nonzero_sums(self.grouping, np.asarray(indices), nonfinite)
        record.events = self._drain(state)
        return record

    def _drain(self, state: _OptimizerState) -> list[dict]:
        """The detections since the last read, with the NaN/Inf counts known for their steps."""
        assert state.guard is not None
        events = self.guard.drain(state.guard)
        for step, counts in self._counts.items():
            count_nonfinite(events, step, counts)
        self._counts.clear()
        return events

    def _label(self, state: _OptimizerState) -> int | None:
        """The optimizer's index in tags, or None for a lone first optimizer."""
        return state.index if (state.index > 0 or self.label_optimizers) else None

    def _build(
        self,
        step: int,
        state: _OptimizerState,
        stats: TensorStats,
        summary: StepSummary,
        histograms: dict[str, Histogram],
    ) -> Record:
        return build_record(
            step,
            self.grouping,
            stats,
            summary=summary,
            histograms=histograms,
            optimizer=self._label(state),
            skips=self.guard.guard.reads_every_step,
            scaler=self.scaler is not None and self.scaler.is_enabled(),
            statistics=self.statistics,
        )


def _split(flat: torch.Tensor, parts: list[torch.Tensor]) -> list[np.ndarray]:
    """One device-to-host copy of ``flat``, cut back into the sizes of ``parts``."""
    host = flat.cpu().numpy().astype(np.float64)
    sizes = np.cumsum([p.numel() for p in parts])[:-1]
    return np.split(host, sizes)


def _scaler_skipped(
    scaler: torch.amp.GradScaler | None, optimizer: torch.optim.Optimizer
) -> torch.Tensor | None:
    """Whether the loss scaler will drop this step itself (a bool on the device), or None
    without an enabled scaler. Unscales the gradients first when the user has not."""
    if scaler is None or not scaler.is_enabled():
        return None
    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    found = list(scaler._found_inf_per_device(optimizer).values())
    if not found:  # no gradients at all
        return None
    total = found[0]
    for other in found[1:]:  # one per device the optimizer's gradients live on
        total = total + other.to(total.device)
    return total > 0


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _without_overflow(
    norms: torch.Tensor, grads: list[torch.Tensor], sharded: bool
) -> torch.Tensor:
    """``norms`` (float32, on the CPU) with each infinite norm of a finite gradient taken again
    scaled by its largest value, so that it is what it is, a large finite number, and not an
    overflow of its sum of squares (from about 1.8e19) that would read as non-finite.
    Norms beyond float32's range are held at its largest value."""
    values = norms.numpy()
    if not np.isinf(values).any() or sharded:
        return norms
    norms = norms.clone()
    for k in np.flatnonzero(np.isinf(values)):
        grad = grads[k].detach()
        largest = grad.abs().max().double()
        if torch.isfinite(largest) and largest > 0:
            scaled = (grad.double() / largest).norm() * largest
            norms[k] = min(float(scaled), _FLOAT32_MAX)
    return norms


class TorchGradWatch:
    """gradwatch for a plain PyTorch loop: an engine writing to TensorBoard event files.

    Args:
        model: the module whose gradients are watched.
        log_dir: directory of the event files.
        log_every_n_steps: optimizer steps between logging steps.
        histogram_every_n_steps: optimizer steps between histograms (0: none).
        group_by: see :class:`TorchEngine`.
        track_update_ratio: see :class:`TorchEngine`.
        histogram_bins: buckets per histogram (at most 10,000).
        statistics: the per-group statistics written: ``"default"`` (``grad_norm`` and
            ``grad_to_param``, two charts a group), ``"all"``, or a list of names from
            ``grad_norm``, ``grad_to_param``, ``grad_max_abs``, ``grad_nonfinite``,
            ``param_norm``, ``update_to_param``. Non-finite values are reported through the
            events whatever is chosen.
        sinks: extra sinks (for example a :class:`gradwatch.sinks.MemorySink`).
        scaler: the ``torch.amp.GradScaler`` of the loop, if any. The steps it drops itself
            (its overflow checks) are counted (``amp/skipped_steps``), never reported as
            faults nor acted on. gradwatch unscales the gradients when you have not.
        clip, on_nonfinite, on_explosion, on_vanishing, explosion, vanishing: as for the
            Lightning callback. ``"skip"`` drops the step inside ``before_optimizer_step``
            (every ``p.grad`` the optimizer holds set to None, so ``optimizer.step()`` leaves
            the parameters and its state alone); ``"stop"`` drops the offending step the same
            way and makes :attr:`should_stop` true: end your loop then.

    The most recent detections are kept on ``events`` and told as :class:`GradWatchWarning`
    lines. Use it as a context manager, or call :meth:`close`: the last step is written then.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        log_dir: str | os.PathLike | None = "runs",
        *,
        log_every_n_steps: int = 50,
        histogram_every_n_steps: int = 0,
        group_by: GroupBy = "module",
        track_update_ratio: bool = False,
        histogram_bins: int = 30,
        statistics: str | Sequence[str] = "default",
        sinks: Sequence[Sink] = (),
        scaler: torch.amp.GradScaler | None = None,
        clip: Policy | float | None = None,
        on_nonfinite: str = "warn",
        on_explosion: str = "warn",
        on_vanishing: str = "warn",
        explosion: Explosion | None = None,
        vanishing: Vanishing | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module. Received: model={model!r}")
        options = check_options(
            log_dir=log_dir,
            log_every_n_steps=log_every_n_steps,
            histogram_every_n_steps=histogram_every_n_steps,
            group_by=group_by,
            track_update_ratio=track_update_ratio,
            histogram_bins=histogram_bins,
            statistics=statistics,
            sinks=sinks,
            clip=clip,
            on_nonfinite=on_nonfinite,
            on_explosion=on_explosion,
            on_vanishing=on_vanishing,
            explosion=explosion,
            vanishing=vanishing,
        )
        scaler = check_instance("scaler", scaler, torch.amp.GradScaler, lambda: None)
        cadence = options.cadence()
        self.engine = TorchEngine(
            model.named_parameters(),
            group_by=options.group_by,
            cadence=cadence,
            track_update_ratio=options.track_update_ratio,
            histogram_bins=options.histogram_bins,
            guard=options.guard,
            scaler=scaler,
            statistics=options.statistics,
        )
        outputs = [] if options.log_dir is None else [TensorBoardSink(options.log_dir)]
        layout = build_layout(  # a plain loop meets its optimizers only as they step
            self.engine.grouping,
            clipping=options.guard.policy is not None,
            optimizers=None,
            statistics=options.statistics,
        )
        pictures = FlowPictures(images=cadence.histogram_every_n_steps > 0, layout=layout)
        self.reporter = Reporter(Monitor([*outputs, *options.sinks], pictures=pictures))

    @property
    def events(self) -> list[dict]:
        """The most recent detections, oldest first."""
        return self.reporter.events

    @property
    def should_stop(self) -> bool:
        """Whether a ``"stop"`` action fired (its step was dropped): end the loop."""
        return self.engine.stopped_at is not None

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, step: int | None = None
    ) -> None:
        self.engine.before_optimizer_step(optimizer, step)

    def after_optimizer_step(self) -> None:
        self.reporter.publish(self.engine.after_optimizer_step(), self.engine.stopped_at)

    def close(self) -> None:
        """Write the last step when it was not logged, and close the event files."""
        if not self.reporter.monitor.closed:
            self.reporter.close(self.engine.finish())

    def __enter__(self) -> TorchGradWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
