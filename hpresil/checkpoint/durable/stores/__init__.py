"""Storage backends of the durable tier, one module per backend, opened by URL scheme.

:func:`open_store` turns a URL into a :class:`~.api.DurableStore` and checks it
can be used, failing within seconds with a message that names the fix. The
backend comes from a registry keyed by the URL's scheme (``file``, ``s3``,
``s3a``; any other scheme fsspec knows falls back to
:class:`~.generic.FsspecStore`); :func:`register_store` adds a tuned backend
for a scheme without touching this module.
"""

from __future__ import annotations

import os
from typing import Any

from hpresil.checkpoint.durable.stores.api import Buffer, DurableStore, Opener, buffer_nbytes
from hpresil.checkpoint.durable.stores.generic import open_fsspec
from hpresil.checkpoint.durable.stores.local import open_local, open_path
from hpresil.checkpoint.durable.stores.s3 import open_s3
from hpresil.errors import ConfigError

__all__ = ["Buffer", "buffer_nbytes", "DurableStore", "Opener", "open_store", "register_store"]

_OPENERS: dict[str, Opener] = {"file": open_local, "s3": open_s3, "s3a": open_s3}


def register_store(scheme: str, opener: Opener) -> None:
    """Makes :func:`open_store` open ``scheme://`` URLs with ``opener`` (see :mod:`~.api`).

    Raises:
        ConfigError: ``scheme`` is empty or not a URL scheme.
    """
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"register_store: {scheme!r} is not a URL scheme (letters, digits, '+', '-', '.')")
    _OPENERS[scheme.lower()] = opener


def open_store(url: str, *, probe_timeout: float = 10.0, **storage_options: Any) -> DurableStore:
    """Opens the durable store at ``url`` and checks that it is usable.

    Args:
        url: ``file:///abs/path``, a plain path, ``s3://bucket/prefix`` or any
            fsspec URL. S3 endpoint and credentials come from the usual AWS
            configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
            ``AWS_PROFILE``...) unless given in ``storage_options``.
        probe_timeout: bound in seconds on the check of a remote store.
        **storage_options: passed to the backend; ``fsync`` (file),
            ``part_size`` and ``concurrency`` (s3) tune hpresil's writers, the
            rest goes to the fsspec filesystem.

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
        return open_path(os.path.abspath(os.path.expanduser(url)), url, options)
    scheme, rest = url.split("://", 1)
    opener = _OPENERS.get(scheme.lower(), open_fsspec)
    return opener(url, rest, options, probe_timeout)
