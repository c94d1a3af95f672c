"""Declarative fault injection for tests, demos and chaos runs.

A fault plan is a list of :class:`Fault`; it travels to workers as JSON in
``$HPRESIL_FAULTS`` and a training loop calls :func:`maybe_inject` once per
step. Faults are real: ``kill`` sends SIGKILL to the worker itself, ``stop``
SIGSTOP, ``hang`` sleeps forever, ``spin`` loops in Python holding the GIL,
``exit`` calls ``os._exit``, ``raise`` raises an exception. ``nan`` and
``bitflip`` corrupt the training state in memory (the loop passes its model
or state to :func:`maybe_inject`): one element of a floating-point parameter
becomes NaN, or one bit of it flips (silent data corruption on one replica).

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
import sys
import time
from typing import Any, Iterator, Literal

from hpresil.errors import ConfigError

__all__ = ["Fault", "fail_at", "hang_at", "nan_at", "bitflip_at", "to_env", "load_plan", "maybe_inject", "ENV_VAR"]

log = logging.getLogger(__name__)

ENV_VAR = "HPRESIL_FAULTS"
Action = Literal["kill", "stop", "hang", "spin", "exit", "raise", "sleep", "nan", "bitflip"]
_ACTIONS = ("kill", "stop", "hang", "spin", "exit", "raise", "sleep", "nan", "bitflip")
_STATE_ACTIONS = ("nan", "bitflip")


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
        key: ``nan``/``bitflip``: the parameter to corrupt (a name from
            ``named_parameters()`` or a key of the state mapping); empty: the
            first floating-point one.
        bit: ``bitflip``: which bit of the element's bytes flips (0 = lowest).
    """

    rank: int
    step: int
    action: Action = "kill"
    attempt: int = 0
    seconds: float = 0.0
    key: str = ""
    bit: int = 12

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


def nan_at(rank: int, step: int, *, key: str = "", attempt: int = 0) -> Fault:
    """A NaN written into one element of a parameter of ``rank`` at ``step``."""
    return Fault(rank=rank, step=step, action="nan", attempt=attempt, key=key)


def bitflip_at(rank: int, step: int, *, key: str = "", bit: int = 12, attempt: int = 0) -> Fault:
    """One bit of one element of a parameter of ``rank`` flipped at ``step``
    (the value stays finite: only a comparison with a replica finds it)."""
    return Fault(rank=rank, step=step, action="bitflip", attempt=attempt, key=key, bit=bit)


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
_corrupted: set[Fault] = set()  # state faults already fired in this process


def _attempt() -> int:
    # hpresil-run counts every start of the worker group; torchrun's restart count
    # stays put across membership restarts (a node lost or joined), which would
    # fire an attempt-0 fault again in the group that replaces the failed one.
    raw = os.environ.get("HPRESIL_ATTEMPT") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        return int(raw or 0)
    except ValueError:
        raise ConfigError(f"restart attempt {raw!r} (TORCHELASTIC_RESTART_COUNT / HPRESIL_ATTEMPT) is not an integer") from None


def maybe_inject(step: int, rank: int | None = None, state: Any = None) -> None:
    """Fires the faults planned for this rank at ``step`` (call once per step),
    once the snapshot copies still in flight in this process are complete.

    Args:
        step: the current training step.
        rank: global rank (default: ``$RANK``).
        state: what ``nan``/``bitflip`` corrupt: a module (its parameters) or
            a mapping of tensors and modules.

    Raises:
        ConfigError: a ``nan``/``bitflip`` fault fires without ``state``, or
            names a parameter that is not there.
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
        copier = sys.modules.get("hpresil.checkpoint.ram.copier")
        if copier is not None:
            copier.settle()  # the snapshot copies overlapping this step are complete, as with a blocking save
        if fault.action in _STATE_ACTIONS:
            if fault in _corrupted:
                continue  # transient, like the hardware fault it stands for: a rollback replays the step clean
            _corrupted.add(fault)
            log.warning("injecting fault %s at rank %d step %d (attempt %d)", fault.action, rank, step, attempt)
            _corrupt(fault, state)
        else:
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


def _params(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(state, torch.nn.Module):
        for name, p in state.named_parameters():
            yield prefix + name, p
    elif isinstance(state, torch.Tensor):
        yield prefix.rstrip("."), state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _params(v, f"{prefix}{k}.")


def _corrupt(fault: Fault, state: Any) -> None:
    """Writes a NaN into, or flips one bit of, element 0 of a parameter's local data."""
    import torch

    if state is None:
        raise ConfigError(f"fault {fault.action!r} needs the training state: call maybe_inject(step, state=model)")
    params = [(n, p) for n, p in _params(state) if p.is_floating_point() and p.numel()]
    chosen = [(n, p) for n, p in params if n == fault.key or n.endswith("." + fault.key)] if fault.key else params[:1]
    if not chosen:
        raise ConfigError(f"fault {fault.action!r}: no floating-point parameter {fault.key!r}; "
                          f"there are {[n for n, _ in params][:10]}")
    name, p = chosen[0]
    local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard on this rank
    with torch.no_grad():
        flat = local.data.reshape(-1)
        if fault.action == "nan":
            flat[0] = float("nan")
        else:
            width = flat.element_size()
            raw = flat[:1].view(torch.uint8) if flat.dtype != torch.uint8 else flat[:1]
            byte, bit = divmod(fault.bit % (8 * width), 8)
            raw[byte] ^= 1 << bit
    log.warning("fault %s: corrupted element 0 of %s", fault.action, name)
