"""The job's shared-memory directory on one node.

Layout: ``<shm_root>/<run_id>/<node_id>/``. It is created before the first
worker starts and outlives worker crashes (the RAM tier lives in it); it is
removed when the job ends unless the user asks to keep it. Creating it checks
that the filesystem is usable and reports its free space, so a too-small
``/dev/shm`` (a common container default of 64 MiB) is named up front.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

from hpresil.errors import ConfigError

__all__ = ["remove_empty_parents", "JobShmDir", "huge_page_mode", "safe_component"]

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_component(name: str) -> str:
    """Turns a run id or node id into a safe single path component.

    Raises:
        ConfigError: the name is empty or consists only of dots.
    """
    cleaned = _UNSAFE.sub("_", name)[:128]
    if not cleaned.strip("."):
        raise ConfigError(f"id {name!r} cannot name a directory; use letters, digits, '.', '_' or '-'")
    return cleaned


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def huge_page_mode(path: str, mountinfo: str = "/proc/self/mountinfo") -> str:
    """The transparent-huge-page policy of the tmpfs holding ``path``.

    Returns:
        ``"always"``, ``"within_size"`` or ``"advise"`` (the mount's ``huge=``
        option), ``"never"`` for a tmpfs without it, ``""`` when ``path`` is not
        on a tmpfs or the mount table cannot be read.
    """
    real = os.path.realpath(path)
    best: tuple[int, str, str] | None = None
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):
            best = (len(point), tail[0], tail[2])
    if best is None or best[1] != "tmpfs":
        return ""
    for option in best[2].split(","):
        if option.startswith("huge="):
            return option[len("huge="):]
    return "never"


class JobShmDir:
    """Creates, inspects and removes one job's shared-memory directory.

    Args:
        shm_root: parent directory (e.g. ``/dev/shm/hpresil``).
        run_id: the rendezvous run id.
        node_id: this node's id.
    """

    def __init__(self, shm_root: str, run_id: str, node_id: str) -> None:
        self.job_dir = os.path.join(os.path.abspath(shm_root), safe_component(run_id))
        self.path = os.path.join(self.job_dir, safe_component(node_id))

    def create(self) -> str:
        """Creates the directory (mode 0700) and returns its path.

        Raises:
            ConfigError: the directory cannot be created or written.
        """
        try:
            try:
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            except FileNotFoundError:  # another job just removed the empty root: once more
                os.makedirs(self.path, mode=0o700, exist_ok=True)
            probe = os.path.join(self.path, ".probe")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                f"cannot use shared-memory directory {self.path}: {exc}. "
                "Pass --shm-root to a writable tmpfs (e.g. /dev/shm/hpresil)"
            ) from exc
        free = self.free_bytes()
        log.info("job shared-memory directory %s (%.1f GiB free)", self.path, free / 2**30)
        if huge_page_mode(self.path) == "never":
            log.info(
                "%s is a tmpfs without huge pages: a restarted worker reads the RAM tier ~1.3x faster from one "
                "with them (mount -t tmpfs -o huge=within_size,size=<N>G tmpfs <dir>; pass it as --shm-root)",
                self.path,
            )
        return self.path

    def free_bytes(self) -> int:
        """Free bytes on the filesystem holding the directory (0 if unknown)."""
        try:
            st = os.statvfs(self.path if os.path.exists(self.path) else os.path.dirname(self.path))
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def remove(self) -> None:
        """Removes this node's directory, then the job directory and the shm root
        once they are empty (other simulated nodes or jobs may still use them)."""
        shutil.rmtree(self.path, ignore_errors=True)
        remove_empty_parents(self.path, levels=2)


def remove_empty_parents(path: str, levels: int) -> None:
    """Removes up to ``levels`` parent directories of ``path``, nearest first,
    stopping at the first that is not empty (or cannot be removed)."""
    for _ in range(levels):
        path = os.path.dirname(path)
        try:
            os.rmdir(path)
        except OSError:
            return
