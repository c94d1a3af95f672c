"""Storage backends of the durable tier: a local directory, S3, any other fsspec filesystem.

:func:`open_store` turns a URL into a :class:`DurableStore` and checks it can be
used, failing within seconds with a message that names the fix. Stores deal in
paths relative to their root and in byte buffers; they know nothing of the
checkpoint layout (see :mod:`hpresil.checkpoint.durable_layout`).

The S3 backend lives in :mod:`hpresil.checkpoint.durable_s3`.
"""

from __future__ import annotations

import abc
import logging
import os
import uuid
from typing import Any, Sequence, Union

from hpresil.errors import ConfigError, StorageError

__all__ = ["Buffer", "buffer_nbytes", "DurableStore", "LocalStore", "FsspecStore", "open_store"]

log = logging.getLogger(__name__)

#: What stores write: literal bytes or views of the shared-memory arena.
Buffer = Union[bytes, bytearray, memoryview]


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
    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None) -> int:
        """Writes each file as the concatenation of its buffers; returns total bytes.

        Not atomic: a partial file may remain after a failure (the layout's
        markers make it invisible).
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

    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None) -> int:
        # one thread per file (a few): on a parallel filesystem (NFS, Lustre) streams add up
        try:
            if len(files) <= 1:
                total = sum(self._write_one(path, bufs) for path, bufs in files)
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=min(4, len(files)), thread_name_prefix="hpresil-fwrite") as pool:
                    total = sum(pool.map(lambda item: self._write_one(*item), files))
            for d in sorted({os.path.dirname(self._p(path)) for path, _ in files}):
                self._sync_dir(d)  # the new directory entries, too
            return total
        except OSError as exc:
            raise StorageError(f"cannot write {self.url}: {exc}") from exc

    def _write_one(self, path: str, bufs: Sequence[Buffer]) -> int:
        full = self._p(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        total = 0
        try:
            views = [memoryview(b).cast("B") for b in bufs if buffer_nbytes(b)]
            i = 0
            while i < len(views):  # writev takes at most IOV_MAX buffers and may write short
                n = os.writev(fd, views[i : i + 512])
                total += n
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


class FsspecStore(DurableStore):
    """Any fsspec filesystem (``memory://``, ``gs://``...), written with plain streams.

    Args:
        fs: the filesystem.
        root: root path inside ``fs`` (no protocol).
        url: the URL it was opened from (for messages).
    """

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def _wrap(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot {what} in {self.url}: {type(exc).__name__}: {exc}")

    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None) -> int:
        total = 0
        try:
            for path, bufs in files:
                with self.fs.open(self._p(path), "wb") as f:
                    for b in bufs:
                        f.write(b)
                        total += buffer_nbytes(b)
            return total
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise anything
            raise self._wrap(f"write {files[0][0] if files else ''}", exc) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(path), data)
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"write {path}", exc) from exc

    def read_bytes(self, path: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"read {path}", exc) from exc

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        try:
            data = self.fs.cat_file(self._p(path), start=offset, end=offset + out.nbytes)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"read {path}", exc) from exc
        if len(data) != out.nbytes:
            raise StorageError(f"{self.url}/{path} is truncated: wanted {out.nbytes} bytes at {offset}, got {len(data)}")
        out[:] = data

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.info(self._p(path))["size"])
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"stat {path}", exc) from exc

    def list_dir(self, path: str) -> list[str]:
        try:
            names = self.fs.ls(self._p(path), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"list {path or '/'}", exc) from exc
        return sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != self._p(path)})

    def delete(self, paths: Sequence[str]) -> None:
        for p in paths:
            try:
                self.fs.rm_file(self._p(p))
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001
                raise self._wrap(f"delete {p}", exc) from exc

    def delete_tree(self, path: str) -> None:
        try:
            self.fs.rm(self._p(path), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"delete {path}", exc) from exc


def open_store(url: str, *, probe_timeout: float = 10.0, **storage_options: Any) -> DurableStore:
    """Opens the durable store at ``url`` and checks that it is usable.

    Args:
        url: ``file:///abs/path``, a plain path, ``s3://bucket/prefix`` or any
            fsspec URL. S3 endpoint and credentials come from the usual AWS
            configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
            ``AWS_PROFILE``...) unless given in ``storage_options``.
        probe_timeout: bound in seconds on the check of a remote store.
        **storage_options: passed to the fsspec filesystem; ``fsync`` (file),
            ``part_size`` and ``concurrency`` (s3) tune hpresil's writers.

    Raises:
        ConfigError: the URL is malformed or the scheme's package is missing.
        StorageError: the store cannot be reached or used (missing bucket,
            refused credentials, unreachable endpoint, unwritable directory).
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("durable URL is empty: pass file:///abs/path or s3://bucket/prefix")
    url = url.strip()
    options = dict(storage_options)
    if "://" not in url:
        if ":" in url.split("/", 1)[0] and not os.path.exists(url):
            raise ConfigError(f"durable URL {url!r} is malformed: use file:///abs/path or s3://bucket/prefix")
        return _open_local(os.path.abspath(os.path.expanduser(url)), url, options)
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise ConfigError(f"durable URL {url!r}: file URLs need an absolute path, file:///abs/path (three slashes)")
        return _open_local(os.path.normpath(rest), url, options)
    if scheme in ("s3", "s3a"):
        from hpresil.checkpoint.durable_s3 import open_s3

        return open_s3(url, rest, options, probe_timeout)
    import fsspec

    try:
        fs_cls = fsspec.get_filesystem_class(scheme)
    except ValueError as exc:
        raise ConfigError(f"durable URL {url!r}: unknown scheme {scheme!r}; use file:///abs/path or s3://bucket/prefix") from exc
    except ImportError as exc:
        raise ConfigError(f"durable URL {url!r} needs an extra package: {exc}") from exc
    try:
        fs = fs_cls(**options)
        root = fs._strip_protocol(url)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot open durable store {url!r}: {type(exc).__name__}: {exc}") from exc
    return FsspecStore(fs, root, url)


def _open_local(root: str, url: str, options: dict[str, Any]) -> LocalStore:
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
