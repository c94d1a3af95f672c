"""Replica divergence: silent data corruption found from the checksums the
sealer already computes, without replaying any work.

Ranks that hold the same chunk of a parameter or of optimizer state must hold
it bitwise identically after every step: every DDP rank holds all of them,
HSDP's replicate dimension and the data-parallel copies of a TP or EP shard
hold the same chunks. A GPU or memory that computes or keeps a wrong value
breaks that on one replica only.

* **What is compared** (:func:`compare_keys`): the tensors of the state's
  top-level modules' parameters and top-level optimizers' state. Buffers
  (BatchNorm statistics differ per rank under DDP without
  ``broadcast_buffers``) and everything else are not. DeepSpeed engines keep
  their own partitioned state and are not compared.
* **The sealer** summarises them per snapshot in the seal's ``replica`` field
  (:func:`replica_summary`): a layout hash (keys, dtypes, chunk shapes and
  offsets: ranks with equal layouts are replicas of each other) and XXH3-64 of
  their checksums in order.
* **The job compares** them in the health vote
  (:mod:`hpresil.checkpoint.rollback`): once per layout, an exact all-gather
  of ``(layout, digest)`` tells every rank the replica groups (equal layout
  and equal digest: see :class:`DivergenceCheck`); from then on each group has
  three slots in the vote's all-reduce (max digest, max of the negated
  digest, "someone abstained"), so a disagreement shows as max != min, and
  only then does an all-gather name the ranks (:meth:`DivergenceCheck.judge`):
  the minority of a group of 3 or more, every rank of a group that splits
  evenly.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping, Sequence

import torch
import xxhash

from hpresil.checkpoint.api import Entry

__all__ = ["compare_keys", "replica_summary", "parse_replica", "DivergenceCheck", "Verdict", "DEPTH"]

log = logging.getLogger(__name__)

_MASK = (1 << 63) - 1  # digests as non-negative int64 (their negation must fit too)
_ABSENT = -(1 << 62)


def compare_keys(state: Mapping[str, Any], keys_and_paths: Sequence[tuple[str, tuple[Any, ...]]]) -> frozenset[str]:
    """The flattened keys of the parameters of ``state``'s top-level modules and
    the state of its top-level optimizers, among ``(key, path)`` of tensor leaves."""
    params: dict[str, set[str]] = {}
    optims: set[str] = set()
    for top, value in state.items():
        if isinstance(value, torch.nn.Module):
            params[top] = {n for n, _ in value.named_parameters(remove_duplicate=False)}
        elif isinstance(value, torch.optim.Optimizer):
            optims.add(top)
    out = set()
    for key, path in keys_and_paths:
        if len(path) == 2 and path[0] in params and path[1] in params[path[0]]:
            out.add(key)
        elif len(path) > 2 and path[0] in optims and path[1] == "state":
            out.add(key)
    return frozenset(out)


def replica_summary(entries: Sequence[Entry], checksums: Mapping[str, str]) -> str:
    """``"<layout>:<digest>"`` of the ``compared`` entries (empty when none)."""
    chosen = [e for e in entries if e.kind == "tensor" and e.compared]
    if not chosen:
        return ""
    layout = json.dumps([[e.key, e.dtype, e.shape, e.global_offset] for e in chosen], separators=(",", ":"))
    digest = "\n".join(checksums[e.key] for e in chosen)
    return (f"{xxhash.xxh3_64_intdigest(layout.encode()) & _MASK:016x}:"
            f"{xxhash.xxh3_64_intdigest(digest.encode()) & _MASK:016x}")


def parse_replica(text: str) -> tuple[int, int] | None:
    """``(layout, digest)`` of a seal's ``replica`` field, or ``None``."""
    try:
        layout, digest = text.split(":")
        return int(layout, 16), int(digest, 16)
    except ValueError:
        return None


class Verdict:
    """What one vote's comparison found.

    Attributes:
        step: the oldest compared snapshot that split (else the newest compared).
        ranks: the ranks that diverged there (empty: none).
        agreed: the newest compared snapshot every member of every group took
            part in and agreed on, if any.
        regroup: some rank's layout is not in the groups: learn them again.
    """

    def __init__(self, step: int | None, ranks: list[int], agreed: int | None, regroup: bool) -> None:
        self.step, self.ranks, self.agreed, self.regroup = step, ranks, agreed, regroup


#: Snapshots each vote compares: the two before the one just taken. A rank
#: whose seal of the newer one is not written yet (it abstains there) has it
#: for the older one at the next vote, so every snapshot is compared.
DEPTH = 2


