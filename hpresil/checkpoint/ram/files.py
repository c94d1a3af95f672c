"""The RAM tier's files as readers see them (format in :mod:`.api`).

Parsing records and seals (header-only for cheap scans), listing committed
slots, the shared lock readers take, and dropping records. Used by the
restore path, the sealer and the writer; the durable drainer may use them too.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch

from hpresil.checkpoint.api import FORMAT_VERSION, CommitRecord, Seal, check_record_fields, slot_path
from hpresil.errors import IntegrityError, StorageError

__all__ = [
    "SlotInfo",
    "scan",
    "read_record",
    "read_seal",
    "lock_shared",
    "frombuffer",
    "write_atomic",
    "unlink",
    "drop_newer",
    "ScanCache",
    "cached_parse",
]

log = logging.getLogger(__name__)


def frombuffer(buf: Any) -> torch.Tensor:
    """A ``uint8`` tensor over a (possibly read-only) buffer, without the
    non-writable-buffer warning: readers never write through it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


def unlink(path: str) -> None:
    """Removes ``path`` if it exists."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file and renames it over ``path``."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _parse_head(data: bytes, tail_key: bytes) -> dict[str, Any] | None:
    # Records and seals put their one large field last; the small fields before
    # it are all a scan needs, and parsing only them keeps scans cheap when a
    # record lists thousands of entries.
    cut = data.find(b',"' + tail_key + b'":')
    if cut < 0:
        return None
    try:
        obj = json.loads(data[:cut] + b"}")
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def read_record(path: str, *, header_only: bool = False) -> CommitRecord | None:
    """The commit record at ``path``, or ``None`` when absent or malformed.

    Args:
        header_only: skip the entries (``entries`` is empty): cheap, for scans.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if header_only:
            head = _parse_head(data, b"entries")
            if head is not None and head.get("version") == FORMAT_VERSION:
                try:
                    check_record_fields(head, header_only=True)
                except ValueError as exc:
                    raise IntegrityError(f"malformed commit record: {exc}") from exc
                names = CommitRecord.__dataclass_fields__  # type: ignore[attr-defined]
                return CommitRecord(**{k: v for k, v in head.items() if k in names}, entries=[])
        return CommitRecord.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, IntegrityError, TypeError) as exc:
        log.warning("ignoring unreadable commit record %s: %s", path, exc)
        return None


def read_seal(path: str, commit_id: str | None, *, header_only: bool = False) -> Seal | None:
    """The seal at ``path`` when it belongs to ``commit_id`` (any when ``None``).

    Args:
        header_only: skip the checksums (``checksums`` is empty): cheap, for scans.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        seal = None
        if header_only:
            head = _parse_head(data, b"checksums")
            if head is not None and head.get("version") == FORMAT_VERSION:
                try:
                    seal = Seal(**head, checksums={}, sealed=0.0).validated() if "sealed" not in head else None
                except ValueError as exc:
                    raise IntegrityError(f"malformed seal: {exc}") from exc
        if seal is None:
            seal = Seal.from_json(data)
    except FileNotFoundError:
        return None
    except (OSError, IntegrityError, TypeError) as exc:
        log.warning("ignoring unreadable seal %s: %s", path, exc)
        return None
    return seal if commit_id is None or seal.commit_id == commit_id else None


def lock_shared(fd: int, timeout: float | None) -> bool:
    """Takes ``LOCK_SH`` on ``fd``; ``timeout=None`` tries once, else polls.

    Returns:
        Whether the lock was taken.
    """
    deadline = time.monotonic() + (timeout or 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if timeout is None or time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


@dataclasses.dataclass(slots=True)
class SlotInfo:
    """A committed slot found by :func:`scan` (headers only: cheap to list).

    Attributes:
        rank: the rank directory it is in.
        slot: slot index.
        record: its commit record, without entries (see :meth:`load_record`).
        seal: its seal without checksums (see :meth:`load_seal`), when present
            and bound to the record.
    """

    rank: int
    slot: int
    record: CommitRecord
    seal: Seal | None

    def path(self, shm_dir: str, suffix: str = "bin") -> str:
        """The slot's file with ``suffix``."""
        return slot_path(shm_dir, self.rank, self.slot, suffix)  # type: ignore[arg-type]

    def load_record(self, shm_dir: str) -> CommitRecord:
        """The full record (with entries).

        Raises:
            StorageError: the slot was rewritten since the scan.
        """
        record = read_record(self.path(shm_dir, "json"))
        if record is None or record.commit_id != self.record.commit_id:
            raise StorageError(f"RAM snapshot {self.path(shm_dir)} (step {self.record.step}) was replaced since it was listed")
        return record

    def load_seal(self, shm_dir: str) -> Seal:
        """The full seal (with checksums).

        Raises:
            StorageError: the seal is gone or belongs to another commit.
        """
        seal = read_seal(self.path(shm_dir, "seal.json"), self.record.commit_id)
        if seal is None:
            raise StorageError(f"RAM snapshot {self.path(shm_dir)} (step {self.record.step}) lost its seal")
        return seal


