"""Structured JSONL event stream (see :mod:`hpresil.events.api`)."""

from hpresil.events.api import EVENT_NAMES, Event, EventSink
from hpresil.events.jsonl import JsonlEventLog, NullEventLog, read_events

__all__ = ["EVENT_NAMES", "Event", "EventSink", "JsonlEventLog", "NullEventLog", "read_events"]
