"""The durable tier: checkpoints in DCP's layout on fsspec storage (``file://``, ``s3://``).

Writing (:class:`DurableWriter`, driven by :class:`hpresil.checkpoint.drain.Drainer`)
is a three-phase, multi-writer commit that needs no coordination between nodes:

1. each node uploads its local ranks' data files ``__<R>_0.distcp``;
2. then each rank's ``.hpresil/rank<R>.json`` (layout, checksums, item
   locations) - the rank's "done" marker;
3. whoever sees all ``world_size`` rank markers writes DCP's ``.metadata`` and
   then ``.hpresil/manifest.json``, the commit marker. Both are built
   deterministically from the rank markers, so concurrent committers write
   the same bytes.

Readers (:class:`DurableSource`, and ``torch.distributed.checkpoint.load``
when the user follows the manifest) only trust steps whose manifest exists and
parses. Retention runs after a commit: committed steps beyond ``keep`` are
deleted oldest first (manifest first, so readers never see half a deletion),
never the newest one; uncommitted directories older than the newest commit
are garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from hpresil.checkpoint.api import CommitRecord, Entry, SnapshotRef, TierName
from hpresil.checkpoint.durable_layout import (
    META_DIR,
    build_dcp_metadata,
    build_manifest,
    manifest_json,
    parse_manifest,
    parse_step_dir,
    rank_json,
    record_from_obj,
    step_dir,
)
from hpresil.checkpoint.durable_store import Buffer, DurableStore, open_store
from hpresil.checkpoint.integrity import checksum
from hpresil.errors import CheckpointError, IntegrityError, StorageError

if TYPE_CHECKING:
    from hpresil.events.api import EventSink

__all__ = ["open_store", "DurableStore", "DurableWriter", "DurableSource", "RankUpload"]

log = logging.getLogger(__name__)


class RankUpload:
    """One rank's files for a durable step: the data buffers and its marker object.

    Args:
        rank_obj: the ``rank<R>.json`` object from
            :func:`~hpresil.checkpoint.durable_layout.plan_rank_file`.
        buffers: the data file's content, in order.
    """

    __slots__ = ("rank_obj", "buffers")

    def __init__(self, rank_obj: dict[str, Any], buffers: Sequence[Buffer]) -> None:
        self.rank_obj = rank_obj
        self.buffers = buffers

    @property
    def rank(self) -> int:
        return int(self.rank_obj["rank"])


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


class DurableWriter:
    """Writes, commits and prunes durable checkpoints in one store.

    Args:
        store: where checkpoints live.
    """

    def __init__(self, store: DurableStore) -> None:
        self.store = store

    def is_committed(self, step: int) -> bool:
        """True when ``step``'s manifest exists (it is never rewritten)."""
        return "manifest.json" in self.store.list_dir(f"{step_dir(step)}/{META_DIR}")

    def started_elsewhere(self, step: int, mine: Iterable[int]) -> bool:
        """True when ``step`` is not committed and a rank outside ``mine`` (another
        node) has already uploaded its marker: finishing it commits soonest."""
        names = set(self.store.list_dir(f"{step_dir(step)}/{META_DIR}"))
        if "manifest.json" in names:
            return False
        own = {rank_json(r).rsplit("/", 1)[-1] for r in mine}
        return any(n.startswith("rank") and n.endswith(".json") and n not in own for n in names)

    def upload(self, step: int, uploads: Sequence[RankUpload], *, timeout: float | None = None) -> tuple[int, list[int]]:
        """Uploads ranks' data files, then their markers (phase 1 and 2).

        Ranks whose marker already holds the same ``commit_id`` are skipped; a
        marker of another commit is deleted before its data file is rewritten.
        A step committed by a timeline the job has abandoned (it restored an
        older step, e.g. because this one failed verification) is un-committed
        first (manifest and ``.metadata`` deleted) and replaced; a step
        committed by this timeline is never touched.

        Returns:
            Bytes uploaded and the ranks uploaded.

        Raises:
            StorageError: an upload failed (nothing committed is touched).
        """
        sdir = step_dir(step)
        existing = set(self.store.list_dir(f"{sdir}/{META_DIR}"))
        if "manifest.json" in existing:
            if not uploads or not self._superseded(step, uploads[0]):
                return 0, []
            # Un-commit before rewriting anything: readers then fall back to an older step.
            self.store.delete([f"{sdir}/{manifest_json()}", f"{sdir}/.metadata"])
        todo: list[RankUpload] = []
        for up in uploads:
            name = rank_json(up.rank)
            if name.rsplit("/", 1)[-1] in existing:
                try:
                    old = json.loads(self.store.read_bytes(f"{sdir}/{name}"))
                    if old.get("commit_id") == up.rank_obj["commit_id"]:
                        continue
                except (FileNotFoundError, ValueError, StorageError):
                    pass
                self.store.delete([f"{sdir}/{name}"])
            todo.append(up)
        if not todo:
            return 0, []
        nbytes = self.store.write_files(
            [(f"{sdir}/{up.rank_obj['file']}", up.buffers) for up in todo], timeout=timeout
        )
        for up in todo:
            # the marker vouches for the data file: check the store really holds all of it
            path = f"{sdir}/{up.rank_obj['file']}"
            got = self.store.size(path)
            if got != up.rank_obj["file_bytes"]:
                raise StorageError(f"{self.store.url}/{path} holds {got} bytes after upload, expected {up.rank_obj['file_bytes']}")
            self.store.write_bytes(f"{sdir}/{rank_json(up.rank)}", _dump(up.rank_obj))
        return nbytes, [up.rank for up in todo]

    def _superseded(self, step: int, up: RankUpload) -> bool:
        """Whether committed ``step`` belongs to another timeline than ``up``
        (or its rank record is gone or unreadable: it cannot be restored)."""
        path = f"{step_dir(step)}/{rank_json(up.rank)}"
        try:
            old = json.loads(self.store.read_bytes(path))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (FileNotFoundError, ValueError) as exc:
            log.warning("durable step %d: committed, but %s is unreadable (%s); replacing the step", step, path, exc)
            return True
        if old.get("commit_id") == up.rank_obj["commit_id"] or old.get("timeline", "") == up.rank_obj.get("timeline", ""):
            return False
        log.warning("durable step %d: committed by timeline %r, which the job abandoned by restoring an older "
                    "step; replacing it with timeline %r's", step, old.get("timeline", ""), up.rank_obj.get("timeline", ""))
        return True

    def try_commit(self, step: int, world_size: int) -> bool:
        """Commits ``step`` when every rank's marker is present (phase 3).

        Returns:
            True when the step is committed (now or before).

        Raises:
            StorageError: the store failed.
            IntegrityError: the rank markers are inconsistent.
        """
        sdir = step_dir(step)
        names = set(self.store.list_dir(f"{sdir}/{META_DIR}"))
        if "manifest.json" in names:
            return True
        wanted = [rank_json(r) for r in range(world_size)]
        if not all(w.rsplit("/", 1)[-1] in names for w in wanted):
            return False
        blobs = self.store.read_many([f"{sdir}/{w}" for w in wanted])
        recs: dict[int, dict[str, Any]] = {}
        run_id: str | None = None
        timeline: str | None = None
        for r, w in enumerate(wanted):
            blob = blobs.get(f"{sdir}/{w}")
            if blob is None:
                return False
            obj = json.loads(blob)
            run_id = obj.get("run_id") if run_id is None else run_id
            timeline = obj.get("timeline", "") if timeline is None else timeline
            if (int(obj["world_size"]) != world_size or int(obj["step"]) != step or obj.get("run_id") != run_id
                    or obj.get("timeline", "") != timeline):
                # A marker left by an attempt that crashed after this step is
                # overwritten when its node drains the new attempt's snapshot.
                log.warning(
                    "step %d: marker of rank %d is from another run, timeline or world size (%s, %s, %s); "
                    "not committing yet", step, r, obj.get("run_id"), obj.get("timeline"), obj["world_size"],
                )
                return False
            recs[r] = obj
        self._check_owners(step, recs)
        digests = {r: _digest(blobs[f"{sdir}/{w}"]) for r, w in enumerate(wanted)}  # type: ignore[arg-type]
        self.store.write_bytes(f"{sdir}/.metadata", build_dcp_metadata(recs, run_id=run_id or "", step=step))
        self.store.write_bytes(f"{sdir}/{manifest_json()}", build_manifest(recs, world_size=world_size, digests=digests))
        log.info("durable step %d committed in %s (%d ranks)", step, self.store.url, world_size)
        return True

    @staticmethod
    def _check_owners(step: int, recs: dict[int, dict[str, Any]]) -> None:
        written = {(r, e["key"]) for r, rec in recs.items() for e in rec["entries"] if "loc" in e}
        for r, rec in recs.items():
            for e in rec["entries"]:
                owner = e.get("owner")
                if owner is not None and (int(owner), e["key"]) not in written:
                    raise IntegrityError(
                        f"step {step}: replicated entry {e['key']!r} of rank {r} was not written by its owner rank "
                        f"{owner}; ranks disagree on which entries are replicated"
                    )

    def committed_steps(self) -> list[int]:
        """Steps whose manifest parses, newest first."""
        return [s for s, _ in _committed(self.store)]

    def retain(self, keep: int) -> list[int]:
        """Deletes committed steps beyond the newest ``keep`` and stale uncommitted ones.

        Returns:
            The steps deleted.
        """
        keep = max(1, keep)
        committed = _committed(self.store)
        if not committed:
            return []
        newest = committed[0][0]
        doomed = [s for s, _ in committed[keep:]]
        committed_set = {s for s, _ in committed}
        stale = [
            s
            for name in self.store.list_dir("")
            if (s := parse_step_dir(name)) is not None and s < newest and s not in committed_set
        ]
        for s in doomed:
            # manifest first: a reader never sees a committed step with missing files
            self.store.delete([f"{step_dir(s)}/{manifest_json()}"])
            self.store.delete_tree(step_dir(s))
        for s in stale:
            self.store.delete_tree(step_dir(s))
        if doomed or stale:
            log.info("durable retention (keep=%d): deleted steps %s, incomplete %s", keep, doomed, stale)
        return sorted(doomed + stale)


