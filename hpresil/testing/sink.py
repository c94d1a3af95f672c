"""An in-memory event sink for tests: what a service or Checkpointer emitted."""

from __future__ import annotations

import json
import threading
from typing import Any

__all__ = ["RecordingSink"]


class RecordingSink:
    """Collects ``emit(event, **fields)`` calls (thread-safe)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        """Records one event; raises ``TypeError`` if its fields are not JSON-serialisable
        (the real sink writes them as JSON)."""
        json.dumps(fields)
        with self._lock:
            self.events.append((event, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        """The fields of every event called ``name``, in order."""
        with self._lock:
            return [f for e, f in self.events if e == name]

    def names(self) -> list[str]:
        """The event names, in order."""
        with self._lock:
            return [e for e, _ in self.events]
