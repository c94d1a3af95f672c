"""Structured JSONL event stream (see :mod:`hpresil.events.api`)."""

from hpresil.events.api import EVENT_NAMES, Event, EventSink
from hpresil.events.jsonl import EventTail, JsonlEventLog, NullEventLog, read_events

__all__ = ["EVENT_NAMES", "Event", "EventSink", "EventTail", "JsonlEventLog", "NullEventLog", "read_events", "worker_sink"]


def worker_sink() -> "JsonlEventLog | NullEventLog":
    """The event sink of a worker process: the node's ``events.jsonl`` when run
    under ``hpresil-run`` (stamped with ``rank``), else a sink that drops events."""
    import os

    from hpresil import _env

    path = _env.get(_env.EVENTS_FILE)
    if path is None:
        return NullEventLog()
    return JsonlEventLog(
        path,
        node=_env.get(_env.NODE_ID) or "",
        rank=int(os.environ.get("RANK", "0")),
        # the agent's attempt (every start of the group), as in its workers_start events
        attempt=int(_env.get(_env.ATTEMPT) or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0),
    )
