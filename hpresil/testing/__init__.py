"""Fault injection and test helpers usable by users' own tests."""

from hpresil.testing.faults import ENV_VAR, Fault, bitflip_at, fail_at, hang_at, load_plan, maybe_inject, nan_at, to_env
from hpresil.testing.sink import RecordingSink

__all__ = ["ENV_VAR", "Fault", "RecordingSink", "bitflip_at", "fail_at", "hang_at", "load_plan", "maybe_inject",
           "nan_at", "to_env"]
