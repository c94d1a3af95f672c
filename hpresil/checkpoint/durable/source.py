"""Reading the durable tier: :class:`DurableSource`, a
:class:`~hpresil.checkpoint.api.SnapshotSource` over committed steps (format in
:mod:`~hpresil.checkpoint.durable.layout`, commit protocol in
:mod:`~hpresil.checkpoint.durable.writer`)."""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

import torch

from hpresil.checkpoint.api import CommitRecord, Entry, SnapshotRef, SnapshotSource, TierName
from hpresil.checkpoint.durable.layout import manifest_json, parse_manifest, rank_json, record_from_obj, step_dir
from hpresil.checkpoint.durable.stores import DurableStore, open_store
from hpresil.checkpoint.durable.writer import digest, list_committed, list_unhealthy
from hpresil.checkpoint.integrity import checksum
from hpresil.errors import CheckpointError, IntegrityError, StorageError

if TYPE_CHECKING:
    from hpresil.events.api import EventSink

__all__ = ["DurableSource"]

log = logging.getLogger(__name__)


class DurableSource(SnapshotSource):
    """The durable tier as a :class:`~hpresil.checkpoint.api.SnapshotSource`.

    Args:
        store: the store, or a URL for :func:`open_store`.
        events: where ``integrity_failed`` is reported.
    """

    tier: TierName = "durable"

    def __init__(self, store: DurableStore | str, events: "EventSink | None" = None) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.events = events
        self._lock = threading.Lock()
        self._manifests: dict[int, dict[str, Any]] = {}
        self._ranks: dict[int, dict[int, dict[str, Any]]] = {}

    def steps(self) -> list[SnapshotRef]:
        """Committed steps, newest first."""
        found = list_committed(self.store)
        unhealthy = list_unhealthy(self.store, [s for s, _ in found])
        with self._lock:
            self._manifests = dict(found)
            self._ranks = {s: v for s, v in self._ranks.items() if s in self._manifests}
        return [
            SnapshotRef(tier="durable", step=s, world_size=int(m["world_size"]), ranks=frozenset(range(int(m["world_size"]))),
                        health="suspect" if s in unhealthy else "ok")
            for s, m in found
        ]

    def _manifest(self, step: int) -> dict[str, Any]:
        with self._lock:
            if step in self._manifests:
                return self._manifests[step]
        try:
            blob = self.store.read_bytes(f"{step_dir(step)}/{manifest_json()}")
        except FileNotFoundError as exc:
            raise StorageError(f"durable step {step} is not committed in {self.store.url}") from exc
        manifest = parse_manifest(blob, step)
        with self._lock:
            self._manifests[step] = manifest
        return manifest

    def _rank_objs(self, step: int) -> dict[int, dict[str, Any]]:
        with self._lock:
            if step in self._ranks:
                return self._ranks[step]
        manifest = self._manifest(step)
        world = int(manifest["world_size"])
        paths = {r: f"{step_dir(step)}/{rank_json(r)}" for r in range(world)}
        blobs = self.store.read_many(list(paths.values()))
        objs: dict[int, dict[str, Any]] = {}
        for r, p in paths.items():
            blob = blobs.get(p)
            if blob is None:
                raise IntegrityError(f"durable step {step} is committed but {p} is missing from {self.store.url}",
                                     file=p)
            sealed = manifest["ranks"][str(r)].get("sha256")
            if sealed is not None and sealed != digest(blob):
                raise IntegrityError(f"durable step {step}: {p} changed since the step was committed", file=p)
            try:
                obj = json.loads(blob)
            except (ValueError, RecursionError) as exc:
                raise IntegrityError(f"durable step {step}: {p} is not JSON") from exc
            if not isinstance(obj, dict) or obj.get("commit_id") != manifest["ranks"][str(r)]["commit_id"]:
                raise IntegrityError(f"durable step {step}: {p} does not match the manifest's commit of rank {r}")
            objs[r] = obj
        with self._lock:
            self._ranks[step] = objs
        return objs

    def records(self, step: int) -> dict[int, CommitRecord]:
        """Layouts of every rank of ``step``.

        Raises:
            StorageError: the step is not committed or its files are unreadable.
            IntegrityError: its rank records are missing or malformed.
        """
        return {r: record_from_obj(obj) for r, obj in self._rank_objs(step).items()}

    def _locate(self, step: int, rank: int, key: str) -> dict[str, Any]:
        objs = self._rank_objs(step)
        if rank not in objs:
            raise StorageError(f"durable step {step} has no rank {rank}")
        for _ in range(2):  # a replicated entry points to its owner, one hop
            e = next((e for e in objs[rank]["entries"] if e["key"] == key), None)
            if e is None:
                raise StorageError(f"durable step {step} rank {rank} has no entry {key!r}")
            if "loc" in e:
                return e
            rank = int(e["owner"])
            if rank not in objs:
                raise IntegrityError(f"durable step {step}: owner rank {rank} of {key!r} is missing")
        raise IntegrityError(f"durable step {step}: entry {key!r} has no location")

    def read(self, step: int, rank: int, entry: Entry, out: torch.Tensor) -> None:
        """Reads ``entry`` of ``rank`` at ``step`` into ``out`` and verifies its checksum.

        Raises:
            IntegrityError: the bytes fail their checksum (an ``integrity_failed``
                event is emitted).
            StorageError: the bytes cannot be read.
        """
        if entry.kind != "tensor":
            raise CheckpointError(f"entry {entry.key!r} is a JSON value: take it from records(), not read()")
        try:
            e = self._locate(step, rank, entry.key)
            nbytes, loc = int(e["nbytes"]), e["loc"]
            fname, data_offset = loc["file"], int(loc["data_offset"])
            if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or data_offset < 0:
                raise ValueError(f"bad location {loc!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"durable step {step} rank {rank}: malformed location of {entry.key!r}: {exc}") from exc
        if nbytes != out.numel() * out.element_size() or nbytes != entry.nbytes:
            raise IntegrityError(
                f"durable step {step} rank {rank} entry {entry.key!r}: {nbytes} bytes stored, "
                f"{entry.nbytes} expected, out holds {out.numel() * out.element_size()}"
            )
        if out.numel():
            raw = out.reshape(-1) if out.dtype == torch.uint8 else out.reshape(-1).view(torch.uint8)
            try:
                self.store.read_into(f"{step_dir(step)}/{fname}", data_offset, memoryview(raw.numpy()).cast("B"))
            except FileNotFoundError as exc:
                path = f"{step_dir(step)}/{fname}"
                raise IntegrityError(f"durable step {step} is committed but its data file {path} is missing from "
                                     f"{self.store.url}", file=path) from exc
        got = checksum(out, like=e.get("checksum"))
        if got != e.get("checksum"):
            if self.events is not None:
                self.events.emit(
                    "integrity_failed", tier="durable", step=step, rank=rank, key=entry.key, expected=e.get("checksum"), got=got
                )
            raise IntegrityError(
                f"durable step {step} rank {rank} entry {entry.key!r} fails its checksum "
                f"({got} != {e.get('checksum')}): the file {loc['file']} is corrupt; restore from another step",
                file=f"{step_dir(step)}/{fname}",
            )
