"""Straggler detection: ranks persistently slower than the rest are reported, not killed.

In synchronous training every rank's wall-clock step time is the same (the
fast ranks wait for the slow one inside the collectives), so step time cannot
name a straggler. Each rank's own work is measured instead: the time inside
``hpresil.section()`` when the script marks its local work, else the CPU
seconds the process burnt per step (from ``/proc``; waiting in a collective
burns little). Metrics are compared per window of steps; a rank whose metric
exceeds ``threshold`` x the median of the *other* ranks for ``windows``
consecutive windows is reported once, and again only after it recovered for
``windows`` consecutive windows too (one noisy window must not turn a
persistent straggler into a stream of reports).
"""

from __future__ import annotations

import dataclasses
import statistics

__all__ = ["StragglerDetector", "Straggler"]


@dataclasses.dataclass(frozen=True, slots=True)
class Straggler:
    """A report: ``rank`` took ``ratio`` x the others' median (``metric`` vs ``median``)."""

    rank: int
    window: int
    metric: float
    median: float
    ratio: float
    source: str


class StragglerDetector:
    """Consumes per-window metrics of all ranks and yields new straggler reports.

    Args:
        threshold: ratio to the others' median that counts as slow (> 1).
        windows: consecutive slow windows before a report.
    """

    def __init__(self, threshold: float, windows: int) -> None:
        self.threshold = threshold
        self.windows = windows
        self._streak: dict[int, int] = {}  # consecutive slow windows
        self._calm: dict[int, int] = {}  # consecutive windows that were not slow
        self._reported: set[int] = set()

    def observe(self, window: int, metrics: dict[int, float], source: str) -> list[Straggler]:
        """Feeds one window's metric per rank; returns ranks that just became stragglers."""
        reports: list[Straggler] = []
        if len(metrics) < 2:
            return reports
        for rank, value in metrics.items():
            others = [v for r, v in metrics.items() if r != rank]
            median = statistics.median(others)
            slow = median > 0 and value > self.threshold * median
            self._streak[rank] = self._streak.get(rank, 0) + 1 if slow else 0
            self._calm[rank] = 0 if slow else self._calm.get(rank, 0) + 1
            if not slow:
                if self._calm[rank] >= self.windows:
                    self._reported.discard(rank)
            elif self._streak[rank] >= self.windows and rank not in self._reported:
                self._reported.add(rank)
                reports.append(Straggler(rank=rank, window=window, metric=value, median=median,
                                         ratio=value / median, source=source))
        return reports
