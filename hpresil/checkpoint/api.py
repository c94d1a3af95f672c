"""Contract of tiered checkpointing.

Tiers, fastest first: ``ram`` (this node's shared memory,
:mod:`~hpresil.checkpoint.ram`), ``peer`` (other nodes' RAM,
:mod:`~hpresil.checkpoint.peer`) and ``durable`` (fsspec: ``file://``,
``s3://``..., :mod:`~hpresil.checkpoint.durable`).

RAM snapshot format (the interface between the training process, the node
runtime's sealer/drainer and the restore path). For each global rank ``R``
that saved on this node::

    <shm_dir>/ckpt/rank<R>/slot<K>.bin        arena: the raw bytes of every tensor
    <shm_dir>/ckpt/rank<R>/slot<K>.json       commit record, written last (atomic rename)
    <shm_dir>/ckpt/rank<R>/slot<K>.seal.json  checksums, written after the commit

``<shm_dir>`` is ``$HPRESIL_SHM_DIR`` (set by ``hpresil-run``: one directory
per job and node). ``K`` ranges over ``CheckpointConfig.slots`` buffers that
are reused across saves while shapes are unchanged.

Locking: a writer holds ``fcntl.flock(LOCK_EX)`` on ``slot<K>.bin`` from
before it unlinks the old ``slot<K>.json`` until the new one is renamed into
place; a reader (sealer, drainer, restore) holds ``LOCK_SH`` and re-reads the
record after locking to check it is still the same ``commit_id``. A writer
never takes the slot of the newest commit, and skips slots it cannot lock.

The commit record (:class:`CommitRecord`, JSON) describes the layout of the
arena: one :class:`Entry` per leaf of the flattened state dict (DCP's
flattening: nested mappings joined with ``.``). Tensors live in the arena at
``offset``; plain Python values are stored inline as JSON (never pickled).
Use :meth:`CommitRecord.to_json` / :meth:`CommitRecord.from_json` to write
and parse it, and :func:`slot_path` for the file names.

The seal (:class:`Seal`, JSON) holds one checksum per tensor entry
(:mod:`hpresil.checkpoint.integrity`), the snapshot's health
(:mod:`hpresil.checkpoint.health`: ``ok``, ``suspect`` or ``poisoned``,
never chosen while a healthy snapshot exists), the ``commit_id`` of the record it
was computed for and the record's :func:`record_digest` (so a changed layout
or plain value in the record fails verification like a changed tensor byte);
a seal whose ``commit_id`` differs from the slot's current record is stale
and ignored. Only sealed snapshots are trusted when
``CheckpointConfig.verify_on_restore`` is set: a commit proves the copy
finished, a seal lets a reader prove the bytes did not change since.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence

from hpresil.errors import ConfigError, IntegrityError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TierName",
    "TIERS",
    "CheckpointConfig",
    "Entry",
    "CommitRecord",
    "SnapshotRef",
    "SnapshotSource",
    "Seal",
    "FORMAT_VERSION",
    "rank_dir",
    "slot_path",
    "record_digest",
]

TierName = Literal["ram", "peer", "durable"]
TIERS: tuple[TierName, ...] = ("ram", "peer", "durable")
FORMAT_VERSION = 1


@dataclasses.dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Settings of :class:`hpresil.Checkpointer`.

    Attributes:
        every: snapshot to RAM every this many steps (``save(step)`` is a no-op
            on other steps).
        durable: fsspec URL of the durable tier (``file:///path``, ``s3://bucket/prefix``);
            ``None`` takes ``$HPRESIL_DURABLE``, else a ``checkpoints`` directory in
            the job's log dir (or the current directory outside ``hpresil-run``).
        durable_every: drain every this many steps to durable storage; 0 disables
            the durable tier. Must be a multiple of ``every``.
        keep: durable checkpoints retained (older ones are deleted after a newer
            one commits).
        slots: RAM buffers per rank (at least 2; 3 lets a save proceed while the
            durable drain reads an older snapshot).
        upload_timeout: bound on one durable upload attempt of a snapshot
            (carried in its commit record, so the node runtime's drainer
            applies it too); an attempt past it is abandoned and retried.
            :meth:`~hpresil.Checkpointer.close` waits at most this long for
            the last upload.
        verify_on_restore: check checksums before trusting a snapshot.
        final_durable: :meth:`~hpresil.Checkpointer.close` snapshots the last
            saved step for the durable tier and waits until it is committed.
        close_timeout: the longest :meth:`~hpresil.Checkpointer.close` waits
            for that commit (a warning names the newest durable step otherwise).
        slot_wait: the longest one save waits for readers (sealer, durable
            read, peer send) to release a slot when every slot it may
            overwrite is being read; over time saves wait at most 1 % of the
            wall clock (:mod:`~hpresil.checkpoint.ram.slots`). After that the
            snapshot is skipped (``checkpoint_skipped`` event). Short on
            purpose: a wait costs training time for sure, a skipped snapshot
            only when a fault hits before the next one.
        overlap: copy what the optimizers in the state guard after ``save``
            returns, the optimizers' step waiting for it
            (:mod:`~hpresil.checkpoint.fence`); ``False`` copies everything
            before ``save`` returns (for a loop that changes parameters in
            place between ``save`` and the next optimizer step).
    """

    every: int = 1
    durable: str | None = None
    durable_every: int = 50
    keep: int = 3
    slots: int = 3
    upload_timeout: timedelta = timedelta(minutes=10)
    verify_on_restore: bool = True
    slot_wait: timedelta = timedelta(milliseconds=250)
    final_durable: bool = True
    close_timeout: timedelta = timedelta(minutes=2)
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"every={self.every}: snapshot interval must be >= 1 step")
        if self.durable_every < 0:
            raise ConfigError(f"durable_every={self.durable_every}: must be >= 0 (0 disables)")
        if self.durable_every and self.durable_every % self.every:
            raise ConfigError(
                f"durable_every={self.durable_every} is not a multiple of every={self.every}: "
                f"durable_every % every must be 0 (try durable_every={self.every * max(1, self.durable_every // self.every)})"
            )
        if self.keep < 1:
            raise ConfigError(f"keep={self.keep}: keep at least 1 durable checkpoint")
        if self.slot_wait < timedelta(0):
            raise ConfigError(f"slot_wait={self.slot_wait}: must be >= 0 (0 skips a snapshot at once when its slots are busy)")
        if self.upload_timeout <= timedelta(0):
            raise ConfigError(f"upload_timeout={self.upload_timeout}: must be > 0")
        if self.close_timeout < timedelta(0):
            raise ConfigError(f"close_timeout={self.close_timeout}: must be >= 0 (0: close() does not wait "
                              "for the final durable step)")
        if self.slots < 2:
            raise ConfigError(f"slots={self.slots}: double buffering needs slots >= 2")
        if self.durable is None:
            self.durable = os.environ.get("HPRESIL_DURABLE") or None


