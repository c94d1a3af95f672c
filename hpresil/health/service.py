"""The ``health`` node service: GPU checks before the workers start and while they run.

Lifecycle (see :class:`~hpresil.runtime.api.NodeService`):

* ``start`` opens the backend (NVML, or the fake named by ``HPRESIL_HEALTH_FAKE``)
  and runs the pre-flight check synchronously, so a node with a bad GPU has its
  verdict before it joins the first rendezvous.
* ``tick`` (every ``service_interval``, 50 ms) only compares the clock with two
  deadlines and hands due work to the service's own thread: XID polls every
  ``event_poll_interval`` (1 s), full checks every ``interval`` (30 s). NVML
  calls can block for seconds on a sick GPU; on their own thread they cannot
  stall the runtime's shared service thread (RAM-tier sealing, drain).
* ``on_workers_stopped`` runs a full check at once: a worker crash often has a
  GPU cause, and the verdict must be known before the agent re-rendezvouses.

Events: ``health_check`` {ok, fatal, findings, duration_s, kind, devices} when
the set of findings changes, after pre-flight, and at least every
``summary_every``; ``gpu_unhealthy`` {device, check, severity, detail, source,
action} once per new finding.

A fatal finding with ``action_on_fatal="leave"`` latches a :class:`Verdict`,
written to ``<log_dir>/unhealthy.json``; the agent polls :meth:`HealthService.verdict`
and leaves the job (exit code :data:`~hpresil.health.api.EXIT_UNHEALTHY`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import timedelta
from typing import Callable, Mapping

from hpresil.errors import HealthUnavailableError
from hpresil.events.api import EventSink
from hpresil.health.api import (
    ENV_FAKE,
    DeviceReading,
    Finding,
    HealthBackend,
    HealthConfig,
    HealthReport,
    Verdict,
)
from hpresil.health.checks import device_count_finding, evaluate, xid_findings
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["HealthService", "select_backend", "VERDICT_FILE"]

log = logging.getLogger(__name__)

#: Name of the verdict file in the job's log directory.
VERDICT_FILE = "unhealthy.json"


def select_backend(env: Mapping[str, str] | None = None) -> HealthBackend:
    """The fake backend when ``HPRESIL_HEALTH_FAKE`` is set, else NVML.

    Raises:
        ConfigError: ``HPRESIL_HEALTH_FAKE`` is not a valid spec.
    """
    env = os.environ if env is None else env
    spec = env.get(ENV_FAKE, "").strip()
    if spec:
        from hpresil.health.fake import FakeBackend

        return FakeBackend.from_spec(spec)
    from hpresil.health.nvml import NvmlBackend

    return NvmlBackend()


class _Job:
    __slots__ = ("kind", "full", "done", "report")

    def __init__(self, kind: str, full: bool) -> None:
        self.kind, self.full = kind, full
        self.done = threading.Event()
        self.report: HealthReport | None = None


class HealthService(NodeService):
    """GPU health checks as a node service (``name = "health"``).

    Args:
        config: settings; default :meth:`HealthConfig.from_env`.
        backend: where readings come from; default :func:`select_backend` at ``start``.
        threaded: run checks on the service's own thread (``False``: inline in
            ``tick``, for deterministic tests).
        clock: monotonic clock in seconds (tests pass a fake one).
    """

    name = "health"

    def __init__(
        self,
        config: HealthConfig | None = None,
        *,
        backend: HealthBackend | None = None,
        threaded: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else HealthConfig.from_env()
        self._backend = backend
        self._threaded = threaded
        self._clock = clock
        self._events: EventSink | None = None
        self._node = ""
        self.verdict_path = ""
        self._active = False
        self._devices: tuple[int, ...] = ()
        self._baseline_count = 0
        self._baseline_links: dict[int, int] = {}
        self._lock = threading.Lock()  # guards the finding state below
        self._current: dict[tuple[int | None, str, str, int | None], Finding] = {}
        self._recent_xids: list[Finding] = []
        self._fatal: list[Finding] = []
        self._last_report: HealthReport | None = None
        self._last_emit = float("-inf")
        self._next_full = float("inf")
        self._next_poll = float("inf")
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._inflight_since: float | None = None
        self._wedge_reported = False
        self._thread: threading.Thread | None = None

    # -- NodeService -----------------------------------------------------------

    def start(self, ctx: RuntimeContext) -> None:
        """Opens the backend and runs the pre-flight check (before any worker starts)."""
        self._events, self._node = ctx.events, ctx.node_id
        self.verdict_path = os.path.join(ctx.log_dir, VERDICT_FILE)
        try:
            os.remove(self.verdict_path)  # a verdict from an earlier run on this node is stale
        except FileNotFoundError:
            pass
        if not self.config.enabled:
            log.info("GPU health checks are off (HPRESIL_HEALTH=off)")
            return
        backend = self._backend if self._backend is not None else select_backend()
        try:
            backend.open()
            count = backend.device_count()
            if count == 0:
                raise HealthUnavailableError("the health backend sees no GPUs")
        except HealthUnavailableError as exc:
            # "auto" on a CPU host is the normal case; "on" means the operator expected GPUs.
            level = logging.WARNING if self.config.mode == "on" else logging.INFO
            log.log(level, "GPU health checks unavailable: %s", exc)
            ctx.events.emit("health_check", ok=None, available=False, reason=str(exc), kind="preflight")
            return
        self._backend = backend
        self._baseline_count = count
        self._devices = self._resolve_devices(backend, count)
        if not self._devices:
            log.info("GPU health checks: no GPU of this job is visible (CUDA_VISIBLE_DEVICES is empty)")
            backend.close()
            return
        if self._threaded:
            self._thread = threading.Thread(target=self._worker, name="hpresil-health", daemon=True)
            self._thread.start()
        self._active = True
        report = self.check_now(kind="preflight")
        if report is None:
            log.warning("GPU pre-flight check did not finish within %s; continuing", self.config.check_timeout)
        now = self._clock()
        self._next_full = now + self.config.interval.total_seconds()
        self._next_poll = now + self.config.event_poll_interval.total_seconds()

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Nothing to do: the pre-flight already ran."""

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Checks at once: the verdict must be known before the agent restarts the workers."""
        if self._active:
            self.check_now(kind="on_demand")

    def tick(self) -> None:
        """Hands due XID polls and full checks to the health thread; returns in microseconds."""
        if not self._active:
            return
        now = self._clock()
        if self._pending:
            since = self._inflight_since
            if since is not None and not self._wedge_reported and now - since > self.config.check_timeout.total_seconds():
                self._wedge_reported = True
                self._report_wedged(now - since)
            return
        full, poll = now >= self._next_full, now >= self._next_poll
        if not (full or poll):
            return
        self._next_poll = now + self.config.event_poll_interval.total_seconds()
        if full:
            self._next_full = now + self.config.interval.total_seconds()
        self._submit("periodic" if full else "events", full)

    def stop(self, timeout: timedelta) -> None:
        """Stops the health thread and closes the backend."""
        self._active = False
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=min(max(timeout.total_seconds(), 0.0), 5.0))
            if self._thread.is_alive():
                # A driver call is stuck; closing NVML under it could crash. The
                # thread is a daemon and dies with the process.
                log.warning("health thread still busy at stop; leaving the backend open")
                return
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception:
                log.debug("health backend close failed", exc_info=True)

    # -- public ------------------------------------------------------------------

    def fatal(self) -> list[Finding] | None:
        """The fatal findings so far (whatever ``action_on_fatal``), or ``None`` if none."""
        fatal = self._fatal
        return list(fatal) if fatal else None

    def verdict(self) -> Verdict | None:
        """Why this node must leave the job, or ``None`` (no fatal finding, or action ``warn``).

        Cheap (reads one attribute): the agent may call it every monitor interval.
        """
        fatal = self._fatal
        if not fatal or self.config.action_on_fatal != "leave":
            return None
        return Verdict(findings=tuple(fatal), path=self.verdict_path)

    @property
    def last_report(self) -> HealthReport | None:
        """The latest completed check."""
        return self._last_report

    @property
    def devices(self) -> tuple[int, ...]:
        """NVML indices this service checks (empty until started, or when inactive)."""
        return self._devices

    def check_now(self, kind: str = "on_demand", timeout: timedelta | None = None) -> HealthReport | None:
        """Runs a full check now and waits for it.

        Args:
            kind: the ``kind`` recorded in the report and the event.
            timeout: bound on the wait (default ``config.check_timeout``).

        Returns:
            The report, or ``None`` when the service is inactive or the check did
            not finish in time (a wedged driver; it is reported by ``tick``).
        """
        if not self._active:
            return None
        if not self._threaded:
            return self._run(kind, full=True)
        if self._inflight_since is not None and self._wedge_reported:
            return None  # the driver is stuck; queueing behind it would only wait
        job = self._submit(kind, True)
        job.done.wait((timeout or self.config.check_timeout).total_seconds())
        return job.report

    # -- internals -----------------------------------------------------------------

    def _submit(self, kind: str, full: bool) -> _Job:
        job = _Job(kind, full)
        if not self._threaded:
            job.report = self._run(kind, full)
            job.done.set()
            return job
        with self._lock:
            self._pending += 1
        self._queue.put(job)
        return job

    def _worker(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            self._inflight_since = self._clock()
            try:
                job.report = self._run(job.kind, job.full)
            except Exception:
                log.exception("GPU health check failed")
            finally:
                self._inflight_since = None
                self._wedge_reported = False
                with self._lock:
                    self._pending -= 1
                job.done.set()

    def _run(self, kind: str, full: bool) -> HealthReport:
        backend, config = self._backend, self.config
        assert backend is not None
        t0 = time.perf_counter()
        xids: list[Finding] = []
        if "xid" in config.checks:
            try:
                events = backend.poll_xids()
            except Exception as exc:
                log.warning("XID poll failed: %s", exc)
                events = []
            mine = [e for e in events if e.device is None or e.device in self._devices]
            xids = xid_findings(mine, config, backend.source("xid"))
        if not full:
            with self._lock:
                self._recent_xids += xids
                findings = dict(self._current)
                for f in xids:
                    findings.setdefault(f.key, f)
            return self._publish(kind, findings, time.perf_counter() - t0, summary=False)

        found: list[Finding] = []
        if "device_count" in config.checks:
            expected = config.expected_devices or self._baseline_count
            finding = device_count_finding(backend.device_count(), expected, backend.source("device_count"))
            if finding is not None:
                found.append(finding)
        for device in self._devices:
            reading = self._read(backend, device)
            if kind == "preflight" and reading.nvlink_active is not None:
                self._baseline_links[device] = sum(reading.nvlink_active)
            found += evaluate(reading, config, backend.source, self._baseline_links.get(device))
        with self._lock:
            found += self._recent_xids + xids + self._fatal
            self._recent_xids = []
        findings: dict[tuple[int | None, str, str, int | None], Finding] = {}
        for f in found:
            findings.setdefault(f.key, f)
        return self._publish(kind, findings, time.perf_counter() - t0, summary=True)

    def _read(self, backend: HealthBackend, device: int) -> DeviceReading:
        try:
            return backend.read(device, self.config.checks)
        except Exception as exc:  # a backend bug must not end the checks
            log.warning("reading GPU %d failed: %s", device, exc)
            return DeviceReading(device=device, errors={"device": f"{type(exc).__name__}: {exc}"})

    def _publish(self, kind: str, findings: dict[tuple[int | None, str, str, int | None], Finding], duration: float,
                 summary: bool) -> HealthReport:
        report = HealthReport(kind=kind, findings=tuple(findings.values()), devices=self._devices,
                              duration_s=duration)
        with self._lock:
            added = [f for k, f in findings.items() if k not in self._current]
            changed = findings.keys() != self._current.keys()
            self._current = findings
            new_fatal = [f for f in added if f.severity == "fatal" and f not in self._fatal]
            if new_fatal:
                self._fatal = self._fatal + new_fatal  # a new list: readers see old or new, never partial
            self._last_report = report
        now = self._clock()
        due = summary and now - self._last_emit >= self.config.summary_every.total_seconds()
        events = self._events
        if events is not None:
            for f in added:
                action = self.config.action_on_fatal if f.severity == "fatal" else "none"
                events.emit("gpu_unhealthy", device=f.device, check=f.check, severity=f.severity,
                            detail=f.detail, source=f.source, code=f.code, action=action)
            if changed or due or kind == "preflight":
                self._last_emit = now
                events.emit("health_check", ok=report.ok, fatal=bool(report.fatal), kind=kind,
                            findings=[f.to_json_obj() for f in report.findings],
                            devices=list(self._devices), duration_s=round(duration, 6))
        for f in added:
            where = "node" if f.device is None else f"GPU {f.device}"
            log.log(logging.ERROR if f.severity == "fatal" else logging.WARNING,
                    "%s %s (%s): %s [%s]", where, f.severity, f.check, f.detail, f.source)
        if new_fatal and self.config.action_on_fatal == "leave":
            self._write_verdict()
        return report

    def _write_verdict(self) -> None:
        verdict = self.verdict()
        if verdict is None or not self.verdict_path:
            return
        record = {
            "node": self._node,
            "ts": time.time(),
            "action": "leave",
            "exit_code": verdict.exit_code,
            "message": verdict.message,
            "findings": [f.to_json_obj() for f in verdict.findings],
        }
        tmp = f"{self.verdict_path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.verdict_path) or ".", exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, self.verdict_path)  # readers never see half a verdict
        except OSError as exc:
            log.error("cannot write %s: %s (the verdict still holds in memory)", self.verdict_path, exc)
        log.error("hpresil health: %s", verdict.message)

    def _report_wedged(self, seconds: float) -> None:
        detail = (f"a GPU health query has been running for {seconds:.0f} s (> check_timeout "
                  f"{self.config.check_timeout}): the driver is wedged or a GPU is failing")
        log.warning("%s", detail)
        if self._events is not None:
            self._events.emit("gpu_unhealthy", device=None, check="driver_hang", severity="warn",
                              detail=detail, source=f"{getattr(self._backend, 'name', 'health')}:health-thread",
                              action="none")

    def _resolve_devices(self, backend: HealthBackend, count: int) -> tuple[int, ...]:
        if self.config.devices is not None:
            wanted = tuple(d for d in self.config.devices if d < count)
            if len(wanted) != len(self.config.devices):
                log.warning("health devices %s: only %d GPUs exist; checking %s", self.config.devices, count, wanted)
            return wanted
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return tuple(range(count))
        # CUDA_VISIBLE_DEVICES holds indices or (prefixes of) UUIDs. Indices are
        # CUDA's order, which matches NVML's PCI order on homogeneous HGX/NVL
        # nodes (set CUDA_DEVICE_ORDER=PCI_BUS_ID to be sure elsewhere).
        uuids = {i: backend.uuid(i) or "" for i in range(count)}
        chosen: list[int] = []
        for item in (x.strip() for x in visible.split(",") if x.strip()):
            if item.isdigit():
                index: int | None = int(item) if int(item) < count else None
            else:
                matches = [i for i, u in uuids.items() if u and u.startswith(item)]
                index = matches[0] if len(matches) == 1 else None  # CUDA rejects ambiguous prefixes
            if index is None:
                break  # CUDA ignores everything after the first invalid entry
            chosen.append(index)
        return tuple(dict.fromkeys(chosen))
