"""Health backend on NVML (``pip install nvidia-ml-py``, imported as ``pynvml``).

Optional: importing this module never imports ``pynvml``; :meth:`NvmlBackend.open`
does, and raises :class:`~hpresil.errors.HealthUnavailableError` with the reason
when the package, the driver or the GPUs are missing.

Every query is guarded: ``NVML_ERROR_NOT_SUPPORTED`` (and a function missing
from an older driver or binding) skips that check on that device,
``NVML_ERROR_GPU_IS_LOST`` / ``NVML_ERROR_RESET_REQUIRED`` mark the GPU lost,
and any other error becomes a warning, so one odd GPU never stops the checks.
pynvml calls go through ctypes, which releases the GIL, so a wedged driver call
blocks only the health thread.
"""

from __future__ import annotations

import ctypes
import logging
from types import ModuleType
from typing import Any, Callable

from hpresil.errors import HealthUnavailableError
from hpresil.health.api import DeviceReading, XidEvent

__all__ = ["NvmlBackend", "THROTTLE_BITS"]

log = logging.getLogger(__name__)

#: nvmlClocksEventReason* bits (nvml.h; same values as the older
#: nvmlClocksThrottleReason* names) by the short names findings use.
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clock",
}

#: NVML_GPU_RECOVERY_ACTION_* values (nvml.h, driver R550+).
_RECOVERY_ACTIONS = {
    0: "none",
    1: "gpu_reset",
    2: "node_reboot",
    3: "drain_p2p",
    4: "drain_and_reset",
    5: "recover_imex_domain",
    6: "bus_reset",
    7: "system_reboot",
}

_FABRIC_STATES = {1: "not_started", 2: "in_progress", 3: "completed"}  # 0 = not supported

#: The NVML call behind each check (for Finding.source).
_SOURCES = {
    "xid": "nvmlEventSetWait_v2",
    "ecc": "nvmlDeviceGetTotalEccErrors",
    "retired_pages": "nvmlDeviceGetRetiredPagesPendingStatus",
    "row_remap": "nvmlDeviceGetRemappedRows",
    "gpu_lost": "NVML_ERROR_GPU_IS_LOST",
    "nvlink": "nvmlDeviceGetNvLinkState",
    "fabric": "nvmlDeviceGetGpuFabricInfoV",
    "throttle": "nvmlDeviceGetCurrentClocksEventReasons",
    "temperature": "nvmlDeviceGetTemperature",
    "recovery_action": "nvmlDeviceGetFieldValues(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION)",
    "device_count": "nvmlDeviceGetCount",
}

#: Events drained per poll; a storm of XIDs must not keep the health thread busy.
_MAX_EVENTS_PER_POLL = 256


class _Unsupported(Exception):
    """The query is not supported on this device/driver: skip the check."""


class _Lost(Exception):
    """The GPU does not answer any more."""


