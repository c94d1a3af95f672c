"""Contract of the network-environment tuning (EFA / NCCL / libfabric / torch).

Three steps, each a pure function of its inputs so tests can feed fake hosts:

1. :func:`hpresil.netenv.detect.detect` reads the host (sysfs, /proc, library
   directories, the environment; IMDSv2 only when asked) into :class:`Facts`.
2. :func:`hpresil.netenv.plan.evaluate` matches the rule table
   (:data:`hpresil.netenv.rules.RULES`, a list of :class:`Rule` records) against
   the facts and the current environment into a :class:`Plan` of
   :class:`Decision` records: set, keep (the user's value wins), leave (to the
   aws-ofi-nccl plugin) or warn.
3. :mod:`hpresil.netenv.env` applies the plan's ``set`` decisions, the one place
   hpresil changes the launcher's and the workers' environment.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from typing import Any, Literal

from hpresil.errors import ConfigError
from hpresil.netenv.families import FAMILIES

__all__ = [
    "NetEnvConfig",
    "HostRoots",
    "Facts",
    "Rule",
    "Decision",
    "Plan",
    "Severity",
    "Action",
    "Scope",
    "version_tuple",
]

#: ``info``: worth knowing; ``warning``: probably slower or harder to debug;
#: ``error``: the job will fail (the doctor exits non-zero).
Severity = Literal["info", "warning", "error"]
#: What a rule does: ``set`` a value when the user has not; ``leave`` the variable
#: to the aws-ofi-nccl plugin (report a user value that overrides the plugin's);
#: ``warn`` about a user value (or, with no variable, about the host).
RuleAction = Literal["set", "leave", "warn"]
#: What was decided: ``set`` by hpresil, ``keep`` the user's value, ``leave`` to the
#: plugin, ``warn`` about a value or the host.
Action = Literal["set", "keep", "leave", "warn"]
#: Where a ``set`` goes: ``launcher`` (hpresil-run's own environment, inherited by
#: workers; always applied), ``workers`` (only the workers'; always applied, may
#: use ``{log_dir}``), ``net`` (launcher environment, only when ``--net-env`` is not off).
Scope = Literal["launcher", "workers", "net"]

_SEVERITIES = ("info", "warning", "error")
_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def version_tuple(text: str | None) -> tuple[int, int, int] | None:
    """``"1.7.4-aws"`` -> ``(1, 7, 4)``; ``None`` when no version is in ``text``."""
    if not text:
        return None
    match = _VERSION.search(text)
    if match is None:
        return None
    return (int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0))


@dataclasses.dataclass(kw_only=True, slots=True)
class NetEnvConfig:
    """How ``hpresil-run`` tunes the network environment.

    Attributes:
        mode: ``off`` (change and check nothing), ``auto`` (detect the instance type)
            or a family preset (``p5``, ``p6e-gb200``, ...: use that family's rules
            without reading the instance type; everything else is still detected).
        imds: ask the EC2 instance metadata service (IMDSv2) for the instance type
            when the DMI product name does not give it. Off by default: detection
            makes no network call unless asked.
        imds_timeout: bound of each IMDS request.
    """

    mode: str = "auto"
    imds: bool = False
    imds_timeout: timedelta = timedelta(milliseconds=200)

    def __post_init__(self) -> None:
        choices = ("off", "auto", *FAMILIES)
        if self.mode not in choices:
            raise ConfigError(f"--net-env {self.mode!r}: use one of {', '.join(choices)}")
        if not timedelta(0) < self.imds_timeout <= timedelta(seconds=1):
            raise ConfigError(f"imds_timeout={self.imds_timeout}: need 0 < imds_timeout <= 1 s "
                              "(detection must stay under a second)")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HostRoots:
    """Where detection looks; tests point these at fake trees.

    Attributes:
        root: prefix of ``/sys``, ``/proc``, ``/dev``, ``/opt``, ``/etc``, ``/run``.
        lib_dirs: directories searched for the NCCL plugin, libfabric and NCCL;
            ``None``: ``$LD_LIBRARY_PATH`` then the usual install directories under ``root``.
        python_metadata: also look up NCCL in installed Python packages
            (``nvidia-nccl-cu*``) and in an already imported CUDA torch.
    """

    root: str = "/"
    lib_dirs: tuple[str, ...] | None = None
    python_metadata: bool = True


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What detection found. ``None`` means "could not tell", never "absent".

    Attributes:
        instance_type: e.g. ``p5.48xlarge``.
        instance_source: ``dmi``, ``imds``, ``preset`` or ``none``.
        family: the rule-table family (``p5``, ``trn2``, ...) or ``unknown``.
        efa_devices: names under ``/sys/class/infiniband`` driven by ``efa``.
        efa_expected: EFA devices this instance type has, when known.
        plugin_path / plugin_version: the aws-ofi-nccl NCCL net plugin.
        libfabric_path / libfabric_version: libfabric as NCCL's plugin would load it.
        efa_installer_version: from ``/opt/amazon/efa_installed_packages``.
        nccl_version: NCCL's version (loaded torch, library file name or wheel).
        kernel: the running kernel release.
        gpu_model: the first NVIDIA GPU's model name from the driver.
        gpu_count: NVIDIA GPUs on the PCI bus.
        nvswitch_count: NVSwitch bridges on the PCI bus (HGX boards).
        imex_channels: IMEX channel devices (``None``: no channel directory).
        interfaces: IP interfaces (``/sys/class/net``), for ``NCCL_SOCKET_IFNAME`` checks.
        container: ``docker``, ``podman``, ``kubernetes``, ``containerd`` or ``None`` (host).
        schedulers: ``slurm``, ``kubernetes``, ``hyperpod`` markers present.
        notes: detection steps that failed or were skipped, and why.
        elapsed_s: how long detection took.
    """

    instance_type: str | None = None
    instance_source: str = "none"
    family: str = "unknown"
    efa_devices: tuple[str, ...] = ()
    efa_expected: int | None = None
    plugin_path: str | None = None
    plugin_version: str | None = None
    libfabric_path: str | None = None
    libfabric_version: str | None = None
    efa_installer_version: str | None = None
    nccl_version: str | None = None
    kernel: str | None = None
    gpu_model: str | None = None
    gpu_count: int = 0
    nvswitch_count: int = 0
    imex_channels: int | None = None
    interfaces: tuple[str, ...] | None = None
    container: str | None = None
    schedulers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    elapsed_s: float = 0.0

    def versions(self) -> dict[str, tuple[int, int, int] | None]:
        """The comparable versions rule conditions refer to (``plugin>=1.7``)."""
        return {
            "plugin": version_tuple(self.plugin_version),
            "libfabric": version_tuple(self.libfabric_version),
            "efa_installer": version_tuple(self.efa_installer_version),
            "nccl": version_tuple(self.nccl_version),
            "kernel": version_tuple(self.kernel),
        }

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        obj = dataclasses.asdict(self)
        for key, value in obj.items():
            if isinstance(value, tuple):
                obj[key] = list(value)
        obj["elapsed_s"] = round(self.elapsed_s, 4)
        return obj


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One row of the rule table: data, evaluated by :func:`hpresil.netenv.plan.evaluate`.

    Attributes:
        id: short stable name (shown by the doctor and in events).
        variable: the environment variable; ``None`` for a check on the host alone.
        action: ``set``, ``leave`` or ``warn`` (see :data:`RuleAction`).
        value: what ``set`` sets (``{log_dir}`` is replaced by the job's log dir).
        plugin_value: for ``leave``: what the plugin sets, so a user value equal to
            it is reported as redundant (info) rather than with ``severity``.
        families: family names the rule applies to; ``"*"`` matches any, ``unknown`` included.
        when: conditions that must all hold (see :mod:`hpresil.netenv.plan`): flags such
            as ``plugin_tunes``, comparisons such as ``kernel<5.15``, ``$NAME`` (the
            variable is set), each negated by a leading ``!``.
        bad_values: for ``warn``: user values that trigger it (case-insensitive;
            ``"*"``: any value); ``ok_values`` are exempt.
        ok_values: values never warned about.
        severity: of the finding.
        scope: where a ``set`` is applied (see :data:`Scope`).
        reason: one line, why.
        source: where the fact comes from (URL or document name).
    """

    id: str
    variable: str | None
    action: RuleAction
    reason: str
    source: str
    value: str | None = None
    plugin_value: str | None = None
    families: tuple[str, ...] = ("*",)
    when: tuple[str, ...] = ()
    bad_values: tuple[str, ...] = ()
    ok_values: tuple[str, ...] = ()
    severity: Severity = "info"
    scope: Scope = "net"

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ConfigError(f"rule {self.id}: severity {self.severity!r} is not one of {_SEVERITIES}")
        if self.action == "set" and (self.value is None or self.variable is None):
            raise ConfigError(f"rule {self.id}: a set rule needs a variable and a value")
        if self.action == "leave" and self.variable is None:
            raise ConfigError(f"rule {self.id}: a leave rule needs a variable")
        if self.action == "warn" and self.variable is not None and not self.bad_values:
            raise ConfigError(f"rule {self.id}: a warn rule on {self.variable} needs bad_values ('*' for any)")
        if not self.source:
            raise ConfigError(f"rule {self.id}: every rule names its source")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What one rule decided for this host and environment.

    Attributes:
        rule: the rule's id.
        variable: the variable (``None`` for a host check).
        action: ``set``, ``keep``, ``leave`` or ``warn``.
        value: the value hpresil sets (``set``), would have set (``keep``) or the
            plugin sets (``leave``).
        current: the user's value, if any.
        severity: of the finding.
        scope: where a ``set`` goes.
        reason: one line, why.
        source: the rule's source.
    """

    rule: str
    variable: str | None
    action: Action
    value: str | None
    current: str | None
    severity: Severity
    scope: Scope
    reason: str
    source: str

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The decisions for one host, in rule-table order.

    Attributes:
        mode: the ``--net-env`` mode it was made for.
        facts: what detection found (``None`` when ``mode`` is ``off``).
        decisions: every decision.
    """

    mode: str
    facts: Facts | None
    decisions: tuple[Decision, ...] = ()

    def to_set(self, scope: Scope) -> list[Decision]:
        """The ``set`` decisions of ``scope``."""
        return [d for d in self.decisions if d.action == "set" and d.scope == scope]

    @property
    def warnings(self) -> list[Decision]:
        """Findings of severity warning or error."""
        return [d for d in self.decisions if d.severity in ("warning", "error")]

    @property
    def errors(self) -> list[Decision]:
        """Findings that will break the job."""
        return [d for d in self.decisions if d.severity == "error"]

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the doctor's ``--json`` output)."""
        return {
            "mode": self.mode,
            "facts": None if self.facts is None else self.facts.to_json_obj(),
            "decisions": [d.to_json_obj() for d in self.decisions],
            "errors": len(self.errors),
            "warnings": sum(1 for d in self.decisions if d.severity == "warning"),
        }

