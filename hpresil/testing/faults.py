"""Declarative fault injection for tests, demos and chaos runs.

A fault plan is a list of :class:`Fault`; it travels to workers as JSON in
``$HPRESIL_FAULTS`` and a training loop calls :func:`maybe_inject` once per
step. Faults are real: ``kill`` sends SIGKILL to the worker itself, ``stop``
SIGSTOP, ``hang`` sleeps forever, ``spin`` loops in Python holding the GIL,
``exit`` calls ``os._exit``, ``raise`` raises an exception.

Example::

    env = faults.to_env([faults.fail_at(rank=1, step=5)])
    subprocess.run(["hpresil-run", ...], env={**os.environ, **env})
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Literal

from hpresil.errors import ConfigError

__all__ = ["Fault", "fail_at", "hang_at", "to_env", "load_plan", "maybe_inject", "ENV_VAR"]

log = logging.getLogger(__name__)

ENV_VAR = "HPRESIL_FAULTS"
Action = Literal["kill", "stop", "hang", "spin", "exit", "raise", "sleep"]
_ACTIONS = ("kill", "stop", "hang", "spin", "exit", "raise", "sleep")


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """One fault: ``action`` hits global ``rank`` when it reaches ``step``.

    Attributes:
        rank: global rank to hit.
        step: the step at which :func:`maybe_inject` fires.
        action: what happens (see module docstring).
        attempt: fire only in this start of the worker group (``HPRESIL_ATTEMPT``
            under ``hpresil-run``, which counts failure and membership restarts;
            ``TORCHELASTIC_RESTART_COUNT`` under torchrun), so a restarted
            worker does not fail again; ``-1`` fires every attempt.
        seconds: duration for ``sleep``; exit code for ``exit``.
    """

    rank: int
    step: int
    action: Action = "kill"
    attempt: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ConfigError(f"fault action {self.action!r} unknown; use one of {', '.join(_ACTIONS)}")
        if self.rank < 0 or self.step < 0:
            raise ConfigError(f"fault rank={self.rank} step={self.step}: both must be >= 0")


def fail_at(rank: int, step: int, *, attempt: int = 0, action: Action = "kill") -> Fault:
    """A worker that dies (SIGKILL by default) at ``step``."""
    return Fault(rank=rank, step=step, action=action, attempt=attempt)


def hang_at(rank: int, step: int, *, attempt: int = 0, gil: bool = False) -> Fault:
    """A worker that stops making progress at ``step`` (``gil=True``: spins holding the GIL)."""
    return Fault(rank=rank, step=step, action="spin" if gil else "hang", attempt=attempt)


def to_env(plan: list[Fault]) -> dict[str, str]:
    """Encodes a plan as the environment a launcher passes to its workers."""
    return {ENV_VAR: json.dumps([dataclasses.asdict(f) for f in plan])}


def load_plan(text: str | None = None) -> list[Fault]:
    """Parses a plan from JSON (default: ``$HPRESIL_FAULTS``).

    Raises:
        ConfigError: the text is not a JSON list of fault objects.
    """
    text = os.environ.get(ENV_VAR, "") if text is None else text
    if not text.strip():
        return []
    try:
        raw = json.loads(text)
        if not isinstance(raw, list):
            raise TypeError("not a list")
        return [Fault(**item) for item in raw]
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(
            f"{ENV_VAR} is not a JSON list of faults like "
            f'[{{"rank": 1, "step": 5, "action": "kill"}}]: {exc}'
        ) from exc


_plan_cache: tuple[str, list[Fault]] | None = None


def _attempt() -> int:
    # hpresil-run counts every start of the worker group; torchrun's restart count
    # stays put across membership restarts (a node lost or joined), which would
    # fire an attempt-0 fault again in the group that replaces the failed one.
    raw = os.environ.get("HPRESIL_ATTEMPT") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return int(raw or 0)
    except ValueError:
        raise ConfigError(f"restart attempt {raw!r} (TORCHELASTIC_RESTART_COUNT / HPRESIL_ATTEMPT) is not an integer") from None


def maybe_inject(step: int, rank: int | None = None) -> None:
    """Fires the faults planned for this rank at ``step`` (call once per step).

    Args:
        step: the current training step.
        rank: global rank (default: ``$RANK``).
    """
    global _plan_cache
    text = os.environ.get(ENV_VAR, "")
    if not text:
        return
    if _plan_cache is None or _plan_cache[0] != text:
        _plan_cache = (text, load_plan(text))
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    attempt = _attempt()
    for fault in _plan_cache[1]:
        if fault.rank != rank or fault.step != step or fault.attempt not in (-1, attempt):
            continue
        log.warning("injecting fault %s at rank %d step %d (attempt %d)", fault.action, rank, step, attempt)
        _fire(fault)


def _fire(fault: Fault) -> None:
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "exit":
        os._exit(int(fault.seconds) or 1)
    elif fault.action == "raise":
        raise RuntimeError(f"injected fault at step {fault.step} on rank {fault.rank}")
    elif fault.action == "sleep":
        time.sleep(fault.seconds)
    elif fault.action == "hang":
        while True:
            time.sleep(3600)
    elif fault.action == "spin":
        _spin_holding_gil()


def _spin_holding_gil() -> None:
    # A tight pure-Python loop keeps the GIL between the interpreter's switch
    # intervals; raising the interval makes it hold the GIL essentially forever,
    # which is what a C extension stuck in a loop looks like.
    import sys

    sys.setswitchinterval(1e6)
    x = 0
    while True:
        x += 1