class DivergenceCheck:
    """The replica groups and this rank's slots in the health vote.

    Groups are learned, not assumed: at a regroup every rank shares its
    layout hash and its digest of the same snapshot, and ranks with equal
    layouts *and* equal digests form a group. Ranks whose tensors share names
    and shapes but not contents (tensor parallelism with plain tensors, expert
    shards) thus never count as replicas; the price is that a divergence
    older than the first comparison would be learned as a group of its own.

    Args:
        rank: this rank.
        world: the world size.
        group: the CPU process group the vote runs on.
    """

    def __init__(self, rank: int, world: int, group: Any) -> None:
        self.rank, self.world, self.group = rank, world, group
        self._groups: list[list[int]] = []  # ranks of each replica group (2 or more), in slot order
        self._slot: int | None = None  # this rank's group
        self._layout: int | None = None  # the layout this rank had when grouped
        self._known = False
        self.regroups = 0

    @property
    def width(self) -> int:
        """Vote slots this check uses: one regroup flag, three per group and compared snapshot."""
        return 1 + 3 * DEPTH * len(self._groups)

    def contribute(self, layout: int | None, summaries: Sequence[tuple[int, int] | None]) -> torch.Tensor:
        """This rank's slots: its digests of the :data:`DEPTH` compared
        snapshots (``None`` to abstain) and whether the groups must be learned
        again (none yet, or its ``layout`` changed)."""
        vec = torch.full((self.width,), _ABSENT, dtype=torch.int64)
        vec[0] = 1 if not self._known or (layout is not None and layout != self._layout) else 0
        if self._slot is not None:
            for k, summary in enumerate(summaries):
                base = 1 + 3 * (self._slot * DEPTH + k)
                if summary is not None and summary[0] == self._layout:
                    vec[base], vec[base + 1], vec[base + 2] = summary[1], -summary[1], 0
                else:
                    vec[base + 2] = 1  # abstained: that seal is not written yet (or the step had no snapshot)
        return vec

    def judge(self, steps: Sequence[int | None], slots: torch.Tensor,
              summary_of: Callable[[int], tuple[int, int] | None]) -> Verdict:
        """Reads the vote's slots (``steps``: the compared snapshots, newest
        first); on a disagreement, names the ranks with one exact all-gather of
        each rank's ``summary_of(step)`` (collective: every rank sees the same slots)."""
        if slots.numel() != self.width:
            return Verdict(None, [], None, False)
        regroup = int(slots[0]) == 1
        split: list[int] = []
        agreed: int | None = None
        for k, step in enumerate(steps):
            if step is None:
                continue
            whole = bool(self._groups)
            for g in range(len(self._groups)):
                hi, neg_lo, absent = (int(v) for v in slots[1 + 3 * (g * DEPTH + k): 4 + 3 * (g * DEPTH + k)])
                if hi != _ABSENT and hi != -neg_lo:
                    split.append(k)
                if absent == 1:
                    whole = False
            if whole and k not in split and agreed is None:
                agreed = step
        if not split:
            return Verdict(steps[0] if steps else None, [], agreed, regroup)
        k = max(split)  # the oldest snapshot that split
        step = steps[k]
        assert step is not None
        return Verdict(step, self._name_ranks(summary_of(step)), agreed, regroup)

    def regroup(self, summary: tuple[int, int] | None, layout: int | None) -> bool:
        """Learns the replica groups from every rank's ``(layout, digest)`` of
        the compared snapshot (exact all-gather; collective). A rank with a
        layout but no digest yet makes it wait for a later snapshot.

        Returns:
            Whether the groups are known now.
        """
        row = list(summary) if summary is not None else [layout if layout is not None else -1, -1]
        rows = self._gather(row)
        if any(lay >= 0 and digest < 0 for lay, digest in rows):
            return False
        by_key: dict[tuple[int, int], list[int]] = {}
        for r, key in enumerate(rows):
            if key[0] >= 0:
                by_key.setdefault(key, []).append(r)
        self._groups = sorted((ranks for ranks in by_key.values() if len(ranks) > 1), key=lambda rs: rs[0])
        self._slot = next((i for i, rs in enumerate(self._groups) if self.rank in rs), None)
        self._layout = rows[self.rank][0] if rows[self.rank][0] >= 0 else None
        self._known = True
        self.regroups += 1
        log.info("rank %d: %d replica group(s) compared for divergence%s", self.rank, len(self._groups),
                 f" (sizes {[len(g) for g in self._groups]})" if self._groups else ": no rank has a replica")
        return True

    def _name_ranks(self, summary: tuple[int, int] | None) -> list[int]:
        rows = self._gather(list(summary) if summary is not None else [-1, -1])
        bad: list[int] = []
        for members in self._groups:
            votes: dict[int, list[int]] = {}
            for r in members:
                got_layout, digest = rows[r]
                if digest >= 0:
                    votes.setdefault(digest, []).append(r)
            if len(votes) < 2:
                continue
            ordered = sorted(votes.values(), key=len, reverse=True)
            if len(ordered[0]) > len(ordered[1]):  # a strict majority: the others diverged
                bad += [r for group in ordered[1:] for r in group]
            else:  # no majority (two replicas, or an even split): all of them
                bad += [r for group in ordered for r in group]
        return sorted(bad)

    def _gather(self, row: list[int]) -> list[tuple[int, int]]:
        import torch.distributed as dist

        mine = torch.tensor(row, dtype=torch.int64)
        out = [torch.empty(2, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        return [(int(t[0]), int(t[1])) for t in out]
