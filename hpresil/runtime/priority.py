"""Background work yields to training: a nice value for node-service threads.

The node runtime's bulk work (sealing checksums, streaming replicas to peers,
receiving them, draining to durable storage) runs in threads of the
``hpresil-run`` process, on the same cores as the training processes. On a
GPU node the training processes mostly wait for the GPU and spare cores are
plenty; on a CPU-bound node every millisecond of background work is taken from
a training step. Linux schedules threads individually, so each bulk thread
lowers its own priority (``setpriority(PRIO_PROCESS, tid, nice)``) when it
starts: it then runs in the cycles training leaves idle (collective waits,
data loading) instead of preempting it. Detection, liveness, restart and
restore-serving threads keep the agent's priority.

``HPRESIL_BACKGROUND_NICE`` (``hpresil-run --background-nice``) sets the nice
value, 0–19; 0 leaves the threads alone. Raising a nice value needs no
privilege; a thread never lowers one an operator already set higher.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Mapping

from hpresil.errors import ConfigError

__all__ = ["BACKGROUND_NICE_ENV", "DEFAULT_BACKGROUND_NICE", "background_nice", "lower_this_thread"]

log = logging.getLogger(__name__)

BACKGROUND_NICE_ENV = "HPRESIL_BACKGROUND_NICE"
#: Low enough that a busy training process wins the core (weight 110 vs 1024), not so low
#: that a snapshot waits seconds for its seal when training leaves no idle time at all.
DEFAULT_BACKGROUND_NICE = 10


def background_nice(environ: Mapping[str, str] | None = None) -> int:
    """The nice value for background threads from ``HPRESIL_BACKGROUND_NICE``.

    Raises:
        ConfigError: the value is not an integer in 0..19.
    """
    env = os.environ if environ is None else environ
    raw = env.get(BACKGROUND_NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_BACKGROUND_NICE
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise ConfigError(f"{BACKGROUND_NICE_ENV}={raw!r}: use an integer nice value 0..19 (0: background threads "
                          "keep the agent's priority)")
    return value


def lower_this_thread(nice: int | None = None) -> int | None:
    """Gives the calling thread (only) at least ``nice`` (default:
    :func:`background_nice`); call it first thing in a background thread.

    Returns:
        The thread's nice value afterwards, or ``None`` when nothing was changed
        (0 requested, a platform without per-thread priorities, or refused).
    """
    try:
        target = background_nice() if nice is None else nice
    except ConfigError as exc:  # the launcher validated it; a worker-side typo must not stop a service
        log.warning("%s", exc)
        return None
    if target <= 0 or not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"):
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current >= target:
            return current
        os.setpriority(os.PRIO_PROCESS, tid, target)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as exc:  # e.g. a seccomp profile that forbids it: run at normal priority
        log.debug("cannot lower the priority of thread %s: %s", threading.current_thread().name, exc)
        return None