@dataclasses.dataclass(kw_only=True, slots=True)
class Entry:
    """One leaf of the flattened state dict.

    Attributes:
        key: flattened key (``"model.layers.0.attn.wq.weight"``).
        kind: ``"tensor"`` (bytes in the arena) or ``"json"`` (``value`` inline).
        dtype: torch dtype name without the ``torch.`` prefix (tensors).
        shape: shape of this rank's local data (tensors).
        global_shape: shape of the whole tensor; equal to ``shape`` when not sharded.
        global_offset: where the local chunk starts in the whole tensor.
        offset: byte offset of the data in the arena (tensors).
        nbytes: byte length in the arena (tensors).
        replicated: every rank holds an identical full copy (DDP parameters);
            restore may read any rank's copy, the durable tier writes one.
        compared: a parameter or optimizer state that every rank holding the
            same chunk must hold bitwise identically; the divergence check
            (:mod:`hpresil.checkpoint.divergence`) compares these.
        value: the JSON value (``kind == "json"``), encoded by
            :mod:`hpresil.checkpoint.flatten`'s codec (tuples, bytes and
            non-string dict keys are tagged objects).
        path: the unflattened key path with its original key types (``int``
            for optimizer state ids), like DCP's ``planner_data``; lets a
            restore rebuild entries its template lacks.
    """

    key: str
    kind: Literal["tensor", "json"]
    dtype: str = ""
    shape: list[int] = dataclasses.field(default_factory=list)
    global_shape: list[int] = dataclasses.field(default_factory=list)
    global_offset: list[int] = dataclasses.field(default_factory=list)
    offset: int = 0
    nbytes: int = 0
    replicated: bool = True
    compared: bool = False
    value: Any = None
    path: list[str | int] | None = None

    def to_json_obj(self) -> dict[str, Any]:
        """The entry as a JSON object (fields that do not apply are left out)."""
        if self.kind == "json":
            obj: dict[str, Any] = {"key": self.key, "kind": "json", "value": self.value}
        else:
            obj = {
                "key": self.key,
                "kind": self.kind,
                "dtype": self.dtype,
                "shape": self.shape,
                "global_shape": self.global_shape,
                "global_offset": self.global_offset,
                "offset": self.offset,
                "nbytes": self.nbytes,
                "replicated": self.replicated,
            }
            if self.compared:
                obj["compared"] = True
        if self.path is not None:
            obj["path"] = self.path
        return obj

    @classmethod
    def from_json_obj(cls, obj: dict[str, Any]) -> "Entry":
        """Parses :meth:`to_json_obj`'s output (unknown fields are ignored)."""
        names = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in obj.items() if k in names})


