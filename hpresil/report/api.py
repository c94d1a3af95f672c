"""Contract of ``hpresil-run report``: goodput and where the time went.

The report reads every node's ``events.jsonl`` under a log directory and
splits the job's wall time (first ``runtime_start`` to last ``runtime_stop``)
into disjoint :class:`Segment` s, one kind each:

* ``productive``: step time of steps that were kept. A step computed and
  later undone by a restore to an earlier step is ``lost_work`` instead.
* ``lost_work``: recomputed steps: done, then undone by a restore to an
  earlier snapshot.
* ``detection``: from the last step completed before a failure until the
  failure was seen (a worker's exit, the agents' restart decision): the step
  the failure interrupted plus the detection delay.
* ``checkpoint``: blocking time of ``Checkpointer.save`` (the slowest rank's
  copy into the RAM tier, per step).
* ``restore``: ``Checkpointer.restore`` (slowest rank).
* ``restart``: from a failure (worker exit, node leaving) until the new
  worker group started, including the re-rendezvous.
* ``rescale``: the same, for a restart caused by a membership change.
* ``hang_detection``: from a hung rank's last heartbeat until the watchdog
  named the suspect (the timeout plus the diagnosis); the time before that
  last heartbeat, back to the last completed step, is ``detection``.
* ``init``: runtime start, rendezvous, worker start-up until the first step
  (imports, process group, model build).
* ``shutdown``: after the last step until the runtime stopped (final
  evaluation, waiting for uploads, teardown).

An in-process rollback (event ``rollback``) ends an epoch like a fault and
opens the next without a restart: the steps it undid are ``lost_work``, its
restore is ``restore``. :class:`StateHealth` lists the snapshots found
poisoned or suspect, the replica divergences and the rollbacks.

Goodput is ``productive / wall``; by construction the kinds sum to the wall
time. Step timing comes from the ``progress`` events the node runtime emits
from the workers' heartbeats (see :mod:`hpresil.report.progress`), from
``checkpoint_saved`` and from ``checkpoint_restored``; between two
observations step time is spread evenly over the steps in between.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["CAUSES", "KINDS", "Segment", "Epoch", "TierStats", "StateHealth", "GoodputReport"]

#: Kinds of lost time, in the order the report prints them.
CAUSES: tuple[str, ...] = (
    "lost_work", "detection", "checkpoint", "restore", "restart", "rescale", "hang_detection", "init", "shutdown",
)
#: Every segment kind.
KINDS: tuple[str, ...] = ("productive", *CAUSES)


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """A span of wall time spent one way (``kind`` is one of :data:`KINDS`)."""

    start: float
    end: float
    kind: str
    epoch: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.end - self.start


@dataclasses.dataclass(slots=True)
class Epoch:
    """One start of the job's worker groups, until the next start (or the end).

    Attributes:
        index: 0 for the first start.
        start: when the first node started its workers.
        end: when the next epoch started, else the end of the job.
        fault: what ended it: ``exit``, ``hang``, ``membership``, ``leave``,
            ``rollback`` (in-process, no restart), ``succeeded``, ``failed``
            or ``None`` (the job was stopped, e.g. SIGTERM).
        fault_ts: when that was noticed.
        base_step: the step it restored (0 without a restore).
        restore_tier: the tier it restored from, if any.
        max_step: the last step observed.
        world_size: workers in the job.
    """

    index: int
    start: float
    end: float = 0.0
    fault: str | None = None
    fault_ts: float | None = None
    base_step: int = 0
    restore_tier: str | None = None
    max_step: int = 0
    world_size: int = 0


@dataclasses.dataclass(slots=True)
class TierStats:
    """Checkpoint and restore statistics of one tier (``ram``, ``peer``, ``durable``).

    A tier the worker writes (``ram``) counts ``saves``; a tier the node runtime
    copies to (``peer``, ``durable``) counts ``uploads``; ``steps`` counts the
    distinct steps either holds. ``skipped`` counts saves skipped because
    readers held every slot."""

    tier: str
    saves: int = 0
    skipped: int = 0
    steps: int = 0
    blocking_s_total: float = 0.0
    blocking_s_max: float = 0.0
    bytes_total: int = 0
    restores: int = 0
    restore_s_max: float = 0.0
    restore_s_total: float = 0.0
    restore_bytes: int = 0
    uploads: int = 0
    upload_s_total: float = 0.0
    upload_bytes: int = 0
    upload_lag_s_max: float = 0.0
    degraded: int = 0
    integrity_failures: int = 0

    @property
    def blocking_s_mean(self) -> float:
        """Mean blocking time per save (one rank's save)."""
        return self.blocking_s_total / self.saves if self.saves else 0.0

    @property
    def bytes_per_save(self) -> float:
        """Mean bytes per save."""
        return self.bytes_total / self.saves if self.saves else 0.0

    @property
    def bytes_per_upload(self) -> float:
        """Mean bytes per upload."""
        return self.upload_bytes / self.uploads if self.uploads else 0.0

    @property
    def upload_mb_per_s(self) -> float:
        """Mean upload throughput (MB/s) of the uploads this node group made."""
        return self.upload_bytes / 1e6 / self.upload_s_total if self.upload_s_total > 0 else 0.0

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable dict, derived values included."""
        obj = dataclasses.asdict(self)
        obj.update(blocking_s_mean=self.blocking_s_mean, bytes_per_save=self.bytes_per_save,
                   bytes_per_upload=self.bytes_per_upload, upload_mb_per_s=self.upload_mb_per_s)
        return obj


@dataclasses.dataclass(slots=True)
class StateHealth:
    """What the health checks found (:mod:`hpresil.checkpoint.health`).

    Attributes:
        poisoned: ``snapshot_poisoned`` events: ``{step, rank, keys}``.
        suspect: ``snapshot_suspect`` events: ``{step, rank, causes, loss}``.
        divergences: ``replica_divergence``, one per step: ``{step, ranks, nodes}``.
        rollbacks: one per rollback of the job: ``{ts, from_step, to_step,
            cause, bad_step, tier, attempt, duration_s}``.
    """

    poisoned: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    suspect: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    divergences: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rollbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing was found."""
        return not (self.poisoned or self.suspect or self.divergences or self.rollbacks)


@dataclasses.dataclass(slots=True)
class GoodputReport:
    """Everything ``hpresil-run report`` prints or draws.

    Attributes:
        log_dir: the directory that was read.
        files: the ``events.jsonl`` files found.
        nodes: node ids seen.
        start: Unix time of the job's start (first ``runtime_start``).
        end: Unix time of its end (last ``runtime_stop``, else the last event).
        segments: disjoint spans covering ``[start, end]``.
        epochs: worker-group starts.
        tiers: checkpoint statistics per tier.
        restarts: restarts by cause (``failure``, ``hang``, ``membership``).
        hang_detections: ``hang_detected`` events.
        stragglers: ``straggler`` events.
        final_step: the last step kept.
        progress: ``(time, step, epoch)`` observations (restores included), for the timeline.
        world_sizes: ``(time, world size)`` at every epoch start.
        marks: ``(time, kind, label)`` of failures, hangs, saves, restores,
            rollbacks and unhealthy snapshots.
        health: unhealthy snapshots, divergences and rollbacks.
    """

    log_dir: str
    files: list[str]
    nodes: list[str]
    start: float
    end: float
    segments: list[Segment]
    epochs: list[Epoch]
    tiers: dict[str, TierStats]
    restarts: dict[str, int]
    hang_detections: int
    stragglers: int
    final_step: int
    progress: list[tuple[float, int, int]] = dataclasses.field(default_factory=list)
    world_sizes: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    marks: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)
    health: StateHealth = dataclasses.field(default_factory=StateHealth)

    @property
    def wall_s(self) -> float:
        """The job's wall time in seconds."""
        return self.end - self.start

    def seconds(self, kind: str) -> float:
        """Total seconds spent as ``kind``."""
        return sum(s.duration for s in self.segments if s.kind == kind)

    @property
    def productive_s(self) -> float:
        """Productive step time in seconds."""
        return self.seconds("productive")

    @property
    def lost(self) -> dict[str, float]:
        """Seconds lost per cause (every kind of :data:`CAUSES`)."""
        return {cause: self.seconds(cause) for cause in CAUSES}

    @property
    def goodput(self) -> float:
        """Productive step time / wall time (0 for an empty job)."""
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable summary (segments and marks left out)."""
        return {
            "log_dir": self.log_dir,
            "files": self.files,
            "nodes": self.nodes,
            "start": self.start,
            "end": self.end,
            "wall_s": self.wall_s,
            "productive_s": self.productive_s,
            "goodput": self.goodput,
            "lost_s": self.lost,
            "epochs": [dataclasses.asdict(e) for e in self.epochs],
            "tiers": {name: t.to_json_obj() for name, t in self.tiers.items()},
            "restarts": self.restarts,
            "hang_detections": self.hang_detections,
            "stragglers": self.stragglers,
            "final_step": self.final_step,
            "health": dataclasses.asdict(self.health),
        }
