"""On-storage layout of the durable tier: DCP-compatible files plus hpresil's JSON.

One checkpoint is one directory::

    step_0000000042/
        __<R>_0.distcp              rank R's items, each a ``torch.save`` zip (DCP's format)
        .metadata                   pickled DCP ``Metadata`` (for ``dcp.load``; hpresil never reads it)
        .hpresil/rank<R>.json       rank R's layout, checksums and item locations (its "done" marker)
        .hpresil/manifest.json      written last: the commit marker

A tensor item is the exact byte sequence ``torch.save(tensor)`` produces, but
built as *envelope prefix + raw bytes + envelope suffix*: the envelope comes
from ``torch.save`` under :class:`torch.serialization.skip_data` (which leaves
the data record's CRC at 0, accepted by ``torch.load``), so the raw bytes
stream straight from the shared-memory arena without an extra copy. hpresil's
own reader reads the raw byte range recorded in ``rank<R>.json`` and verifies
its checksum; it never unpickles anything from storage. JSON values are also
written as ``torch.save`` bytes so that ``dcp.load`` restores them, but hpresil
takes them from ``rank<R>.json``.

Replicated entries are written once, by an owner rank chosen by a size-balanced
greedy assignment that every node computes identically from its own records.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io
import json
import pickle
import re
from typing import Any, Iterable, Union

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, CommitRecord, Entry, check_record_fields
from hpresil.checkpoint.flatten import decode_json, dtype_from_name
from hpresil.errors import CheckpointError, IntegrityError

__all__ = [
    "LAYOUT_VERSION",
    "MANIFEST",
    "META_DIR",
    "verdict_json",
    "ArenaSlice",
    "Segment",
    "step_dir",
    "parse_step_dir",
    "data_file",
    "rank_json",
    "manifest_json",
    "record_from_obj",
    "record_to_obj",
    "tensor_envelope",
    "assign_owners",
    "plan_rank_file",
    "build_dcp_metadata",
    "build_manifest",
    "parse_manifest",
]

LAYOUT_VERSION = 1
META_DIR = ".hpresil"
MANIFEST = f"{META_DIR}/manifest.json"
_STEP_RE = re.compile(r"^step_(\d{10,})$")


@dataclasses.dataclass(frozen=True, slots=True)
class ArenaSlice:
    """A byte range of the rank's shared-memory arena (resolved by the writer)."""

    offset: int
    nbytes: int


#: A piece of a data file: literal bytes or a range of the arena.
Segment = Union[bytes, ArenaSlice]


def step_dir(step: int) -> str:
    """Name of the directory of ``step`` (sorts lexically in step order)."""
    return f"step_{step:010d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a directory name, or ``None`` when it is not a step directory."""
    m = _STEP_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def data_file(rank: int) -> str:
    """DCP's data file name for ``rank`` (one file per rank)."""
    return f"__{rank}_0.distcp"


def rank_json(rank: int) -> str:
    """Path (relative to the step directory) of rank ``rank``'s record."""
    return f"{META_DIR}/rank{rank}.json"


def manifest_json() -> str:
    """Path (relative to the step directory) of the commit marker."""
    return MANIFEST


def verdict_json() -> str:
    """Path (relative to the step directory) of the marker that a rollback
    abandoned the step (its state is suspect: restore prefers any healthy step)."""
    return f"{META_DIR}/unhealthy.json"


def record_from_obj(obj: Any) -> CommitRecord:
    """Builds a :class:`CommitRecord` from its JSON object, ignoring unknown fields
    (``rank<R>.json`` adds ``checksum``/``loc``/``owner`` to entries).

    Raises:
        IntegrityError: required fields are missing or malformed.
    """
    try:
        check_record_fields(obj)
        rec_names = {f.name for f in dataclasses.fields(CommitRecord)}
        entries = [Entry.from_json_obj(e) for e in obj["entries"]]
        fields = {k: v for k, v in obj.items() if k in rec_names and k != "entries"}
        return CommitRecord(entries=entries, **fields)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise IntegrityError(f"malformed commit record: {exc}") from exc


def record_to_obj(record: CommitRecord) -> dict[str, Any]:
    """The JSON object of a record, as the RAM tier writes it (:meth:`CommitRecord.to_json`)."""
    return json.loads(record.to_json())


