"""Contract of the GPU health checks.

A :class:`HealthBackend` reads raw per-device state (NVML on a GPU host, a
scriptable fake in tests); :mod:`hpresil.health.checks` turns readings into
:class:`Finding` objects (``ok``/``warn``/``fatal``); the
:class:`~hpresil.health.service.HealthService` runs the checks before the
workers start and then periodically, emits events, and records a
:class:`Verdict` when the node should leave the job.

Readings use ``None`` for "this device or driver does not support the query":
an unsupported check is skipped, never failed.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from typing import Any, Literal, Mapping, Protocol

from hpresil.errors import ConfigError, NodeUnhealthyError

__all__ = [
    "Severity",
    "FatalAction",
    "Mode",
    "CHECKS",
    "EXIT_UNHEALTHY",
    "Finding",
    "DeviceReading",
    "XidEvent",
    "HealthReport",
    "Verdict",
    "HealthBackend",
    "HealthConfig",
    "ENV_MODE",
    "ENV_INTERVAL",
    "ENV_ACTION",
    "ENV_FAKE",
]

Severity = Literal["ok", "warn", "fatal"]
FatalAction = Literal["leave", "warn"]
Mode = Literal["auto", "on", "off"]

_SEVERITIES = ("ok", "warn", "fatal")

#: Every check the service knows, by name (the ``check`` field of a :class:`Finding`).
CHECKS: frozenset[str] = frozenset(
    {
        "xid",  # critical XID events since the last poll
        "ecc",  # volatile uncorrectable ECC errors
        "retired_pages",  # page retirement pending (pre-Ampere memory repair)
        "row_remap",  # row remapping pending or failed (Ampere+ memory repair)
        "gpu_lost",  # the GPU stopped answering (fallen off the bus, reset required)
        "nvlink",  # an NVLink of a device that has NVLink is down
        "fabric",  # NVLink fabric (NVL72 / NVSwitch) registration state
        "throttle",  # hardware clock slowdown (HW slowdown, HW thermal, power brake)
        "temperature",  # GPU core temperature over the warning threshold
        "recovery_action",  # the driver asks for a GPU reset / node reboot / drain
        "device_count",  # fewer GPUs than at pre-flight (or than expected)
    }
)

#: Exit code of ``hpresil-run`` when it leaves the job because of a fatal GPU
#: finding: ``EX_UNAVAILABLE`` from sysexits.h (a resource the program needs,
#: a healthy GPU, is unavailable). Schedulers can key node draining on it.
EXIT_UNHEALTHY = 69

#: ``off`` | ``on`` | ``auto`` (default: on when NVML loads and sees GPUs).
ENV_MODE = "HPRESIL_HEALTH"
#: Seconds between periodic checks (default 30).
ENV_INTERVAL = "HPRESIL_HEALTH_INTERVAL"
#: ``leave`` | ``warn``: what a fatal finding does (default leave).
ENV_ACTION = "HPRESIL_HEALTH_ACTION"
#: JSON (or a path to a JSON file) describing a fake node; selects the fake backend.
ENV_FAKE = "HPRESIL_HEALTH_FAKE"


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check on one device.

    Attributes:
        device: NVML device index, or ``None`` for node-wide findings.
        check: name of the check (one of :data:`CHECKS`, or ``"nvml_error"``).
        severity: ``ok``, ``warn`` (log and report) or ``fatal`` (the GPU is unfit).
        detail: what was seen and what to do, for a human.
        source: the backend and call that produced it (e.g. ``nvml:nvmlDeviceGetRemappedRows``).
        code: the XID number for ``xid`` findings, else ``None``.
    """

    device: int | None
    check: str
    severity: Severity
    detail: str
    source: str
    code: int | None = None

    @property
    def key(self) -> tuple[int | None, str, str, int | None]:
        """Identity used to tell a new finding from one already reported (a
        changing detail, such as a rising temperature, is not a new finding)."""
        return (self.device, self.check, self.severity, self.code)

    def to_json_obj(self) -> dict[str, Any]:
        """Returns the finding as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class DeviceReading:
    """Raw state of one device; ``None`` means "not supported here, skip the check".

    Attributes:
        device: NVML device index.
        uuid: the GPU UUID (``GPU-...``), when readable.
        lost: why the GPU does not answer (``GPU is lost``, ``GPU requires reset``), else ``None``.
        ecc_uncorrected_volatile: uncorrectable ECC errors since the last driver load / reset.
        retired_pages_pending: pages are waiting for a reset to be retired.
        remap_pending: a row remap is waiting for a reset to take effect.
        remap_failed: a row remap could not be recorded (the GPU needs service).
        nvlink_active: state of each existing NVLink (``True`` = up); ``None`` without NVLink.
        fabric_state: ``not_started`` | ``in_progress`` | ``completed``; ``None`` when
            the GPU is not on an NVLink fabric.
        fabric_status_ok: the fabric registration status is success (only with a state).
        fabric_degraded_bw: the fabric reports degraded bandwidth.
        throttle_reasons: active clock-event reasons by short name (``hw_slowdown``,
            ``hw_thermal``, ``hw_power_brake``, ``sw_thermal``, ``sw_power_cap``...).
        temperature_c: GPU core temperature in °C.
        recovery_action: what the driver asks for: ``none``, ``gpu_reset``,
            ``node_reboot``, ``drain_p2p``, ``drain_and_reset``...
        errors: unexpected query errors by check name (reported as warnings).
    """

    device: int
    uuid: str | None = None
    lost: str | None = None
    ecc_uncorrected_volatile: int | None = None
    retired_pages_pending: bool | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None
    nvlink_active: tuple[bool, ...] | None = None
    fabric_state: str | None = None
    fabric_status_ok: bool | None = None
    fabric_degraded_bw: bool | None = None
    throttle_reasons: frozenset[str] | None = None
    temperature_c: int | None = None
    recovery_action: str | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class XidEvent:
    """A critical XID event reported by the driver.

    Attributes:
        device: NVML device index (``None`` when the driver did not say which).
        xid: the XID number.
    """

    device: int | None
    xid: int


@dataclasses.dataclass(frozen=True, slots=True)
class HealthReport:
    """The result of one check.

    Attributes:
        kind: ``preflight`` (before workers start), ``periodic``, ``events``
            (XID poll only) or ``on_demand`` (e.g. after the workers stopped).
        findings: every current non-``ok`` finding (fatal ones stay until the job ends).
        devices: the NVML indices checked.
        duration_s: wall time of the check.
    """

    kind: str
    findings: tuple[Finding, ...]
    devices: tuple[int, ...]
    duration_s: float

    @property
    def ok(self) -> bool:
        """No findings at all."""
        return not self.findings

    @property
    def fatal(self) -> tuple[Finding, ...]:
        """The fatal findings."""
        return tuple(f for f in self.findings if f.severity == "fatal")


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """Why this node must leave the job.

    Attributes:
        findings: the fatal findings, first seen first.
        path: where the verdict was written (``<log_dir>/unhealthy.json``).
        exit_code: the exit code ``hpresil-run`` should end with.
    """

    findings: tuple[Finding, ...]
    path: str
    exit_code: int = EXIT_UNHEALTHY

    @property
    def message(self) -> str:
        """One line naming the GPU(s) and the reason, for logs and the exit message."""
        first = self.findings[0]
        where = "node" if first.device is None else f"GPU {first.device}"
        more = f" (+{len(self.findings) - 1} more)" if len(self.findings) > 1 else ""
        return f"leaving the job: {where} unhealthy: {first.check}: {first.detail}{more}; see {self.path}"

    def error(self) -> NodeUnhealthyError:
        """The error the agent raises to leave the job."""
        return NodeUnhealthyError(self.message, self.exit_code)


class HealthBackend(Protocol):
    """Source of raw GPU state. Implementations must never raise for a faulty
    device: a lost GPU is a reading (``lost``), an unsupported query is ``None``."""

    #: Short name used in :attr:`Finding.source` (``nvml``, ``fake``).
    name: str

    def open(self) -> None:
        """Connects to the driver.

        Raises:
            HealthUnavailableError: no library, no driver or no devices; the message says which.
        """
        ...

    def device_count(self) -> int:
        """Number of GPUs the driver reports."""
        ...

    def uuid(self, device: int) -> str | None:
        """The GPU UUID (``GPU-...``) of ``device``, when known."""
        ...

    def read(self, device: int, checks: frozenset[str]) -> DeviceReading:
        """Reads the state ``checks`` need from one device (others stay ``None``)."""
        ...

    def poll_xids(self) -> list[XidEvent]:
        """Returns the critical XID events since the last call, without blocking."""
        ...

    def source(self, check: str) -> str:
        """Names the call behind ``check`` (for :attr:`Finding.source`)."""
        ...

    def close(self) -> None:
        """Releases driver resources; safe to call twice."""
        ...


@dataclasses.dataclass(kw_only=True, slots=True)
class HealthConfig:
    """Settings of the GPU health checks.

    Attributes:
        mode: ``auto`` (check when a backend loads and sees GPUs), ``on`` (same, but
            a missing backend is a warning) or ``off``.
        interval: time between periodic full checks.
        event_poll_interval: time between polls of the XID event queue (cheap: one
            non-blocking driver call), so a fallen-off GPU is seen within seconds.
        check_timeout: bound on waiting for one check; a check that takes longer
            is reported (the driver is wedged) and not waited for again.
        summary_every: emit a ``health_check`` event at least this often even when
            nothing changed (otherwise only changes are emitted).
        checks: names of the checks to run (subset of :data:`CHECKS`).
        action_on_fatal: ``leave`` (the node leaves the job so the others rescale)
            or ``warn`` (report only).
        temperature_warn_c: warn at or above this GPU core temperature.
        ecc_uncorrected_limit: fatal when volatile uncorrectable ECC errors exceed this.
        expected_devices: fatal when fewer GPUs are visible (``None``: the pre-flight count).
        devices: NVML indices to check (``None``: those in ``CUDA_VISIBLE_DEVICES``, else all).
        xid_severity: per-XID overrides of the built-in classification.
    """

    mode: Mode = "auto"
    interval: timedelta = timedelta(seconds=30)
    event_poll_interval: timedelta = timedelta(seconds=1)
    check_timeout: timedelta = timedelta(seconds=10)
    summary_every: timedelta = timedelta(minutes=10)
    checks: frozenset[str] = CHECKS
    action_on_fatal: FatalAction = "leave"
    temperature_warn_c: int = 85
    ecc_uncorrected_limit: int = 0
    expected_devices: int | None = None
    devices: tuple[int, ...] | None = None
    xid_severity: Mapping[int, Severity] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ConfigError(f"health mode={self.mode!r}: use 'auto', 'on' or 'off' ({ENV_MODE}=auto)")
        for name in ("interval", "event_poll_interval", "check_timeout", "summary_every"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigError(f"health {name}={value!r} must be a positive timedelta, e.g. timedelta(seconds=30)")
        if self.event_poll_interval > self.interval:
            raise ConfigError(
                f"health event_poll_interval={self.event_poll_interval} > interval={self.interval}: "
                "XID events must be polled at least as often as the full check; lower event_poll_interval"
            )
        if self.summary_every < self.interval:
            raise ConfigError(
                f"health summary_every={self.summary_every} < interval={self.interval}: "
                "a summary needs a check; set summary_every >= interval"
            )
        self.checks = frozenset(self.checks)
        unknown = self.checks - CHECKS
        if unknown:
            raise ConfigError(f"unknown health checks {sorted(unknown)}: choose from {sorted(CHECKS)}")
        if self.action_on_fatal not in ("leave", "warn"):
            raise ConfigError(
                f"health action_on_fatal={self.action_on_fatal!r}: use 'leave' or 'warn' ({ENV_ACTION}=leave)"
            )
        if not 0 < self.temperature_warn_c < 150:
            raise ConfigError(f"temperature_warn_c={self.temperature_warn_c} must be in (0, 150) °C, e.g. 85")
        if self.ecc_uncorrected_limit < 0:
            raise ConfigError(f"ecc_uncorrected_limit={self.ecc_uncorrected_limit} must be >= 0 (0: any error is fatal)")
        if self.expected_devices is not None and self.expected_devices < 1:
            raise ConfigError(f"expected_devices={self.expected_devices} must be >= 1, or None for the pre-flight count")
        if self.devices is not None:
            self.devices = tuple(self.devices)
            if not self.devices or any(d < 0 for d in self.devices):
                raise ConfigError(f"devices={self.devices} must be non-negative NVML indices, or None for all")
        for xid, severity in self.xid_severity.items():
            if severity not in _SEVERITIES:
                raise ConfigError(f"xid_severity[{xid}]={severity!r}: use one of {_SEVERITIES}")

    @property
    def enabled(self) -> bool:
        """Whether checks may run at all (``mode`` is not ``off``)."""
        return self.mode != "off"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **explicit: Any) -> HealthConfig:
        """Builds a config from ``HPRESIL_HEALTH*`` variables; ``explicit`` arguments win.

        Args:
            env: the environment (default ``os.environ``).
            **explicit: fields set by the caller, overriding the environment.

        Raises:
            ConfigError: a variable has an invalid value; the message names the fix.
        """
        env = os.environ if env is None else env
        fields: dict[str, Any] = {}
        mode = env.get(ENV_MODE, "").strip().lower()
        if mode:
            if mode not in ("auto", "on", "off"):
                raise ConfigError(f"{ENV_MODE}={env[ENV_MODE]!r}: use off, on or auto")
            fields["mode"] = mode
        interval = env.get(ENV_INTERVAL, "").strip()
        if interval:
            try:
                seconds = float(interval)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds <= 1e9:  # also NaN and values past timedelta's range
                raise ConfigError(f"{ENV_INTERVAL}={interval!r}: give the seconds between checks, e.g. 30")
            fields["interval"] = timedelta(seconds=seconds)
        action = env.get(ENV_ACTION, "").strip().lower()
        if action:
            if action not in ("leave", "warn"):
                raise ConfigError(f"{ENV_ACTION}={env[ENV_ACTION]!r}: use leave or warn")
            fields["action_on_fatal"] = action
        fields.update(explicit)
        if "interval" in fields:
            # Keep the derived intervals consistent with a short (test, demo) or long interval.
            fields.setdefault("event_poll_interval", min(timedelta(seconds=1), fields["interval"]))
            fields.setdefault("summary_every", max(timedelta(minutes=10), fields["interval"]))
        return cls(**fields)
