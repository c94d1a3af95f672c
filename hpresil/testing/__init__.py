"""Fault injection and test helpers usable by users' own tests."""

from hpresil.testing.faults import ENV_VAR, Fault, fail_at, hang_at, load_plan, maybe_inject, to_env
from hpresil.testing.sink import RecordingSink

__all__ = ["ENV_VAR", "Fault", "RecordingSink", "fail_at", "hang_at", "load_plan", "maybe_inject", "to_env"]