def _digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _committed(store: DurableStore) -> list[tuple[int, dict[str, Any]]]:
    steps = sorted((s for n in store.list_dir("") if (s := parse_step_dir(n)) is not None), reverse=True)
    paths = {s: f"{step_dir(s)}/{manifest_json()}" for s in steps}
    blobs = store.read_many(list(paths.values()))
    out = []
    for s in steps:
        blob = blobs.get(paths[s])
        if blob is None:
            continue
        try:
            out.append((s, parse_manifest(blob, s)))
        except IntegrityError as exc:
            log.warning("skipping durable step %d in %s: %s", s, store.url, exc)
    return out


class DurableSource:
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
        found = _committed(self.store)
        with self._lock:
            self._manifests = dict(found)
            self._ranks = {s: v for s, v in self._ranks.items() if s in self._manifests}
        return [
            SnapshotRef(tier="durable", step=s, world_size=int(m["world_size"]), ranks=frozenset(range(int(m["world_size"]))))
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
                raise StorageError(f"durable step {step}: {p} is missing from {self.store.url}")
            sealed = manifest["ranks"][str(r)].get("sha256")
            if sealed is not None and sealed != _digest(blob):
                raise IntegrityError(f"durable step {step}: {p} changed since the step was committed")
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
            IntegrityError: its rank records are malformed.
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
                raise StorageError(f"durable step {step}: data file {fname} is missing from {self.store.url}") from exc
        got = checksum(out)
        if got != e.get("checksum"):
            if self.events is not None:
                self.events.emit(
                    "integrity_failed", tier="durable", step=step, rank=rank, key=entry.key, expected=e.get("checksum"), got=got
                )
            raise IntegrityError(
                f"durable step {step} rank {rank} entry {entry.key!r} fails its checksum "
                f"({got} != {e.get('checksum')}): the file {loc['file']} is corrupt; restore from another step"
            )
