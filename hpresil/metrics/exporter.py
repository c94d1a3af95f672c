"""Node service ``metrics``: a Prometheus endpoint for this node (see :mod:`hpresil.metrics.api`).

Runs in the node runtime, so training processes pay nothing: every
``refresh`` it reads the local workers' heartbeat records and the lines
appended to the node's ``events.jsonl`` since the last read (agent, workers
and services all write there), and updates its own registry, which
prometheus-client serves from a thread.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

from hpresil.events.jsonl import EventTail
from hpresil.metrics.api import MetricsConfig
from hpresil.report.progress import group_beats
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["MetricsExporter"]

log = logging.getLogger(__name__)

_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class MetricsExporter(NodeService):
    """NodeService ``metrics``: off unless ``config.port`` is set.

    Args:
        config: port, address and refresh interval.

    Attributes:
        port: the port actually served (useful with port 0), once started.
    """

    name = "metrics"

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        self.port: int | None = None
        self._server: Any = None
        self._ctx: RuntimeContext | None = None
        self._group: WorkerGroupInfo | None = None
        self._tail: EventTail | None = None
        self._next = 0.0
        self._min_step: int | None = None
        self._save_ts: dict[int, float] = {}
        self._hang_pending = False

    # -- NodeService --------------------------------------------------------------
    def start(self, ctx: RuntimeContext) -> None:
        """Starts the HTTP server (when a port is configured)."""
        if self.config.port is None:
            return
        from prometheus_client import CollectorRegistry, start_http_server

        self._ctx = ctx
        self.registry = CollectorRegistry()
        self._define()
        self._tail = EventTail(getattr(ctx.events, "path", os.path.join(ctx.log_dir, "events.jsonl")), from_end=True)
        server, _thread = start_http_server(self.config.port, addr=self.config.addr, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        log.info("Prometheus metrics at http://%s:%d/metrics", self.config.addr, self.port)
        ctx.events.emit("metrics_started", port=self.port, addr=self.config.addr)

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Follows the new group's heartbeats."""
        self._group, self._min_step = group, None

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Stops reading the old group's heartbeats."""
        if self._group is group:
            self.refresh()
            self._group = None

    def tick(self) -> None:
        """Refreshes the metrics every ``config.refresh``."""
        if self._server is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.config.refresh.total_seconds()
            self.refresh()

    def stop(self, timeout: timedelta) -> None:
        """Stops the HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- metrics ------------------------------------------------------------------
    def _define(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry
        self.step = Gauge("hpresil_step", "Last completed step of each local worker", ["rank"], registry=r)
        self.steps = Counter("hpresil_steps", "Steps completed by this node's slowest local worker", registry=r)
        self.step_seconds = Gauge("hpresil_step_seconds", "Recent step time of each local worker (phases excluded)",
                                  ["rank"], registry=r)
        self.ckpt_blocking = Histogram("hpresil_checkpoint_blocking_seconds", "Blocking time of Checkpointer.save",
                                       ["tier"], buckets=_SECONDS, registry=r)
        self.ckpt_bytes = Counter("hpresil_checkpoint_bytes", "Bytes copied by Checkpointer.save", ["tier"], registry=r)
        self.ckpt_step = Gauge("hpresil_checkpoint_last_step", "Step of the newest snapshot", ["tier"], registry=r)
        self.ckpt_skipped = Counter("hpresil_checkpoint_skipped", "Snapshots skipped because readers held every slot",
                                    ["reason"], registry=r)
        self.restore_seconds = Histogram("hpresil_restore_seconds", "Duration of restores", ["tier"],
                                         buckets=_SECONDS, registry=r)
        self.restarts = Counter("hpresil_restarts", "Worker-group restarts by cause", ["cause"], registry=r)
        self.hangs = Counter("hpresil_hang_detections", "Hangs detected by the watchdog", ["phase"], registry=r)
        self.stragglers = Counter("hpresil_stragglers", "Straggler reports", registry=r)
        self.degraded = Counter("hpresil_tier_degraded", "Tier degradations", ["tier"], registry=r)
        self.integrity = Counter("hpresil_integrity_failures", "Snapshots failing verification", ["tier"], registry=r)
        self.upload_seconds = Histogram("hpresil_durable_upload_seconds", "Duration of durable uploads",
                                        buckets=_SECONDS, registry=r)
        self.upload_bytes = Counter("hpresil_durable_upload_bytes", "Bytes uploaded to the durable tier", registry=r)
        self.upload_lag = Gauge("hpresil_durable_upload_lag_seconds",
                                "Last durable upload: time from the step's save to its upload", registry=r)
        self.durable_step = Gauge("hpresil_durable_last_step", "Newest step committed to the durable tier", registry=r)
        self.repl_lag = Gauge("hpresil_replication_lag_seconds", "Last peer replication: time behind the save",
                              registry=r)
        self.repl_bytes = Counter("hpresil_replicated_bytes", "Bytes replicated to peers", registry=r)
        self.world_size = Gauge("hpresil_world_size", "Workers in the job", registry=r)

    def refresh(self) -> None:
        """Reads heartbeats and new events now."""
        if self._server is None or self._ctx is None:
            return
        group = self._group
        if group is not None:
            beats = group_beats(self._ctx.shm_dir, group)
            for b in beats:
                self.step.labels(rank=str(b.rank)).set(b.step)
                if b.step_ema > 0:
                    self.step_seconds.labels(rank=str(b.rank)).set(b.step_ema)
            if len(beats) == len(group.pids) and beats:
                low = min(b.step for b in beats)
                if self._min_step is not None and low > self._min_step:
                    self.steps.inc(low - self._min_step)
                self._min_step = low
        if self._tail is not None:
            for e in self._tail.read():
                self._on_event(e)

    def _on_event(self, e: dict[str, Any]) -> None:
        name, tier = e["event"], str(e.get("tier", "ram"))
        num = lambda key: float(e[key]) if isinstance(e.get(key), (int, float)) else 0.0  # noqa: E731
        if name == "checkpoint_saved":
            self.ckpt_blocking.labels(tier=tier).observe(num("blocking_s"))
            self.ckpt_bytes.labels(tier=tier).inc(num("bytes"))
            self.ckpt_step.labels(tier=tier).set(num("step"))
            self._save_ts.setdefault(int(num("step")), float(e["ts"]))
        elif name == "checkpoint_skipped":
            self.ckpt_skipped.labels(reason=str(e.get("reason", "unknown"))).inc()
        elif name == "checkpoint_restored":
            self.restore_seconds.labels(tier=tier).observe(num("duration_s"))
        elif name == "checkpoint_drained":
            self.upload_seconds.observe(num("duration_s"))
            self.upload_bytes.inc(num("bytes"))
            step = int(num("step"))
            if step in self._save_ts:
                self.upload_lag.set(max(0.0, float(e["ts"]) - self._save_ts[step]))
            if e.get("committed"):
                self.durable_step.set(step)
            for old in [s for s in self._save_ts if s < step]:
                del self._save_ts[old]
        elif name == "checkpoint_replicated":
            step = int(num("step"))
            lag = e.get("lag_s")
            if not isinstance(lag, (int, float)):
                lag = float(e["ts"]) - self._save_ts[step] if step in self._save_ts else None
            if lag is not None:
                self.repl_lag.set(max(0.0, float(lag)))
            self.repl_bytes.inc(num("bytes"))
        elif name == "hang_detected":
            self.hangs.labels(phase=str(e.get("phase", "unknown"))).inc()
            self._hang_pending = True
        elif name == "workers_restart":
            cause = "hang" if self._hang_pending else str(e.get("cause", "failure"))
            self._hang_pending = False
            self.restarts.labels(cause=cause).inc()
        elif name == "straggler":
            self.stragglers.inc()
        elif name == "tier_degraded":
            self.degraded.labels(tier=tier).inc()
        elif name == "integrity_failed":
            self.integrity.labels(tier=tier).inc()
        elif name == "workers_start" and isinstance(e.get("world_size"), int):
            self.world_size.set(e["world_size"])
