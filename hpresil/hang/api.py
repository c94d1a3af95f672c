"""Contract of hang and straggler detection.

Workers publish progress in a fixed 128-byte heartbeat record per local rank,
``<shm_dir>/hb/local<LOCAL_RANK>``, written through ``mmap`` (no syscall per
step) under a sequence lock: ``seq`` is odd while a write is in progress and
a reader retries until it sees the same even ``seq`` before and after.

The watchdog (a node-runtime service, out of process, so a worker holding
the GIL forever is still caught) compares each rank's time in its current
phase with that phase's timeout:

* ``init``: from worker start to the first heartbeat (imports, rendezvous,
  restore, first step);
* ``step``: between heartbeats, calibrated as ``max(step_floor, factor x the
  slowest step observed)`` once ``min_samples`` steps were seen (the
  calibration is seeded from the checkpoint after a restart);
* ``checkpoint``: inside ``Checkpointer.save``, calibrated the same way;
* user phases (``with hpresil.phase("eval", timeout=...)``): explicit, else
  ``user_timeout``;
* ``exit``: interpreter shutdown (set by an ``atexit`` hook): ``init_timeout``.

Work after the last heartbeat that is not inside a phase (a final
evaluation, exporting the model) runs under the step timeout: wrap it in
``hpresil.phase(...)``. ``Checkpointer.close`` does this itself.
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import timedelta
from typing import Literal

from hpresil.errors import ConfigError

__all__ = ["HangConfig", "Beat", "RECORD", "RECORD_SIZE", "PHASES", "phase_name", "FLAG_FAULTHANDLER"]

#: seq, step, t_beat, t_phase, phase, pid, step_last, step_max, step_ema, n_steps, flags,
#: ckpt_max, busy_ema, rank, phase_timeout, name (16 bytes)
RECORD = struct.Struct("<QqddIIdddIIddid16s")
RECORD_SIZE = 128
assert RECORD.size <= RECORD_SIZE

PHASES = {0: "init", 1: "step", 2: "checkpoint", 3: "user", 4: "exit"}
FLAG_FAULTHANDLER = 1  # the worker dumps its stacks on SIGUSR1 (faulthandler)


def phase_name(code: int, name: bytes = b"") -> str:
    """Human name of a phase code (user phases carry their own name)."""
    if code == 3 and name.strip(b"\0"):
        return name.rstrip(b"\0").decode("ascii", "replace")
    return PHASES.get(code, f"phase{code}")


@dataclasses.dataclass(slots=True)
class Beat:
    """One decoded heartbeat record."""

    seq: int
    step: int
    t_beat: float
    t_phase: float
    phase: int
    pid: int
    step_last: float
    step_max: float
    step_ema: float
    n_steps: int
    flags: int
    ckpt_max: float
    busy_ema: float
    rank: int
    phase_timeout: float
    name: bytes

    @property
    def phase_label(self) -> str:
        """The phase's name."""
        return phase_name(self.phase, self.name)


@dataclasses.dataclass(kw_only=True, slots=True)
class HangConfig:
    """Hang-detection settings (``hpresil-run --hang-*`` / ``HPRESIL_HANG_*``).

    Attributes:
        enabled: run the watchdog.
        init_timeout: worker start -> first heartbeat.
        step_timeout: explicit step timeout; ``None`` calibrates it.
        step_floor: lower bound of the calibrated step timeout.
        factor: calibrated timeout = factor x slowest observed step (or checkpoint).
        min_samples: steps observed before the calibrated step timeout applies.
        checkpoint_floor: lower bound of the calibrated checkpoint timeout.
        user_timeout: timeout of user phases that give none.
        stopped_timeout: a worker in the stopped state (SIGSTOP) this long is hung,
            heartbeats or not (process-level supervision).
        busy_timeout: how long a rank that overran its phase timeout may stay
            busy in its own code (outside collectives and device waits: host
            work, I/O, a slow first compile, a sleep) before it is killed as
            hung, counted from its last progress. It is reported (``rank_busy``) when it overruns; a drop-in
            must not kill what torchrun lets run, so the default is NCCL's
            collective timeout. A stopped rank, or one blocked inside a
            collective or a device wait, keeps the fast verdict.
        grace: SIGTERM -> SIGKILL delay when killing a hung group.
        gather_timeout: how long to wait for other nodes' diagnostics.
        straggler_threshold: a rank slower than this x the group median ...
        straggler_windows: ... in this many consecutive windows is reported (again only
            after as many consecutive windows that were not slow).
        straggler_window: steps per straggler window.
    """

    enabled: bool = True
    init_timeout: timedelta = timedelta(minutes=15)
    step_timeout: timedelta | None = None
    step_floor: timedelta = timedelta(seconds=4)
    factor: float = 2.5
    min_samples: int = 3
    checkpoint_floor: timedelta = timedelta(seconds=30)
    user_timeout: timedelta = timedelta(minutes=30)
    stopped_timeout: timedelta = timedelta(seconds=4)
    busy_timeout: timedelta = timedelta(minutes=10)
    grace: timedelta = timedelta(seconds=3)
    gather_timeout: timedelta = timedelta(seconds=2)
    straggler_threshold: float = 1.5
    straggler_windows: int = 3
    straggler_window: int = 10

    def __post_init__(self) -> None:
        for name in ("init_timeout", "step_floor", "checkpoint_floor", "user_timeout", "stopped_timeout", "busy_timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.step_timeout is not None and self.step_timeout <= timedelta(0):
            raise ConfigError(f"step_timeout={self.step_timeout} must be > 0 (or None to calibrate)")
        if self.factor < 1.0:
            raise ConfigError(f"factor={self.factor}: a timeout below the slowest observed step fires on "
                              "healthy steps; use factor >= 1 (default 2.5)")
        if self.grace < timedelta(0) or self.gather_timeout < timedelta(0):
            raise ConfigError("grace and gather_timeout must be >= 0")
        if self.min_samples < 1 or self.straggler_windows < 1 or self.straggler_window < 1:
            raise ConfigError("min_samples, straggler_windows and straggler_window must be >= 1")
        if self.straggler_threshold <= 1.0:
            raise ConfigError(f"straggler_threshold={self.straggler_threshold} must be > 1 (e.g. 1.5 = 50% slower)")
        if self.init_timeout < self.step_floor:
            raise ConfigError(f"init_timeout={self.init_timeout} < step_floor={self.step_floor}: the first step "
                              "includes start-up, so init_timeout must be >= step_floor")


Verdict = Literal["stopped", "behind", "not_in_collective", "spinning", "unknown"]
