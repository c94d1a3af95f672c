"""The hang watchdog: a node-runtime service outside the workers.

Every tick it reads each local worker's heartbeat and process state and
compares the time spent in the current phase with that phase's timeout (see
:mod:`hpresil.hang.api`). When one is overdue it diagnoses in a separate
thread (so the runtime keeps ticking): dumps every local rank's stacks,
shares the node's view with the other nodes through the job's store, names
the suspect, emits ``hang_detected`` and kills the local worker group
(SIGTERM, then SIGKILL after the grace period). The elastic agent then
restarts the group, which resumes from the newest snapshot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from datetime import timedelta

from hpresil.hang import probe
from hpresil.hang.api import FLAG_FAULTHANDLER, Beat, HangConfig
from hpresil.hang.config import hang_config_from_env
from hpresil.hang.diagnose import RankDiag, busy, find_suspects, in_collective, in_device_wait
from hpresil.hang.heartbeat import dump_request_path, fr_dump_path, record_path
from hpresil.hang.straggler import StragglerDetector
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["Watchdog", "phase_timeout"]

log = logging.getLogger(__name__)


def phase_timeout(beat: Beat | None, cfg: HangConfig, step_max: float, ckpt_max: float) -> tuple[float, str]:
    """The timeout (seconds) that applies to a worker now, and the phase's name.

    Args:
        beat: the worker's record (``None``: it has not beaten yet).
        cfg: the configuration.
        step_max: slowest step observed on this node (seconds).
        ckpt_max: slowest checkpoint observed on this node (seconds).
    """
    init = cfg.init_timeout.total_seconds()
    if beat is None or beat.phase == 0:
        return init, "init"
    if beat.phase == 1:
        if cfg.step_timeout is not None:
            return cfg.step_timeout.total_seconds(), "step"
        if beat.n_steps < cfg.min_samples or step_max <= 0:
            return init, "step"  # not calibrated yet: the early steps may still warm up
        return max(cfg.step_floor.total_seconds(), cfg.factor * step_max), "step"
    if beat.phase == 2:
        return max(cfg.checkpoint_floor.total_seconds(), cfg.factor * ckpt_max), "checkpoint"
    if beat.phase == 4:
        return init, "exit"
    return (beat.phase_timeout or cfg.user_timeout.total_seconds()), beat.phase_label


def _touch(path: str) -> None:
    try:
        with open(path, "w"):
            pass
    except OSError:
        pass


def _alive(pid: int) -> bool:
    state = probe.proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def _beat_key(beat: Beat | None) -> tuple[int, float, float] | None:
    return None if beat is None else (beat.step, beat.t_beat, beat.t_phase)


@dataclasses.dataclass(slots=True)
class _Busy:
    """A verdict that ranks are busy in their own code: the group may run on
    until ``busy_timeout`` (counted from the first overrunning rank's last
    progress) or until any local rank makes progress."""

    group: WorkerGroupInfo
    suspects: list[int]
    first: "_Rank"
    phase: str  # the phase the first rank overran
    waited: float  # how long the first rank had overrun when the verdict was made
    since: float  # monotonic time of the verdict
    beats: dict[int, tuple[int, float, float] | None]

    def progressed(self, ranks: list["_Rank"]) -> bool:
        return any(_beat_key(r.beat) != self.beats.get(r.rank) for r in ranks if r.rank in self.beats)


class _Rank:
    """The watchdog's view of one local worker."""

    def __init__(self, local_rank: int, rank: int, pid: int, path: str) -> None:
        self.local_rank, self.rank, self.pid, self.path = local_rank, rank, pid, path
        self.cpu: list[tuple[float, float]] = []  # (monotonic time, cpu seconds), last ~2 s
        self.stopped_since: float | None = None
        self.beat: Beat | None = None
        self.state: str | None = None
        self.win_step: int | None = None  # straggler window start: step and CPU seconds
        self.win_cpu = 0.0

    def sample(self, now: float) -> None:
        beat = probe.read_beat(self.path)
        self.beat = beat if beat is not None and beat.pid == self.pid else None
        st = probe.proc_state(self.pid)
        self.state = st[0] if st else None
        if st:
            self.cpu.append((now, st[1]))
            while len(self.cpu) > 2 and now - self.cpu[0][0] > 2.0:
                self.cpu.pop(0)
        if self.state in ("T", "t"):
            self.stopped_since = self.stopped_since or now
        else:
            self.stopped_since = None

    def cpu_rate(self) -> float | None:
        if len(self.cpu) < 2 or self.cpu[-1][0] - self.cpu[0][0] < 0.2:
            return None
        (t0, c0), (t1, c1) = self.cpu[0], self.cpu[-1]
        return (c1 - c0) / (t1 - t0)


