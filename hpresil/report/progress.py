"""Node service ``progress``: step timing for the goodput report, from heartbeats.

Workers already publish their step and its completion time in the heartbeat
record (:mod:`hpresil.hang.heartbeat`, a few stores into shared memory per
step). This service reads those records from the node runtime's thread and
emits one ``progress`` event per node every ``interval`` when the step moved,
plus one when the worker group stops (the dead workers' records survive
them, so the report knows the last step each group completed). Training
pays nothing for it.

``progress`` fields: ``step`` (the slowest local rank's last completed step),
``t_step`` (when it completed, Unix time), ``step_time_s`` (median of the
local ranks' recent step time, phases excluded), ``ranks``, ``attempt``,
``final`` (sampled when the group stopped).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from datetime import timedelta

from hpresil.errors import ConfigError
from hpresil.hang.api import Beat
from hpresil.hang.heartbeat import record_path
from hpresil.hang.probe import read_beat
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["ProgressConfig", "ProgressService", "group_beats", "ENV_INTERVAL"]

log = logging.getLogger(__name__)

#: Seconds between ``progress`` events (default 5).
ENV_INTERVAL = "HPRESIL_PROGRESS_INTERVAL"


@dataclasses.dataclass(kw_only=True, slots=True)
class ProgressConfig:
    """Settings of the ``progress`` service.

    Attributes:
        interval: at most one ``progress`` event per node per interval.
    """

    interval: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if self.interval <= timedelta(0):
            raise ConfigError(f"progress interval={self.interval} must be > 0 (e.g. {ENV_INTERVAL}=5)")

    @classmethod
    def from_env(cls) -> "ProgressConfig":
        """The config from ``$HPRESIL_PROGRESS_INTERVAL`` (seconds).

        Raises:
            ConfigError: the value is not a positive number.
        """
        raw = os.environ.get(ENV_INTERVAL)
        if not raw:
            return cls()
        try:
            return cls(interval=timedelta(seconds=float(raw)))
        except (ValueError, OverflowError):  # OverflowError: beyond timedelta's range (1e400, inf)
            raise ConfigError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds") from None


def group_beats(shm_dir: str, group: WorkerGroupInfo) -> list[Beat]:
    """The heartbeat records of ``group``'s local workers that have beaten at
    least once (a record left by an earlier worker, with another pid, is skipped)."""
    beats = []
    for local_rank, pid in enumerate(group.pids):
        beat = read_beat(record_path(shm_dir, local_rank))
        if beat is not None and beat.pid == pid and beat.step >= 0 and beat.t_beat > 0:
            beats.append(beat)
    return beats


class ProgressService(NodeService):
    """NodeService ``progress`` (see the module docstring).

    Args:
        config: settings; default from ``$HPRESIL_PROGRESS_INTERVAL``.
    """

    name = "progress"

    def __init__(self, config: ProgressConfig | None = None) -> None:
        self.config = config or ProgressConfig.from_env()
        self._ctx: RuntimeContext | None = None
        self._group: WorkerGroupInfo | None = None
        self._next = 0.0
        self._last: tuple[int, float] | None = None

    def start(self, ctx: RuntimeContext) -> None:
        """Remembers where the heartbeat records are."""
        self._ctx = ctx

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Samples the new group from now on."""
        self._group, self._last = group, None
        self._next = time.monotonic() + self.config.interval.total_seconds()

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Records the last step the stopped group completed."""
        if self._group is group:
            self._sample(group, final=True)
            self._group = None

    def tick(self) -> None:
        """Emits a ``progress`` event when one is due and the step moved."""
        group = self._group
        now = time.monotonic()
        if group is None or now < self._next:
            return
        self._next = now + self.config.interval.total_seconds()
        self._sample(group, final=False)

    def stop(self, timeout: timedelta) -> None:
        """Records the last step when the job ends with workers still registered (e.g. SIGTERM)."""
        group = self._group
        if group is not None:
            self._sample(group, final=True)
            self._group = None

    def _sample(self, group: WorkerGroupInfo, final: bool) -> None:
        if self._ctx is None:
            return
        beats = group_beats(self._ctx.shm_dir, group)
        if not beats:
            return
        slowest = min(beats, key=lambda b: (b.step, b.t_beat))
        key = (slowest.step, slowest.t_beat)
        if key == self._last:
            return
        self._last = key
        times = [b.step_ema for b in beats if b.step_ema > 0]
        self._ctx.events.emit(
            "progress",
            step=slowest.step,
            t_step=slowest.t_beat,
            step_time_s=round(statistics.median(times), 6) if times else None,
            ranks=len(beats),
            attempt=group.attempt,
            final=final,
        )
