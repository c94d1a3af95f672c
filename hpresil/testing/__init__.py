"""Fault injection and test helpers usable by users' own tests."""

from hpresil.testing.faults import ENV_VAR, Fault, fail_at, hang_at, load_plan, maybe_inject, to_env

__all__ = ["ENV_VAR", "Fault", "fail_at", "hang_at", "load_plan", "maybe_inject", "to_env"]
