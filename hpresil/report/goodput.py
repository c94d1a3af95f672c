"""Turns the events of a job into a :class:`~hpresil.report.api.GoodputReport`.

The job's events (every node's ``events.jsonl``, merged by time) are cut into
*epochs*, one per start of the worker groups: an epoch opens at the first
``workers_start`` after the previous epoch's fault and collects every node's
start of the same round. Inside an epoch, step observations ``(time, step)``
come from ``progress`` (heartbeats, sampled by the node runtime),
``checkpoint_saved`` (the step had completed when its save began) and
``checkpoint_restored`` (the base step). Steps of an epoch above the step a
*later* epoch restored were recomputed: lost work.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from typing import Any, Iterable

from hpresil.errors import ConfigError
from hpresil.events.jsonl import read_events
from hpresil.report.api import Epoch, GoodputReport, Segment, StateHealth, TierStats

__all__ = ["find_event_files", "load_events", "analyse", "build_report"]

log = logging.getLogger(__name__)

# Events that end an epoch, and the fault name they stand for.
_FAULTS = {
    "hang_detected": "hang",
    "worker_exit": "exit",
    "node_leave": "leave",
    "workers_failed": "failed",
    "workers_succeeded": "succeeded",
}


def find_event_files(log_dir: str) -> list[str]:
    """Every ``events.jsonl`` under ``log_dir`` (or ``log_dir`` itself when it is one)."""
    if os.path.isfile(log_dir):
        return [log_dir]
    found = []
    for root, _dirs, files in os.walk(log_dir):
        if "events.jsonl" in files:
            found.append(os.path.join(root, "events.jsonl"))
    return sorted(found)


def load_events(files: Iterable[str], run_id: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Reads and merges events of one run, sorted by time.

    A log directory reused by several runs holds several ``runtime_start``
    lines per file; each starts the events of the run it names.

    Args:
        files: ``events.jsonl`` paths.
        run_id: the run to keep; default: the run of the newest ``runtime_start``.

    Returns:
        The events and the run id they belong to.
    """
    per_run: dict[str | None, list[dict[str, Any]]] = {}
    newest: tuple[float, str | None] = (-math.inf, None)
    for path in files:
        current: str | None = None
        for e in read_events(path):
            # a damaged line must not end the report: skip events whose time, name or node is unusable
            if _number(e.get("ts")) is None or not isinstance(e["event"], str) or not isinstance(e.get("node", ""), str):
                continue
            if e["event"] == "runtime_start":
                run = e.get("run_id")
                current = None if run is None else str(run)
                newest = max(newest, (float(e["ts"]), current), key=lambda x: x[0])
            per_run.setdefault(current, []).append(e)
    chosen = run_id if run_id is not None else newest[1]
    events = per_run.get(chosen, [])
    if not events and run_id is None and len(per_run) == 1:
        chosen, events = next(iter(per_run.items()))
    events.sort(key=lambda e: e["ts"])
    return events, chosen


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (not a number, NaN, infinite, or an integer past 1e18)."""
    if not isinstance(value, (int, float)) or isinstance(value, int) and abs(value) > 10**18:
        return None
    return float(value) if math.isfinite(value) else None


def _f(e: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = _number(e.get(key))
    return default if value is None else value


def _epochs(events: list[dict[str, Any]], end: float, rolled: dict[int, int]) -> list[Epoch]:
    """The epochs; ``rolled`` is filled with the step each rollback epoch restored."""
    epochs: list[Epoch] = []
    cur: Epoch | None = None
    started: set[str] = set()
    rollback_key: Any = None
    for e in events:
        name, node = e["event"], e.get("node", "")
        if name == "rollback" and cur is not None and node in started:
            # Every rank reports the same rollback: the first report opens the next epoch.
            key = (e.get("from_step"), e.get("to_step"), e.get("attempt"), e.get("cause"))
            if key == rollback_key or cur.fault_ts is not None:
                continue
            t = e["ts"] - _f(e, "duration_s")
            cur.fault, cur.fault_ts = "rollback", t
            cur = Epoch(index=len(epochs), start=t, world_size=cur.world_size)
            epochs.append(cur)
            rolled[cur.index] = int(_f(e, "to_step"))
            rollback_key = key
            continue
        if name == "workers_start":
            rollback_key = None
            if cur is None or cur.fault_ts is not None:
                cur = Epoch(index=len(epochs), start=e["ts"])
                epochs.append(cur)
                started = set()
            started.add(node)
            cur.world_size = max(cur.world_size, int(_f(e, "world_size")))
            continue
        # A fault counts only from a node that already started this epoch's
        # workers: a late report of the previous round must not end this one.
        if cur is None or node not in started:
            continue
        if cur.fault_ts is not None:
            # The first fault keeps its time, but the agent's restart decides the
            # cause: workers of a node's peers exit (broken connections) a moment
            # before the agents declare that node lost.
            if name == "workers_restart" and e.get("cause") == "membership" and cur.fault == "exit":
                cur.fault = "membership"
            continue
        if name in _FAULTS:
            cur.fault, cur.fault_ts = _FAULTS[name], e["ts"]
        elif name == "workers_restart":
            cur.fault = "membership" if e.get("cause") == "membership" else "exit"
            cur.fault_ts = e["ts"]
    for i, ep in enumerate(epochs):
        ep.end = epochs[i + 1].start if i + 1 < len(epochs) else end
    return epochs


class _Cursor:
    """Cuts ``[start, stop]`` into consecutive segments."""

    def __init__(self, start: float, stop: float, epoch: int, out: list[Segment]) -> None:
        self.t, self.stop, self.epoch, self.out = start, stop, epoch, out

    def to(self, kind: str, until: float) -> None:
        until = min(max(until, self.t), self.stop)
        if until > self.t:
            if self.out and self.out[-1].kind == kind and self.out[-1].end == self.t:
                self.out[-1] = Segment(self.out[-1].start, until, kind, self.epoch)
            else:
                self.out.append(Segment(self.t, until, kind, self.epoch))
            self.t = until

    def span(self, kind: str, seconds: float) -> None:
        self.to(kind, self.t + max(0.0, seconds))


def _split_steps(cur: _Cursor, t_end: float, s_from: int, s_to: int, keep: float, blocking: float) -> None:
    """Step time of steps ``(s_from, s_to]`` ending at ``t_end``: checkpoint
    blocking first, then kept steps (productive) and recomputed ones (lost)."""
    length = max(0.0, t_end - cur.t)
    b = min(length, blocking)
    cur.span("checkpoint", b)
    work = length - b
    n = max(1, s_to - s_from)
    kept = min(max(keep - s_from, 0.0), n)
    cur.span("productive", work * kept / n)
    cur.to("lost_work", t_end)


def analyse(events: list[dict[str, Any]], log_dir: str = "", files: list[str] | None = None) -> GoodputReport:
    """Builds the report from one run's merged events (sorted by ``ts``).

    Raises:
        ConfigError: there are no events.
    """
    if not events:
        raise ConfigError(f"no events found in {log_dir or 'the input'}: pass the job's log directory "
                          "(--job-log-dir / --log-dir of hpresil-run), which holds each node's events.jsonl")
    starts = [e["ts"] for e in events if e["event"] == "runtime_start"]
    start = min(starts) if starts else events[0]["ts"]
    end = max(e["ts"] for e in events)
    rolled: dict[int, int] = {}
    epochs = _epochs(events, end, rolled)
    health = StateHealth()

    saved: dict[tuple[int, int], tuple[float, float]] = {}  # (epoch, step) -> (max blocking, completion time)
    obs: list[list[tuple[float, int]]] = [[] for _ in epochs]
    restores: list[list[dict[str, Any]]] = [[] for _ in epochs]
    step_times: list[list[float]] = [[] for _ in epochs]
    tiers: dict[str, TierStats] = {}
    save_ts: dict[int, float] = {}
    tier_steps: dict[str, set[int]] = {}
    marks: list[tuple[float, str, str]] = []
    hangs = stragglers = 0
    k = -1
    for e in events:
        name, ts = e["event"], e["ts"]
        while k + 1 < len(epochs) and ts >= epochs[k + 1].start:
            k += 1
        tier = str(e.get("tier", "ram"))
        if name == "checkpoint_saved":
            st = tiers.setdefault(tier, TierStats(tier))
            blocking = _f(e, "blocking_s")
            st.saves += 1
            st.blocking_s_total += blocking
            st.blocking_s_max = max(st.blocking_s_max, blocking)
            st.bytes_total += int(_f(e, "bytes"))
            step = int(_f(e, "step"))
            if step not in tier_steps.setdefault(tier, set()):
                tier_steps[tier].add(step)
                marks.append((ts, f"save:{tier}", f"step {step}"))
            save_ts.setdefault(step, ts)
            if k >= 0:
                old = saved.get((k, step), (0.0, math.inf))
                saved[(k, step)] = (max(old[0], blocking), min(old[1], ts - blocking))
        elif name == "checkpoint_restored":
            st = tiers.setdefault(tier, TierStats(tier))
            st.restores += 1
            st.restore_s_total += _f(e, "duration_s")
            st.restore_s_max = max(st.restore_s_max, _f(e, "duration_s"))
            st.restore_bytes += int(_f(e, "bytes"))
            into = k
            if k + 1 < len(epochs) and rolled.get(k + 1) == int(_f(e, "step", -1)) and ts >= epochs[k + 1].start - 1.0:
                into = k + 1  # a rank that began the rollback a moment before the first one reported it
            if into >= 0:
                if not restores[into]:
                    marks.append((ts, "restore", f"step {e.get('step')} from {tier}"))
                restores[into].append(e)
        elif name in _HEALTH:
            _note_health(health, marks, e)
        elif name in ("checkpoint_drained", "checkpoint_replicated"):
            tier = str(e.get("tier", "durable" if name == "checkpoint_drained" else "peer"))
            st = tiers.setdefault(tier, TierStats(tier))
            st.uploads += 1
            st.upload_s_total += _f(e, "duration_s")
            st.upload_bytes += int(_f(e, "bytes"))
            step = int(_f(e, "step", -1))
            lag = _f(e, "lag_s", ts - save_ts[step] if step in save_ts else 0.0)
            st.upload_lag_s_max = max(st.upload_lag_s_max, lag)
            if e.get("committed") or name == "checkpoint_replicated":
                tier_steps.setdefault(tier, set()).add(step)
            if e.get("committed"):
                marks.append((ts, "durable", f"step {step}"))
        elif name == "checkpoint_skipped":
            tiers.setdefault(tier, TierStats(tier)).skipped += 1
        elif name == "tier_degraded":
            tiers.setdefault(tier, TierStats(tier)).degraded += 1
        elif name == "integrity_failed":
            tiers.setdefault(tier, TierStats(tier)).integrity_failures += 1
        elif name == "progress" and k >= 0:
            if _f(e, "t_step") > 0 and int(_f(e, "step", -1)) >= 0:
                obs[k].append((_f(e, "t_step"), int(_f(e, "step"))))
            if _f(e, "step_time_s") > 0:
                step_times[k].append(_f(e, "step_time_s"))
        elif name == "hang_detected":
            hangs += 1
            marks.append((ts, "hang", f"suspects {e.get('suspects')}"))
        elif name == "worker_exit":
            marks.append((ts, "exit", f"rank {e.get('rank')} {e.get('signal') or e.get('exitcode')}"))
        elif name == "straggler":
            stragglers += 1
    for tier, steps in tier_steps.items():
        tiers[tier].steps = len(steps)
    for (ep, step), (_, t_done) in saved.items():
        obs[ep].append((t_done, step))

    segments: list[Segment] = []
    lead = _Cursor(start, epochs[0].start if epochs else end, -1, segments)
    lead.to("init", lead.stop)
    progress: list[tuple[float, int, int]] = []
    for ep in epochs:
        rs = restores[ep.index]
        if rs:
            ep.base_step = min(int(_f(r, "step")) for r in rs)
            ep.restore_tier = str(rs[0].get("tier"))
    # An attempt that neither restored nor completed a step (the job ended while
    # it started up) says nothing about which steps survive, nor about the final step.
    idle = {ep.index for ep in epochs if not restores[ep.index] and not obs[ep.index]}
    for ep in epochs:
        later = [e.base_step for e in epochs[ep.index + 1:] if e.index not in idle]
        keep = float(min(later)) if later else math.inf
        cur = _Cursor(ep.start, ep.end, ep.index, segments)
        rs = restores[ep.index]
        points = sorted(p for p in obs[ep.index] if ep.start <= p[0] <= ep.end and p[1] > ep.base_step)
        if rs:
            t_restored = max(r["ts"] for r in rs)
            cur.to("init", t_restored - max(_f(r, "duration_s") for r in rs))
            cur.to("restore", t_restored)
            progress.append((t_restored, ep.base_step, ep.index))
        elif points:
            # No restore event: the first observed steps ran from an unknown
            # start; estimate it from this epoch's typical step time.
            deltas = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(points, points[1:]) if b[1] > a[1]]
            dt = statistics.median(step_times[ep.index] or deltas or [0.0])
            cur.to("init", points[0][0] - (points[0][1] - ep.base_step) * dt)
        last_step = ep.base_step
        for t, step in points:
            if step <= last_step:
                continue
            # over the saves, not range(last_step, step): a damaged step number can be huge
            blocking = sum(b for (k, s), (b, _) in saved.items() if k == ep.index and last_step <= s < step)
            _split_steps(cur, t, last_step, step, keep, blocking)
            progress.append((t, step, ep.index))
            last_step = step
        ep.max_step = last_step
        cur.span("checkpoint", saved.get((ep.index, last_step), (0.0, 0.0))[0])
        fault_ts = ep.fault_ts if ep.fault_ts is not None else ep.end
        if ep.fault in (None, "succeeded"):
            cur.to("shutdown", ep.end)
            continue
        if ep.fault == "hang":
            hang = next((e for e in events if e["event"] == "hang_detected" and ep.start <= e["ts"] <= ep.end), {})
            began = fault_ts - _f(hang, "waited_s") - _f(hang, "diagnose_s")
            cur.to("detection", began)
            cur.to("hang_detection", fault_ts)
        else:
            cur.to("detection", fault_ts)
        last = ep.index + 1 == len(epochs)
        cur.to("shutdown" if last else ("rescale" if ep.fault == "membership" else "restart"), ep.end)

    restarts: dict[str, int] = {}
    for ep in epochs[:-1]:
        if ep.fault == "rollback":
            continue  # in-process: no restart
        cause = {"hang": "hang", "membership": "membership"}.get(ep.fault or "", "failure")
        restarts[cause] = restarts.get(cause, 0) + 1
    final = next((ep.max_step for ep in reversed(epochs) if ep.index not in idle), 0)
    return GoodputReport(
        log_dir=log_dir,
        files=list(files or []),
        nodes=sorted({str(e.get("node", "")) for e in events}),
        start=start,
        end=end,
        segments=segments,
        epochs=epochs,
        tiers=tiers,
        restarts=restarts,
        hang_detections=hangs,
        stragglers=stragglers,
        final_step=final,
        progress=progress,
        world_sizes=[(ep.start, ep.world_size) for ep in epochs],
        marks=sorted(marks),
        health=health,
    )


#: Events about the state's health (see :class:`~hpresil.report.api.StateHealth`).
_HEALTH = ("snapshot_poisoned", "snapshot_suspect", "replica_divergence", "rollback")


def _note_health(health: StateHealth, marks: list[tuple[float, str, str]], e: dict[str, Any]) -> None:
    """Adds one health event; the events every rank reports once per rollback or
    divergence are kept once."""
    name, ts, step = e["event"], e["ts"], int(_f(e, "step", -1))
    if name == "snapshot_poisoned":
        health.poisoned.append({"step": step, "rank": e.get("rank"), "keys": e.get("keys", [])})
        if step not in {int(p["step"]) for p in health.poisoned[:-1]}:
            marks.append((ts, "poisoned", f"step {step}"))
    elif name == "snapshot_suspect":
        health.suspect.append({"step": step, "rank": e.get("rank"), "causes": e.get("causes", []),
                               "loss": e.get("loss")})
        if step not in {int(p["step"]) for p in health.suspect[:-1]}:
            marks.append((ts, "suspect", f"step {step} ({', '.join(map(str, e.get('causes', [])))})"))
    elif name == "replica_divergence":
        same = next((d for d in health.divergences if d["step"] == step), None)
        if same is None:
            health.divergences.append({"step": step, "ranks": e.get("ranks", []), "nodes": [e.get("node", "")]})
            marks.append((ts, "divergence", f"step {step}: ranks {e.get('ranks')}"))
        elif e.get("node", "") not in same["nodes"]:
            same["nodes"].append(e.get("node", ""))
    else:
        key = (e.get("from_step"), e.get("to_step"), e.get("attempt"), e.get("cause"))
        last = health.rollbacks[-1] if health.rollbacks else None
        if last is not None and (last["from_step"], last["to_step"], last["attempt"], last["cause"]) == key:
            return
        health.rollbacks.append({"ts": ts, "from_step": e.get("from_step"), "to_step": e.get("to_step"),
                                 "cause": e.get("cause"), "bad_step": e.get("bad_step"), "tier": e.get("tier"),
                                 "attempt": e.get("attempt"), "duration_s": _f(e, "duration_s")})
        marks.append((ts, "rollback", f"step {e.get('from_step')} -> {e.get('to_step')} ({e.get('cause')})"))


def build_report(log_dir: str, run_id: str | None = None) -> GoodputReport:
    """Reads every ``events.jsonl`` under ``log_dir`` and builds the report.

    Args:
        log_dir: the job's log directory (one sub-directory per node is fine),
            or one ``events.jsonl``.
        run_id: the run to report when the directory holds several; default: the newest.

    Raises:
        ConfigError: no events were found.
    """
    files = find_event_files(log_dir)
    if not files:
        raise ConfigError(f"no events.jsonl under {log_dir!r}: pass the job's log directory "
                          "(--job-log-dir / --log-dir of hpresil-run)")
    events, chosen = load_events(files, run_id)
    if not events:
        raise ConfigError(f"no events of run {run_id!r} in {log_dir!r}")
    log.debug("report of run %s: %d events from %d files", chosen, len(events), len(files))
    return analyse(events, log_dir, files)
