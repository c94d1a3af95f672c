"""Building :class:`HangConfig` from ``hpresil-run`` flags or ``HPRESIL_HANG_*``."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Mapping

from hpresil._parse import parse_bool
from hpresil.errors import ConfigError
from hpresil.hang.api import HangConfig

__all__ = ["hang_config_from_env", "hang_config", "HANG_OPTIONS"]

#: (flag, env var, HangConfig field, help). Values are seconds, except factor.
HANG_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--hang-detection", "HPRESIL_HANG", "enabled", "on|off: run the hang watchdog (default on)."),
    ("--hang-init-timeout", "HPRESIL_HANG_INIT_TIMEOUT", "init_timeout",
     "Seconds from worker start to its first heartbeat (default 900)."),
    ("--hang-step-timeout", "HPRESIL_HANG_STEP_TIMEOUT", "step_timeout",
     "Fixed step timeout in seconds; default: calibrated as factor x slowest step, at least the floor."),
    ("--hang-step-floor", "HPRESIL_HANG_STEP_FLOOR", "step_floor", "Lower bound of the calibrated step timeout (default 4)."),
    ("--hang-factor", "HPRESIL_HANG_FACTOR", "factor", "Calibrated timeout = factor x slowest observed (default 2.5)."),
    ("--hang-checkpoint-floor", "HPRESIL_HANG_CHECKPOINT_FLOOR", "checkpoint_floor",
     "Lower bound of the checkpoint-phase timeout (default 30)."),
    ("--hang-stopped-timeout", "HPRESIL_HANG_STOPPED_TIMEOUT", "stopped_timeout",
     "Seconds a worker may stay stopped (SIGSTOP) before it counts as hung (default 4)."),
    ("--hang-busy-timeout", "HPRESIL_HANG_BUSY_TIMEOUT", "busy_timeout",
     "Seconds a rank that overran its step timeout may stay busy in its own code (outside collectives and "
     "device waits: host work, I/O, a first compile, a sleep), counted from its last progress, before it is "
     "killed; it is reported at once (default 600, NCCL's collective timeout)."),
    ("--hang-grace", "HPRESIL_HANG_GRACE", "grace", "SIGTERM -> SIGKILL delay when killing a hung group (default 3)."),
)


def _value(field: str, raw: str, source: str) -> Any:
    if field == "enabled":
        return parse_bool(raw, source, fix="use on or off")
    try:
        number = float(raw)
        return number if field == "factor" else timedelta(seconds=number)
    except (ValueError, OverflowError):  # not a number, NaN, or beyond timedelta's range (1e400, inf)
        what = "a number (a factor, e.g. 2.5)" if field == "factor" else "a number of seconds"
        raise ConfigError(f"{source}={raw!r} is not {what}") from None


def hang_config(values: Mapping[str, str | None]) -> HangConfig:
    """A config from ``{flag or env name: raw string}``; unset values keep defaults.

    Raises:
        ConfigError: a value does not parse or the combination is invalid.
    """
    kwargs: dict[str, Any] = {}
    for flag, env_var, field, _ in HANG_OPTIONS:
        raw = values.get(flag)
        source = flag
        if raw is None:
            raw, source = values.get(env_var), env_var
        if raw is not None and raw != "":
            kwargs[field] = _value(field, raw, source)
    return HangConfig(**kwargs)


def hang_config_from_env(environ: Mapping[str, str] | None = None) -> HangConfig:
    """A config from the ``HPRESIL_HANG_*`` variables."""
    env = os.environ if environ is None else environ
    return hang_config({env_var: env.get(env_var) for _, env_var, _, _ in HANG_OPTIONS})