class _SkipWriter:
    """A seekable sink that keeps what ``torch.save`` writes and records the one skipped range."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.skip: tuple[int, int] | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.buf += view
        self.pos += view.nbytes
        return view.nbytes

    def seek(self, off: int, whence: int = 0) -> int:
        target = off if whence == 0 else self.pos + off
        if whence not in (0, 1) or self.skip is not None or target < self.pos:
            raise CheckpointError("unexpected seek while building a torch.save envelope")
        self.skip = (self.pos, target - self.pos)
        self.pos = target
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass


@functools.lru_cache(maxsize=4096)
def tensor_envelope(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[bytes, bytes]:
    """The bytes ``torch.save`` writes before and after a tensor's raw data.

    ``prefix + raw + suffix`` is a valid ``torch.save`` file of a contiguous
    tensor of ``dtype`` and ``shape`` whose bytes are ``raw``. Position-independent,
    hence cached per (dtype, shape).

    Raises:
        CheckpointError: this torch writes the zip in an unexpected way.
    """
    # torch.empty only reserves address space; skip_data never touches it.
    template = torch.empty(shape, dtype=dtype)
    sink = _SkipWriter()
    with torch.serialization.skip_data():
        torch.save(template, sink)
    nbytes = template.numel() * template.element_size()
    if nbytes == 0:
        return bytes(sink.buf), b""
    if sink.skip is None or sink.skip[1] != nbytes:
        raise CheckpointError(f"torch.save envelope for {dtype}{list(shape)} has no data gap of {nbytes} bytes")
    start = sink.skip[0]
    return bytes(sink.buf[:start]), bytes(sink.buf[start:])


def assign_owners(entries: Iterable[Entry], world_size: int) -> dict[str, int]:
    """Chooses the rank that writes each replicated entry.

    Greedy bin packing by size (largest first, ties by key; least-loaded rank,
    ties to the lowest rank). Deterministic in the replicated entries alone, so
    every node computes the same owners from its own ranks' records.

    Returns:
        ``key -> owner rank`` for replicated entries.
    """
    # Plain values weigh by their key, not their value: per-rank values (the
    # hang calibration) have rank-dependent JSON sizes, and owners must not.
    items = sorted(
        ((e.nbytes if e.kind == "tensor" else len(e.key), e.key) for e in entries if e.replicated),
        key=lambda it: (-it[0], it[1]),
    )
    heap = [(0, r) for r in range(max(1, world_size))]
    owners: dict[str, int] = {}
    for size, key in items:
        load, rank = heapq.heappop(heap)
        owners[key] = rank
        heapq.heappush(heap, (load + size, rank))
    return owners


def _json_blob(value: Any) -> bytes:
    # dcp.load unpickles this: store the decoded Python value (tuples, bytes...)
    value = decode_json(value)
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def plan_rank_file(
    record: CommitRecord, checksums: dict[str, str], owners: dict[str, int]
) -> tuple[list[Segment], dict[str, Any]]:
    """Lays out rank ``record.rank``'s data file and its ``rank<R>.json``.

    Args:
        record: the rank's commit record.
        checksums: ``key -> checksum`` of every tensor entry (from the seal).
        owners: replicated entry owners from :func:`assign_owners`.

    Returns:
        The segments of the data file (literal bytes and arena ranges), and the
        JSON object of the rank's record (layout, checksums and locations).

    Raises:
        IntegrityError: a tensor entry has no checksum.
    """
    fname = data_file(record.rank)
    segments: list[Segment] = []
    pos = 0
    out_entries: list[dict[str, Any]] = []
    for entry in record.entries:
        obj = entry.to_json_obj()
        owner = owners.get(entry.key, record.rank) if entry.replicated else record.rank
        if entry.kind == "tensor":
            if entry.key not in checksums:
                raise IntegrityError(f"seal of rank {record.rank} step {record.step} lacks entry {entry.key!r}")
            obj["checksum"] = checksums[entry.key]
        if owner != record.rank:
            obj["owner"] = owner
            out_entries.append(obj)
            continue
        if entry.kind == "tensor":
            prefix, suffix = tensor_envelope(dtype_from_name(entry.dtype), tuple(entry.shape))
            segments.append(prefix)
            data_at = pos + len(prefix)
            if entry.nbytes:
                segments.append(ArenaSlice(entry.offset, entry.nbytes))
            if suffix:
                segments.append(suffix)
            length = len(prefix) + entry.nbytes + len(suffix)
            obj["loc"] = {"file": fname, "blob_offset": pos, "blob_length": length, "data_offset": data_at}
        else:
            blob = _json_blob(entry.value)
            segments.append(blob)
            length = len(blob)
            obj["loc"] = {"file": fname, "blob_offset": pos, "blob_length": length}
        pos += length
        out_entries.append(obj)
    rec = record_to_obj(record)
    rec["entries"] = out_entries
    rec["layout_version"] = LAYOUT_VERSION
    rec["file"] = fname
    rec["file_bytes"] = pos
    return segments, rec


def build_dcp_metadata(rank_records: dict[int, dict[str, Any]], *, run_id: str, step: int) -> bytes:
    """Pickles DCP's ``Metadata`` for a checkpoint made of ``rank_records``.

    Deterministic: any node that sees the same rank records writes the same bytes.
    Where several ranks hold the same chunk (non-replicated entries saved
    identically by several ranks), the lowest rank's copy is the one DCP reads.

    Raises:
        IntegrityError: ranks disagree on an entry's dtype, kind or global shape.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd_meta: dict[str, Any] = {}
    paths: dict[str, tuple[Any, ...]] = {}
    storage: dict[Any, Any] = {}
    seen_chunks: dict[str, set[tuple[int, ...]]] = {}
    for rank in sorted(rank_records):
        for e in rank_records[rank]["entries"]:
            loc = e.get("loc")
            key = e["key"]
            if key not in paths:
                paths[key] = tuple(e["path"]) if e.get("path") else (key,)
            if e["kind"] == "json":
                if key in sd_meta and not isinstance(sd_meta[key], BytesStorageMetadata):
                    raise IntegrityError(f"entry {key!r} is a tensor on one rank and JSON on rank {rank}")
                sd_meta.setdefault(key, BytesStorageMetadata())
                if loc is not None and MetadataIndex(key) not in storage:
                    storage[MetadataIndex(key)] = _StorageInfo(loc["file"], loc["blob_offset"], loc["blob_length"])
                continue
            gshape = tuple(e.get("global_shape") or e["shape"])
            goff = tuple(e.get("global_offset") or [0] * len(e["shape"]))
            md = sd_meta.get(key)
            if md is None:
                md = TensorStorageMetadata(
                    properties=TensorProperties(dtype=dtype_from_name(e["dtype"])),
                    size=torch.Size(gshape),
                    chunks=[],
                )
                sd_meta[key] = md
                seen_chunks[key] = set()
            elif not isinstance(md, TensorStorageMetadata) or tuple(md.size) != gshape or (
                md.properties.dtype != dtype_from_name(e["dtype"])
            ):
                raise IntegrityError(f"ranks disagree on dtype or global shape of entry {key!r} (rank {rank})")
            if loc is None or goff in seen_chunks[key]:
                continue
            seen_chunks[key].add(goff)
            md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(goff), sizes=torch.Size(e["shape"])))
            storage[MetadataIndex(key, goff)] = _StorageInfo(loc["file"], loc["blob_offset"], loc["blob_length"])
    for md in sd_meta.values():
        if isinstance(md, TensorStorageMetadata):
            md.chunks.sort(key=lambda c: tuple(c.offsets))
    metadata = Metadata(
        state_dict_metadata=dict(sorted(sd_meta.items())),
        planner_data={key: paths[key] for key in sorted(sd_meta)},
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=None, save_id=f"hpresil:{run_id}:{step}"),
        version="1.0.0",
    )
    return pickle.dumps(metadata, protocol=4)


