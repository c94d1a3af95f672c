"""Contract of the durable tier's storage backends.

A :class:`DurableStore` deals in paths relative to its root and in byte
buffers; it knows nothing of the checkpoint layout (see
:mod:`hpresil.checkpoint.durable.layout`). Backends live beside this module,
one per module, and :mod:`hpresil.checkpoint.durable.stores` opens the one a
URL's scheme names. A backend module provides an opener::

    def open_xyz(url: str, rest: str, options: dict[str, Any], probe_timeout: float) -> DurableStore

(``rest``: the URL after ``scheme://``; ``options``: the caller's storage
options, which the opener must consume or refuse) that checks the store can be
used and fails within ``probe_timeout`` seconds with a message naming the fix.
"""

from __future__ import annotations

import abc
import re
import time
from typing import Any, Callable, Sequence, Union

from hpresil.errors import StorageError

__all__ = ["Buffer", "buffer_nbytes", "DurableStore", "Opener", "Deadline", "Progress", "redact"]

#: What stores write: literal bytes or views of the shared-memory arena.
Buffer = Union[bytes, bytearray, memoryview]


#: A write's progress callback: the bytes just taken by the store.
Progress = Callable[[int], None]


def redact(url: str) -> str:
    """``url`` with a password it carries (``ftp://user:pass@host``) masked, for messages and logs."""
    return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)


def buffer_nbytes(buf: Buffer) -> int:
    """Length in bytes of a buffer (a memoryview's ``len`` counts items, not bytes)."""
    return memoryview(buf).nbytes


class DurableStore(abc.ABC):
    """A place that holds durable checkpoints; paths are relative to its root.

    Every method raises :class:`~hpresil.errors.StorageError` (or
    ``FileNotFoundError`` where stated) on failure.
    """

    url: str

    @abc.abstractmethod
    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None,
                    progress: Progress | None = None) -> int:
        """Writes each file as the concatenation of its buffers; returns total bytes.

        Not atomic: a partial file may remain after a failure (the layout's
        markers make it invisible).

        Args:
            timeout: seconds the whole call may take; past it the write is
                abandoned with a :class:`~hpresil.errors.StorageError` (at the
                next buffer a blocking backend hands to the OS).
            progress: called with the bytes of each piece the store has taken
                (a part, a buffer), from whatever thread wrote it; the drainer
                tells a stalled upload from a slow one by it.
        """

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Writes a small file atomically (readers see the old or the new bytes)."""

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """Reads a whole (small) file.

        Raises:
            FileNotFoundError: it does not exist.
        """

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        """Reads several small files (``None`` for missing or unreadable ones)."""
        out: dict[str, bytes | None] = {}
        for p in paths:
            try:
                out[p] = self.read_bytes(p)
            except (FileNotFoundError, StorageError):
                out[p] = None
        return out

    @abc.abstractmethod
    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        """Fills ``out`` with the bytes of ``path`` starting at ``offset``.

        Raises:
            FileNotFoundError: the file does not exist.
            StorageError: it is shorter than requested or unreadable.
        """

    @abc.abstractmethod
    def size(self, path: str) -> int | None:
        """Size of a file in bytes; ``None`` when it does not exist."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) in directory ``path`` (``""``: the root); [] when missing."""

    @abc.abstractmethod
    def delete(self, paths: Sequence[str]) -> None:
        """Deletes files; missing ones are fine."""

    @abc.abstractmethod
    def delete_tree(self, path: str) -> None:
        """Deletes a directory and everything under it; a missing one is fine."""

    def close(self) -> None:
        """Releases resources (connections)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


#: A backend's opener: ``(url, rest after "scheme://", storage options, probe timeout) -> store``.
Opener = Callable[[str, str, "dict[str, Any]", float], DurableStore]


class Deadline:
    """The bound of one ``write_files`` call, checked between the buffers a
    blocking backend writes (an OS write in progress cannot be interrupted)."""

    def __init__(self, timeout: float | None, what: str) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._what = what

    def check(self) -> None:
        """Raises :class:`~hpresil.errors.StorageError` once the bound has passed."""
        if self._end is not None and time.monotonic() > self._end:
            raise StorageError(f"upload to {self._what} took longer than its {self._timeout:.0f}s bound "
                               "(CheckpointConfig.upload_timeout); abandoned, retried later")
