"""Turns raw device readings and XID events into findings.

Pure functions, no driver calls: the same rules run on NVML readings and on
the fake backend's, so every classification is testable on a CPU.

The rule behind ``fatal``: the GPU cannot run the job again until someone
resets, reboots or repairs it, so restarting the workers on it would crash
again. Such a node should leave the job and let the others rescale.
``warn``: worth a line in the event log (slow GPU, application error), not a
reason to leave.
"""

from __future__ import annotations

from typing import Callable, Mapping

from hpresil.health.api import DeviceReading, Finding, HealthConfig, Severity, XidEvent

__all__ = ["XID_CATALOG", "THROTTLE_WARN", "classify_xid", "xid_findings", "evaluate", "device_count_finding"]

#: Classification of XIDs on Ampere and newer GPUs, from NVIDIA's Xid catalog
#: ("Analyzing Xid Errors with the Xid Catalog",
#: https://docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html, column
#: "Resolution Bucket (Immediate Action)") and the A100/H100 memory error
#: management guide (https://docs.nvidia.com/deploy/a100-gpu-mem-error-mgmt/).
#: Buckets RESTART_APP / IGNORE / CHECK_APP map to ``warn`` (the application or
#: a previous error caused it; the GPU is fine); RESET_GPU / RESTART_BM /
#: CONTACT_SUPPORT on hardware faults map to ``fatal``. XIDs not listed are
#: ``warn``; ``HealthConfig.xid_severity`` overrides any entry.
XID_CATALOG: Mapping[int, tuple[Severity, str]] = {
    8: ("warn", "GPU stopped processing (channel idle timeout); restart the application"),
    13: ("warn", "graphics engine exception: usually an application bug (out-of-range access, illegal instruction)"),
    31: ("warn", "GPU memory page fault: usually an application bug (illegal address)"),
    32: ("warn", "invalid or corrupted push buffer stream (application, driver or PCIe)"),
    38: ("fatal", "driver firmware error: reset the GPU"),
    43: ("warn", "GPU stopped processing: usually an application fault (channel reset)"),
    44: ("fatal", "graphics engine fault during context switch: reset the GPU"),
    45: ("warn", "preemptive cleanup after a previous error (the application was stopped)"),
    48: ("fatal", "double-bit (uncorrectable) ECC error: reset the GPU; RMA if it recurs"),
    57: ("fatal", "error programming the video memory interface: reset the GPU"),
    58: ("fatal", "unstable video memory interface: reset the GPU"),
    61: ("fatal", "internal micro-controller breakpoint/warning: reset the GPU"),
    62: ("fatal", "internal micro-controller halt: reset the GPU"),
    63: ("fatal", "row remap / page retirement recorded: reset the GPU to apply it"),
    64: ("fatal", "row remap / page retirement recording failed: the GPU needs service (RMA)"),
    68: ("warn", "video decoder (NVDEC) exception: application error"),
    69: ("warn", "graphics engine class error: application error"),
    74: ("fatal", "NVLink error: check the link; reset the GPU (reboot if it persists)"),
    79: ("fatal", "GPU has fallen off the bus: reboot the node; check power and seating"),
    92: ("warn", "high single-bit ECC error rate: schedule a memory check"),
    94: ("fatal", "contained uncorrectable ECC error: the GPU needs a reset to remap the row"),
    95: ("fatal", "uncontained uncorrectable ECC error: reset the GPU"),
    109: ("warn", "context switch timeout (often follows an application hang)"),
    110: ("fatal", "security fault: reset the GPU"),
    119: ("fatal", "GSP RPC timeout: the GPU firmware stopped answering; reset the GPU"),
    120: ("fatal", "GSP error: the GPU firmware failed; reset the GPU"),
    121: ("warn", "C2C link corrected error (Grace-Hopper/Blackwell chip-to-chip link)"),
    140: ("fatal", "unrecovered ECC error: reset the GPU"),
    # NVLink 5 (Blackwell, GB200) unit errors; many are corrected, so the NVLink
    # state and fabric checks decide whether the link is actually unusable.
    144: ("warn", "NVLink SAW error (see the nvlink/fabric checks)"),
    145: ("warn", "NVLink RLW error (see the nvlink/fabric checks)"),
    146: ("warn", "NVLink TLW error (see the nvlink/fabric checks)"),
    147: ("warn", "NVLink TREX error (see the nvlink/fabric checks)"),
    148: ("warn", "NVLink NVLPW_CTRL error (see the nvlink/fabric checks)"),
    149: ("warn", "NVLink NETIR error (see the nvlink/fabric checks)"),
    150: ("warn", "NVLink MSE error (see the nvlink/fabric checks)"),
    # The driver's recovery action changed; the recovery_action check reads what it now asks for.
    154: ("warn", "GPU recovery action changed (see the recovery_action check)"),
}

#: Clock-event reasons that mean the hardware, not the user, is slowing the GPU.
THROTTLE_WARN: Mapping[str, str] = {
    "hw_slowdown": "HW slowdown (power supply, over-temperature or external signal)",
    "hw_thermal": "HW thermal slowdown (GPU too hot)",
    "hw_power_brake": "HW power brake slowdown (external power brake asserted)",
}


def classify_xid(xid: int, overrides: Mapping[int, Severity] | None = None) -> tuple[Severity, str]:
    """Returns the severity and a description of ``xid``.

    Args:
        xid: the XID number.
        overrides: per-XID severities that win over :data:`XID_CATALOG`.
    """
    severity, text = XID_CATALOG.get(xid, ("warn", "XID not in hpresil's catalog; see NVIDIA's Xid catalog"))
    if overrides and xid in overrides:
        severity = overrides[xid]
    return severity, text


