"""The torch engine: per-tensor gradient measures on the tensors' own device.

Every optimizer step costs one ``torch._foreach_norm`` over the gradients plus a handful of
scalar kernels, and no host read (unless an action may drop the step). At the logging cadence
the engine also takes the measures :func:`gradwatch.stats.measures_for` declares for the
statistics written, and histograms at theirs, and copies them to the host in one transfer
after the optimizer step; the core's :class:`~gradwatch.recording.Recorder` names them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.amp.grad_scaler import OptState

from gradwatch import tags
from gradwatch.cadence import Cadence
from gradwatch.grouping import GroupBy, Grouping
from gradwatch.guard import Guard
from gradwatch.integrations._shards import ShardReducer, has_dtensors, local
from gradwatch.integrations._torch_decisions import GuardRun, TorchDecisions, view
from gradwatch.integrations._torch_signal import SignalProbe
from gradwatch.options import check_histogram_bins
from gradwatch.record import Record
from gradwatch.recording import Reading, Recorder
from gradwatch.signal import Entry, SignalAlarms, fold
from gradwatch.stats import (
    GRAD_NORM,
    StepSummary,
    global_norm,
    init_summary,
    measures_for,
    nonzero_sums,
    reset_summary,
)

__all__ = ["TorchEngine"]

_NOT_SHARDED = ShardReducer(())
_STEPPED_KEPT = 8  # sets of parameters with gradients remembered per optimizer
_KEPT = 1000  # dropped steps remembered (all are counted)
_ORDER = {"norm": 2.0, "max_abs": math.inf}  # a Measure's reduction as a vector norm's order
_COMPILED = "_orig_mod"  # the attribute through which torch.compile's wrapper holds the module
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class _Stepped:
    """The watched parameters that one optimizer steps with gradients, in its order."""

    indices: list[int]  # positions among the engine's parameters
    params: list[torch.Tensor]
    sharded: bool  # some are DTensors
    plain: bool  # none is sharded, empty or float64, so neither is any gradient


@dataclass
class _Last:
    """The newest step of an optimizer: enough to write it when the run ends before it is
    logged (its gradient norms; the gradients themselves may be gone by then)."""

    step: int
    indices: list[int]
    norms: torch.Tensor
    logged: bool


@dataclass
class _Optimizer:
    index: int
    recorder: Recorder
    calls: int = 0
    summary: StepSummary | None = None
    guard: GuardRun | None = None
    stepped: dict[tuple[int, ...], _Stepped] = field(default_factory=dict)  # by parameter ids
    last: _Last | None = None
    counts: dict[int, dict[str, float]] = field(default_factory=dict)  # NaN/Inf counts by step


@dataclass
class _Pending:
    """A step measured on the device, read on the host after the optimizer step.

    Reading after the step puts gradwatch's one host synchronisation where Lightning makes
    its own on the same steps, so the two cost one pipeline drain.
    """

    step: int
    optimizer: _Optimizer
    indices: list[int]
    grads: list[torch.Tensor]
    reducer: ShardReducer
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named, copied in one transfer
    histogram_groups: list[int] = field(default_factory=list)
    params: list[torch.Tensor] = field(default_factory=list)
    snapshot: list[torch.Tensor] | None = None  # the parameters before the step
    signal: list[Entry] = field(default_factory=list)  # what parts["signal"] holds


def _original_name(name: str) -> str:
    """A parameter's name in the module that ``torch.compile`` wrapped: without the
    ``_orig_mod`` components it inserts, wherever a compiled module sits in the model.

    Example:
        >>> _original_name("net._orig_mod.0.weight")
        'net.0.weight'
    """
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def _float_norms(
    tensors: Sequence[torch.Tensor], order: float, plain: bool = False
) -> torch.Tensor:
    """Per-tensor norms in float32, stacked; empty tensors (empty shards) count as 0, and
    float64 tensors are reduced in float64 (torch will not narrow them in a reduction).

    ``plain``: the caller knows that no tensor is empty or float64 (one kernel, no
    bookkeeping).
    """
    if plain or all(t.numel() > 0 and t.dtype != torch.float64 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, order, dtype=torch.float32))
    norms: dict[int, torch.Tensor] = {}
    for wide in (False, True):  # one call for the float64 tensors, one for the others
        chosen = [
            i for i, t in enumerate(tensors) if t.numel() > 0 and (t.dtype == torch.float64) is wide
        ]
        if chosen:
            dtype = torch.float64 if wide else torch.float32
            measured = torch._foreach_norm([tensors[i] for i in chosen], order, dtype=dtype)
            norms.update(zip(chosen, measured, strict=True))
    zero = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    return torch.stack([norms.get(i, zero) for i in range(len(tensors))]).float()


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
        guard: detectors, their actions and a clipping policy (default: warn on every kind,
            no clipping).
        scaler: the loop's ``torch.amp.GradScaler``; the steps it drops are counted, never
            treated as faults.
        statistics: the per-group statistics written (``gradwatch.tags.STATISTICS``).
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
        statistics: Sequence[str] = tags.DEFAULT_STATISTICS,
        signal_of: torch.nn.Module | None = None,
        alarms: SignalAlarms | None = None,
    ) -> None:
        given = [(n, p) for n, p in named_parameters if p.requires_grad]
        named = [(_original_name(n), p) for n, p in given]
        self.params = [p for _, p in named]
        self.grouping = Grouping.build([n for n, _ in named], group_by)
        self.signal, self.alarms = None, alarms
        if signal_of is not None:
            self.signal = SignalProbe(signal_of, self.grouping, [n for n, _ in given])
        self.cadence = cadence or Cadence()
        self.track_update_ratio = track_update_ratio
        self.label_optimizers = label_optimizers
        self.histogram_bins = check_histogram_bins(histogram_bins)
        self.scaler = scaler
        self.statistics = tuple(statistics)
        self.measures = measures_for([*self.statistics, *self._update_ratio()])
        self.guard = TorchDecisions(guard or Guard(), self.grouping)
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._optimizers: dict[int, _Optimizer] = {}
        self._pending: list[_Pending] = []
        self._restored: dict[str, list] = {}
        self._skipped: deque[int] = deque(maxlen=_KEPT)
        self.skipped_count = 0  # optimizer steps dropped by a "skip" or "stop" action, in all
        self.stopped_at: int | None = None  # the step a "stop" action dropped

    @property
    def skipped(self) -> list[int]:
        """The most recent steps dropped by a ``"skip"`` or ``"stop"`` action, oldest first."""
        return list(self._skipped)

    # -- the calls ---------------------------------------------------------------------------

    def before_forward(self) -> None:
        """With ``signal_of``: before a forward whose optimizer step is a logging step, hook
        the groups' modules (the hooks go at that step). Elsewhere nothing is installed."""
        if self.signal is not None and self.cadence.logs(self._next_count()):
            self.signal.install()

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
            reducer, grads = ShardReducer.for_tensors(grads), [local(g) for g in grads]
        else:
            reducer = _NOT_SHARDED
        norms = reducer.combine("norm", _float_norms(grads, 2.0, stepped.plain))
        if state.guard is None:
            state.guard = self.guard.start(norms)
            self._restore(state)
        on_host = state.guard.on_host
        if on_host:
            norms = _without_overflow(norms, grads, stepped.sharded)
        if state.summary is None:
            state.summary = init_summary(view(norms, on_host))
        number = count if step is None else step
        decision, dropped, total, state.summary = self.guard.step(
            state.guard, indices, params, grads, norms, number, state.summary, scaler_skipped
        )
        if (on_host or dropped) and _nonfinite_finding(total, scaler_skipped):
            # How many NaN/Inf values, counted while they are here, where the host knows the
            # step already (on the CPU, or a step dropped after its one read on a GPU).
            host = view(norms, True) if on_host else norms.cpu().numpy()
            counts = _count_nonfinite(grads, host, reducer)
            state.counts[number] = nonzero_sums(self.grouping, np.asarray(indices), counts)
        stop = dropped and bool(decision.stop)
        if dropped:
            self._drop(optimizer, number, stop)
        logs = self.cadence.logs(count) or stop
        histograms = self.cadence.histograms(count)
        signal = None  # the signal hooks go at every step they were installed for
        if self.signal is not None and logs:
            signal = self.signal.collect(_loss_scale(self.scaler))
        elif self.signal is not None:
            self.signal.remove()
        state.last = _Last(number, indices, norms, logs)
        if logs or histograms:
            pending = _Pending(number, state, indices, grads, reducer)
            if logs:
                self._measure(pending, params, norms)
                if signal is not None:
                    pending.parts["signal"], pending.signal = signal
            if histograms:
                pending.histogram_groups, pending.parts["histograms"] = self._histograms(
                    indices, grads, reducer
                )
            self._pending.append(pending)

    def after_optimizer_step(self) -> list[Record]:
        """Finish the steps measured since the last call and return their records, with the
        detections since the last read on each logging step's ``record.events``."""
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
            reading = Reading(
                last.step,
                np.asarray(last.indices),
                {GRAD_NORM.name: last.norms.float().cpu().numpy().astype(np.float64)},
                StepSummary(*(float(v) for v in state.summary)),
            )
            records.append(self._read(state, reading))
            last.logged = True
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

    def _next_count(self) -> int:
        """The count of the first optimizer's next step (what the cadence is asked)."""
        first = next((s for s in self._optimizers.values() if s.index == 0), None)
        if first is not None:
            return first.calls
        restored = self._restored.get("optimizer_steps", [0])
        return restored[0] if restored and isinstance(restored[0], int) else 0

    def _update_ratio(self) -> tuple[str, ...]:
        return (tags.UPDATE_TO_PARAM,) if self.track_update_ratio else ()

    def _state(self, optimizer: torch.optim.Optimizer) -> _Optimizer:
        state = self._optimizers.get(id(optimizer))
        if state is None:
            index = len(self._optimizers)
            restored = self._restored.get("optimizer_steps", [])
            calls = restored[index] if index < len(restored) else 0
            if not isinstance(calls, int) or isinstance(calls, bool) or calls < 0:
                calls = 0
            recorder = Recorder(
                self.grouping,
                self.guard.guard,
                statistics=self.statistics,
                optimizer=index if (index > 0 or self.label_optimizers) else None,
                scaler=self.scaler is not None and self.scaler.is_enabled(),
                alarms=self.alarms,
            )
            state = _Optimizer(index, recorder, calls=calls)
            self._optimizers[id(optimizer)] = state
        return state

    def _restore(self, state: _Optimizer) -> None:
        """Put the saved guard state of this optimizer into its freshly started run."""
        guards = self._restored.get("guards", [])
        if not self._restored or state.guard is None:
            return
        self.guard.load_state_dict(
            state.guard, guards[state.index] if state.index < len(guards) else {}
        )

    def _stepped(self, state: _Optimizer, optimizer: torch.optim.Optimizer) -> _Stepped:
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
                not sharded and all(p.numel() > 0 and p.dtype != torch.float64 for p in params),
            )
        return stepped

    def _drop(self, optimizer: torch.optim.Optimizer, step: int, stop: bool) -> None:
        """Drop the whole step: watched or not, no parameter moves."""
        self._skipped.append(step)
        self.skipped_count += 1
        if stop and self.stopped_at is None:
            self.stopped_at = step
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _measure(self, pending: _Pending, params: list[torch.Tensor], norms: torch.Tensor) -> None:
        """Launch a logging step's measures on the device (nothing is read yet): those the
        statistics need, each reduced and combined over shards as it declares. The NaN/Inf
        counts are taken on the host, only where a norm is not finite; the update's norms
        after the step."""
        state, grads, reducer = pending.optimizer, pending.grads, pending.reducer
        tensors = {"grad": grads, "param": [local(p).detach() for p in params]}
        for measure in self.measures:
            if measure is GRAD_NORM:
                pending.parts[measure.name] = norms
            elif measure.of in tensors and measure.reduce in _ORDER:
                values = _float_norms(tensors[measure.of], _ORDER[measure.reduce])
                pending.parts[measure.name] = reducer.combine(measure.combine, values)
            elif measure.of == "update":
                pending.params = params
                pending.snapshot = [p.clone() for p in tensors["param"]]
        assert state.summary is not None  # updated by this step
        pending.parts["summary"] = torch.stack([torch.as_tensor(v) for v in state.summary])
        state.summary = reset_summary(state.summary)
        if state.guard is not None and self.guard.guard.policy is not None:
            clipped = reducer.combine("norm", _float_norms(grads, 2.0))  # after clipping
            clip = self.guard.clip_values(state.guard, global_norm(clipped))
            if clip is not None:
                pending.parts["clip"] = clip

    def _histograms(
        self, indices: list[int], grads: list[torch.Tensor], reducer: ShardReducer
    ) -> tuple[list[int], torch.Tensor]:
        """Per group: a row of :data:`gradwatch.record.HISTOGRAM_HEAD` and the counts, over
        its finite gradient values."""
        by_group: dict[int, list[torch.Tensor]] = {}
        for k, (i, g) in enumerate(zip(indices, grads, strict=True)):
            part = g.detach().flatten()
            if not reducer.counts_here(k):  # a replica counted on another process
                part = part[:0]
            by_group.setdefault(int(self.grouping.index[i]), []).append(part)
        rows = []
        bins = self.histogram_bins
        for parts in by_group.values():
            values = torch.cat(parts).float()
            if values.numel() == 0:  # an empty shard: neutral elements for the reductions
                values = torch.full((1,), torch.nan, device=values.device)
            finite = torch.isfinite(values)
            lo = reducer.min(torch.where(finite, values, math.inf).amin(0, True))
            hi = reducer.max(torch.where(finite, values, -math.inf).amax(0, True))
            safe = torch.where(finite, values, 0.0)
            width = torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
            bucket = ((safe - lo) / width * bins).long().clamp(0, bins - 1)
            counts = torch.zeros(bins, device=values.device).index_add_(0, bucket, finite.float())
            sums = reducer.sum(torch.stack([safe.sum(), safe.square().sum()]))
            rows.append(torch.cat([lo, hi, sums, reducer.sum(counts)]))
        return list(by_group), torch.stack(rows)

    def _record(self, pending: _Pending) -> Record:
        """Read a step on the host, in one copy, and have the core name it."""
        parts = pending.parts
        if pending.snapshot is not None:
            current = [local(p).detach() for p in pending.params]
            torch._foreach_sub_(pending.snapshot, current)
            updates = ShardReducer.for_tensors(pending.params).combine(
                "norm", _float_norms(pending.snapshot, 2.0)
            )
            parts = {**parts, "update_norm": updates}
        host = _to_host(parts)
        reading = Reading(pending.step, np.asarray(pending.indices))
        if "histograms" in host:
            rows = host["histograms"].reshape(len(pending.histogram_groups), -1)
            reading.histograms = dict(zip(pending.histogram_groups, rows, strict=True))
        if "summary" not in host:  # a histogram step between logging steps
            return pending.optimizer.recorder.record(reading)
        reading.summary = StepSummary(*host["summary"])
        reading.clip = host.get("clip")
        if "signal" in host:
            reading.signal = fold(pending.signal, host["signal"])
        for measure in self.measures:
            if measure.reduce == "nonfinite":
                counts = _count_nonfinite(pending.grads, host[GRAD_NORM.name], pending.reducer)
                reading.measures[measure.name] = counts
            elif measure.name in host:
                reading.measures[measure.name] = host[measure.name]
        return self._read(pending.optimizer, reading)

    def _read(self, state: _Optimizer, reading: Reading) -> Record:
        """The record of a logging step, with the detections since the last read."""
        assert state.guard is not None
        record = state.recorder.record(reading, self.guard.drain(state.guard), state.counts)
        state.counts.clear()
        return record


