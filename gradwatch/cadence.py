"""When a step is a logging step, and when a histogram step, counted in optimizer steps."""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.checks import OFF, check_count

__all__ = ["Cadence", "ReadSchedule"]


@dataclass(frozen=True)
class Cadence:
    """How often the expensive statistics are gathered, counted in optimizer steps.

    Step ``k`` (0-based) is a logging step when ``(k + 1) % n == 0``: the steps Lightning's
    own logging uses (``n - 1``, ``2n - 1``, ...), so both share one host synchronisation and
    the charts line up. Step 0 is a logging step too, so a run shows its start.

    Example:
        >>> [k for k in range(10) if Cadence(log_every_n_steps=4).logs(k)]
        [0, 3, 7]
    """

    log_every_n_steps: int = 50
    histogram_every_n_steps: int = 0

    def __post_init__(self) -> None:
        every = check_count("log_every_n_steps", self.log_every_n_steps)
        histograms = check_count(
            "histogram_every_n_steps", self.histogram_every_n_steps, smallest=0, meaning=OFF
        )
        object.__setattr__(self, "log_every_n_steps", every)
        object.__setattr__(self, "histogram_every_n_steps", histograms)

    def logs(self, count: int) -> bool:
        return _due(count, self.log_every_n_steps)

    def histograms(self, count: int) -> bool:
        n = self.histogram_every_n_steps
        return n > 0 and _due(count, n)

    def next_due(self, count: int) -> int:
        """The first logging or histogram step after step ``count`` (-1: before any step).

        Example:
            >>> [Cadence(4, histogram_every_n_steps=6).next_due(k) for k in (-1, 0, 3, 5)]
            [0, 3, 5, 7]
        """
        every = [n for n in (self.log_every_n_steps, self.histogram_every_n_steps) if n > 0]
        return min(_next_due(count, n) for n in every)


def _due(count, every: int):
    """Whether step ``count`` is due; ``count`` may be an int or a scalar array (in-graph)."""
    return (count == 0) | ((count + 1) % every == 0)


def _next_due(count: int, every: int) -> int:
    """The first step after ``count`` that :func:`_due` says is due."""
    return 0 if count < 0 else ((count + 1) // every + 1) * every - 1


class ReadSchedule:
    """When the host must read what a compiled train step stored: only after the batches
    that may have run a logging or histogram step not yet read, for a framework that runs
    several steps per call (Keras' ``steps_per_execution``) and counts them itself.

    The step count (``iterations``) is read at the start; each batch runs at most
    ``steps_per_batch`` steps (fewer counted ones when steps are skipped, since a skipped step
    is not counted), so ``upper`` never falls behind the true step count and no due step is
    read late. After a skip the due step comes later than ``upper`` says: the batches until it
    each read once more, and each read that finds it re-syncs ``upper``.

    Example:
        >>> reads = ReadSchedule(Cadence(4), iterations=2, steps_per_batch=2)  # due: 3, 7, ...
        >>> reads.batch_ended()  # steps 2 and 3
        True
        >>> reads.caught_up(last_stored=3, iterations=4)
        >>> reads.batch_ended(), reads.batch_ended()  # steps 4 and 5, then 6 and 7
        (False, True)
    """

    def __init__(self, cadence: Cadence, iterations: int, steps_per_batch: int) -> None:
        self.cadence = cadence
        self.upper = iterations  # at least the step count after the last batch
        self.steps_per_batch = max(1, int(steps_per_batch))
        self.next = cadence.next_due(iterations - 1)

    def batch_ended(self) -> bool:
        """Count a batch; whether it may have run a step due and not yet read."""
        self.upper += self.steps_per_batch
        return self.next < self.upper

    def caught_up(self, last_stored: int, iterations: int) -> None:
        """After a read: the newest step stored, and the step count now."""
        self.upper = iterations
        self.next = self.cadence.next_due(max(last_stored, iterations - 1))
