"""Graceful stop: SIGTERM asks the training loop to stop at a step all ranks agree on.

A scheduler stops a job with SIGTERM (Slurm preemption, a deleted pod,
``docker stop``); ``hpresil-run`` forwards it to the workers and waits
``--shutdown-timeout`` seconds before SIGKILL. A worker that calls
:meth:`hpresil.Checkpointer.should_stop` every step gets a handler that only
records the request; ``should_stop`` then all-reduces the flag so that every
rank sees it at the same step, takes a final snapshot there and returns
``True``. Workers that never call it keep Python's default: SIGTERM ends them.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

__all__ = ["install_handler", "requested", "agree"]

log = logging.getLogger(__name__)

_requested = threading.Event()
_installed = False
_group: dict[int, Any] = {}


def _on_term(signum: int, frame: object) -> None:
    _requested.set()


def install_handler() -> bool:
    """Installs the SIGTERM handler once, unless the program has its own.

    Returns:
        Whether hpresil's handler is (now) installed; ``False`` off the main
        thread or when another handler was already there.
    """
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        log.info("SIGTERM already has a handler; Checkpointer.should_stop will not install its own")
        return False
    signal.signal(signal.SIGTERM, _on_term)
    _installed = True
    return True


def requested() -> bool:
    """Whether this process received SIGTERM since the handler was installed."""
    return _requested.is_set()


def cpu_group() -> Any:
    """A gloo group over all ranks (the default group when it is gloo), so the
    per-step agreement never waits for the GPU stream."""
    import torch.distributed as dist

    key = id(dist.group.WORLD)
    if key not in _group:
        backend = str(dist.get_backend()).lower()
        _group[key] = None if backend == "gloo" else dist.new_group(backend="gloo")
    return _group[key]


def agree(flag: bool) -> bool:
    """Whether any rank has ``flag`` set (one 4-byte all-reduce on CPU; local
    without an initialised process group). Collective: every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(value.item())