def xid_findings(events: list[XidEvent], config: HealthConfig, source: str) -> list[Finding]:
    """One finding per distinct (device, XID) among ``events``."""
    seen: set[tuple[int | None, int]] = set()
    findings = []
    for event in events:
        if (event.device, event.xid) in seen:
            continue
        seen.add((event.device, event.xid))
        severity, text = classify_xid(event.xid, config.xid_severity)
        if severity != "ok":
            findings.append(Finding(device=event.device, check="xid", severity=severity,
                                    detail=f"Xid {event.xid}: {text}", source=source, code=event.xid))
    return findings


def device_count_finding(count: int, expected: int, source: str) -> Finding | None:
    """A fatal finding when fewer than ``expected`` GPUs are visible."""
    if count >= expected:
        return None
    return Finding(device=None, check="device_count", severity="fatal",
                   detail=f"{count} GPUs visible, expected {expected}: a GPU fell off the bus or failed to "
                          "initialise; reboot the node", source=source)


def evaluate(
    reading: DeviceReading,
    config: HealthConfig,
    source: Callable[[str], str],
    baseline_links: int | None = None,
) -> list[Finding]:
    """Applies the enabled checks to one device's reading.

    Args:
        reading: the device's raw state.
        config: thresholds and the enabled checks.
        source: maps a check name to the call that produced its reading.
        baseline_links: active NVLinks at pre-flight; fewer now is fatal.

    Returns:
        The non-``ok`` findings (an empty list means healthy).
    """
    dev, checks = reading.device, config.checks
    out: list[Finding] = []

    def add(check: str, severity: Severity, detail: str) -> None:
        out.append(Finding(device=dev, check=check, severity=severity, detail=detail, source=source(check)))

    if reading.lost is not None:
        # Nothing else is readable on a lost GPU; one finding says it all.
        if "gpu_lost" in checks:
            add("gpu_lost", "fatal", f"{reading.lost}: the GPU stopped answering; reset the GPU or reboot the node")
        return out

    ecc = reading.ecc_uncorrected_volatile
    if "ecc" in checks and ecc is not None and ecc > config.ecc_uncorrected_limit:
        add("ecc", "fatal", f"{ecc} volatile uncorrectable ECC errors (limit {config.ecc_uncorrected_limit}): "
                            "reset the GPU; RMA if they recur")
    if "retired_pages" in checks and reading.retired_pages_pending:
        add("retired_pages", "fatal", "retired pages pending: reset the GPU to retire them")
    if "row_remap" in checks:
        if reading.remap_failed:
            add("row_remap", "fatal", "row remapping failed: the GPU needs service (RMA)")
        elif reading.remap_pending:
            add("row_remap", "fatal", "row remapping pending: reset the GPU to apply it")
    if "nvlink" in checks and reading.nvlink_active is not None:
        _nvlink(reading.nvlink_active, baseline_links, add)
    if "fabric" in checks and reading.fabric_state is not None:
        _fabric(reading, add)
    if "throttle" in checks and reading.throttle_reasons:
        hw = sorted(r for r in reading.throttle_reasons if r in THROTTLE_WARN)
        if hw:
            add("throttle", "warn", "clocks slowed by " + "; ".join(THROTTLE_WARN[r] for r in hw))
    temp = reading.temperature_c
    if "temperature" in checks and temp is not None and temp >= config.temperature_warn_c:
        add("temperature", "warn", f"GPU at {temp} °C (warn at {config.temperature_warn_c} °C): check cooling")
    action = reading.recovery_action
    if "recovery_action" in checks and action not in (None, "none"):
        add("recovery_action", "fatal", f"the driver requests recovery action {action!r}")
    for check, error in sorted(reading.errors.items()):
        if check in checks or check == "device":  # "device": the whole read failed
            out.append(Finding(device=dev, check="nvml_error", severity="warn",
                               detail=f"{check} query failed: {error}", source=source(check)))
    return out


def _nvlink(active: tuple[bool, ...], baseline: int | None, add: Callable[[str, Severity, str], None]) -> None:
    up = sum(active)
    down = [i for i, a in enumerate(active) if not a]
    if baseline is not None and up < baseline:
        add("nvlink", "fatal", f"{baseline - up} NVLink(s) went down since pre-flight (links {down} down, "
                               f"{up}/{len(active)} up): NCCL over NVLink will fail or slow down; reset the GPU")
    elif down and up:
        # Some links up, some down: on HGX/NVL72 every link is cabled, so a
        # down link is a fault, not a configuration.
        add("nvlink", "fatal", f"NVLinks {down} down ({up}/{len(active)} up): reset the GPU or check the baseboard")


def _fabric(reading: DeviceReading, add: Callable[[str, Severity, str], None]) -> None:
    state = reading.fabric_state
    if state == "completed":
        if reading.fabric_status_ok is False:
            add("fabric", "fatal", "NVLink fabric registration completed with an error: check the fabric "
                                   "manager / IMEX and the NVSwitch trays")
        elif reading.fabric_degraded_bw:
            add("fabric", "warn", "NVLink fabric reports degraded bandwidth")
    elif state == "in_progress":
        # Normal for a few seconds after boot; fatal only if it stays so (the
        # next periodic check will show it as still in progress).
        add("fabric", "warn", "NVLink fabric registration in progress: CUDA cannot start until it completes")
    elif state == "not_started":
        add("fabric", "fatal", "NVLink fabric registration not started: is the fabric manager / IMEX running?")
