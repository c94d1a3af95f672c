"""Reading what workers expose: heartbeat records, process state, stacks.

Everything here is read-only and tolerant: a missing or torn record, a
vanished process or an unreadable ``/proc`` file yields ``None``, never an
exception, because the watchdog must keep running whatever the workers do.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time

from hpresil.hang.api import RECORD, Beat

__all__ = ["read_beat", "proc_state", "dump_stacks", "CLK_TCK"]

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_beat(path: str, retries: int = 5) -> Beat | None:
    """Decodes a heartbeat record, retrying while a write is in progress;
    ``None`` for a missing, torn or nonsensical (non-finite or negative times) one."""
    try:
        with open(path, "rb") as f:
            data = f.read(RECORD.size)
    except OSError:
        return None
    for _ in range(retries):
        if len(data) < RECORD.size:
            return None
        beat = Beat(*RECORD.unpack_from(data, 0))
        if beat.seq % 2 == 0 and beat.seq > 0:
            # A record with NaN, infinite or negative times is garbage: a NaN
            # would compare false against every timeout and never be overdue.
            return beat if _sane(beat) else None
        time.sleep(0.001)
        try:
            with open(path, "rb") as f:
                data = f.read(RECORD.size)
        except OSError:
            return None
    return None


def _sane(beat: Beat) -> bool:
    times = (beat.t_beat, beat.t_phase, beat.step_last, beat.step_max, beat.step_ema, beat.ckpt_max, beat.busy_ema,
             beat.phase_timeout)
    return all(math.isfinite(t) and t >= 0.0 for t in times)


def proc_state(pid: int) -> tuple[str, float] | None:
    """``(state letter, user+system CPU seconds)`` of a process, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    rest = raw[raw.rfind(")") + 2 :].split()
    if len(rest) < 13:
        return None
    return rest[0], (int(rest[11]) + int(rest[12])) / CLK_TCK


def dump_stacks(pid: int, stacks_file: str | None, use_signal: bool, timeout: float = 1.0) -> str | None:
    """Captures a worker's Python stacks.

    Prefers py-spy when installed (works on stopped processes and needs nothing
    from the worker); else sends the faulthandler signal the worker registered
    and reads what it appended to ``stacks_file``.

    Returns:
        The stack text, or ``None`` when nothing could be captured.
    """
    py_spy = shutil.which("py-spy")
    if py_spy:
        try:
            out = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout * 5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not (use_signal and stacks_file):
        return None
    before = os.path.getsize(stacks_file) if os.path.exists(stacks_file) else 0
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    last = before
    while time.monotonic() < deadline:
        time.sleep(0.05)
        size = os.path.getsize(stacks_file) if os.path.exists(stacks_file) else 0
        if size > before and size == last:  # grew, then stopped growing
            break
        last = size
    try:
        with open(stacks_file, encoding="utf-8", errors="replace") as f:
            f.seek(before)
            text = f.read()
    except OSError:
        return None
    return text or None
