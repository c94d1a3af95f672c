"""Environment changes ``hpresil-run`` makes, in one place.

What to set comes from one table, :data:`hpresil.netenv.rules.RULES`: the
``launcher`` rules (always), the ``workers`` rules (always; hang diagnosis) and,
unless ``--net-env off``, the ``net`` decisions of a
:class:`~hpresil.netenv.api.Plan` (EFA / NCCL / libfabric for the detected
host). Each change is logged as ``old -> new`` with its reason and reported as
an ``env_change`` event; a value the user already set is never overridden (a
known-harmful one is logged as a warning and reported by the net-env service).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterable, MutableMapping

from hpresil.netenv.api import Decision, Facts, Plan
from hpresil.netenv.plan import evaluate
from hpresil.netenv.rules import RULES

__all__ = ["EnvChange", "LAUNCHER_DEFAULTS", "apply_launcher_env", "worker_defaults"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class EnvChange:
    """One environment change: ``name`` went from ``old`` to ``new`` because ``reason``."""

    name: str
    old: str | None
    new: str
    reason: str


def _table(scope: str, environ: MutableMapping[str, str], log_dir: str | None = None) -> list[Decision]:
    # launcher/workers rules apply to every host, so no detection is needed.
    return evaluate(Facts(), environ, scopes=(scope,), log_dir=log_dir)  # type: ignore[arg-type]


def _launcher_defaults() -> tuple[tuple[str, str, str], ...]:
    return tuple((r.variable, r.value, r.reason) for r in RULES  # type: ignore[misc]
                 if r.scope == "launcher" and r.action == "set")


#: (name, value, reason) set in the launcher when the user has not set them
#: (the ``launcher`` rules of :data:`hpresil.netenv.rules.RULES`).
LAUNCHER_DEFAULTS: tuple[tuple[str, str, str], ...] = _launcher_defaults()


def _apply(decisions: Iterable[Decision], env: MutableMapping[str, str], label: str | None) -> list[EnvChange]:
    """Sets ``set`` decisions not already in ``env``; logs each change under ``label`` (``None``: silent)."""
    changes: list[EnvChange] = []
    for d in decisions:
        if d.variable is None:
            continue
        if d.action == "set" and d.value is not None and d.variable not in env:
            env[d.variable] = d.value
            changes.append(EnvChange(name=d.variable, old=None, new=d.value, reason=d.reason))
            if label:
                log.info("%s %s: unset -> %s (%s)", label, d.variable, d.value, d.reason)
        elif label and d.action in ("set", "keep") and d.severity == "info":
            log.info("%s %s=%s: %s", label, d.variable, env.get(d.variable, d.current), d.reason)
    return changes


def _log_findings(plan: Plan) -> None:
    for d in plan.decisions:
        if d.severity in ("warning", "error"):
            what = f"{d.variable}={d.current}" if d.variable else "host"
            (log.error if d.severity == "error" else log.warning)(
                "net-env %s: %s: %s [%s] (source: %s)", d.severity, what, d.reason, d.rule, d.source)


def apply_launcher_env(environ: MutableMapping[str, str] | None = None, plan: Plan | None = None) -> list[EnvChange]:
    """Sets the ``launcher`` rules and the plan's ``net`` decisions that the user left unset.

    Workers inherit the launcher's environment, so ``net`` values reach every
    worker of every attempt.

    Args:
        environ: the environment to change (default ``os.environ``).
        plan: the ``--net-env`` plan; ``None`` (or mode ``off``) adds nothing.

    Returns:
        The changes, for ``env_change`` events.
    """
    env = os.environ if environ is None else environ
    changes = _apply(_table("launcher", env), env, "env")
    if plan is not None and plan.mode != "off":
        facts = plan.facts
        if facts is not None:
            log.info("net-env %s: instance %s (%s), family %s, %d EFA device(s), aws-ofi-nccl %s, libfabric %s, "
                     "NCCL %s; detection %.1f ms", plan.mode, facts.instance_type, facts.instance_source,
                     facts.family, len(facts.efa_devices), facts.plugin_version, facts.libfabric_version,
                     facts.nccl_version, facts.elapsed_s * 1e3)
        changes += _apply(plan.to_set("net"), env, "env")
        _log_findings(plan)
    return changes


def worker_defaults(log_dir: str, environ: MutableMapping[str, str] | None = None) -> tuple[dict[str, str], list[EnvChange]]:
    """Variables every worker gets unless the user set them (the ``workers`` rules):
    the flight recorder that the hang watchdog dumps (gloo and NCCL), and NCCL's
    own dump on timeout into ``log_dir``.

    Returns:
        The variables to add to the workers' environment, and the changes to report.
    """
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    # The net-env node service logs and reports these changes itself.
    changes = _apply(_table("workers", env, log_dir), out, None)
    return out, changes
