"""Evaluating the rule table against the facts and the environment.

Conditions in :attr:`Rule.when` (all must hold; ``!`` negates one):

* a flag from :data:`FLAGS`: ``plugin_tunes`` (aws-ofi-nccl >= 1.7 and libfabric
  >= 1.18), ``plugin_found``, ``efa`` (at least one EFA device), ``efa_short``
  (fewer than the instance type has), ``imex_missing``,
  ``value_matches_interface`` (the rule's value selects an interface of this
  host), ``user_value_matches_interface`` (the user's value does);
* a version comparison ``<fact><op><version>`` with fact one of ``plugin``,
  ``libfabric``, ``efa_installer``, ``nccl``, ``kernel`` and op one of
  ``< <= > >= == !=``; an unknown version makes the comparison false (so its
  negation true);
* ``$NAME``: the variable ``NAME`` is set.

The user's value always wins: a ``set`` rule whose variable is already set
yields ``keep``; warnings about that value come from ``warn`` rules.
"""

from __future__ import annotations

import operator
import os
import re
from typing import Callable, Iterable, Mapping

from hpresil.netenv.api import Decision, Facts, HostRoots, NetEnvConfig, Plan, Rule, Scope, version_tuple
from hpresil.netenv.rules import RULES

__all__ = ["evaluate", "make_plan", "condition_holds", "ifname_selects", "FLAGS"]

