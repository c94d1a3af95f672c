"""Environment changes ``hpresil-run`` makes in its own process, in one place.

Each change is logged as ``old -> new`` with its reason and reported as an
``env_change`` event; a value the user already set is never overridden.
"""

from __future__ import annotations

import dataclasses
import logging
import os

__all__ = ["EnvChange", "LAUNCHER_DEFAULTS", "apply_launcher_env"]

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
