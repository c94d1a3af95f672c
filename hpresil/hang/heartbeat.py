"""Worker side of hang detection: heartbeats and phases.

``hpresil.heartbeat(step)`` after each step and ``with hpresil.phase("eval"):``
around slow non-step work are all a script needs; ``Checkpointer.save`` does
both for checkpoints. Outside ``hpresil-run`` (no ``$HPRESIL_SHM_DIR``) they
are no-ops. A beat is a few ``struct.pack_into`` calls on a shared mapping:
no system call (``time.time`` goes through the vDSO).
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import json
import logging
import mmap
import os
import signal
import struct
import threading
import time
from datetime import timedelta
from typing import IO, Iterator

from hpresil import _env
from hpresil.hang.api import FLAG_FAULTHANDLER, RECORD, RECORD_SIZE

__all__ = ["Heartbeat", "heartbeat", "phase", "section", "get", "record_path", "dump_request_path", "fr_dump_path",
           "STACK_SIGNAL"]

log = logging.getLogger(__name__)

#: Signal the watchdog sends to make a worker dump every thread's Python stack.
STACK_SIGNAL = signal.SIGUSR1

_CODES = {"init": 0, "step": 1, "checkpoint": 2}
_SEQ = struct.Struct("<Q")  # the record's first field


def record_path(shm_dir: str, local_rank: int) -> str:
    """Where local rank ``local_rank`` writes its heartbeat record."""
    return os.path.join(shm_dir, "hb", f"local{local_rank}")


def dump_request_path(record: str) -> str:
    """The file whose appearance asks a worker for a flight-recorder dump."""
    return record + ".dump"


def fr_dump_path(log_dir: str, rank: int) -> str:
    """Where rank ``rank`` writes its flight-recorder dump."""
    return os.path.join(log_dir, "flight_recorder", f"rank{rank}.json")


def _serve_dump_requests(request: str, out: str, interval: float = 0.25) -> None:
    """Thread body: on request, writes torch's flight recorder (the last
    collectives of every process group, gloo or NCCL) as JSON.

    It needs the GIL, which a rank blocked inside a collective releases; a rank
    spinning while holding the GIL yields its stacks (faulthandler) instead.
    One ``stat`` every ``interval`` seconds, never per step.
    """
    while True:
        time.sleep(interval)
        if not os.path.exists(request):
            continue
        try:
            from torch._C._distributed_c10d import _dump_fr_trace_json

            data = _dump_fr_trace_json()
        except Exception as exc:  # no flight recorder in this torch, or no process group yet
            data = json.dumps({"error": f"flight recorder unavailable: {exc}"}).encode()
        try:
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out + ".tmp", "wb") as f:
                f.write(data)
            os.replace(out + ".tmp", out)
            os.unlink(request)
        except OSError as exc:
            log.warning("cannot write flight-recorder dump %s: %s", out, exc)


class Heartbeat:
    """One worker's heartbeat record.

    Args:
        path: the record file (created, 128 bytes).
        rank: global rank, stored for the watchdog's reports.
        stacks_file: where ``faulthandler`` writes this worker's stacks on
            :data:`STACK_SIGNAL`; ``None`` disables stack dumps.
    """

    def __init__(self, path: str, rank: int, stacks_file: str | None = None) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, RECORD_SIZE)
            self._map = mmap.mmap(fd, RECORD_SIZE)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._stacks: IO[str] | None = None
        self._flags = 0
        if stacks_file is not None:
            self._register_stack_dump(stacks_file)
        now = time.time()
        self._seq = 0
        self.rank = rank
        self.step = -1
        self.t_beat = 0.0
        self.t_phase = now
        self.phase = 0
        self.phase_timeout = 0.0
        self.name = b""
        self.step_last = 0.0
        self.step_max = 0.0
        self.step_ema = 0.0
        self.n_steps = 0
        self.ckpt_max = 0.0
        self.busy_ema = 0.0
        self._busy = 0.0
        self._excluded = 0.0
        self._write()

    def _register_stack_dump(self, stacks_file: str) -> None:
        # faulthandler's handler is C code: it dumps even while another thread
        # holds the GIL or the main thread is stuck inside a collective.
        try:
            os.makedirs(os.path.dirname(stacks_file), exist_ok=True)
            self._stacks = open(stacks_file, "a", encoding="utf-8")
            # faulthandler restores the previous disposition when the interpreter
            # shuts down; make that "ignore" so a late dump request cannot kill us.
            signal.signal(STACK_SIGNAL, signal.SIG_IGN)
            faulthandler.register(STACK_SIGNAL, file=self._stacks, all_threads=True, chain=False)
            self._flags |= FLAG_FAULTHANDLER
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("stack dumps on hang disabled: %s", exc)

    def _write(self) -> None:
        self._seq += 1  # odd: write in progress; readers retry until it is even again
        _SEQ.pack_into(self._map, 0, self._seq)
        self._seq += 1
        RECORD.pack_into(
            self._map, 0, self._seq, self.step, self.t_beat, self.t_phase, self.phase, os.getpid(),
            self.step_last, self.step_max, self.step_ema, self.n_steps, self._flags, self.ckpt_max,
            self.busy_ema, self.rank, self.phase_timeout, self.name,
        )

    def beat(self, step: int) -> None:
        """Records that ``step`` completed."""
        with self._lock:
            now = time.time()
            if self.t_beat and self.phase != 0:
                dt = max(0.0, now - self.t_beat - self._excluded)
                self.step_last = dt
                self.step_max = max(self.step_max, dt)
                self.step_ema = dt if self.n_steps == 0 else 0.8 * self.step_ema + 0.2 * dt
                self.busy_ema = self._busy if self.n_steps == 0 else 0.8 * self.busy_ema + 0.2 * self._busy
                self.n_steps += 1
            self._excluded = 0.0
            self._busy = 0.0
            self.step = step
            self.t_beat = now
            if self.phase in (0, 1):
                self.phase = 1
                self.t_phase = now
            self._write()

    @contextlib.contextmanager
    def phase_scope(self, name: str, timeout: timedelta | None = None) -> Iterator[None]:
        """Marks slow non-step work so the step timeout does not fire during it."""
        code = _CODES.get(name, 3)
        with self._lock:
            saved = (self.phase, self.t_phase, self.phase_timeout, self.name)
            start = time.time()
            self.phase, self.t_phase = code, start
            self.phase_timeout = timeout.total_seconds() if timeout else 0.0
            self.name = name.encode("ascii", "replace")[:16]
            self._write()
        try:
            yield
        finally:
            with self._lock:
                end = time.time()
                spent = end - start
                if code == 2:
                    self.ckpt_max = max(self.ckpt_max, spent)
                # nested phases restore their parent; a top-level phase hands back to "step"
                phase, _, timeout_s, pname = saved
                self.phase = 1 if phase == 0 and self.t_beat else phase
                self.t_phase = end
                self.phase_timeout, self.name = timeout_s, pname
                self._excluded += spent
                self._write()

    @contextlib.contextmanager
    def section_scope(self) -> Iterator[None]:
        """Accumulates this step's local work (for straggler detection)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._busy += time.perf_counter() - start

    def exiting(self) -> None:
        """Marks the interpreter's shutdown: the slow teardown is not a hang."""
        with self._lock:
            self.phase, self.t_phase, self.name = 4, time.time(), b"exit"
            self._flags &= ~FLAG_FAULTHANDLER
            self._write()

    def calibration(self) -> dict[str, float]:
        """The calibration to persist in a checkpoint."""
        return {"step_max": self.step_max, "ckpt_max": self.ckpt_max, "n_steps": float(self.n_steps)}

    def seed(self, calibration: dict[str, float]) -> None:
        """Restores a persisted calibration so a restart need not recalibrate."""
        with self._lock:
            self.step_max = max(self.step_max, float(calibration.get("step_max", 0.0)))
            self.ckpt_max = max(self.ckpt_max, float(calibration.get("ckpt_max", 0.0)))
            self.n_steps = max(self.n_steps, int(calibration.get("n_steps", 0.0)))
            self._write()


