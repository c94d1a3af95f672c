"""Contract of tiered checkpointing.

Tiers, fastest first: ``ram`` (this node's shared memory), ``peer`` (other
nodes' RAM, see issue 4) and ``durable`` (fsspec: ``file://`` or ``s3://``).

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

The seal (:class:`Seal`, JSON) holds one ``sum64`` checksum per tensor entry
(:mod:`hpresil.checkpoint.integrity`) and the ``commit_id`` of the record it
was computed for; a seal whose ``commit_id`` differs from the slot's current
record is stale and ignored. Only sealed snapshots are trusted when
``CheckpointConfig.verify_on_restore`` is set: a commit proves the copy
finished, a seal lets a reader prove the bytes did not change since.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

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
        upload_timeout: bound on one durable upload attempt.
        verify_on_restore: check checksums before trusting a snapshot.
    """

    every: int = 1
    durable: str | None = None
    durable_every: int = 50
    keep: int = 3
    slots: int = 3
    upload_timeout: timedelta = timedelta(minutes=10)
    verify_on_restore: bool = True

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

    def to_json(self) -> str:
        """Serialises the record (see :meth:`from_json`)."""
        obj = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "entries"}  # type: ignore[attr-defined]
        obj["entries"] = [e.to_json_obj() for e in self.entries]
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "CommitRecord":
        """Parses a record written by :meth:`to_json`.

        Raises:
            IntegrityError: the text is not a record of :data:`FORMAT_VERSION`.
        """
        try:
            obj = json.loads(text)
            if obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {obj.get('version')!r}, expected {FORMAT_VERSION}")
            obj["entries"] = [Entry.from_json_obj(e) for e in obj["entries"]]
            names = cls.__dataclass_fields__  # type: ignore[attr-defined]
            return cls(**{k: v for k, v in obj.items() if k in names})
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise IntegrityError(f"malformed commit record: {exc}") from exc


@dataclasses.dataclass(kw_only=True, slots=True)
class Seal:
    """Checksums of one committed RAM snapshot (``slot<K>.seal.json``).

    Attributes:
        version: :data:`FORMAT_VERSION`.
        commit_id: the :class:`CommitRecord` it was computed for.
        step: the record's step (for humans and logs).
        rank: the record's rank.
        checksums: ``sum64`` checksum per tensor entry key.
        sealed: Unix time the seal was written.
    """

    version: int
    commit_id: str
    step: int
    rank: int
    checksums: dict[str, str]
    sealed: float

    def to_json(self) -> str:
        """Serialises the seal (see :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Seal":
        """Parses a seal written by :meth:`to_json`.

        Raises:
            IntegrityError: the text is not a seal of :data:`FORMAT_VERSION`.
        """
        try:
            obj = json.loads(text)
            if obj.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {obj.get('version')!r}, expected {FORMAT_VERSION}")
            return cls(**obj)
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"malformed seal: {exc}") from exc


def rank_dir(shm_dir: str, rank: int) -> str:
    """``<shm_dir>/ckpt/rank<R>``: the RAM snapshots of global rank ``rank``."""
    return os.path.join(shm_dir, "ckpt", f"rank{rank}")


def slot_path(shm_dir: str, rank: int, slot: int, suffix: Literal["bin", "json", "seal.json"]) -> str:
    """``<shm_dir>/ckpt/rank<R>/slot<K>.<suffix>``."""
    return os.path.join(rank_dir(shm_dir, rank), f"slot{slot}.{suffix}")


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A snapshot some tier can serve: which step, which tier, which ranks."""

    tier: TierName
    step: int
    world_size: int
    ranks: frozenset[int]


class SnapshotSource(Protocol):
    """A tier as the restore path sees it: which snapshots exist, their layouts,
    and the bytes of one entry of one rank, verified.

    The restore path asks each source in tier order (ram, peer, durable); all
    ranks agree collectively on the newest step that every rank can load, then
    each rank reads the entries (or the overlapping slices of other ranks'
    entries, when the world size changed) it needs.
    """

    tier: TierName

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
