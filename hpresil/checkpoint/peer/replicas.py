"""Snapshots a node holds for its peers: replicas it received, and its own RAM tier.

Receiving (:meth:`ReplicaStore.begin`): the replica goes into a slot of
``<shm_dir>/replicas/ckpt/rank<R>/`` that does not hold the newest replica of
that rank, under ``LOCK_EX`` (readers take ``LOCK_SH`` and the receiver
skips slots they hold). The old record and seal are unlinked first, the bytes
are received straight into the mapped slot file and checked entry by entry
against the seal's checksum; only then are the seal and, last, the record
renamed into place. A transfer that fails or does not verify leaves a slot
without a record, which no reader trusts, and the newest complete replica
untouched.

Serving: :meth:`ReplicaStore.snapshots` lists the sealed snapshots of both
roots (own RAM and replicas), :meth:`ReplicaStore.pinned` holds one with
``LOCK_SH`` while its bytes are sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
import socket
import threading
from typing import Any, Iterator

import torch

from hpresil.checkpoint.api import CommitRecord, Seal, slot_path
from hpresil.checkpoint.ram.pin import arena_bytes, pin
from hpresil.checkpoint.ram.files import (
    SlotInfo,
    frombuffer,
    read_record,
    read_seal,
    scan,
    unlink,
    write_atomic,
)
from hpresil.errors import StorageError
from hpresil.checkpoint.peer.api import replica_root
from hpresil.checkpoint.peer import wire

__all__ = ["ReplicaStore", "Incoming", "validate"]

log = logging.getLogger(__name__)


def validate(rank: Any, record: CommitRecord, seal: Seal, nbytes: Any, limit: int) -> str | None:
    """Why a replica offered by a peer is unacceptable, or ``None``."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0 or record.rank != rank:
        return f"rank {rank!r} does not match the record's rank {record.rank}"
    if not isinstance(record.step, int) or not isinstance(record.world_size, int) or record.world_size < 1:
        return "record has a bad step or world size"
    if seal.commit_id != record.commit_id or seal.rank != rank:
        return "seal does not belong to the record"
    for n in (nbytes, record.nbytes):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > limit:
            return f"snapshot of {n!r} bytes is over the limit of {limit}"
    for e in record.entries:
        if e.kind != "tensor":
            continue
        if not (isinstance(e.offset, int) and isinstance(e.nbytes, int) and 0 <= e.offset and 0 <= e.nbytes
                and e.offset + e.nbytes <= nbytes):
            return f"entry {e.key!r} lies outside the {nbytes}-byte arena"
        if e.key not in seal.checksums:
            return f"seal lacks a checksum for {e.key!r}"
    return None


class Incoming:
    """A replica being received into a locked slot (see :meth:`ReplicaStore.begin`)."""

    def __init__(self, store: "ReplicaStore", record: CommitRecord, seal: Seal, slot: int, fd: int, nbytes: int) -> None:
        self.store, self.record, self.seal, self.slot, self.fd, self.nbytes = store, record, seal, slot, fd, nbytes

    def receive(self, sock: socket.socket) -> str | None:
        """Receives the arena from ``sock`` and verifies it.

        Returns:
            ``None`` when every entry matches its checksum, else what failed
            (the bytes were consumed either way, so the connection stays usable).

        Raises:
            FrameError: the connection closed early.
        """
        buf = self.store._map(self.record.rank, self.slot, self.nbytes)
        pos, bad = 0, None
        for e in sorted((e for e in self.record.entries if e.kind == "tensor"), key=lambda e: e.offset):
            if e.offset > pos:
                wire.recv_into(sock, memoryview(buf[pos : e.offset].numpy()))
                pos = e.offset
            if e.offset < pos:  # overlapping entries: never written by RamWriter
                return f"entry {e.key!r} overlaps the previous one"
            if not wire.recv_verified(sock, buf[e.offset : e.offset + e.nbytes], self.seal.checksums[e.key]):
                bad = bad or f"{e.key}: checksum differs from the seal"
            pos = e.offset + e.nbytes
        if self.nbytes > pos:
            wire.recv_into(sock, memoryview(buf[pos : self.nbytes].numpy()))
        return bad

    def commit(self) -> None:
        """Writes the seal, then the record: the replica counts from here."""
        rank = self.record.rank
        record = dataclasses.replace(self.record, slot=self.slot)  # the slot it lives in here
        write_atomic(slot_path(self.store.root, rank, self.slot, "seal.json"), self.seal.to_json())
        write_atomic(slot_path(self.store.root, rank, self.slot, "json"), record.to_json())

    def release(self) -> None:
        """Drops the slot's lock (call after commit or on failure)."""
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


