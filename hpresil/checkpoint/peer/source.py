"""The peer tier as the restore path sees it (a :class:`~hpresil.checkpoint.api.SnapshotSource`).

What a node can serve is known on that node, so the tier's availability is
pooled across ranks: before the ranks agree on a step, the first local rank
of every node shares (:meth:`PeerSource.share`) its node's server address and
the sealed snapshots the node holds (its own RAM tier and the replicas it
received), and every rank learns all of them (:meth:`PeerSource.pool`). A
rank whose own RAM snapshot is gone (node replaced, ranks moved) then reads
its entries, or with a changed world size the slices of the old ranks'
entries it needs, from whichever nodes hold them, straight into the state's
tensors, verifying every entry's checksum against the seal on arrival. A
node that fails is skipped for another holder of the same commit; when none
works the restore falls back to the durable tier.

Stale replicas: a rank's snapshots of one step from an abandoned timeline
(saved before a restore to an older step) are never mixed with the live one:
per step, only the timeline of the most recently created copy is offered.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from typing import Any, Sequence

import torch

from hpresil import _env
from hpresil.checkpoint.api import CommitRecord, Entry, Seal, SnapshotRef, SnapshotSource, TierName
from hpresil.checkpoint.health import worst
from hpresil.checkpoint.ram.files import scan
from hpresil.errors import ConfigError, IntegrityError, StorageError
from hpresil.checkpoint.peer import secret as job_secret
from hpresil.checkpoint.peer.api import peer_dir, replica_root
from hpresil.checkpoint.peer.client import PeerClient

__all__ = ["PeerSource"]

log = logging.getLogger(__name__)

_Cand = tuple[float, str, str, str, int]  # created, commit id, timeline, host, port


class PeerSource(SnapshotSource):
    """Snapshots held in any node's RAM or replicas, read over TCP.

    Args:
        shm_dir: this node's job shared-memory directory.
        rank: this process's global rank.
        world_size: the current world size.
        ready_timeout: how long to wait for this node's runtime to publish
            its server for the current attempt.
        io_timeout: bound on any send/receive that makes no progress.
    """

    tier: TierName = "peer"
    pooled = True

    def __init__(self, shm_dir: str, *, rank: int, world_size: int,
                 ready_timeout: timedelta = timedelta(seconds=30),
                 io_timeout: timedelta = timedelta(seconds=30)) -> None:
        self.shm_dir = shm_dir
        self.rank, self.world_size = rank, world_size
        self.ready_timeout, self.io_timeout = ready_timeout, io_timeout
        self._index: dict[tuple[int, int], dict[int, list[_Cand]]] = {}
        self._health: dict[tuple[int, int], str] = {}  # the worst seal of a step among all holders
        self._chosen: dict[tuple[int, int], tuple[str, list[tuple[str, int]]]] = {}  # (step, rank) -> commit, holders
        self._seals: dict[tuple[int, str], Seal] = {}
        self._clients: dict[tuple[str, int], PeerClient] = {}
        self._secret: bytes | None = None

    # -- pooled availability --------------------------------------------
    def _node_info(self) -> dict[str, Any] | None:
        path = os.path.join(peer_dir(self.shm_dir), "node.json")
        if not os.path.isdir(peer_dir(self.shm_dir)):
            return None  # no peer server on this node
        try:
            attempt = int(_env.get(_env.ATTEMPT) or 0)
        except ValueError:
            raise ConfigError(f"{_env.ATTEMPT}={_env.get(_env.ATTEMPT)!r} is not an integer (hpresil-run sets it)") from None
        deadline = time.monotonic() + self.ready_timeout.total_seconds()
        while True:
            try:
                with open(path, encoding="utf-8") as f:
                    info = json.load(f)
                if int(info.get("attempt", -1)) >= attempt:
                    return info
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() >= deadline:
                log.warning("peer tier: this node's runtime did not publish its server for attempt %d", attempt)
                return None
            time.sleep(0.02)

    def share(self) -> dict[str, Any] | None:
        """What this node can serve (only the node's first local rank reports it)."""
        if int(os.environ.get("LOCAL_RANK", 0)) != 0:
            return None
        info = self._node_info()
        if info is None:
            return None
        held = []
        for root in (self.shm_dir, replica_root(self.shm_dir)):
            for i in scan(root):
                if i.seal is not None:
                    r = i.record
                    held.append([i.rank, r.step, r.world_size, r.commit_id, r.created, r.timeline, i.seal.health])
        return {"node": info["node"], "host": info["host"], "port": int(info["port"]), "held": held}

    def pool(self, shares: Sequence[Any]) -> None:
        """Learns what every node can serve (the shares of all ranks, same on every rank)."""
        index: dict[tuple[int, int], dict[int, dict[str, _Cand]]] = {}
        self._health = {}
        for share in shares:
            if not isinstance(share, dict):
                continue
            for rank, step, ws, commit_id, created, timeline, health in share["held"]:
                key = (int(step), int(ws))
                self._health[key] = worst(self._health.get(key, "ok"), str(health))
                per = index.setdefault(key, {}).setdefault(int(rank), {})
                per[f"{commit_id}@{share['host']}:{share['port']}"] = (
                    float(created), str(commit_id), str(timeline), str(share["host"]), int(share["port"]))
        self._index = {}
        for key, per_rank in index.items():
            cands = [c for per in per_rank.values() for c in per.values()]
            live = max(cands)[2]  # the timeline of the newest copy of this step
            kept = {r: sorted((c for c in per.values() if c[2] == live), reverse=True) for r, per in per_rank.items()}
            self._index[key] = {r: c for r, c in kept.items() if c}

    # -- SnapshotSource --------------------------------------------------
    def steps(self) -> list[SnapshotRef]:
        """Snapshots some node can serve, newest first (after :meth:`pool`)."""
        refs = [SnapshotRef(tier="peer", step=s, world_size=ws, ranks=frozenset(per), health=self._health.get((s, ws), "ok"))
                for (s, ws), per in self._index.items()]
        return sorted(refs, key=lambda r: (r.step, r.world_size), reverse=True)

    def records(self, step: int) -> dict[int, CommitRecord]:
        """Layouts of ``step``: this rank's alone when it is there at the current
        world size (no resharding), else every saved rank's.

        Raises:
            StorageError: no holder of some rank's snapshot answers.
        """
        out: dict[int, CommitRecord] = {}
        for (s, ws), per_rank in self._index.items():
            if s != step:
                continue
            ranks = [self.rank] if ws == self.world_size and self.rank in per_rank else sorted(per_rank)
            out.update(self._fetch_records(step, {r: per_rank[r] for r in ranks}))
        return out

    def _fetch_records(self, step: int, cands: dict[int, list[_Cand]]) -> dict[int, CommitRecord]:
        out: dict[int, CommitRecord] = {}
        todo = dict(cands)
        tries = 0
        while todo:
            tries += 1
            by_holder: dict[tuple[str, int], list[tuple[int, str]]] = {}
            for rank, cs in todo.items():
                if len(cs) < tries:
                    raise StorageError(f"peer tier: no node could serve the record of rank {rank} at step {step}")
                c = cs[tries - 1]
                by_holder.setdefault((c[3], c[4]), []).append((rank, c[1]))
            for holder, items in by_holder.items():
                try:
                    got = self._client(holder).get(items)
                except (OSError, StorageError) as exc:
                    log.warning("peer tier: %s:%d did not serve records: %s", *holder, exc)
                    self._drop_client(holder)
                    continue
                for (rank, commit_id), pair in zip(items, got):
                    if pair is None:
                        continue
                    record, seal = pair
                    out[rank] = record
                    self._seals[(rank, commit_id)] = seal
                    holders = [(c[3], c[4]) for c in todo[rank] if c[1] == commit_id]
                    self._chosen[(step, rank)] = (commit_id, [holder] + [h for h in holders if h != holder])
                    del todo[rank]
        return out

    def read(self, step: int, rank: int, entry: Entry, out: torch.Tensor) -> None:
        """Copies ``entry`` of ``rank`` at ``step`` into ``out``, verified.

        Raises:
            IntegrityError: the bytes fail their checksum.
            StorageError: no holder serves them.
        """
        self.read_many(step, [(rank, entry, out)])

    def read_many(self, step: int, items: Sequence[tuple[int, Entry, torch.Tensor]]) -> None:
        """:meth:`read` for many entries: one request per saving rank."""
        by_rank: dict[int, list[tuple[Entry, torch.Tensor]]] = {}
        for rank, entry, out in items:
            if out.numel() != entry.nbytes:
                raise StorageError(f"{entry.key}: output buffer has {out.numel()} bytes, entry {entry.nbytes}")
            by_rank.setdefault(rank, []).append((entry, out))
        for rank, parts in by_rank.items():
            chosen = self._chosen.get((step, rank))
            if chosen is None:
                raise StorageError(f"peer tier: rank {rank} step {step} was not listed")
            commit_id, holders = chosen
            seal = self._seals[(rank, commit_id)]
            reqs = []
            for entry, out in sorted(parts, key=lambda p: p[0].offset):
                expected = seal.checksums.get(entry.key)
                if expected is None:
                    raise IntegrityError(f"seal of rank {rank} step {step} has no checksum for {entry.key}")
                reqs.append((entry.offset, out, expected, entry.key))
            errors = []
            for holder in holders:
                try:
                    self._client(holder).read(rank, commit_id, reqs)
                    break
                except (OSError, StorageError) as exc:
                    if isinstance(exc, IntegrityError):
                        raise
                    errors.append(f"{holder[0]}:{holder[1]}: {exc}")
                    self._drop_client(holder)
            else:
                raise StorageError(f"peer tier: no holder served rank {rank} step {step}: {'; '.join(errors)}")

    # -- connections -----------------------------------------------------
    def _client(self, holder: tuple[str, int]) -> PeerClient:
        client = self._clients.get(holder)
        if client is None:
            if self._secret is None:
                self._secret = job_secret.load(self.shm_dir)
                if self._secret is None:
                    raise StorageError("peer tier: no job secret (HPRESIL_JOB_SECRET or the node runtime's file)")
            client = PeerClient(holder[0], holder[1], self._secret, _env.get(_env.NODE_ID) or "",
                                io_timeout=self.io_timeout, connect_timeout=min(self.io_timeout, timedelta(seconds=5)))
            self._clients[holder] = client
        return client

    def _drop_client(self, holder: tuple[str, int]) -> None:
        client = self._clients.pop(holder, None)
        if client is not None:
            client.close()

    def close(self) -> None:
        """Closes the connections."""
        for holder in list(self._clients):
            self._drop_client(holder)
