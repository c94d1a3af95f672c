"""Append-only JSONL event log shared by the node runtime and its workers.

Several processes (the agent and every local worker) append to the same
file. Each event is written with a single ``os.write`` on a descriptor opened
with ``O_APPEND``, so lines from different processes never interleave on a
local filesystem. Emitting never raises: losing an event must not stop
training.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from hpresil.events.api import Event

__all__ = ["EventTail", "JsonlEventLog", "NullEventLog", "read_events"]

log = logging.getLogger(__name__)


class JsonlEventLog:
    """Writes :class:`~hpresil.events.api.Event` lines to ``path``.

    Args:
        path: the ``events.jsonl`` file; its directory is created.
        node: node id stamped on every event.
        static: fields added to every event (e.g. ``rank``).
    """

    def __init__(self, path: str, node: str, **static: Any) -> None:
        self.path = path
        self.node = node
        self.static = dict(static)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._warned = False
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def emit(self, event: str, **fields: Any) -> None:
        """Appends one event line; logs (once) instead of raising on failure."""
        merged = {**self.static, **fields}
        obj = Event(event=event, ts=time.time(), node=self.node, fields=merged).to_json_obj()
        line = (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                os.write(self._open(), line)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot write event log %s (%s); events are dropped", self.path, exc)

    def close(self) -> None:
        """Closes the file descriptor; later emits reopen it."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class NullEventLog:
    """An event sink that drops everything (used outside ``hpresil-run``)."""

    node = ""

    def emit(self, event: str, **fields: Any) -> None:
        """Drops the event."""

    def close(self) -> None:
        """Does nothing."""


def read_events(path: str) -> list[dict[str, Any]]:
    """Reads an ``events.jsonl`` file, skipping (and logging) malformed lines.

    Args:
        path: the file to read.

    Returns:
        The events in file order.
    """
    events: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
                log.warning("%s:%d: skipping malformed event line", path, lineno)
                continue
            if isinstance(obj, dict) and "event" in obj:
                events.append(obj)
    return events


class EventTail:
    """Reads the complete lines appended to a JSONL file since the last call."""

    def __init__(self, path: str, from_end: bool = True) -> None:
        self.path = path
        self._offset = 0
        self._rest = b""
        if from_end:
            try:
                self._offset = os.path.getsize(path)
            except OSError:
                pass

    def read(self, limit: int = 1 << 22) -> list[dict[str, Any]]:
        """New events (malformed lines are skipped); at most ``limit`` bytes per call."""
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < self._offset:
                    self._offset, self._rest = 0, b""  # truncated or replaced
                f.seek(self._offset)
                data = f.read(limit)
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                out.append(obj)
        return out