@dataclasses.dataclass(kw_only=True, slots=True)
class CommitRecord:
    """The record that makes a RAM snapshot count; written after the data.

    Attributes:
        version: :data:`FORMAT_VERSION`.
        commit_id: random id of this commit (binds the seal to it).
        run_id: the job's rendezvous id.
        step: training step the snapshot belongs to.
        rank: global rank that wrote it.
        world_size: world size when it was written.
        slot: arena slot index.
        nbytes: bytes of tensor data in the arena.
        durable: the drainer should copy this snapshot to the durable tier.
        durable_url: where the drainer writes it (resolved ``CheckpointConfig.durable``).
        keep: durable checkpoints to retain (``CheckpointConfig.keep``).
        entries: the layout.
        created: Unix time of the commit.
        timeline: id the ranks agreed on at their last restore; a durable
            checkpoint commits only from markers of one timeline, so markers
            left by an attempt that crashed are never mixed with a newer one's.
        upload_timeout: seconds one durable upload of this snapshot may take
            (``CheckpointConfig.upload_timeout``); 0 leaves it to the drainer's
            own bound.
        loss: the loss given to ``save(step, loss=...)`` (``None``: not given);
            the sealer's spike and non-finite test reads it.
        checked: hex bitmap of the tensor entries (bit ``i``: ``entries``'
            ``i``-th tensor) whose NaN/Inf check already ran: on the device
            (:func:`hpresil.checkpoint.health.device_finite_flags`) or right
            behind the writer's overlapped host copy
            (:func:`hpresil.checkpoint.ram.copier.copy_checked`); the sealer
            probes only those of them named in ``nonfinite``, to confirm.
        nonfinite: those of them found holding NaN/Inf (a device norm that is
            not finite).
    """

    version: int
    commit_id: str
    run_id: str
    step: int
    rank: int
    world_size: int
    slot: int
    nbytes: int
    durable: bool
    durable_url: str | None
    keep: int
    entries: list[Entry]
    created: float
    timeline: str = ""
    upload_timeout: float = 0.0
    loss: float | None = None
    checked: str = ""
    nonfinite: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        """Serialises the record (see :meth:`from_json`)."""
        obj = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "entries"}  # type: ignore[attr-defined]
        obj["entries"] = [e.to_json_obj() for e in self.entries]
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "CommitRecord":
        """Parses a record written by :meth:`to_json`.

        Raises:
            IntegrityError: the text is not a record of :data:`FORMAT_VERSION`
                (malformed JSON, a missing field or a field of the wrong type).
        """
        try:
            obj = json.loads(text)
            if obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {obj.get('version')!r}, expected {FORMAT_VERSION}")
            check_record_fields(obj)
            obj["entries"] = [Entry.from_json_obj(e) for e in obj["entries"]]
            names = cls.__dataclass_fields__  # type: ignore[attr-defined]
            return cls(**{k: v for k, v in obj.items() if k in names})
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise IntegrityError(f"malformed commit record: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dims(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d) and d >= 0 for d in value)


#: Header fields of a commit record and the check each value must pass.
_RECORD_FIELDS: dict[str, Any] = {
    "commit_id": lambda v: isinstance(v, str),
    "run_id": lambda v: isinstance(v, str),
    "step": lambda v: _is_int(v) and v >= 0,
    "rank": lambda v: _is_int(v) and v >= 0,
    "world_size": lambda v: _is_int(v) and v >= 1,
    "slot": lambda v: _is_int(v) and v >= 0,
    "nbytes": lambda v: _is_int(v) and v >= 0,
    "durable": lambda v: isinstance(v, bool),
    "durable_url": lambda v: v is None or isinstance(v, str),
    "keep": _is_int,
    "created": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == v,
    "timeline": lambda v: isinstance(v, str),
}
#: Optional header fields (absent: the dataclass default) and their checks.
_OPTIONAL_FIELDS: dict[str, Any] = {
    "upload_timeout": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf"),
    "loss": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    "checked": lambda v: isinstance(v, str) and all(c in "0123456789abcdef" for c in v),
    "nonfinite": lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
}


def check_record_fields(obj: Any, *, header_only: bool = False) -> None:
    """Checks the types of a commit record's JSON object (its header, and unless
    ``header_only`` its entries), so a damaged record is refused where it is
    parsed rather than failing deep inside a restore.

    Raises:
        ValueError: a field is missing or has the wrong type or range.
    """
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for name, ok in _RECORD_FIELDS.items():
        if name not in obj or not ok(obj[name]):
            raise ValueError(f"field {name!r} is missing or malformed ({obj.get(name)!r})")
    for name, ok in _OPTIONAL_FIELDS.items():
        if name in obj and not ok(obj[name]):
            raise ValueError(f"field {name!r} is malformed ({obj[name]!r})")
    if header_only:
        return
    entries = obj.get("entries")
    if not isinstance(entries, list):
        raise ValueError("entries is not a list")
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("key"), str) or e.get("kind") not in ("tensor", "json"):
            raise ValueError(f"malformed entry {str(e)[:80]}")
        path = e.get("path")
        if path is not None and not (isinstance(path, list) and all(isinstance(p, str) or _is_int(p) for p in path)):
            raise ValueError(f"entry {e['key']!r}: malformed path")
        if e["kind"] != "tensor":
            continue
        shape = e.get("shape")
        gshape, goff = e.get("global_shape"), e.get("global_offset")
        if not (isinstance(e.get("dtype"), str) and _dims(shape) and _dims(gshape) and _dims(goff)
                and len(shape) == len(gshape) == len(goff)
                and all(o + n <= g for o, n, g in zip(goff, shape, gshape))
                and _is_int(e.get("offset")) and e["offset"] >= 0 and _is_int(e.get("nbytes")) and e["nbytes"] >= 0
                and isinstance(e.get("replicated", True), bool) and isinstance(e.get("compared", False), bool)):
            raise ValueError(f"tensor entry {e['key']!r}: malformed dtype, shape, offsets or size")


