"""Environment changes ``hpresil-run`` makes in its own process, in one place.

Each change is logged as ``old -> new`` with its reason and reported as an
``env_change`` event; a value the user already set is never overridden.
"""

from __future__ import annotations

import dataclasses
import logging
import os

__all__ = ["EnvChange", "LAUNCHER_DEFAULTS", "apply_launcher_env", "worker_defaults"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class EnvChange:
    """One environment change: ``name`` went from ``old`` to ``new`` because ``reason``."""

    name: str
    old: str | None
    new: str
    reason: str


#: (name, value, reason) set in the launcher when the user has not set them.
LAUNCHER_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    (
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
        "1",
        "with the c10d rendezvous's shared TCPStore, restarted workers can read the previous attempt's "
        "gloo/NCCL addresses and fail to connect (pytorch/pytorch#135712); a fresh store per attempt avoids it",
    ),
)


def apply_launcher_env(environ: dict[str, str] | None = None) -> list[EnvChange]:
    """Sets :data:`LAUNCHER_DEFAULTS` that the user left unset; returns the changes."""
    env = os.environ if environ is None else environ
    changes: list[EnvChange] = []
    for name, value, reason in LAUNCHER_DEFAULTS:
        if name in env:
            log.info("keeping %s=%s set by the user (hpresil would set %s: %s)", name, env[name], value, reason)
            continue
        env[name] = value
        changes.append(EnvChange(name=name, old=None, new=value, reason=reason))
        log.info("env %s: unset -> %s (%s)", name, value, reason)
    return changes


def worker_defaults(log_dir: str, environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[EnvChange]]:
    """Variables every worker gets unless the user set them: the flight recorder
    that the hang watchdog dumps (gloo and NCCL), and NCCL's own dump on timeout.

    Returns:
        The variables to add to the workers' environment, and the changes to report.
    """
    env = os.environ if environ is None else environ
    fr_dir = os.path.join(log_dir, "flight_recorder")
    wanted = (
        ("TORCH_FR_BUFFER_SIZE", "2000", "keep the last 2000 collectives per process group so a hang dump shows "
         "which collective each rank is in (torch flight recorder; gloo and NCCL)"),
        ("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000", "the same for torch releases that read only the NCCL name"),
        ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1", "NCCL's watchdog dumps the flight recorder when a collective times out"),
        ("TORCH_FR_DUMP_TEMP_FILE", os.path.join(fr_dir, "nccl_trace_rank_"),
         "where NCCL's own dumps go: next to hpresil's, in the job log dir"),
    )
    out: dict[str, str] = {}
    changes: list[EnvChange] = []
    for name, value, reason in wanted:
        if name in env:
            continue
        out[name] = value
        changes.append(EnvChange(name=name, old=None, new=value, reason=reason))
    return out, changes
