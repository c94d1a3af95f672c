"""Any other fsspec filesystem (``memory://``, ``gs://``, ``az://`` ...),
written with plain streams: the fallback for schemes without a backend of
their own."""

from __future__ import annotations

from typing import Any, Sequence

from hpresil.checkpoint.durable.stores.api import Buffer, Deadline, DurableStore, Progress, buffer_nbytes, redact
from hpresil.errors import ConfigError, StorageError

__all__ = ["FsspecStore", "open_fsspec"]


class FsspecStore(DurableStore):
    """Any fsspec filesystem (``memory://``, ``gs://``...), written with plain streams.

    Args:
        fs: the filesystem.
        root: root path inside ``fs`` (no protocol).
        url: the URL it was opened from (for messages).
    """

    #: Writing a file needs its parent directory made first (ftp, sftp, hdfs);
    #: object stores have no directories and skip that request.
    makes_dirs = True

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = redact(url)
        self._dirs: set[str] = set()  # parent directories known to exist

    def _p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def _for_writing(self, path: str) -> str:
        """The full path, its parent directory made first: file systems with real
        directories (ftp, sftp, hdfs) do not create them on write."""
        full = self._p(path)
        parent = full.rsplit("/", 1)[0]
        if self.makes_dirs and parent and parent not in self._dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        return full

    def _wrap(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot {what} in {self.url}: {type(exc).__name__}: {exc}")

    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None,
                    progress: Progress | None = None) -> int:
        total = 0
        deadline = Deadline(timeout, self.url)
        try:
            for path, bufs in files:
                with self.fs.open(self._for_writing(path), "wb") as f:
                    for b in bufs:
                        deadline.check()
                        f.write(b)
                        total += buffer_nbytes(b)
                        if progress is not None:
                            progress(buffer_nbytes(b))
            return total
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise anything
            raise self._wrap(f"write {files[0][0] if files else ''}", exc) from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._for_writing(path), data)
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


def open_fsspec(url: str, rest: str, options: dict[str, Any], probe_timeout: float) -> FsspecStore:
    """Opener of any scheme fsspec knows (see :mod:`~.api`); ``options`` go to the filesystem.

    Raises:
        ConfigError: fsspec does not know the scheme, or its package is missing.
        StorageError: the filesystem cannot be opened or its root created.
    """
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        fs_cls = fsspec.get_filesystem_class(scheme)
    except ValueError as exc:
        raise ConfigError(f"durable URL {url!r}: unknown scheme {scheme!r}; use file:///abs/path or s3://bucket/prefix") from exc
    except ImportError as exc:
        raise ConfigError(f"durable URL {url!r} needs an extra package: {exc}") from exc
    try:
        # host, port, user... as the URL gives them (ftp, sftp, hdfs, webhdfs, http); explicit options win
        kwargs = {**fs_cls._get_kwargs_from_urls(url), **options}
    except Exception as exc:  # noqa: BLE001 - fsspec parses the URL its own way
        raise ConfigError(f"durable URL {url!r} cannot be parsed for {scheme}://: {exc}") from exc
    try:
        fs = fs_cls(**kwargs)
        root = fs._strip_protocol(url)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot open durable store {url!r}: {type(exc).__name__}: {exc}") from exc
    return FsspecStore(fs, root, url)