_COMPARE = re.compile(r"^(\w+)(<=|>=|==|!=|<|>)([\d.]+)$")
_OPS: dict[str, Callable[[object, object], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}


def ifname_selects(value: str, interfaces: Iterable[str]) -> list[str]:
    """The interfaces NCCL would consider for ``NCCL_SOCKET_IFNAME=value``.

    NCCL's syntax: a comma-separated prefix list; a leading ``^`` excludes the
    listed prefixes instead; a leading ``=`` (after any ``^``) matches names exactly.
    """
    spec = value.strip()
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    exact = spec.startswith("=")
    spec = spec[1:] if exact else spec
    items = [p for p in spec.split(",") if p]

    def listed(name: str) -> bool:
        return any(name == p if exact else name.startswith(p) for p in items)

    return [name for name in interfaces if listed(name) != exclude]


def _plugin_tunes(facts: Facts, env: Mapping[str, str], rule: Rule) -> bool:
    v = facts.versions()
    return bool(v["plugin"] and v["libfabric"] and v["plugin"] >= (1, 7, 0) and v["libfabric"] >= (1, 18, 0))


def _value_matches(facts: Facts, value: str | None) -> bool:
    if facts.interfaces is None or value is None:
        return True  # cannot tell: never claim a mismatch
    return bool(ifname_selects(value, facts.interfaces))


def _torch_reads_fr_name() -> bool:
    """torch >= 2.7 reads ``TORCH_FR_BUFFER_SIZE`` and warns in every process
    that the old ``TORCH_NCCL_TRACE_BUFFER_SIZE`` name is deprecated."""
    import sys

    torch = sys.modules.get("torch")
    version = getattr(torch, "__version__", None) if torch is not None else None
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("torch")
        except Exception:  # noqa: BLE001 - no torch metadata: assume a current release
            return True
    return version_tuple(str(version).split("+")[0]) >= (2, 7)


#: Named conditions over (facts, environment, rule).
FLAGS: dict[str, Callable[[Facts, Mapping[str, str], Rule], bool]] = {
    "plugin_tunes": _plugin_tunes,
    "plugin_found": lambda f, e, r: f.plugin_path is not None,
    "efa": lambda f, e, r: len(f.efa_devices) > 0,
    "efa_short": lambda f, e, r: f.efa_expected is not None and len(f.efa_devices) < f.efa_expected,
    "imex_missing": lambda f, e, r: not f.imex_channels,
    "torch_reads_fr_name": lambda f, e, r: _torch_reads_fr_name(),
    "value_matches_interface": lambda f, e, r: _value_matches(f, r.value),
    "user_value_matches_interface": lambda f, e, r: _value_matches(f, e.get(r.variable or "")),
}


def condition_holds(cond: str, facts: Facts, environ: Mapping[str, str], rule: Rule) -> bool:
    """Whether one ``when`` condition holds (see the module docstring).

    Raises:
        KeyError: an unknown condition (a bug in the rule table).
    """
    if cond.startswith("!"):
        return not condition_holds(cond[1:], facts, environ, rule)
    if cond.startswith("$"):
        return cond[1:] in environ
    match = _COMPARE.match(cond)
    if match:
        fact, op, wanted = match.groups()
        have = facts.versions()[fact]
        return have is not None and _OPS[op](have, version_tuple(wanted))
    return FLAGS[cond](facts, environ, rule)


def _applies(rule: Rule, facts: Facts, environ: Mapping[str, str]) -> bool:
    if "*" not in rule.families and facts.family not in rule.families:
        return False
    return all(condition_holds(c, facts, environ, rule) for c in rule.when)


def _decide(rule: Rule, environ: Mapping[str, str], log_dir: str | None) -> Decision | None:
    current = environ.get(rule.variable) if rule.variable else None
    value = rule.value
    if value is not None and log_dir is not None:
        value = value.replace("{log_dir}", log_dir.rstrip(os.sep))

    def make(action: str, severity: str, reason: str, value: str | None = value) -> Decision:
        return Decision(rule=rule.id, variable=rule.variable, action=action, value=value,  # type: ignore[arg-type]
                        current=current, severity=severity, scope=rule.scope, reason=reason,  # type: ignore[arg-type]
                        source=rule.source)

    if rule.action == "set":
        if current is None:
            return make("set", rule.severity, rule.reason)
        return make("keep", "info", f"kept the user's value (hpresil would set {value}: {rule.reason})")
    if rule.action == "leave":
        if current is None:
            return make("leave", "info", rule.reason, rule.plugin_value)
        if rule.plugin_value is not None and current.strip().lower() == rule.plugin_value.lower():
            return make("keep", "info", f"same as the plugin's value, so redundant ({rule.reason})", rule.plugin_value)
        return make("keep", rule.severity, f"overrides the plugin's own value: {rule.reason}", rule.plugin_value)
    # warn
    if rule.variable is None:
        return make("warn", rule.severity, rule.reason, None)
    if current is None:
        return None
    low = current.strip().lower()
    if low in (v.lower() for v in rule.ok_values):
        return None
    if "*" in rule.bad_values or low in (v.lower() for v in rule.bad_values):
        return make("warn", rule.severity, rule.reason, None)
    return None


def evaluate(
    facts: Facts,
    environ: Mapping[str, str],
    *,
    rules: Iterable[Rule] = RULES,
    scopes: Iterable[Scope] | None = None,
    log_dir: str | None = None,
) -> list[Decision]:
    """The decisions of every rule that applies to ``facts`` and ``environ``, in table order.

    Args:
        facts: what detection found.
        environ: the environment the workers would inherit (user values win).
        rules: the table (default :data:`hpresil.netenv.rules.RULES`).
        scopes: only rules of these scopes (default: all).
        log_dir: the job's log dir, substituted for ``{log_dir}`` in values.
    """
    wanted = None if scopes is None else set(scopes)
    decisions = []
    for rule in rules:
        if wanted is not None and rule.scope not in wanted:
            continue
        if _applies(rule, facts, environ):
            decision = _decide(rule, environ, log_dir)
            if decision is not None:
                decisions.append(decision)
    return decisions


def make_plan(
    config: NetEnvConfig,
    environ: Mapping[str, str] | None = None,
    roots: HostRoots = HostRoots(),
    log_dir: str | None = None,
) -> Plan:
    """Detects the host and evaluates every rule; ``mode=off`` detects and decides nothing."""
    env = os.environ if environ is None else environ
    if config.mode == "off":
        return Plan(mode="off", facts=None, decisions=())
    from hpresil.netenv.detect import detect

    facts = detect(config, roots, env)
    return Plan(mode=config.mode, facts=facts, decisions=tuple(evaluate(facts, env, log_dir=log_dir)))
