"""Hang and straggler detection (see :mod:`hpresil.hang.api`)."""

from hpresil.hang.api import HangConfig
from hpresil.hang.heartbeat import heartbeat, phase, section

__all__ = ["HangConfig", "heartbeat", "phase", "section"]