def record_digest(record: CommitRecord) -> str:
    """``sha256:<hex>`` of ``record``'s canonical JSON without ``slot`` (a
    replica of the same commit lives in another slot). The sealer stores it in
    the seal; readers compare it before trusting a record's layout and plain
    values, which the per-entry checksums do not cover."""
    obj = {f: getattr(record, f) for f in record.__dataclass_fields__ if f not in ("entries", "slot")}  # type: ignore[attr-defined]
    obj["entries"] = [e.to_json_obj() for e in record.entries]
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(kw_only=True, slots=True)
class Seal:
    """Checksums of one committed RAM snapshot (``slot<K>.seal.json``).

    Attributes:
        version: :data:`FORMAT_VERSION`.
        commit_id: the :class:`CommitRecord` it was computed for.
        step: the record's step (for humans and logs).
        rank: the record's rank.
        health: ``ok``, ``suspect`` or ``poisoned`` (:mod:`hpresil.checkpoint.health`).
        causes: why it is not ``ok``: ``nonfinite``, ``spike``, ``divergence``.
        poisoned: entries that became non-finite.
        detail: the verdict for humans.
        replica: ``"<layout>:<digest>"`` (16 hex digits each) of the entries
            marked ``compared``: which chunks they are, and XXH3-64 of their
            checksums in order; empty when the record has none.
        checksums: checksum per tensor entry key.
        sealed: Unix time the seal was written.
        record: :func:`record_digest` of the record (empty in seals written
            without it: the record is then not verified).
    """

    version: int
    commit_id: str
    step: int
    rank: int
    # Health before the checksums: a header-only scan (which stops at
    # "checksums") still sees it.
    health: str = "ok"
    causes: list[str] = dataclasses.field(default_factory=list)
    poisoned: list[str] = dataclasses.field(default_factory=list)
    detail: str = ""
    replica: str = ""
    checksums: dict[str, str]
    sealed: float
    record: str = ""

    def to_json(self) -> str:
        """Serialises the seal (see :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Seal":
        """Parses a seal written by :meth:`to_json`.

        Raises:
            IntegrityError: the text is not a seal of :data:`FORMAT_VERSION`
                (malformed JSON, or a field of the wrong type).
        """
        try:
            obj = json.loads(text)
            if obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {obj.get('version')!r}, expected {FORMAT_VERSION}")
            return cls(**obj).validated()
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise IntegrityError(f"malformed seal: {exc}") from exc

    def validated(self) -> "Seal":
        """``self``, after checking every field's type (also for seals parsed header-only).

        Raises:
            ValueError: a field has the wrong type or an unknown health.
        """
        sums = self.checksums
        if not (isinstance(self.commit_id, str) and _is_int(self.step) and _is_int(self.rank)
                and self.health in ("ok", "suspect", "poisoned") and isinstance(self.detail, str)
                and isinstance(self.replica, str)
                and all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in (self.causes, self.poisoned))
                and isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())
                and isinstance(self.sealed, (int, float)) and isinstance(self.record, str)):
            raise ValueError("a field has the wrong type")
        return self


def rank_dir(shm_dir: str, rank: int) -> str:
    """``<shm_dir>/ckpt/rank<R>``: the RAM snapshots of global rank ``rank``."""
    return os.path.join(shm_dir, "ckpt", f"rank{rank}")


def slot_path(shm_dir: str, rank: int, slot: int, suffix: Literal["bin", "json", "seal.json", "reclaim"]) -> str:
    """``<shm_dir>/ckpt/rank<R>/slot<K>.<suffix>`` (``reclaim``: the writer's
    request that readers release the slot, see :mod:`hpresil.checkpoint.ram.slots`)."""
    return os.path.join(rank_dir(shm_dir, rank), f"slot{slot}.{suffix}")


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A snapshot some tier can serve: which step, which tier, which ranks, and
    whether any of those ranks' seals found it unhealthy (``suspect`` or
    ``poisoned``, :mod:`hpresil.checkpoint.health`)."""

    tier: TierName
    step: int
    world_size: int
    ranks: frozenset[int]
    health: str = "ok"


