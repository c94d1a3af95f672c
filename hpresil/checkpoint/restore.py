"""The restore engine: agree on a step, read it, reshard when needed.

1. Each rank lists what its sources (tiers, fastest first) hold: ``(step,
   saved world size) → saving ranks``. The lists are exchanged with one
   all-gather of JSON bytes over the default group (metadata only; purely local
   when ``torch.distributed`` is not initialised).
2. Every rank computes the same choice: the newest step that *every* rank can
   load from *some* tier. At the same world size a rank needs its own saved
   rank; at another world size it needs a tier holding every saved rank (the
   RAM tier of a single node, the peer tier, or the durable tier). Each rank
   then reads from its fastest tier that qualifies, so ranks on a replaced
   node read peer replicas (else durable storage) while the others read RAM.
   A source with ``share()``/``pool()`` (the peer tier) is pooled first: what
   each node can serve is known only there, so one all-gather tells every
   rank what all nodes hold.
3. Reads are verified by the source. A failure (checksum, missing file) makes
   the rank try its next tier for that step; if none works, the failure is
   shared and everyone chooses again without it. ``integrity_failed`` is
   emitted for each bad snapshot.

Tensors are copied in place into the state's tensors (a DTensor's local
shard). A tensor whose saved chunk has the same place is read straight into
it; otherwise (world size or sharding changed) the saved chunks overlapping
it are found by box intersection over ``global_offset``/``shape`` and the
overlapping slices copied. Replicated tensors are read from any rank's copy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Mapping, Sequence

import torch

from hpresil.checkpoint import flatten as fl
from hpresil.checkpoint.api import CommitRecord, Entry, SnapshotSource, TierName
from hpresil.checkpoint.h2d import read_to_device
from hpresil.checkpoint.health import worst
from hpresil.errors import CheckpointError, IntegrityError, StateMismatchError, StorageError
from hpresil.events import NullEventLog
from hpresil.events.api import EventSink

__all__ = ["RestoreResult", "restore_state", "choose"]

log = logging.getLogger(__name__)

_MAX_ROUNDS = 8
Avail = dict[int, dict[tuple[int, int], list[int]]]  # tier index -> (step, world) -> ranks


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreResult:
    """What :func:`restore_state` loaded.

    Attributes:
        step: the step restored.
        tier: the tier this rank read from.
        world_size_saved: world size when the snapshot was saved.
        bytes: tensor bytes this rank read.
        duration_s: wall time of the whole restore on this rank.
    """

    step: int
    tier: TierName
    world_size_saved: int
    bytes: int
    duration_s: float


class _Comm:
    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1

    def all_gather(self, obj: Any) -> list[Any]:
        """Gathers a plain value from every rank as JSON bytes in tensors:
        ``all_gather_object`` would unpickle bytes that come off the network."""
        if self.dist is None:
            return [obj]
        data = json.dumps(fl.encode_json(obj), separators=(",", ":")).encode()
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self.dist.all_gather(sizes, size)
        longest = max(int(s.item()) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
        self.dist.all_gather(bufs, mine)
        return [fl.decode_json(json.loads(bytes(b[: int(n.item())].tolist()))) for b, n in zip(bufs, sizes)]


def _pool_shared(sources: Sequence[SnapshotSource], comm: _Comm) -> None:
    """Tiers whose availability is pooled across ranks (the peer tier: what a
    node holds is known on that node only) share it in one all-gather."""
    shared = [s for s in sources if s.pooled]
    if not shared:
        return
    mine = []
    for source in shared:
        try:
            mine.append(source.share())
        except Exception as exc:  # one rank raising here would leave the others in the collective
            log.warning("%s tier cannot share what it holds: %s", source.tier, exc)
            mine.append(None)
    gathered = comm.all_gather(mine)
    for i, source in enumerate(shared):
        try:
            source.pool([g[i] for g in gathered])
        except Exception as exc:
            log.warning("%s tier unavailable for restore: %s", source.tier, exc)


def _availability(sources: Sequence[SnapshotSource]) -> tuple[Avail, dict[int, str]]:
    """What the sources hold, and the steps some seal found unhealthy (with the health)."""
    avail: Avail = {}
    unhealthy: dict[int, str] = {}
    for t, source in enumerate(sources):
        try:
            refs = source.steps()
        except Exception as exc:  # one rank raising here would leave the others in the collective
            log.warning("%s tier unavailable for restore: %s", source.tier, exc)
            continue
        avail[t] = {(r.step, r.world_size): sorted(r.ranks) for r in refs}
        for r in refs:
            if r.health != "ok":
                unhealthy[r.step] = worst(unhealthy.get(r.step, "ok"), r.health)
    return avail, unhealthy


def choose(
    all_avail: list[Avail], world: int, unhealthy: Mapping[int, str] | None = None, before: int | None = None
) -> tuple[int, int, dict[int, list[int]]] | None:
    """The newest ``(step, saved world size)`` every rank can load, and for each
    rank its usable tiers in order; ``None`` when there is none.

    A step in ``unhealthy`` (a seal on some rank found it poisoned or suspect)
    is chosen only when no healthy step can be loaded; steps at or after
    ``before`` never are (a rollback).

    Deterministic, so every rank computes the same answer from the same input.
    """
    unhealthy = unhealthy or {}
    keys = {key for avail in all_avail for per_tier in avail.values() for key in per_tier
            if before is None or key[0] < before}
    # Newest step first; at equal step prefer a snapshot of the current world size.
    ordered = sorted(keys, key=lambda k: (k[0], k[1] == world, k[1]), reverse=True)
    healthy = [k for k in ordered if k[0] not in unhealthy]
    return _first_loadable(all_avail, world, healthy) or _first_loadable(
        all_avail, world, [k for k in ordered if k[0] in unhealthy])


def _first_loadable(
    all_avail: list[Avail], world: int, ordered: list[tuple[int, int]]
) -> tuple[int, int, dict[int, list[int]]] | None:
    for step, ws in ordered:
        plan: dict[int, list[int]] = {}
        for r, avail in enumerate(all_avail):
            tiers = []
            for t in sorted(avail):
                held = avail[t].get((step, ws))
                # the length first: a damaged record can claim any world size
                if held is not None and (r in held if ws == world else len(held) == ws and set(held) == set(range(ws))):
                    tiers.append(t)
            if not tiers:
                break
            plan[r] = tiers
        else:
            return step, ws, plan
    return None


def restore_state(
    state: Mapping[str, Any],
    sources: Sequence[SnapshotSource],
    *,
    events: EventSink | None = None,
    before: int | None = None,
) -> RestoreResult | None:
    """Restores ``state`` in place from the newest healthy snapshot all ranks can load.

    Collective when ``torch.distributed`` is initialised: every rank must call it.

    Args:
        state: the state mapping given to the Checkpointer.
        sources: the tiers, fastest first.
        events: where ``checkpoint_restored`` / ``integrity_failed`` go.
        before: only steps before this one (a rollback).

    Returns:
        What was restored, or ``None`` when no snapshot exists that every rank can load.

    Raises:
        StateMismatchError: the snapshot's keys, shapes or dtypes differ from
            ``state`` on some rank (raised on every rank, naming them).
        CheckpointError: a rank failed unexpectedly, or every snapshot tried
            failed on some rank and none is left (raised on every rank).
    """
    events = events or NullEventLog()
    comm = _Comm()
    t0 = time.perf_counter()
    _pool_shared(sources, comm)
    avail, bad = _availability(sources)
    tried: list[int] = []
    skipped: list[str] = []  # steps chosen and found unusable, with the first failing rank's reason
    try:
        for _ in range(_MAX_ROUNDS):
            gathered = comm.all_gather([avail, bad])
            unhealthy: dict[int, str] = {}
            for _, theirs in gathered:
                for s, h in theirs.items():
                    unhealthy[int(s)] = worst(unhealthy.get(int(s), "ok"), h)
            chosen = choose([a for a, _ in gathered], comm.world, unhealthy, before)
            if chosen is None and tried:
                # A failed round loads in place: ranks that read a snapshot before
                # another rank failed hold its tensors, others partly. Starting
                # "fresh" from that would train on state that differs across ranks.
                raise CheckpointError(
                    f"every snapshot tried (steps {tried}) failed on some rank and no other one is left; "
                    "the state was partly overwritten in place, so training cannot start fresh from it"
                )
            if chosen is None:
                log.info("rank %d: no snapshot every rank can load; starting fresh", comm.rank)
                return None
            step, ws, plan = chosen
            tried.append(step)
            if not tried[1:]:
                newer = sorted(s for s in unhealthy if s > step and (before is None or s < before))
                if newer:
                    skipped.append(f"unhealthy steps {newer} ({', '.join(sorted({unhealthy[s] for s in newer}))})")
                if step in unhealthy:
                    log.warning("rank %d: no healthy snapshot can be loaded; restoring %s step %d",
                                comm.rank, unhealthy[step], step)
            status, result = _load_one(state, sources, plan[comm.rank], step, ws, comm, events)
            if status is not None:
                # No tier could serve this rank: stop offering (step, ws) from any.
                for per_tier in avail.values():
                    per_tier.pop((step, ws), None)
            statuses = comm.all_gather(status)
            failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
            fatal = [(r, s) for r, s in failed if s[0] != "retry"]
            if fatal:
                r, (kind, msg) = fatal[0]
                cls = StateMismatchError if kind == "mismatch" else CheckpointError
                raise cls(f"restore of step {step} failed on rank {r}: {msg}")
            if all(s is None for s in statuses):
                assert result is not None
                tier, nbytes = result
                res = RestoreResult(
                    step=step, tier=tier, world_size_saved=ws, bytes=nbytes, duration_s=time.perf_counter() - t0
                )
                events.emit(
                    "checkpoint_restored",
                    step=step,
                    tier=tier,
                    duration_s=round(res.duration_s, 6),
                    bytes=nbytes,
                    world_size_saved=ws,
                    **({"skipped": skipped} if skipped else {}),
                    **({"health": unhealthy[step]} if step in unhealthy else {}),
                )
                log.info(
                    "rank %d: restored step %d from %s (%.1f MiB in %.3fs, saved at world size %d)%s",
                    comm.rank, step, tier, nbytes / 2**20, res.duration_s, ws,
                    "; skipped newer " + "; ".join(skipped) if skipped else "",
                )
                return res
            r, (_, msg) = failed[0]
            skipped.append(f"step {step} (rank {r}: {msg})")
            log.warning("rank %d: step %d unusable on rank %d (%s); choosing again", comm.rank, step, r, msg)
        raise CheckpointError(f"restore gave up after {_MAX_ROUNDS} rounds of failing snapshots")
    finally:
        for source in sources:
            source.close()


def _load_one(
    state: Mapping[str, Any],
    sources: Sequence[SnapshotSource],
    tiers: list[int],
    step: int,
    ws: int,
    comm: _Comm,
    events: EventSink,
) -> tuple[tuple[str, str] | None, tuple[TierName, int] | None]:
    """Loads ``step`` from the first tier that works; returns (status, (tier, bytes))."""
    why: list[str] = []
    for t in tiers:
        source = sources[t]
        try:
            nbytes = _load_from(state, source, step, ws, comm)
            return None, (source.tier, nbytes)
        except IntegrityError as exc:
            log.error("rank %d: %s snapshot of step %d failed verification: %s", comm.rank, source.tier, step, exc)
            events.emit("integrity_failed", step=step, tier=source.tier, rank=comm.rank, error=str(exc),
                        **({"file": exc.file} if exc.file else {}))
            why.append(f"{source.tier}: failed verification: {exc}")
        except StorageError as exc:
            log.warning("rank %d: cannot read step %d from %s: %s", comm.rank, step, source.tier, exc)
            why.append(f"{source.tier}: {exc}")
        except StateMismatchError as exc:
            return ("mismatch", str(exc)), None
        except Exception as exc:  # shared so that no rank waits forever in the next collective
            log.exception("rank %d: restore of step %d from %s failed", comm.rank, step, source.tier)
            return ("error", f"{type(exc).__name__}: {exc}"), None
    return ("retry", f"no tier could serve step {step} ({'; '.join(why) or 'none holds it'})"), None


class _Reader:
    """Reads entries of one (source, step) into tensors, resharding when needed."""

    def __init__(self, source: SnapshotSource, step: int, records: dict[int, CommitRecord], rank: int, same_world: bool) -> None:
        self.source = source
        self.step = step
        self.records = records
        self.rank = rank
        self.same_world = same_world
        self.index = {r: {e.key: e for e in rec.entries} for r, rec in records.items()}
        self.bytes = 0
        # Reads straight into state tensors are batched, so a tier that reads
        # many entries in parallel (RAM, peer) gets them at once: see flush().
        self._batch: list[tuple[int, Entry, torch.Tensor]] = []
        # Device tensors it can read straight into go through pinned staging (h2d).
        self._device: list[tuple[int, Entry, torch.Tensor]] = []

    def _read(self, rank: int, entry: Entry, target: torch.Tensor | None = None) -> torch.Tensor:
        """Reads ``entry`` into ``target`` when it can take the bytes directly,
        else into a new tensor of the entry's dtype and shape, which is returned."""
        dtype = fl.dtype_from_name(entry.dtype)
        if entry.nbytes != math.prod(entry.shape) * dtype.itemsize:
            # a damaged layout would otherwise skip or misread the bytes
            raise IntegrityError(f"{entry.key}: the {self.source.tier} snapshot records {entry.nbytes} bytes "
                                 f"for {entry.dtype}{entry.shape}")
        direct = (
            target is not None
            and target.dtype == dtype
            and target.is_contiguous()
            and list(target.shape) == entry.shape
        )
        if direct and target is not None and target.is_cuda:
            if entry.nbytes:
                self._device.append((rank, entry, target))
            self.bytes += entry.nbytes
            return target
        direct = direct and target is not None and target.device.type == "cpu"
        if direct:
            out = target.view(-1).view(torch.uint8) if target.numel() else torch.empty(0, dtype=torch.uint8)
        else:
            out = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            if direct:
                self._batch.append((rank, entry, out))
            else:
                self.source.read(self.step, rank, entry, out)
        self.bytes += entry.nbytes
        if direct:
            return target  # type: ignore[return-value]
        return out.view(dtype).view(entry.shape)

    def flush(self) -> None:
        """Performs the batched reads."""
        if self._batch:
            batch, self._batch = self._batch, []
            self.source.read_many(self.step, batch)
        if self._device:
            batch, self._device = self._device, []
            read_to_device(self.source, self.step, batch)

    def fill(self, key: str, target: torch.Tensor, offset: Sequence[int]) -> None:
        """Fills ``target`` (the local data at ``offset`` of the global tensor)."""
        own = self.index.get(self.rank, {}).get(key) if self.same_world else None
        if own is not None and own.shape == list(target.shape) and own.global_offset == list(offset):
            got = self._read(self.rank, own, target)
            if got is not target:
                target.copy_(got)
            return
        ranks = sorted(self.index, key=lambda r: (r != self.rank, r))
        volume, seen = 0, set()
        for r in ranks:
            e = self.index[r].get(key)
            if e is None:
                continue
            box = (tuple(e.global_offset), tuple(e.shape))
            if box in seen:
                continue  # replicas of the same chunk (replicated dims of a mesh, DDP)
            hit = _intersect(offset, target.shape, e.global_offset, e.shape)
            if hit is None:
                continue
            seen.add(box)
            lo, hi = hit
            full = list(lo) == list(offset) and [h - l for l, h in zip(lo, hi)] == list(target.shape)
            if full and e.global_offset == list(offset) and e.shape == list(target.shape):
                got = self._read(r, e, target)
                if got is not target:
                    target.copy_(got)
            else:
                chunk = self._read(r, e)
                src = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, e.global_offset))
                dst = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))
                target[dst].copy_(chunk[src])
            volume += math.prod(h - l for l, h in zip(lo, hi))
            if volume >= target.numel():
                break
        if volume != target.numel():
            raise StorageError(
                f"{key}: the {self.source.tier} snapshot of step {self.step} covers {volume} of "
                f"{target.numel()} elements of this rank's shard (ranks held: {sorted(self.index)})"
            )