def build_manifest(rank_records: dict[int, dict[str, Any]], *, world_size: int,
                   digests: dict[int, str] | None = None) -> bytes:
    """The commit marker's bytes (deterministic in the rank records).

    Args:
        digests: ``sha256:<hex>`` of each rank's ``rank<R>.json`` as committed;
            readers refuse a rank record that changed since.
    """
    any_rec = rank_records[min(rank_records)]
    obj = {
        "format": "hpresil-durable",
        "version": LAYOUT_VERSION,
        "record_version": FORMAT_VERSION,
        "step": any_rec["step"],
        "run_id": any_rec["run_id"],
        "world_size": world_size,
        "created": max(r["created"] for r in rank_records.values()),
        "total_bytes": sum(r["file_bytes"] for r in rank_records.values()),
        "metadata": ".metadata",
        "ranks": {
            str(r): {"commit_id": rec["commit_id"], "file": rec["file"], "bytes": rec["file_bytes"],
                     **({"sha256": digests[r]} if digests and r in digests else {})}
            for r, rec in sorted(rank_records.items())
        },
    }
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def parse_manifest(data: bytes, step: int) -> dict[str, Any]:
    """Parses and checks a manifest read from ``step``'s directory.

    Raises:
        IntegrityError: it is not valid JSON or is inconsistent (step, ranks).
    """
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("format") != "hpresil-durable":
            raise ValueError("not an hpresil manifest")
        if int(obj["version"]) > LAYOUT_VERSION:
            raise ValueError(f"layout version {obj['version']} is newer than this hpresil ({LAYOUT_VERSION})")
        if int(obj["step"]) != step:
            raise ValueError(f"manifest says step {obj['step']}")
        world = int(obj["world_size"])
        ranks = sorted(int(r) for r in obj["ranks"])
        if len(ranks) != world or ranks != list(range(world)):  # the length first: world may be huge
            raise ValueError(f"ranks {sorted(obj['ranks'])} do not cover world_size {world}")
        for r, info in obj["ranks"].items():
            if not isinstance(info, dict) or not isinstance(info.get("commit_id"), str) or (
                    not isinstance(info.get("sha256", ""), str)):
                raise ValueError(f"rank {r}: malformed entry {str(info)[:80]}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"manifest of step {step} is malformed: {exc}") from exc
    return obj

