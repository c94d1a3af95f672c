"""Rollback's parts: the policy, the per-snapshot health vote, the steps a
spike rollback skips (the Checkpointer's side is :mod:`hpresil.checkpoint.guard`).

Every rank agrees that the state went bad and restores the newest healthy
snapshot, in the training processes, without a restart.

The sealer judges each snapshot (:mod:`hpresil.checkpoint.health`) a few
milliseconds after ``save`` returns. A rank learns its own verdicts from its
seals; the job learns them through one small all-reduce per snapshot on a CPU
(gloo) group, started asynchronously at one ``save`` and read at the next
(:class:`HealthVote`), so no step waits for it and every rank acts at the
same step. The vector holds, per cause (``nonfinite``, ``spike``,
``divergence``), the oldest bad step any rank saw (as a maximum of negated
steps), and the replica-divergence slots of :mod:`hpresil.checkpoint.divergence`.

What happens is the policy's (:class:`RollbackPolicy`, from ``hpresil-run
--on-nonfinite/--on-spike/--on-divergence``): ``rollback`` restores the newest
healthy snapshot before the bad step (event ``rollback``), ``stop`` raises
:class:`~hpresil.errors.UnhealthyStateError` on every rank, ``warn`` only
reports. When the same cause comes back at or before the step it came at after
a rollback (a crash loop), the next rollback goes one more snapshot back;
after ``max_tries`` the job stops with an error naming the step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch

from hpresil.checkpoint.ram.files import SlotInfo
from hpresil.errors import ConfigError

__all__ = ["RollbackPolicy", "Decision", "HealthVote", "SkipList", "CAUSES", "local_verdicts", "iterate", "ENV"]

log = logging.getLogger(__name__)

CAUSES = ("nonfinite", "spike", "divergence")
#: Environment variables ``hpresil-run`` sets for the workers.
ENV = {"on_nonfinite": "HPRESIL_ON_NONFINITE", "on_spike": "HPRESIL_ON_SPIKE",
       "on_divergence": "HPRESIL_ON_DIVERGENCE", "max_tries": "HPRESIL_ROLLBACK_TRIES"}
_NONE = -(1 << 62)  # "no bad step" in a maximum of negated steps
_CHOICES = {"on_nonfinite": ("rollback", "stop", "warn"), "on_spike": ("rollback", "warn"),
            "on_divergence": ("rollback", "leave", "warn")}


@dataclasses.dataclass(kw_only=True, slots=True)
class RollbackPolicy:
    """What the Checkpointer does about an unhealthy snapshot.

    Attributes:
        on_nonfinite: a NaN/Inf in the state or the loss: ``rollback``, ``stop`` or ``warn``.
        on_spike: a loss spike: ``rollback`` or ``warn``.
        on_divergence: replicas that should be identical differ: ``rollback``,
            ``leave`` (roll back, and the node that diverged twice leaves the
            job like an unhealthy GPU) or ``warn``.
        max_tries: rollbacks for one bad step before giving up with an error.
        skip_spike_data: after a spike rollback, :meth:`~hpresil.Checkpointer.steps`
            skips the step whose data produced the spike.
    """

    on_nonfinite: Literal["rollback", "stop", "warn"] = "rollback"
    on_spike: Literal["rollback", "warn"] = "warn"
    on_divergence: Literal["rollback", "leave", "warn"] = "rollback"
    max_tries: int = 3
    skip_spike_data: bool = False

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r}: use one of {', '.join(choices)}")
        if not isinstance(self.max_tries, int) or isinstance(self.max_tries, bool) or self.max_tries < 1:
            raise ConfigError(f"max_tries={self.max_tries!r}: must be an integer >= 1")

    @classmethod
    def from_env(cls) -> "RollbackPolicy":
        """The policy ``hpresil-run`` passed to the workers (defaults elsewhere).

        Raises:
            ConfigError: a variable holds a value the policy does not take.
        """
        kw: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = os.environ.get(var)
            if raw:
                kw[name] = int(raw) if name == "max_tries" and raw.isdigit() else raw
        try:
            return cls(**kw)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (from the environment: {', '.join(ENV.values())})") from None

    def action(self, cause: str) -> str:
        """What to do about ``cause``."""
        return {"nonfinite": self.on_nonfinite, "spike": self.on_spike, "divergence": self.on_divergence}[cause]


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What the job agreed on at one save: the oldest bad step per cause."""

    bad: Mapping[str, int]


def local_verdicts(infos: Iterable[SlotInfo], since: float) -> dict[str, int]:
    """The oldest step per cause among the unhealthy seals of ``infos`` (this
    rank's scanned slots) of commits made after ``since`` (Unix time)."""
    bad: dict[str, int] = {}
    for info in infos:
        seal = info.seal
        if seal is None or seal.health == "ok" or info.record.created <= since:
            continue
        for cause in seal.causes or ["nonfinite"]:
            if cause in CAUSES:
                bad[cause] = min(bad.get(cause, info.record.step), info.record.step)
    return bad


class HealthVote:
    """One asynchronous all-reduce (MAX, int64, CPU) per snapshot: started by
    :meth:`start`, read by :meth:`result` at the next snapshot.

    Args:
        group: the process group (a gloo group; ``None``: the default group).
        distributed: vote with the other ranks (else decide locally).
    """

    def __init__(self, group: Any, distributed: bool) -> None:
        self.group = group
        self.distributed = distributed
        self._work: Any = None
        self._vec: torch.Tensor | None = None

    def start(self, bad: Mapping[str, int], extra: torch.Tensor | None = None) -> None:
        """Contributes this rank's oldest bad step per cause (and ``extra`` slots, maxed)."""
        head = torch.tensor([-bad[c] if c in bad else _NONE for c in CAUSES], dtype=torch.int64)
        vec = head if extra is None else torch.cat([head, extra])
        self._vec = vec
        self._work = None
        if self.distributed:
            import torch.distributed as dist

            self._work = dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def result(self) -> tuple[Decision, torch.Tensor] | None:
        """The vote started last (``None`` before the first), after it arrived."""
        if self._vec is None:
            return None
        if self._work is not None:
            self._work.wait()
            self._work = None
        vec, self._vec = self._vec, None
        bad = {c: int(-vec[i]) for i, c in enumerate(CAUSES) if int(vec[i]) != _NONE}
        return Decision(bad), vec[len(CAUSES):]


class SkipList:
    """Steps whose data :meth:`~hpresil.Checkpointer.steps` skips (after a
    spike rollback with ``skip_spike_data``); a stateful entry of every
    checkpoint, merged (not replaced) on restore so a rollback keeps what it
    just learned."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"skip": sorted(self.steps)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.steps |= {int(s) for s in sd.get("skip", [])}


def iterate(start: int, stop: int, cursor: list[int], skip: SkipList) -> Iterator[int]:
    """Yields ``cursor[0]`` from ``start`` up to ``stop`` (exclusive), one by
    one, skipping ``skip``; a rollback moves ``cursor[0]`` back."""
    cursor[0] = start
    while cursor[0] < stop:
        step = cursor[0]
        cursor[0] += 1
        if step in skip.steps:
            log.info("step %d: skipping its data (it produced a loss spike)", step)
            continue
        yield step

