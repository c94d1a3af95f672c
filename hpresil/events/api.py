"""Contract of the structured event stream.

Every state change that matters for goodput (worker start/exit/restart,
checkpoint saved/restored, hang detected, rescale, environment change) is an
:class:`Event`. Events are appended as one JSON object per line to
``events.jsonl`` in the job's log directory; ``hpresil report`` reads them.

Each line has at least ``ts`` (Unix seconds, float), ``event`` (name),
``node`` (node id) and the event's own fields. Workers add ``rank``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

__all__ = ["Event", "EventSink", "EVENT_NAMES"]

#: Names used by hpresil itself; users may emit their own names too.
EVENT_NAMES = frozenset(
    {
        "runtime_start",
        "runtime_stop",
        "rendezvous",
        "workers_start",
        "worker_exit",
        "workers_restart",
        "fast_restart",
        "workers_failed",
        "workers_succeeded",
        "env_change",
        "checkpoint_saved",
        "checkpoint_skipped",
        "checkpoint_restored",
        "checkpoint_sealed",
        "checkpoint_drained",
        "tier_degraded",
        "tier_restored",
        "integrity_failed",
        "hang_detected",
        "rank_busy",
        "straggler",
        "health_check",
        "gpu_unhealthy",
        "node_leave",
        "service_failed",
        "rescale",
        "rdzv_evicted",
        "step",
        "progress",
        "metrics_started",
        "topology",
        "checkpoint_replicated",
        "peer_refused",
        "net_env",
        "env_warning",
        "snapshot_poisoned",
        "snapshot_suspect",
        "rollback",
        "replica_divergence",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One state change.

    Attributes:
        event: the event name (see :data:`EVENT_NAMES`).
        ts: Unix time in seconds.
        node: the id of the node that emitted it.
        fields: event-specific, JSON-serialisable fields.
    """

    event: str
    ts: float
    node: str
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json_obj(self) -> dict[str, Any]:
        """Returns the flat JSON object written as one line of ``events.jsonl``."""
        obj: dict[str, Any] = {"ts": self.ts, "event": self.event, "node": self.node}
        for key, value in self.fields.items():
            if key not in obj:
                obj[key] = value
        return obj


class EventSink(Protocol):
    """Anything that accepts events."""

    def emit(self, event: str, **fields: Any) -> None:
        """Records ``event`` with ``fields`` now; never raises on I/O errors."""
        ...