_instance: Heartbeat | None = None
_instance_pid = -1
_create_lock = threading.Lock()


def get() -> Heartbeat | None:
    """This worker's heartbeat, created on first use; ``None`` outside ``hpresil-run``."""
    global _instance, _instance_pid
    if _instance is not None and _instance_pid == os.getpid():
        return _instance
    shm_dir = _env.get(_env.SHM_DIR)
    if shm_dir is None:
        return None
    with _create_lock:
        if _instance is None or _instance_pid != os.getpid():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            rank = int(os.environ.get("RANK", "0"))
            log_dir = _env.get(_env.LOG_DIR)
            stacks = os.path.join(log_dir, "stacks", f"rank{rank}.txt") if log_dir else None
            path = record_path(shm_dir, local_rank)
            _instance = Heartbeat(path, rank, stacks)
            _instance_pid = os.getpid()
            if log_dir:
                threading.Thread(target=_serve_dump_requests, args=(dump_request_path(path), fr_dump_path(log_dir, rank)),
                                 name="hpresil-fr-dump", daemon=True).start()
            atexit.register(_instance.exiting)
    return _instance


def heartbeat(step: int) -> None:
    """Tells the watchdog that ``step`` completed (no-op outside ``hpresil-run``)."""
    hb = get()
    if hb is not None:
        hb.beat(step)


@contextlib.contextmanager
def phase(name: str, timeout: timedelta | None = None) -> Iterator[None]:
    """Marks a slow phase (``"eval"``, ``"checkpoint"``, ...) with its own timeout.

    Args:
        name: phase name (``"checkpoint"`` uses the calibrated checkpoint timeout).
        timeout: explicit timeout of this phase; default: the watchdog's ``user_timeout``.
    """
    hb = get()
    if hb is None:
        yield
        return
    with hb.phase_scope(name, timeout):
        yield


@contextlib.contextmanager
def section() -> Iterator[None]:
    """Marks local work without collectives (e.g. data loading + forward) so the
    straggler detector can compare ranks' own speed."""
    hb = get()
    if hb is None:
        yield
        return
    with hb.section_scope():
        yield