class NvmlBackend:
    """Reads GPU health through NVML.

    Args:
        nvml: the ``pynvml`` module to use (tests pass a patched one); default: import it.
    """

    name = "nvml"

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nv: Any = nvml
        self._opened = False
        self._handles: list[Any] = []
        self._uuids: list[str | None] = []
        self._links: dict[int, list[int]] = {}
        self._event_set: Any = None
        self._event_devices: dict[int, int] = {}
        self._xid_mask = 0
        self._count = 0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """Initialises NVML, opens every device and registers for critical XID events.

        Raises:
            HealthUnavailableError: ``nvidia-ml-py`` missing, no driver, or no GPUs.
        """
        if self._nv is None:
            try:
                import pynvml  # noqa: PLC0415 - optional dependency, imported on use
            except ImportError as exc:
                raise HealthUnavailableError(
                    "nvidia-ml-py is not installed: pip install 'hpresil[nvml]' to enable GPU health checks"
                ) from exc
            self._nv = pynvml
        nv = self._nv
        try:
            nv.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / OSError from ctypes
            raise HealthUnavailableError(
                f"NVML did not initialise ({type(exc).__name__}: {exc}): no NVIDIA driver loaded on this host"
            ) from exc
        self._opened = True
        try:
            self._count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            self.close()
            raise HealthUnavailableError(f"nvmlDeviceGetCount failed: {exc}") from exc
        if self._count == 0:
            self.close()
            raise HealthUnavailableError("NVML sees no GPUs on this host")
        self._handles = [self._handle(i) for i in range(self._count)]
        self._uuids = [self._uuid(h) for h in self._handles]
        self._register_events()

    def close(self) -> None:
        """Frees the event set and shuts NVML down; safe to call twice."""
        if not self._opened:
            return
        self._opened = False
        nv = self._nv
        if self._event_set is not None:
            try:
                nv.nvmlEventSetFree(self._event_set)
            except Exception:
                log.debug("nvmlEventSetFree failed", exc_info=True)
            self._event_set = None
        try:
            nv.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)

    # -- HealthBackend -------------------------------------------------------

    def device_count(self) -> int:
        """GPUs NVML reports now (the last known count if the query fails)."""
        try:
            self._count = int(self._nv.nvmlDeviceGetCount())  # nvmlDeviceGetCount
        except Exception:
            log.debug("nvmlDeviceGetCount failed", exc_info=True)
        return self._count

    def source(self, check: str) -> str:
        """Names the NVML call behind ``check``."""
        return f"nvml:{_SOURCES.get(check, check)}"

    def uuid(self, device: int) -> str | None:
        """The GPU UUID of ``device`` as read at open."""
        return self._uuids[device] if 0 <= device < len(self._uuids) else None

    def read(self, device: int, checks: frozenset[str]) -> DeviceReading:
        """Queries what ``checks`` need from ``device``; never raises for device faults."""
        nv = self._nv
        reading = DeviceReading(device=device, uuid=self.uuid(device))
        try:
            handle = self._handles[device] if device < len(self._handles) else None
            if handle is None:
                handle = self._handle(device, strict=True)
                self._handles[device:device + 1] = [handle]
            if "ecc" in checks:
                # nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE): errors since the last driver load/reset.
                reading.ecc_uncorrected_volatile = self._q(
                    reading, "ecc", "nvmlDeviceGetTotalEccErrors", handle,
                    nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
            if "retired_pages" in checks:
                # nvmlDeviceGetRetiredPagesPendingStatus: pre-Ampere page retirement awaiting a reset.
                pending = self._q(reading, "retired_pages", "nvmlDeviceGetRetiredPagesPendingStatus", handle)
                reading.retired_pages_pending = None if pending is None else bool(pending)
            if "row_remap" in checks:
                # nvmlDeviceGetRemappedRows -> (corrected, uncorrected, pending, failure); Ampere+.
                rows = self._q(reading, "row_remap", "nvmlDeviceGetRemappedRows", handle)
                if rows is not None:
                    reading.remap_pending, reading.remap_failed = bool(rows[2]), bool(rows[3])
            if "nvlink" in checks:
                reading.nvlink_active = self._nvlink(reading, device, handle)
            if "fabric" in checks:
                self._fabric(reading, handle)
            if "throttle" in checks:
                # nvmlDeviceGetCurrentClocksEventReasons (driver R535+), else the older
                # nvmlDeviceGetCurrentClocksThrottleReasons: same bit values.
                try:
                    bits = self._call("nvmlDeviceGetCurrentClocksEventReasons", handle)
                except _Unsupported:
                    bits = self._q(reading, "throttle", "nvmlDeviceGetCurrentClocksThrottleReasons", handle)
                except nv.NVMLError as exc:
                    reading.errors["throttle"] = str(exc)
                    bits = None
                if bits is not None:
                    reading.throttle_reasons = frozenset(n for b, n in THROTTLE_BITS.items() if bits & b)
            if "temperature" in checks:
                # nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU): core temperature in °C.
                temp = self._q(reading, "temperature", "nvmlDeviceGetTemperature", handle, nv.NVML_TEMPERATURE_GPU)
                reading.temperature_c = None if temp is None else int(temp)
            if "recovery_action" in checks:
                reading.recovery_action = self._recovery_action(reading, handle)
        except _Lost as exc:
            reading.lost = str(exc)
        return reading

    def poll_xids(self) -> list[XidEvent]:
        """Drains critical XID events without blocking (``nvmlEventSetWait_v2`` with timeout 0)."""
        if self._event_set is None:
            return []
        nv = self._nv
        events: list[XidEvent] = []
        for _ in range(_MAX_EVENTS_PER_POLL):
            try:
                data = nv.nvmlEventSetWait_v2(self._event_set, 0)
            except nv.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == nv.NVML_ERROR_TIMEOUT:
                    break  # queue empty
                if code == nv.NVML_ERROR_GPU_IS_LOST:
                    # The wait reports a registered GPU that fell off the bus
                    # this way; that is what Xid 79 means. The next full check
                    # names the device.
                    events.append(XidEvent(device=None, xid=79))
                    break
                log.warning("nvmlEventSetWait_v2 failed: %s", exc)
                break
            if data.eventType & self._xid_mask:
                events.append(XidEvent(device=self._event_device(data.device), xid=int(data.eventData)))
        return events

    # -- helpers -------------------------------------------------------------

    def _call(self, name: str, *args: Any) -> Any:
        nv = self._nv
        fn: Callable[..., Any] | None = getattr(nv, name, None)
        if fn is None:  # binding older than the call
            raise _Unsupported(name)
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_FUNCTION_NOT_FOUND, nv.NVML_ERROR_NO_PERMISSION):
                raise _Unsupported(name) from exc
            if code == nv.NVML_ERROR_GPU_IS_LOST:
                raise _Lost("GPU is lost (NVML_ERROR_GPU_IS_LOST)") from exc
            if code == nv.NVML_ERROR_RESET_REQUIRED:
                raise _Lost("GPU requires reset (NVML_ERROR_RESET_REQUIRED)") from exc
            raise

    def _q(self, reading: DeviceReading, check: str, name: str, *args: Any) -> Any:
        """Calls ``name``; ``None`` when unsupported, other errors recorded as warnings."""
        try:
            return self._call(name, *args)
        except _Unsupported:
            return None
        except self._nv.NVMLError as exc:
            reading.errors[check] = f"{name}: {exc}"
            return None

    def _handle(self, index: int, strict: bool = False) -> Any:
        try:
            return self._call("nvmlDeviceGetHandleByIndex", index)
        except (_Lost, _Unsupported, self._nv.NVMLError):
            if strict:
                raise _Lost(f"GPU {index} cannot be opened (nvmlDeviceGetHandleByIndex failed)") from None
            return None

    def _uuid(self, handle: Any) -> str | None:
        if handle is None:
            return None
        try:
            value = self._call("nvmlDeviceGetUUID", handle)
        except Exception:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    def _register_events(self) -> None:
        # nvmlEventSetCreate + nvmlDeviceRegisterEvents(nvmlEventTypeXidCriticalError):
        # the driver queues every critical XID for us until poll_xids drains it.
        nv = self._nv
        self._xid_mask = int(getattr(nv, "nvmlEventTypeXidCriticalError", 0x8))
        try:
            self._event_set = nv.nvmlEventSetCreate()
        except Exception as exc:
            log.info("NVML event set unavailable (%s): XIDs are seen only through the periodic checks", exc)
            return
        for index, handle in enumerate(self._handles):
            if handle is None:
                continue
            try:
                supported = int(nv.nvmlDeviceGetSupportedEventTypes(handle))
                if not supported & self._xid_mask:
                    log.info("GPU %d does not report XID events", index)
                    continue
                nv.nvmlDeviceRegisterEvents(handle, self._xid_mask, self._event_set)
                self._event_devices[_address(handle)] = index
            except Exception as exc:
                log.info("cannot register XID events on GPU %d: %s", index, exc)

    def _event_device(self, handle: Any) -> int | None:
        index = self._event_devices.get(_address(handle))
        if index is None:
            try:
                index = int(self._nv.nvmlDeviceGetIndex(handle))
            except Exception:
                return None
        return index

    def _nvlink(self, reading: DeviceReading, device: int, handle: Any) -> tuple[bool, ...] | None:
        # nvmlDeviceGetNvLinkState(handle, link) per link. The links that exist
        # are probed once (NOT_SUPPORTED / INVALID_ARGUMENT = no such link), so a
        # periodic check costs one call per real link.
        nv = self._nv
        links = self._links.get(device)
        if links is None:
            links = []
            for link in range(int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18))):
                try:
                    self._call("nvmlDeviceGetNvLinkState", handle, link)
                except _Unsupported:
                    continue
                except nv.NVMLError:
                    continue  # NVML_ERROR_INVALID_ARGUMENT: the link does not exist
                links.append(link)
            self._links[device] = links
        if not links:
            return None
        states = []
        for link in links:
            state = self._q(reading, "nvlink", "nvmlDeviceGetNvLinkState", handle, link)
            states.append(bool(state) if state is not None else False)
        return tuple(states)

    def _fabric(self, reading: DeviceReading, handle: Any) -> None:
        # nvmlDeviceGetGpuFabricInfoV (v2 struct carries healthMask); older
        # drivers only have nvmlDeviceGetGpuFabricInfo. Healthy: state COMPLETED
        # and status NVML_SUCCESS. State NOT_SUPPORTED: no NVLink fabric here.
        nv = self._nv
        info: Any = None
        try:
            info = nv.c_nvmlGpuFabricInfoV_t()
            self._call("nvmlDeviceGetGpuFabricInfoV", handle, ctypes.byref(info))
        except (_Unsupported, AttributeError):
            try:
                info = nv.c_nvmlGpuFabricInfo_t()
                self._call("nvmlDeviceGetGpuFabricInfo", handle, ctypes.byref(info))
            except (_Unsupported, AttributeError):
                return
            except nv.NVMLError as exc:
                reading.errors["fabric"] = f"nvmlDeviceGetGpuFabricInfo: {exc}"
                return
        except nv.NVMLError as exc:
            reading.errors["fabric"] = f"nvmlDeviceGetGpuFabricInfoV: {exc}"
            return
        state = _FABRIC_STATES.get(int(info.state))
        if state is None:
            return
        reading.fabric_state = state
        reading.fabric_status_ok = int(info.status) == nv.NVML_SUCCESS
        mask = getattr(info, "healthMask", None)
        if mask is not None:
            shift = getattr(nv, "NVML_GPU_FABRIC_HEALTH_MASK_SHIFT_DEGRADED_BW", 0)
            width = getattr(nv, "NVML_GPU_FABRIC_HEALTH_MASK_WIDTH_DEGRADED_BW", 0x3)
            true = getattr(nv, "NVML_GPU_FABRIC_HEALTH_MASK_DEGRADED_BW_TRUE", 1)
            reading.fabric_degraded_bw = ((int(mask) >> shift) & width) == true

    def _recovery_action(self, reading: DeviceReading, handle: Any) -> str | None:
        # nvmlDeviceGetFieldValues(NVML_FI_DEV_GET_GPU_RECOVERY_ACTION), driver R550+:
        # what the driver says the GPU needs (reset, reboot, drain) after an error.
        nv = self._nv
        field = getattr(nv, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        if field is None:
            return None
        values = self._q(reading, "recovery_action", "nvmlDeviceGetFieldValues", handle, [field])
        if values is None:
            return None
        value = values[0]
        if int(value.nvmlReturn) == nv.NVML_ERROR_GPU_IS_LOST:
            raise _Lost("GPU is lost (NVML_ERROR_GPU_IS_LOST)")
        if int(value.nvmlReturn) != nv.NVML_SUCCESS:
            return None  # field not supported by this driver/GPU
        action = int(value.value.uiVal)
        return _RECOVERY_ACTIONS.get(action, f"unknown({action})")


def _address(handle: Any) -> int:
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
