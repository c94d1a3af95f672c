"""Naming the suspect of a hang from every rank's diagnostics.

In a hung data-parallel job every rank stops at once: the healthy ones wait
inside a collective for the one that never arrives. The suspect is found by
evidence, strongest first:

1. ``stopped``: the process is in the stopped state (SIGSTOP, debugger);
2. ``behind``: its last completed step is lower than the others';
3. ``not_in_collective``: its stack is outside ``torch.distributed`` while the
   others' stacks are inside it (it never arrived);
4. ``spinning``: it burnt CPU during the stall while the others idled;
5. otherwise ``unknown``: all ranks are named with their state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

__all__ = ["RankDiag", "find_suspects", "in_collective", "in_device_wait", "busy"]

# Frames of a rank that waits for its peers: torch.distributed's Python API,
# DDP's gradient sync (which waits inside backward), and FSDP's collectives.
_COLLECTIVE_MARKERS = (
    "torch/distributed/distributed_c10d.py",
    "torch/distributed/c10d_logger.py",
    "torch/nn/parallel/distributed.py",
    "torch/autograd/graph.py",
    "torch/distributed/fsdp/",
    "torch/distributed/_composable/",
)


# Frames of a rank that waits for its device: a synchronize, an event or a stream wait.
_DEVICE_WAIT_MARKERS = (
    "torch/cuda/__init__.py",
    "torch/cuda/streams.py",
    "torch/cuda/graphs.py",
)


def _main_stack(stacks: str) -> str:
    blocks = [b for b in stacks.strip().split("\n\n") if b.strip()]
    # py-spy names the main thread; faulthandler does not, but only the main
    # thread's stack bottoms out in the script's module-level code.
    return (next((b for b in blocks if "MainThread" in b), None)
            or next((b for b in blocks if "in <module>" in b), None)
            or next((b for b in blocks if "Current thread" in b), None)
            or (blocks[0] if blocks else ""))


def in_collective(stacks: str | None) -> bool | None:
    """Whether the main thread's stack is inside a collective (``None``: unknown).

    faulthandler prints the current thread first, most recent call first; py-spy
    prints the innermost frame first too. Only the first (main) thread counts.
    """
    if not stacks:
        return None
    main = _main_stack(stacks)
    return any(marker in main for marker in _COLLECTIVE_MARKERS)


def in_device_wait(stacks: str | None) -> bool | None:
    """Whether the main thread waits for the GPU (``None``: unknown)."""
    if not stacks:
        return None
    main = _main_stack(stacks)
    return any(marker in main for marker in _DEVICE_WAIT_MARKERS)


@dataclasses.dataclass(slots=True)
class RankDiag:
    """What one node saw of one rank when the hang fired."""

    rank: int
    node: str
    step: int
    phase: str
    state: str | None
    cpu_rate: float | None
    in_collective: bool | None
    in_device_wait: bool | None = None
    stacks_file: str | None = None
    flight_recorder: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (published to the other nodes)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "RankDiag":
        """Parses what :meth:`to_json` wrote; raises ``TypeError``/``KeyError`` on junk."""
        fields = {f.name for f in dataclasses.fields(RankDiag)}
        return RankDiag(**{k: obj[k] for k in fields if k in obj})


def find_suspects(diags: Iterable[RankDiag], spin_rate: float = 0.5) -> tuple[list[int], str]:
    """Picks the suspect ranks and the reason.

    Args:
        diags: every rank's diagnostics (all nodes).
        spin_rate: CPU seconds per second above which a rank counts as spinning.

    Returns:
        ``(suspect ranks, reason)``; reason is one of ``stopped``, ``behind``,
        ``not_in_collective``, ``spinning``, ``unknown``.
    """
    ranks = sorted(diags, key=lambda d: d.rank)
    if not ranks:
        return [], "unknown"
    stopped = [d.rank for d in ranks if d.state in ("T", "t")]
    if stopped:
        return stopped, "stopped"
    known = [d for d in ranks if d.step >= 0]
    if known:
        low = min(d.step for d in known)
        if any(d.step > low for d in known):
            return [d.rank for d in known if d.step == low], "behind"
    flags = [d for d in ranks if d.in_collective is not None]
    waiting = [d for d in flags if d.in_collective]
    outside = [d.rank for d in flags if not d.in_collective]
    if waiting and outside and len(outside) < len(ranks):
        return outside, "not_in_collective"
    rates = [d for d in ranks if d.cpu_rate is not None]
    spinning = [d.rank for d in rates if d.cpu_rate >= spin_rate]
    if spinning and len(spinning) < len(ranks):
        return spinning, "spinning"
    return [d.rank for d in ranks], "unknown"


def busy(diags: Iterable[RankDiag], suspects: list[int], reason: str) -> bool:
    """Whether the suspects are busy in their own code rather than stuck.

    Certainly stuck: a stopped rank, or a suspect inside a collective or a
    device wait, or one whose stack could not be read. Busy: every suspect's
    main thread is in its own code (host work, I/O, a sleep, a Python spin),
    as when rank 0 exports a checkpoint while the others wait in the next
    all-reduce: torchrun lets that run for NCCL's collective timeout.
    """
    if reason == "stopped" or not suspects:
        return False
    by_rank = {d.rank: d for d in diags}
    named = [by_rank[r] for r in suspects if r in by_rank]
    return bool(named) and all(
        d.state not in ("T", "t") and d.in_collective is False and not d.in_device_wait for d in named
    )
