"""Writing the durable tier: checkpoints in DCP's layout on a :class:`~.stores.api.DurableStore`.

:class:`DurableWriter`, driven by :class:`~hpresil.checkpoint.durable.drain.Drainer`,
runs a three-phase, multi-writer commit that needs no coordination between nodes:

1. each node uploads its local ranks' data files ``__<R>_0.distcp``;
2. then each rank's ``.hpresil/rank<R>.json`` (layout, checksums, item
   locations) - the rank's "done" marker;
3. whoever sees all ``world_size`` rank markers writes DCP's ``.metadata`` and
   then ``.hpresil/manifest.json``, the commit marker. Both are built
   deterministically from the rank markers, so concurrent committers write
   the same bytes.

Readers (:class:`~hpresil.checkpoint.durable.source.DurableSource`, and
``torch.distributed.checkpoint.load`` when the user follows the manifest) only
trust steps whose manifest exists and parses. Retention runs after a commit:
committed steps beyond ``keep`` are deleted oldest first (manifest first, so
readers never see half a deletion), never the newest one; uncommitted
directories older than the newest commit are garbage.

A rollback (:mod:`hpresil.checkpoint.guard`) marks the committed steps newer
than the one it restored with ``.hpresil/unhealthy.json``
(:func:`mark_unhealthy`): their state is what the job found bad, so a later
restore chooses them only when nothing healthy is left, and retention keeps
the newest ``keep`` *healthy* steps (plus anything newer). The marker goes
when the new timeline commits the step again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterable, Sequence

from hpresil.checkpoint.durable.layout import (
    META_DIR,
    build_dcp_metadata,
    build_manifest,
    manifest_json,
    parse_manifest,
    parse_step_dir,
    rank_json,
    step_dir,
    verdict_json,
)
from hpresil.checkpoint.durable.stores.api import Buffer, DurableStore, Progress
from hpresil.errors import IntegrityError, StorageError

__all__ = ["DurableWriter", "RankUpload", "digest", "is_committed", "list_committed"]

log = logging.getLogger(__name__)


class RankUpload:
    """One rank's files for a durable step: the data buffers and its marker object.

    Args:
        rank_obj: the ``rank<R>.json`` object from
            :func:`~hpresil.checkpoint.durable.layout.plan_rank_file`.
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

    def started_elsewhere(self, step: int, mine: Iterable[int]) -> bool:
        """True when ``step`` is not committed and a rank outside ``mine`` (another
        node) has already uploaded its marker: finishing it commits soonest."""
        names = set(self.store.list_dir(f"{step_dir(step)}/{META_DIR}"))
        if "manifest.json" in names:
            return False
        own = {rank_json(r).rsplit("/", 1)[-1] for r in mine}
        return any(n.startswith("rank") and n.endswith(".json") and n not in own for n in names)

    def upload(self, step: int, uploads: Sequence[RankUpload], *, timeout: float | None = None,
               progress: Progress | None = None) -> tuple[int, list[int]]:
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
            self.store.delete([f"{sdir}/{manifest_json()}", f"{sdir}/.metadata", f"{sdir}/{verdict_json()}"])
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
            [(f"{sdir}/{up.rank_obj['file']}", up.buffers) for up in todo], timeout=timeout, progress=progress
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
        digests = {r: digest(blobs[f"{sdir}/{w}"]) for r, w in enumerate(wanted)}  # type: ignore[arg-type]
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

    def retain(self, keep: int) -> list[int]:
        """Deletes committed steps beyond the newest ``keep`` and stale uncommitted ones.

        Returns:
            The steps deleted.
        """
        keep = max(1, keep)
        committed = list_committed(self.store)
        if not committed:
            return []
        newest = committed[0][0]
        unhealthy = list_unhealthy(self.store, [s for s, _ in committed])
        healthy = [s for s, _ in committed if s not in unhealthy]
        # The newest `keep` healthy steps and anything newer than the oldest of them stay.
        floor = healthy[keep - 1] if len(healthy) >= keep else (healthy[-1] if healthy else committed[-1][0])
        doomed = [s for s, _ in committed if s < floor]
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


def digest(blob: bytes) -> str:
    """``sha256:<hex>`` of a rank marker, as the manifest records it."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def is_committed(store: DurableStore, step: int) -> bool:
    """Whether ``step`` has its commit marker in ``store`` (one listing)."""
    return "manifest.json" in store.list_dir(f"{step_dir(step)}/{META_DIR}")


def list_committed(store: DurableStore) -> list[tuple[int, dict[str, Any]]]:
    """Committed steps of ``store`` (their manifest parses) with the manifest, newest first."""
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


def list_unhealthy(store: DurableStore, steps: Sequence[int]) -> dict[int, str]:
    """Of ``steps``, those a rollback marked, with the cause (one batched read)."""
    paths = {s: f"{step_dir(s)}/{verdict_json()}" for s in steps}
    blobs = store.read_many(list(paths.values()))
    out = {}
    for s, path in paths.items():
        blob = blobs.get(path)
        if blob is None:
            continue
        try:
            obj = json.loads(blob)
            out[s] = str(obj.get("cause", "unknown")) if isinstance(obj, dict) else "unknown"
        except ValueError:
            out[s] = "unknown"
    return out


def mark_unhealthy(store: DurableStore, after: int, cause: str, timeline: str) -> list[int]:
    """Marks the committed steps newer than ``after`` as abandoned by a
    rollback for ``cause``; returns them."""
    steps = [s for s, _ in list_committed(store) if s > after]
    for s in steps:
        store.write_bytes(f"{step_dir(s)}/{verdict_json()}",
                          _dump({"cause": cause, "rolled_back_to": after, "timeline": timeline}))
    if steps:
        log.warning("durable steps %s: marked unhealthy (%s); restores prefer healthy steps", steps, cause)
    return steps
