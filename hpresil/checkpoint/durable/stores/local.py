"""The durable tier in a local (or mounted) directory: ``file:///abs/path``.

Data files are written, fsynced and renamed into place; small files are
replaced atomically, so readers see the old or the new bytes.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Sequence

from hpresil.checkpoint.durable.stores.api import Buffer, Deadline, DurableStore, Progress, buffer_nbytes
from hpresil.errors import ConfigError, StorageError

__all__ = ["LocalStore", "open_local", "open_path"]

log = logging.getLogger(__name__)

#: Bytes one writev hands the OS per buffer: the upload bound is checked between calls.
_WRITE_MAX = 256 << 20


class LocalStore(DurableStore):
    """A directory on a local or shared POSIX filesystem (``file://``).

    Args:
        root: absolute directory path (created if missing).
        fsync: flush data and directory entries to stable storage before the
            commit marker is written, so a checkpoint that committed survives a
            host crash (DCP's ``sync_files`` does the same).
    """

    def __init__(self, root: str, *, fsync: bool = True) -> None:
        self.root = root
        self.url = "file://" + root
        self.fsync = fsync

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def _sync_dir(self, path: str) -> None:
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None,
                    progress: Progress | None = None) -> int:
        # one thread per file (a few): on a parallel filesystem (NFS, Lustre) streams add up
        deadline = Deadline(timeout, self.url)
        try:
            if len(files) <= 1:
                total = sum(self._write_one(path, bufs, deadline, progress) for path, bufs in files)
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=min(4, len(files)), thread_name_prefix="hpresil-fwrite") as pool:
                    total = sum(pool.map(lambda item: self._write_one(*item, deadline, progress), files))
            for d in sorted({os.path.dirname(self._p(path)) for path, _ in files}):
                self._sync_dir(d)  # the new directory entries, too
            return total
        except OSError as exc:
            raise StorageError(f"cannot write {self.url}: {exc}") from exc

    def _write_one(self, path: str, bufs: Sequence[Buffer], deadline: Deadline, progress: Progress | None) -> int:
        full = self._p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        total = 0
        try:
            views = [memoryview(b).cast("B") for b in bufs if buffer_nbytes(b)]
            i = 0
            while i < len(views):  # writev takes at most IOV_MAX buffers and may write short
                deadline.check()
                n = os.writev(fd, [v[:_WRITE_MAX] for v in views[i : i + 512]])
                total += n
                if progress is not None:
                    progress(n)
                while i < len(views) and n >= views[i].nbytes:
                    n -= views[i].nbytes
                    i += 1
                if n:
                    views[i] = views[i][n:]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return total

    def write_bytes(self, path: str, data: bytes) -> None:
        full = self._p(path)
        tmp = f"{full}.tmp.{uuid.uuid4().hex[:12]}"
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, full)
            self._sync_dir(os.path.dirname(full))
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StorageError(f"cannot write {full}: {exc}") from exc

    def read_bytes(self, path: str) -> bytes:
        try:
            with open(self._p(path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot read {self._p(path)}: {exc}") from exc

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        full = self._p(path)
        try:
            with open(full, "rb", buffering=0) as f:
                f.seek(offset)
                got = 0
                while got < out.nbytes:
                    n = f.readinto(out[got:])
                    if not n:
                        raise StorageError(f"{full} is truncated: wanted {out.nbytes} bytes at {offset}, got {got}")
                    got += n
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot read {full}: {exc}") from exc

    def size(self, path: str) -> int | None:
        try:
            return os.stat(self._p(path)).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {self._p(path)}: {exc}") from exc

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self._p(path)}: {exc}") from exc

    def delete(self, paths: Sequence[str]) -> None:
        for p in paths:
            try:
                os.unlink(self._p(p))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(f"cannot delete {self._p(p)}: {exc}") from exc

    def delete_tree(self, path: str) -> None:
        import shutil

        try:
            shutil.rmtree(self._p(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {self._p(path)}: {exc}") from exc


def open_local(url: str, rest: str, options: dict[str, Any], probe_timeout: float) -> LocalStore:
    """Opener of ``file://`` URLs (see :mod:`~.api`).

    Raises:
        ConfigError: the path is not absolute, or an option is unknown.
        StorageError: the directory is not writable.
    """
    if not rest.startswith("/"):
        raise ConfigError(f"durable URL {url!r}: file URLs need an absolute path, file:///abs/path (three slashes)")
    return open_path(os.path.normpath(rest), url, options)


def open_path(root: str, url: str, options: dict[str, Any]) -> LocalStore:
    """A :class:`LocalStore` at directory ``root`` (a plain path given as the URL), probed by a write.

    Raises:
        ConfigError: an option is unknown.
        StorageError: the directory is not writable.
    """
    fsync = bool(options.pop("fsync", True))
    if options:
        raise ConfigError(f"durable URL {url!r}: unknown options for a local directory: {sorted(options)}")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".probe.{uuid.uuid4().hex[:8]}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(f"durable directory {root} is not writable ({exc}): fix its permissions or pick another") from exc
    return LocalStore(root, fsync=fsync)
