"""The S3 backend of the durable tier (s3fs/aiobotocore), with concurrent multipart uploads.

Each file is a multipart upload whose parts (``part_size``, default 8 MiB like
boto3's ``TransferConfig``) go out ``concurrency`` at a time (default 10, like
its thread pool), shared across all files of one call, on fsspec's event loop.
Parts are cut from the arena with one memcpy. A failed part cancels its
siblings and aborts the upload; nothing partial is ever reported as written.

Fail-fast defaults: 3 s connect timeout, 2 botocore attempts and 3 s3fs
retries, so a dead endpoint costs seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from typing import Any, Sequence

from hpresil.checkpoint.durable.stores.api import Buffer, Progress, buffer_nbytes
from hpresil.checkpoint.durable.stores.generic import FsspecStore
from hpresil.errors import ConfigError, StorageError

__all__ = ["S3Store", "open_s3"]

log = logging.getLogger(__name__)

#: Defaults for s3fs chosen to fail fast: a dead endpoint is noticed in seconds,
#: not after botocore's default ~1 minute of connect retries.
_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 3, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}},
    "skip_instance_cache": True,
    "use_listings_cache": False,
}
#: s3fs's own retry loop around each call (its default is 5, backing off up to ~2 s).
_S3_RETRIES = 3


class S3Store(FsspecStore):
    """S3 (or an S3-compatible server) through s3fs, with concurrent multipart uploads.

    Args:
        fs: an ``s3fs.S3FileSystem``.
        root: ``bucket/prefix``.
        url: the URL it was opened from.
        part_size: multipart part size in bytes (>= 5 MiB, S3's minimum).
        concurrency: parts in flight at once, across all files of one call.
    """

    makes_dirs = False  # keys, not directories: no request before a write

    def __init__(self, fs: Any, root: str, url: str, *, part_size: int = 8 << 20, concurrency: int = 10) -> None:
        super().__init__(fs, root, url)
        if part_size < 5 << 20:
            raise ConfigError(f"part_size={part_size}: S3 parts must be >= 5 MiB (5242880)")
        if concurrency < 1:
            raise ConfigError(f"concurrency={concurrency}: must be >= 1")
        self.bucket = root.split("/", 1)[0]
        self.part_size = part_size
        self.concurrency = concurrency

    def close(self) -> None:
        """Closes the S3 client's connections (best effort)."""
        from fsspec.asyn import sync

        client, self.fs._s3 = self.fs._s3, None
        if client is not None:
            try:
                sync(self.fs.loop, client.close, timeout=5)
            except Exception as exc:  # noqa: BLE001 - closing must not fail the caller
                log.debug("closing the S3 client of %s failed: %s", self.url, exc)

    def _key(self, path: str) -> str:
        return self._p(path).split("/", 1)[1] if "/" in self._p(path) else ""

    def write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], *, timeout: float | None = None,
                    progress: Progress | None = None) -> int:
        from fsspec.asyn import sync

        try:
            total = sync(self.fs.loop, self._write_files, files, timeout, progress)
            if not isinstance(total, int):
                raise StorageError(f"upload to {self.url} ended without a result")
            return total
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp/timeout errors
            raise self._wrap("upload", exc) from exc

    async def _write_files(self, files: Sequence[tuple[str, Sequence[Buffer]]], timeout: float | None,
                           progress: Progress | None) -> int:
        sem = asyncio.Semaphore(self.concurrency)
        coro = _all_or_nothing([self._upload(path, bufs, sem, progress) for path, bufs in files])
        try:
            return sum(await asyncio.wait_for(coro, timeout))
        except asyncio.CancelledError as exc:
            # fsspec's sync() returns None for a cancelled coroutine: never let that look like success
            raise StorageError(f"upload to {self.url} was cancelled") from exc

    async def _upload(self, path: str, bufs: Sequence[Buffer], sem: asyncio.Semaphore, progress: Progress | None) -> int:
        views = [memoryview(b).cast("B") for b in bufs if buffer_nbytes(b)]
        total = sum(v.nbytes for v in views)
        key = self._key(path)
        if total <= self.part_size:
            async with sem:
                await self.fs._call_s3("put_object", Bucket=self.bucket, Key=key, Body=b"".join(views))
            if progress is not None:
                progress(total)
            return total
        mpu = await self.fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key)
        upload_id = mpu["UploadId"]
        try:
            parts = await self._upload_parts(key, upload_id, views, total, sem, progress)
            await self.fs._call_s3(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                await asyncio.wait_for(
                    self.fs._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id), 5
                )
            except BaseException as exc:  # noqa: BLE001 - best effort; the server may be down
                log.debug("abort of multipart upload %s failed: %s", key, exc)
            raise
        return total

    async def _upload_parts(
        self, key: str, upload_id: str, views: list[memoryview], total: int, sem: asyncio.Semaphore,
        progress: Progress | None = None,
    ) -> list[dict[str, Any]]:
        bounds = list(range(0, total, self.part_size))
        # cumulative starts of the views, to cut a part out of several buffers
        starts, acc = [], 0
        for v in views:
            starts.append(acc)
            acc += v.nbytes

        def part_bytes(lo: int, hi: int) -> bytes:
            chunks, i = [], max(0, bisect.bisect_right(starts, lo) - 1)
            while i < len(views) and starts[i] < hi:
                a, b = max(lo, starts[i]) - starts[i], min(hi, starts[i] + views[i].nbytes) - starts[i]
                chunks.append(views[i][a:b])
                i += 1
            return b"".join(chunks)

        async def one(num: int, lo: int) -> dict[str, Any]:
            async with sem:
                body = part_bytes(lo, min(total, lo + self.part_size))
                resp = await self.fs._call_s3(
                    "upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=num, Body=body
                )
            if progress is not None:
                progress(len(body))
            return {"PartNumber": num, "ETag": resp["ETag"]}

        return await _all_or_nothing([one(i + 1, lo) for i, lo in enumerate(bounds)])

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes | None]:
        if not paths:
            return {}
        full = [self._p(p) for p in paths]
        try:
            got = self.fs.cat(full, on_error="return")
        except Exception as exc:  # noqa: BLE001
            raise self._wrap("read", exc) from exc
        return {p: (v if isinstance(v, bytes) else None) for p, v in zip(paths, (got.get(f) for f in full))}

    def read_into(self, path: str, offset: int, out: memoryview) -> None:
        chunk = 32 << 20
        if out.nbytes <= chunk:
            return super().read_into(path, offset, out)
        from fsspec.asyn import sync

        ranges = [(o, min(out.nbytes, o + chunk)) for o in range(0, out.nbytes, chunk)]
        full = self._p(path)
        try:
            blobs = sync(
                self.fs.loop,
                self.fs._cat_ranges,
                [full] * len(ranges),
                [offset + lo for lo, _ in ranges],
                [offset + hi for _, hi in ranges],
            )
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"read {path}", exc) from exc
        for (lo, hi), blob in zip(ranges, blobs):
            if isinstance(blob, Exception):
                raise self._wrap(f"read {path}", blob)
            if len(blob) != hi - lo:
                raise StorageError(f"{self.url}/{path} is truncated at offset {offset + lo}")
            out[lo:hi] = blob

    def delete(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        try:
            self.fs.rm([self._p(p) for p in paths])
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._wrap("delete", exc) from exc

    def delete_tree(self, path: str) -> None:
        """Deletes every object under ``path``, then the directory entries above
        them, deepest first. S3 itself has no directories, but servers backed by
        a file system (SeaweedFS, for one) keep an empty directory after its last
        object is deleted and go on listing it: retention would then find the
        step again at every pass."""
        from fsspec.asyn import sync

        root = self._p(path).rstrip("/")
        try:
            keys = self.fs.find(root, withdirs=False)
            if keys:
                self.fs.rm(keys)
            dirs = {root}
            for key in keys:
                parent = key.rsplit("/", 1)[0]
                while parent.startswith(root + "/") and parent not in dirs:
                    dirs.add(parent)
                    parent = parent.rsplit("/", 1)[0]
            for d in sorted(dirs, key=lambda d: d.count("/"), reverse=True):
                sync(self.fs.loop, self.fs._call_s3, "delete_object", Bucket=self.bucket,
                     Key=d.split("/", 1)[1] + "/")
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(f"delete {path}", exc) from exc


async def _all_or_nothing(coros: list[Any]) -> list[Any]:
    """Runs ``coros`` concurrently; on the first failure (or cancellation) cancels the rest and raises."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # a sibling's failure cancelled the others: report the failure, not the cancellations
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]  # raises CancelledError if we were cancelled


def open_s3(url: str, rest: str, options: dict[str, Any], probe_timeout: float) -> S3Store:
    """Opener of ``s3://`` and ``s3a://`` URLs (see :mod:`~.api`): opens and probes ``s3://<rest>``."""
    bucket = rest.split("/", 1)[0]
    if not bucket or any(c in bucket for c in " \\?#"):
        raise ConfigError(f"durable URL {url!r} has no valid bucket: use s3://BUCKET/PREFIX")
    try:
        import s3fs
    except ImportError as exc:
        raise ConfigError(f"durable URL {url!r} needs s3fs: pip install 'hpresil[s3]'") from exc
    part_size = int(options.pop("part_size", 8 << 20))
    concurrency = int(options.pop("concurrency", 10))
    kwargs = {**_S3_DEFAULTS, **options}
    if "config_kwargs" in options:
        kwargs["config_kwargs"] = {**_S3_DEFAULTS["config_kwargs"], **options["config_kwargs"]}
    retries = int(kwargs.pop("retries", _S3_RETRIES))
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = retries
    store = S3Store(fs, rest.rstrip("/"), url, part_size=part_size, concurrency=concurrency)
    _probe_s3(store, probe_timeout)
    return store


def _probe_s3(store: S3Store, timeout: float) -> None:
    """Lists one key under the prefix to check endpoint, credentials and bucket."""
    from fsspec.asyn import sync

    fs = store.fs
    endpoint = fs.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    async def probe() -> None:
        async def go() -> None:
            await fs.set_session()
            await fs._s3.list_objects_v2(Bucket=store.bucket, Prefix=store._key(""), MaxKeys=1)

        await asyncio.wait_for(go(), timeout)

    where = f"bucket {store.bucket!r} at {endpoint}"
    try:
        sync(fs.loop, probe)
        return
    except Exception as exc:  # noqa: BLE001 - classify below
        err = exc
    code = ""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    name = type(err).__name__
    if code in ("NoSuchBucket", "404"):
        msg = f"{where} does not exist: create it (aws s3 mb s3://{store.bucket}) or fix the durable URL"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken", "ExpiredToken"):
        msg = (
            f"{where} refused the credentials ({code}): set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) to a key allowed to list and write the bucket"
        )
    elif name in ("NoCredentialsError", "PartialCredentialsError"):
        msg = f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ClientConnectorError",
                  "FSTimeoutError", "TimeoutError", "ConnectionRefusedError", "ReadTimeoutError") or isinstance(
        err, (OSError, asyncio.TimeoutError)
    ):
        msg = (
            f"cannot reach S3 endpoint {endpoint} within {timeout:g}s ({name}: {err}): check AWS_ENDPOINT_URL "
            "and that the server is up"
        )
    else:
        msg = f"cannot use {where} ({name}: {err}): check the durable URL, AWS_ENDPOINT_URL and credentials"
    raise StorageError(msg) from err