def _intersect(
    a_off: Sequence[int], a_shape: Sequence[int], b_off: Sequence[int], b_shape: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    lo = [max(a, b) for a, b in zip(a_off, b_off)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, hi


def _load_from(state: Mapping[str, Any], source: SnapshotSource, step: int, ws: int, comm: _Comm) -> int:
    records = {r: rec for r, rec in source.records(step).items() if rec.world_size == ws}
    if not records:
        raise StorageError(f"{source.tier} tier lost step {step}")
    same_world = ws == comm.world
    # Plain values (epoch, data loader position) come from this rank's record,
    # or from the lowest saved rank when this rank did not exist then.
    meta = records.get(comm.rank) if same_world and comm.rank in records else records[min(records)]
    reader = _Reader(source, step, records, comm.rank, same_world)
    flat, build = fl.prepare(state, meta, records, same_world=same_world, rank=comm.rank)
    for leaf in flat.leaves:
        if isinstance(leaf.value, torch.Tensor):
            reader.fill(leaf.key, leaf.value, leaf.global_offset)
    built = {}
    for entry in build:
        if entry.kind == "json":
            built[entry.key] = fl.decode_json(entry.value)
        else:
            t = torch.empty(entry.global_shape, dtype=fl.dtype_from_name(entry.dtype))
            reader.fill(entry.key, t, [0] * len(entry.global_shape))
            built[entry.key] = t
    reader.flush()
    fl.apply_loaded(flat, meta, build, built)
    return reader.bytes