#: Parsed files by path, with the (inode, mtime, size) they were parsed at.
ScanCache = dict[str, tuple[tuple[int, int, int], Any]]


def cached_parse(path: str, cache: ScanCache | None, parse: Callable[[], Any]) -> Any:
    """``parse()``, or its earlier result when ``path`` has not changed."""
    # Records are replaced by rename, so (inode, mtime, size) identifies a version.
    if cache is None:
        return parse()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        cache.pop(path, None)
        return None
    ident = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = cache.get(path)
    if hit is not None and hit[0] == ident:
        return hit[1]
    value = parse()
    cache[path] = (ident, value)
    return value


def scan(shm_dir: str, ranks: Sequence[int] | None = None, cache: ScanCache | None = None) -> list[SlotInfo]:
    """Every committed slot under ``shm_dir`` (all ranks, or ``ranks``), with seals.

    Args:
        cache: a dict kept by the caller between scans; unchanged records and
            seals are then not parsed again (a record can be megabytes).
    """
    base = os.path.join(shm_dir, "ckpt")
    found: list[SlotInfo] = []
    if ranks is None:
        try:
            names = [n for n in os.listdir(base) if n.startswith("rank") and n[4:].isdigit()]
        except FileNotFoundError:
            return found
    else:  # the caller's ranks only: no listing of every rank's directory
        names = [f"rank{r}" for r in ranks]
    for name in names:
        rank = int(name[4:])
        folder = os.path.join(base, name)
        try:
            files = os.listdir(folder)
        except FileNotFoundError:
            continue
        for fname in files:
            if not (fname.startswith("slot") and fname.endswith(".json")) or fname.endswith(".seal.json"):
                continue
            num = fname[4:-5]
            if not num.isdigit():
                continue
            path = os.path.join(folder, fname)
            record = cached_parse(path, cache, lambda: read_record(path, header_only=True))
            if record is None or record.rank != rank or record.slot != int(num):
                continue
            spath = slot_path(shm_dir, rank, int(num), "seal.json")
            seal = cached_parse(spath, cache, lambda: read_seal(spath, None, header_only=True))
            if seal is not None and seal.commit_id != record.commit_id:
                seal = None
            found.append(SlotInfo(rank=rank, slot=int(num), record=record, seal=seal))
    return found


def drop_newer(shm_dir: str, rank: int, step: int, commits: dict[int, tuple[int, float, str]] | None = None) -> list[int]:
    """Removes the records (not the data) of ``rank``'s snapshots newer than ``step``.

    Only the record is unlinked, which cannot disturb a reader that holds the
    slot's lock: it already has the record and the bytes do not change.
    """
    dropped = []
    for info in scan(shm_dir, [rank]):
        if info.record.step > step:
            unlink(slot_path(shm_dir, rank, info.slot, "json"))
            unlink(slot_path(shm_dir, rank, info.slot, "seal.json"))
            if commits is not None:
                commits.pop(info.slot, None)
            dropped.append(info.record.step)
    return sorted(dropped)