def _to_host(parts: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """One device-to-host copy of the named ``parts``, cut back into their names."""
    flat = torch.cat([p.float().flatten() for p in parts.values()]).cpu().numpy()
    sizes = np.cumsum([p.numel() for p in parts.values()])[:-1]
    return dict(zip(parts, np.split(flat.astype(np.float64), sizes), strict=True))


def _nonfinite_finding(total: object, scaler_skipped: object) -> bool:
    """Whether this step's gradient is non-finite and that is a finding (not the loss
    scaler's own overflow check)."""
    return not np.isfinite(float(total)) and not (
        scaler_skipped is not None and bool(scaler_skipped)
    )


def _count_nonfinite(
    grads: list[torch.Tensor], norms: np.ndarray, reducer: ShardReducer
) -> np.ndarray:
    """Per tensor, its NaN/Inf values: counted only when some norm (read on the host) is not
    finite. The norms are reduced across processes, so every rank takes the same branch."""
    if np.isfinite(norms).all():
        return np.zeros(len(grads))
    counts = torch.stack([(~torch.isfinite(g)).sum(dtype=torch.float32) for g in grads])
    return reducer.combine("sum", counts).cpu().numpy().astype(np.float64)


def _loss_scale(scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """The factor an enabled loss scaler multiplied this step's loss by, on the device."""
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler._scale


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