class Watchdog(NodeService):
    """NodeService ``watchdog``.

    Args:
        config: hang settings; default from ``HPRESIL_HANG_*``.
    """

    name = "watchdog"

    def __init__(self, config: HangConfig | None = None) -> None:
        self.config = config or hang_config_from_env()
        self._ctx: RuntimeContext | None = None
        self._group: WorkerGroupInfo | None = None
        self._ranks: list[_Rank] = []
        self._handling: threading.Thread | None = None
        self._handled: WorkerGroupInfo | None = None  # the group a detection already fired for
        self._stragglers = StragglerDetector(self.config.straggler_threshold, self.config.straggler_windows)
        self._windows: dict[int, dict[int, tuple[float | None, float]]] = {}
        self._store: object | None = None
        self._others_max = (0.0, 0.0)  # slowest step and checkpoint the other nodes reported
        self._busy: _Busy | None = None  # ranks reported busy, not stuck
        self._lock = threading.Lock()
        self.detections: list[dict] = []

    def start(self, ctx: RuntimeContext) -> None:
        """Remembers where the workers' records live."""
        self._ctx = ctx

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """Watches the new group's workers from now on."""
        assert self._ctx is not None
        with self._lock:
            self._group = group
            self._windows.clear()
            self._store = None
            self._others_max = (0.0, 0.0)
            self._ranks = [
                _Rank(i, rank, pid, record_path(self._ctx.shm_dir, i))
                for i, (rank, pid) in enumerate(zip(group.global_ranks, group.pids))
            ]

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """Stops watching the group that just stopped."""
        with self._lock:
            if self._group is group:
                self._group, self._ranks = None, []

    def tick(self) -> None:
        """Checks every local worker against its phase's timeout."""
        if not self.config.enabled:
            return
        with self._lock:
            group, ranks = self._group, list(self._ranks)
        if group is None or not ranks or self._handled is group:
            return
        now_mono, now = time.monotonic(), time.time()
        for r in ranks:
            r.sample(now_mono)
        beats = [r.beat for r in ranks if r.beat is not None]
        # calibration agreed across nodes: the slowest step any node has seen
        step_max = max([b.step_max for b in beats] + [self._others_max[0]])
        ckpt_max = max([b.ckpt_max for b in beats] + [self._others_max[1]])
        overdue: list[tuple[_Rank, str, float, float]] = []
        for r in ranks:
            if r.state in (None, "Z", "X"):
                continue  # exited: the elastic agent handles it
            if r.stopped_since is not None and now_mono - r.stopped_since > self.config.stopped_timeout.total_seconds():
                overdue.append((r, "stopped", self.config.stopped_timeout.total_seconds(), now_mono - r.stopped_since))
                continue
            timeout, phase = phase_timeout(r.beat, self.config, step_max, ckpt_max)
            if r.beat is None:
                waited = now - group.started
            elif r.beat.phase == 1:
                waited = now - max(r.beat.t_beat, r.beat.t_phase)
            else:
                waited = now - r.beat.t_phase
            if waited > timeout:
                overdue.append((r, phase, timeout, waited))
        force = busy_kill = False
        verdict = self._busy if self._busy is not None and self._busy.group is group else None
        if verdict is not None:
            if verdict.progressed(ranks):
                log.info("busy rank(s) %s went on after %.1f s", verdict.suspects, now_mono - verdict.since + verdict.waited)
                self._busy = None
                return
            stopped = [o for o in overdue if o[1] == "stopped"]
            busy_for = now_mono - verdict.since + verdict.waited
            if stopped:
                overdue, force = stopped, True
            elif busy_for > self.config.busy_timeout.total_seconds():
                overdue = [(verdict.first, verdict.phase, self.config.busy_timeout.total_seconds(), busy_for)]
                force = busy_kill = True
            else:
                return  # busy, not stuck: torchrun would let it run
        if not overdue:
            self._straggler_tick(group, ranks)
            return
        self._handled = group
        self._handling = threading.Thread(target=self._handle, args=(group, ranks, overdue, force, busy_kill),
                                          name="hpresil-hang", daemon=True)
        self._handling.start()

    # -- stragglers ---------------------------------------------------------------

    def _straggler_tick(self, group: WorkerGroupInfo, ranks: list[_Rank]) -> None:
        size = self.config.straggler_window
        for r in ranks:
            if r.beat is None or r.beat.phase == 0 or not r.cpu:
                continue
            cpu = r.cpu[-1][1]
            if r.win_step is None or r.beat.step < r.win_step:
                r.win_step, r.win_cpu = r.beat.step, cpu
            elif r.beat.step - r.win_step >= size:
                per_step = (cpu - r.win_cpu) / (r.beat.step - r.win_step)
                busy = r.beat.busy_ema if r.beat.busy_ema > 0 else None
                self._windows.setdefault(r.beat.step // size, {})[r.rank] = (busy, per_step)
                r.win_step, r.win_cpu = r.beat.step, cpu
        local = {r.rank for r in ranks}
        for window in sorted(self._windows):
            metrics = self._windows[window]
            if not local <= set(metrics):
                continue
            del self._windows[window]
            everyone = {**self._share_window(group, window, {k: v for k, v in metrics.items() if k in local}, ranks),
                        **metrics}
            use_busy = all(b is not None for b, _ in everyone.values())
            values = {k: (b if use_busy else c) for k, (b, c) in everyone.items()}
            for rep in self._stragglers.observe(window, values, "section" if use_busy else "cpu"):
                if rep.rank in local:
                    assert self._ctx is not None
                    self._ctx.events.emit("straggler", rank=rep.rank, window=rep.window, metric_s=round(rep.metric, 6),
                                          others_median_s=round(rep.median, 6), ratio=round(rep.ratio, 3),
                                          source=rep.source, attempt=group.attempt)
                    log.warning("straggler: rank %d is %.2fx slower than the others (%s %.4f s vs %.4f s per step)",
                                rep.rank, rep.ratio, rep.source, rep.metric, rep.median)
        for window in [w for w in self._windows if w < max(self._windows, default=0) - 8]:
            del self._windows[window]  # a rank that stopped beating must not make this grow forever

    def _share_window(self, group: WorkerGroupInfo, window: int, mine: dict[int, tuple[float | None, float]],
                      ranks: list[_Rank]) -> dict[int, tuple[float | None, float]]:
        """Publishes this node's window metrics and calibration; returns the other
        nodes' metrics that are there, and folds their calibration into ours."""
        try:
            found_store = self._job_store(group)
            if found_store is None:
                return {}
            store, base = found_store
            prefix = f"{base}straggler/{window}/"
            beats = [r.beat for r in ranks if r.beat is not None]
            calib = [max((b.step_max for b in beats), default=0.0), max((b.ckpt_max for b in beats), default=0.0)]
            store.set(prefix + str(group.group_rank), json.dumps(  # type: ignore[attr-defined]
                {"metrics": {str(k): v for k, v in mine.items()}, "calib": calib}))
            found: dict[int, tuple[float | None, float]] = {}
            others = list(self._others_max)
            for node in range(group.group_world_size):
                key = prefix + str(node)
                if node != group.group_rank and store.check([key]):  # type: ignore[attr-defined]
                    obj = json.loads(store.get(key))  # type: ignore[attr-defined]
                    found.update({int(k): (v[0], v[1]) for k, v in obj["metrics"].items()})
                    others = [max(a, float(b)) for a, b in zip(others, obj["calib"])]
            self._others_max = (others[0], others[1])
            return found
        except Exception as exc:
            log.debug("straggler metrics not shared across nodes: %s", exc)
            return {}

    # -- diagnosis and recovery -------------------------------------------------

    def _handle(self, group: WorkerGroupInfo, ranks: list[_Rank], overdue: list[tuple[_Rank, str, float, float]],
                force: bool = False, busy_kill: bool = False) -> None:
        assert self._ctx is not None
        t0 = time.monotonic()
        first, phase, timeout, waited = overdue[0]
        log.warning("rank %d in phase %s for %.1f s (timeout %.1f s); diagnosing", first.rank, phase, waited, timeout)
        for r in ranks:  # ask every rank for its flight recorder first: it dumps while we take stacks
            _touch(dump_request_path(r.path))
        diags = [self._diagnose(r) for r in ranks]
        self._collect_flight_recorders(ranks, diags)
        diags += self._exchange(group, diags, "busy/" if busy_kill else "hang/")
        suspects, reason = find_suspects(diags)
        if not force and busy(diags, suspects, reason):
            self._report_busy(group, ranks, diags, suspects, reason, first, phase, waited)
            return
        detection = {
            "suspects": suspects,
            "reason": reason,
            "phase": phase,
            "timeout_s": round(timeout, 3),
            "waited_s": round(waited, 3),
            "step": min((d.step for d in diags), default=-1),
            "attempt": group.attempt,
            "ranks": [d.to_json() for d in sorted(diags, key=lambda d: d.rank)],
            "diagnose_s": round(time.monotonic() - t0, 3),
        }
        if busy_kill:
            detection["busy_timeout_s"] = round(self.config.busy_timeout.total_seconds(), 3)
        self.detections.append(detection)
        self._ctx.events.emit("hang_detected", **detection)
        log.error("hang detected: suspect rank(s) %s (%s) in phase %s after %.1f s; killing the local worker group",
                  suspects, reason, phase, waited)
        self._kill(ranks)

    def _report_busy(self, group: WorkerGroupInfo, ranks: list[_Rank], diags: list[RankDiag], suspects: list[int],
                     reason: str, first: _Rank, phase: str, waited: float) -> None:
        """Busy in its own code, not stuck: report who, how long, who waits for it, and where it is."""
        assert self._ctx is not None
        waiting = sorted(d.rank for d in diags if d.in_collective and d.rank not in suspects)
        limit = self.config.busy_timeout.total_seconds()
        stacks = {str(d.rank): d.stacks_file for d in diags if d.rank in suspects and d.stacks_file}
        self._ctx.events.emit("rank_busy", suspects=suspects, reason=reason, waited_s=round(waited, 3),
                              waiting=waiting, busy_timeout_s=round(limit, 3), stacks=stacks,
                              step=min((d.step for d in diags), default=-1), attempt=group.attempt)
        log.warning("rank(s) %s busy outside collectives for %.1f s (%s; stacks: %s)%s; not stuck, so it may run "
                    "for --hang-busy-timeout %.0f s", suspects, waited, reason, ", ".join(stacks.values()) or "none",
                    f"; ranks {waiting} wait for it" if waiting else "", limit)
        with self._lock:
            if self._group is group:
                self._busy = _Busy(group=group, suspects=suspects, first=first, phase=phase, waited=waited,
                                   since=time.monotonic(), beats={r.rank: _beat_key(r.beat) for r in ranks})
                self._handled = None

    def _diagnose(self, r: _Rank) -> RankDiag:
        assert self._ctx is not None
        stacks_file = os.path.join(self._ctx.log_dir, "stacks", f"rank{r.rank}.txt")
        use_signal = bool(r.beat and r.beat.flags & FLAG_FAULTHANDLER) and r.state not in ("T", "t")
        text = probe.dump_stacks(r.pid, stacks_file, use_signal)
        return RankDiag(
            rank=r.rank,
            node=self._ctx.node_id,
            step=r.beat.step if r.beat else -1,
            phase=r.beat.phase_label if r.beat else "init",
            state=r.state,
            cpu_rate=r.cpu_rate(),
            in_collective=in_collective(text),
            in_device_wait=in_device_wait(text),
            stacks_file=stacks_file if text else None,
        )

    def _collect_flight_recorders(self, ranks: list[_Rank], diags: list[RankDiag], timeout: float = 1.0) -> None:
        assert self._ctx is not None
        paths = {r.rank: fr_dump_path(self._ctx.log_dir, r.rank) for r in ranks}
        # A stopped process (state T) cannot answer: waiting for it would only delay the kill.
        awaited = [paths[r.rank] for r in ranks if r.state not in ("T", "t")]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(os.path.exists(p) for p in awaited):
            time.sleep(0.05)
        for d in diags:
            if d.rank in paths and os.path.exists(paths[d.rank]):
                d.flight_recorder = paths[d.rank]
        for r in ranks:
            try:
                os.unlink(dump_request_path(r.path))
            except OSError:
                pass

    def _job_store(self, group: WorkerGroupInfo) -> tuple[object, str] | None:
        """The store shared by all nodes and a key prefix unique to this group.

        Prefers the agents' rendezvous store (its keys are already private to the
        rendezvous round, and it lives in the agents, not in a worker that may be
        the hung one); falls back to the workers' store at MASTER_ADDR:PORT."""
        if group.group_world_size <= 1:
            return None
        if group.store is not None:
            return group.store, "hpresil/"
        if not group.master_addr or not group.master_port:
            return None
        if self._store is None:
            from torch.distributed import TCPStore

            self._store = TCPStore(group.master_addr, int(group.master_port), is_master=False,
                                   timeout=timedelta(seconds=2), wait_for_workers=False)
        return self._store, f"hpresil/{group.attempt}/"

    def _exchange(self, group: WorkerGroupInfo, mine: list[RankDiag], kind: str = "hang/") -> list[RankDiag]:
        """Publishes this node's diagnostics and collects the other nodes' (best effort).

        ``kind`` keeps the diagnosis that found ranks busy (``hang/``) apart from
        the one that kills them at ``busy_timeout`` (``busy/``)."""
        try:
            found_store = self._job_store(group)
            if found_store is None:
                return []
            store, base = found_store
            prefix = base + kind
            store.set(prefix + str(group.group_rank), json.dumps([d.to_json() for d in mine]))  # type: ignore[attr-defined]
            others = [prefix + str(n) for n in range(group.group_world_size) if n != group.group_rank]
            deadline = time.monotonic() + self.config.gather_timeout.total_seconds()
            while time.monotonic() < deadline and not store.check(others):  # type: ignore[attr-defined]
                time.sleep(0.05)
            found: list[RankDiag] = []
            for key in others:
                if store.check([key]):  # type: ignore[attr-defined]
                    found += [RankDiag.from_json(o) for o in json.loads(store.get(key))]  # type: ignore[attr-defined]
            return found
        except Exception as exc:  # the store may be gone with the node that hosted it
            log.warning("could not exchange hang diagnostics with other nodes: %s", exc)
            return []

    def _kill(self, ranks: list[_Rank]) -> None:
        for r in ranks:
            for sig in (signal.SIGTERM, signal.SIGCONT):  # a stopped process only acts on SIGTERM once continued
                try:
                    os.kill(r.pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + self.config.grace.total_seconds()
        while time.monotonic() < deadline and any(_alive(r.pid) for r in ranks):
            time.sleep(0.05)
        for r in ranks:
            if _alive(r.pid):
                try:
                    os.kill(r.pid, signal.SIGKILL)
                except OSError:
                    pass

    def stop(self, timeout: timedelta) -> None:
        """Waits for a diagnosis in progress to finish."""
        if self._handling is not None:
            self._handling.join(timeout.total_seconds())