class ReplicaStore:
    """The replicas under ``<shm_dir>/replicas`` plus this node's RAM tier.

    Args:
        shm_dir: the job's shared-memory directory on this node.
        slots: replica slots per rank.
        max_bytes: largest arena accepted.
    """

    def __init__(self, shm_dir: str, slots: int = 2, max_bytes: int = 1 << 40) -> None:
        self.shm_dir = shm_dir
        self.root = replica_root(shm_dir)
        self.slots = slots
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}
        self._maps: dict[str, tuple[tuple[int, int], mmap.mmap, torch.Tensor]] = {}

    # -- receiving -------------------------------------------------------
    def begin(self, record: CommitRecord, seal: Seal) -> Incoming | str:
        """Reserves a slot for a replica of ``record.rank``.

        Returns:
            An :class:`Incoming`, or why the replica is not wanted (``"have"``
            when the same commit is already held, ``"busy"`` when every
            usable slot is being read).
        """
        rank, nbytes = record.rank, arena_bytes(record)
        with self._lock:
            held = {i.slot: i for i in scan(self.root, [rank], self._cache) if i.seal is not None}
            if any(i.record.commit_id == record.commit_id for i in held.values()):
                return "have"
            newest = max(held.values(), key=lambda i: i.record.created, default=None)
            free = [k for k in range(self.slots) if k not in held]
            used = sorted((i for i in held.values() if i is not newest), key=lambda i: i.record.created)
            candidates = free + [i.slot for i in used]
            os.makedirs(os.path.dirname(slot_path(self.root, rank, 0, "bin")), mode=0o700, exist_ok=True)
            for slot in candidates:
                fd = os.open(slot_path(self.root, rank, slot, "bin"), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    unlink(slot_path(self.root, rank, slot, "json"))
                    unlink(slot_path(self.root, rank, slot, "seal.json"))
                    # As long as the record says, like a RAM-tier slot (readers check it).
                    size = max(nbytes, record.nbytes, 1)
                    if os.fstat(fd).st_size != size:
                        os.ftruncate(fd, size)
                        os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS mid-transfer
                except OSError as exc:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                    return f"cannot allocate {nbytes} bytes: {exc}"
                return Incoming(self, record, seal, slot, fd, nbytes)
            return "busy"

    def _map(self, rank: int, slot: int, nbytes: int) -> torch.Tensor:
        # Kept mapped across transfers: a fresh mapping would fault every page again.
        path = slot_path(self.root, rank, slot, "bin")
        map_fd = os.open(path, os.O_RDWR)  # a separate open: the mapping must not hold the flock
        try:
            st = os.fstat(map_fd)
            ident = (st.st_ino, st.st_size)
            hit = self._maps.get(path)
            if hit is not None and hit[0] == ident:
                return hit[2]
            self._maps.pop(path, None)
            mm = mmap.mmap(map_fd, st.st_size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(map_fd)
        buf = frombuffer(mm)
        self._maps[path] = (ident, mm, buf)
        return buf

    # -- serving ---------------------------------------------------------
    def snapshots(self) -> list[tuple[str, SlotInfo]]:
        """Sealed snapshots this node can serve: ``(root, info)`` for its own
        RAM tier (root = shm_dir) and its replicas."""
        out = []
        for root in (self.shm_dir, self.root):
            out += [(root, i) for i in scan(root, None, self._cache) if i.seal is not None]
        return out

    def find(self, rank: int, commit_id: str) -> tuple[str, SlotInfo]:
        """The snapshot of ``rank`` with ``commit_id``.

        Raises:
            StorageError: not held here (any more).
        """
        for root, info in self.snapshots():
            if info.rank == rank and info.record.commit_id == commit_id:
                return root, info
        raise StorageError(f"no sealed snapshot of rank {rank} with commit {commit_id} here")

    def load(self, rank: int, commit_id: str) -> tuple[str, str]:
        """The record and seal JSON of a held snapshot.

        Raises:
            StorageError: not held here, or replaced meanwhile.
        """
        root, info = self.find(rank, commit_id)
        record = read_record(slot_path(root, rank, info.slot, "json"))
        seal = read_seal(slot_path(root, rank, info.slot, "seal.json"), commit_id)
        if record is None or seal is None or record.commit_id != commit_id:
            raise StorageError(f"snapshot of rank {rank} commit {commit_id} was replaced")
        return record.to_json(), seal.to_json()

    @contextlib.contextmanager
    def pinned(self, rank: int, commit_id: str, timeout: float = 5.0) -> Iterator[tuple[int, int]]:
        """Holds the snapshot's slot with ``LOCK_SH``; yields ``(fd, file size)``.

        Raises:
            StorageError: not held, locked by a writer for ``timeout``, or replaced.
        """
        root, info = self.find(rank, commit_id)
        with pin(root, info, timeout=timeout) as held:
            yield held.fd, held.size

    def close(self) -> None:
        """Unmaps the slot files."""
        self._maps.clear()