class SnapshotSource(Protocol):
    """A tier as the restore path sees it: which snapshots exist, their layouts,
    and the bytes of one entry of one rank, verified.

    The restore path asks each source in tier order (ram, peer, durable); all
    ranks agree collectively on the newest step that every rank can load, then
    each rank reads the entries (or the overlapping slices of other ranks'
    entries, when the world size changed) it needs. Sources subclass this
    Protocol, so the optional hooks below :meth:`read` inherit their defaults.
    """

    tier: TierName
    #: What this tier holds is known on its own node only: before choosing a
    #: step, every rank's :meth:`share` is gathered and handed to :meth:`pool`
    #: (one all-gather for all such tiers). The same on every rank.
    pooled: bool = False

    def steps(self) -> list[SnapshotRef]:
        """Snapshots this source can serve, newest first (metadata only, cheap)."""
        ...

    def records(self, step: int) -> dict[int, CommitRecord]:
        """Layouts of ``step`` per saving rank (only ranks this source holds)."""
        ...

    def read(self, step: int, rank: int, entry: Entry, out: "torch.Tensor") -> None:
        """Copies the bytes of ``entry`` saved by ``rank`` at ``step`` into ``out``.

        Args:
            out: a contiguous ``uint8`` CPU tensor of ``entry.nbytes`` bytes.

        Raises:
            IntegrityError: the bytes fail their checksum.
            StorageError: the bytes cannot be read.
        """
        ...

    # -- optional hooks ------------------------------------------------------
    def read_many(self, step: int, items: "Sequence[tuple[int, Entry, torch.Tensor]]") -> None:
        """:meth:`read` for many ``(rank, entry, out)`` at once; a tier that can
        read in parallel overrides it (the restore path batches the entries it
        reads in place). Default: one after the other."""
        for rank, entry, out in items:
            self.read(step, rank, entry, out)

    def share(self) -> Any:
        """With :attr:`pooled`: what this rank contributes (plain JSON values)."""
        return None

    def pool(self, shares: "Sequence[Any]") -> None:
        """With :attr:`pooled`: every rank's :meth:`share`, in rank order."""

    def close(self) -> None:
        """Releases what the restore held (locks, connections, threads)."""
