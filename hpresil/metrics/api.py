"""Contract of the Prometheus exporter (``hpresil-run --metrics-port PORT``).

Off by default. When on, the node runtime serves ``/metrics`` (text format)
for this node, built from the workers' heartbeats and the node's
``events.jsonl``. Every name starts with ``hpresil_``:

=====================================  =========  ===========  ==============================================
name                                   type       labels       from
=====================================  =========  ===========  ==============================================
``hpresil_step``                       gauge      rank         last completed step (heartbeat)
``hpresil_steps_total``                counter                 steps completed by the node's slowest rank
``hpresil_step_seconds``               gauge      rank         recent step time, phases excluded (heartbeat)
``hpresil_checkpoint_blocking_seconds``histogram  tier         ``checkpoint_saved.blocking_s``
``hpresil_checkpoint_bytes_total``     counter    tier         ``checkpoint_saved.bytes``
``hpresil_checkpoint_last_step``       gauge      tier         ``checkpoint_saved.step``
``hpresil_checkpoint_skipped_total``   counter    reason       ``checkpoint_skipped`` (every slot still being read)
``hpresil_restore_seconds``            histogram  tier         ``checkpoint_restored.duration_s``
``hpresil_restarts_total``             counter    cause        ``workers_restart`` (``hang`` after ``hang_detected``)
``hpresil_hang_detections_total``      counter    phase        ``hang_detected``
``hpresil_stragglers_total``           counter                 ``straggler``
``hpresil_tier_degraded_total``        counter    tier         ``tier_degraded``
``hpresil_integrity_failures_total``   counter    tier         ``integrity_failed``
``hpresil_durable_upload_seconds``     histogram               ``checkpoint_drained.duration_s``
``hpresil_durable_upload_bytes_total`` counter                 ``checkpoint_drained.bytes``
``hpresil_durable_upload_lag_seconds`` gauge                   last drained step: drained - first saved time
``hpresil_durable_last_step``          gauge                   ``checkpoint_drained.step`` (committed)
``hpresil_replication_lag_seconds``    gauge                   ``checkpoint_replicated``: ``lag_s``, else replicated - saved time
``hpresil_replicated_bytes_total``     counter                 ``checkpoint_replicated.bytes``
``hpresil_world_size``                 gauge                   ``workers_start.world_size``
=====================================  =========  ===========  ==============================================

A peer-replication service reports to the exporter and the report by
emitting ``checkpoint_replicated`` with ``step``, ``bytes``, ``duration_s``
and optionally ``lag_s``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from datetime import timedelta

from hpresil.errors import ConfigError

__all__ = ["MetricsConfig", "ENV_PORT"]

#: Environment default of ``--metrics-port``.
ENV_PORT = "HPRESIL_METRICS_PORT"


@dataclasses.dataclass(kw_only=True, slots=True)
class MetricsConfig:
    """Settings of the exporter.

    Attributes:
        port: TCP port of ``/metrics``; 0 picks a free one (see ``MetricsExporter.port``);
            ``None`` turns the exporter off.
        addr: address to listen on.
        refresh: how often heartbeats and new events are read.
    """

    port: int | None = None
    addr: str = "0.0.0.0"
    refresh: timedelta = timedelta(seconds=1)

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics port {self.port} is not in 0..65535 (0 picks a free port)")
        if self.port is not None and importlib.util.find_spec("prometheus_client") is None:
            raise ConfigError("--metrics-port needs prometheus-client: pip install 'hpresil[metrics]'")
        if self.refresh <= timedelta(0):
            raise ConfigError(f"metrics refresh={self.refresh} must be > 0")
