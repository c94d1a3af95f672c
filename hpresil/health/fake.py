"""A scriptable fake GPU node for CPU tests and demos.

In Python::

    fake = FakeBackend(devices=8)
    fake.inject_xid(3, 79)          # GPU 3 falls off the bus
    fake.set_ecc(1, 2)              # two volatile uncorrectable ECC errors
    service = HealthService(HealthConfig(), backend=fake)

From the environment, so ``hpresil-run`` itself runs against a fake unhealthy
node (``HPRESIL_HEALTH_FAKE`` holds JSON, or the path of a JSON file)::

    HPRESIL_HEALTH_FAKE='{"devices": 8, "xid": [[3, 79, 2.0]]}' hpresil-run ...

Spec keys (device keys may be strings, as JSON requires): ``devices`` (int),
``nvlinks`` (links per GPU, 0 = none; default 18), ``visible`` (device count
reported, to fake a vanished GPU), ``unavailable`` (reason: ``open()`` fails),
``read_delay_s`` (seconds each device read takes, to fake a wedged driver),
``xid`` ([[device, xid] or [device, xid, after_s]]), ``ecc`` ({device: count}),
``retired_pending`` / ``remap_pending`` / ``remap_failed`` ([devices]),
``lost`` ([devices]), ``nvlink_down`` ({device: [links]}), ``throttle``
({device: [reason names]}), ``temperature`` ({device: °C}), ``fabric``
(state for all GPUs, or {device: state}), ``fabric_error`` ([devices]),
``recovery_action`` ({device: action}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any, Callable, Mapping

from hpresil.errors import ConfigError, HealthUnavailableError
from hpresil.health.api import CHECKS, DeviceReading, XidEvent

__all__ = ["FakeBackend", "FakeGpu"]

_FABRIC_STATES = (None, "not_started", "in_progress", "completed")


@dataclasses.dataclass(slots=True)
class FakeGpu:
    """State of one fake GPU; ``None`` fields read as "not supported"."""

    uuid: str
    lost: str | None = None
    ecc_uncorrected_volatile: int | None = 0
    retired_pages_pending: bool | None = False
    remap_pending: bool | None = False
    remap_failed: bool | None = False
    nvlinks: int = 18
    nvlink_down: set[int] = dataclasses.field(default_factory=set)
    fabric_state: str | None = None
    fabric_status_ok: bool = True
    fabric_degraded_bw: bool = False
    throttle: set[str] = dataclasses.field(default_factory=set)
    temperature_c: int | None = 40
    recovery_action: str | None = "none"
    unsupported: set[str] = dataclasses.field(default_factory=set)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


class FakeBackend:
    """In-memory :class:`~hpresil.health.api.HealthBackend` whose faults tests script.

    Args:
        devices: number of GPUs.
        nvlinks: NVLinks per GPU (0: no NVLink).
        unavailable: when set, :meth:`open` fails with this reason.
        read_delay: seconds each :meth:`read` sleeps (a slow or wedged driver).
        clock: monotonic clock for delayed XIDs (tests pass a fake one).
    """

    name = "fake"

    def __init__(
        self,
        devices: int = 8,
        *,
        nvlinks: int = 18,
        unavailable: str | None = None,
        read_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= devices <= 4096:  # a damaged spec must not allocate millions of fake GPUs
            raise ConfigError(f"fake devices={devices} must be in 0..4096")
        self.gpus = [FakeGpu(uuid=f"GPU-{i:08x}-fake-0000-000000000000", nvlinks=nvlinks) for i in range(devices)]
        self.visible: int | None = None
        self.unavailable = unavailable
        self.read_delay = read_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._xids: list[tuple[float, XidEvent]] = []
        self._pre_open: list[tuple[float, XidEvent]] = []
        self._opened_at: float | None = None
        #: calls made, for tests of rate limiting and cost.
        self.reads = 0
        self.polls = 0
        self.closed = False

    # -- scripting -----------------------------------------------------------

    def inject_xid(self, device: int | None, xid: int, after: float = 0.0) -> None:
        """Queues an XID event, delivered ``after`` seconds after :meth:`open` (or now)."""
        event = XidEvent(device=device, xid=xid)
        with self._lock:
            if self._opened_at is None:
                self._pre_open.append((after, event))
            else:
                self._xids.append((self._clock() + after, event))

    def lose(self, device: int, reason: str = "GPU is lost (NVML_ERROR_GPU_IS_LOST)") -> None:
        """Makes ``device`` stop answering."""
        self.gpus[device].lost = reason

    def set_ecc(self, device: int, count: int | None) -> None:
        """Sets the volatile uncorrectable ECC count (``None``: ECC unsupported)."""
        self.gpus[device].ecc_uncorrected_volatile = count

    def set_retired_pending(self, device: int, pending: bool = True) -> None:
        """Marks retired pages pending on ``device``."""
        self.gpus[device].retired_pages_pending = pending

    def set_remap(self, device: int, *, pending: bool = False, failed: bool = False) -> None:
        """Sets the row-remapper's pending / failure flags."""
        self.gpus[device].remap_pending, self.gpus[device].remap_failed = pending, failed

    def set_nvlink_down(self, device: int, *links: int) -> None:
        """Takes ``links`` of ``device`` down (no links: all up again)."""
        self.gpus[device].nvlink_down = set(links)

    def set_throttle(self, device: int, *reasons: str) -> None:
        """Sets active clock-event reasons (``hw_slowdown``, ``hw_thermal``, ``hw_power_brake``...)."""
        self.gpus[device].throttle = set(reasons)

    def set_temperature(self, device: int, celsius: int | None) -> None:
        """Sets the GPU core temperature."""
        self.gpus[device].temperature_c = celsius

    def set_fabric(self, device: int, state: str | None, *, status_ok: bool = True, degraded_bw: bool = False) -> None:
        """Sets the NVLink fabric state (``None``: not on a fabric)."""
        if state not in _FABRIC_STATES:
            raise ConfigError(f"fabric state {state!r}: use one of {_FABRIC_STATES}")
        gpu = self.gpus[device]
        gpu.fabric_state, gpu.fabric_status_ok, gpu.fabric_degraded_bw = state, status_ok, degraded_bw

    def set_recovery_action(self, device: int, action: str | None) -> None:
        """Sets the driver's requested recovery action (``none``, ``gpu_reset``, ``node_reboot``...)."""
        self.gpus[device].recovery_action = action

    def set_unsupported(self, device: int, *checks: str) -> None:
        """Makes ``checks`` read as unsupported on ``device``."""
        self.gpus[device].unsupported = set(checks)

    # -- HealthBackend -------------------------------------------------------

    def open(self) -> None:
        """Starts the fake (the delayed-XID clock starts here).

        Raises:
            HealthUnavailableError: the fake was scripted ``unavailable``.
        """
        if self.unavailable:
            raise HealthUnavailableError(self.unavailable)
        with self._lock:
            if self._opened_at is None:
                # XIDs scripted before open count their delay from open.
                self._opened_at = self._clock()
                self._xids += [(self._opened_at + after, event) for after, event in self._pre_open]
                self._pre_open.clear()
        self.closed = False

    def close(self) -> None:
        """Marks the fake closed."""
        self.closed = True

    def device_count(self) -> int:
        """Scripted visible count, else the number of fake GPUs."""
        return len(self.gpus) if self.visible is None else self.visible

    def uuid(self, device: int) -> str | None:
        """The fake GPU's UUID."""
        return self.gpus[device].uuid if 0 <= device < len(self.gpus) else None

    def source(self, check: str) -> str:
        """``fake:<check>``."""
        return f"fake:{check}"

    def read(self, device: int, checks: frozenset[str]) -> DeviceReading:
        """The scripted state of ``device`` as a reading."""
        self.reads += 1
        if self.read_delay:
            time.sleep(self.read_delay)
        gpu = self.gpus[device]
        reading = DeviceReading(device=device, uuid=gpu.uuid, lost=gpu.lost)
        if gpu.lost:
            return reading

        def want(check: str) -> bool:
            return check in checks and check not in gpu.unsupported

        if want("ecc"):
            reading.ecc_uncorrected_volatile = gpu.ecc_uncorrected_volatile
        if want("retired_pages"):
            reading.retired_pages_pending = gpu.retired_pages_pending
        if want("row_remap"):
            reading.remap_pending, reading.remap_failed = gpu.remap_pending, gpu.remap_failed
        if want("nvlink") and gpu.nvlinks:
            reading.nvlink_active = tuple(i not in gpu.nvlink_down for i in range(gpu.nvlinks))
        if want("fabric") and gpu.fabric_state is not None:
            reading.fabric_state = gpu.fabric_state
            reading.fabric_status_ok = gpu.fabric_status_ok
            reading.fabric_degraded_bw = gpu.fabric_degraded_bw
        if want("throttle"):
            reading.throttle_reasons = frozenset(gpu.throttle)
        if want("temperature"):
            reading.temperature_c = gpu.temperature_c
        if want("recovery_action"):
            reading.recovery_action = gpu.recovery_action
        reading.errors = {k: v for k, v in gpu.errors.items() if k in checks}
        return reading

    def poll_xids(self) -> list[XidEvent]:
        """XIDs whose delivery time has come, oldest first."""
        self.polls += 1
        now = self._clock()
        with self._lock:
            due = [e for t, e in self._xids if t <= now]
            self._xids = [(t, e) for t, e in self._xids if t > now]
        return due

    # -- from the environment ----------------------------------------------

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, Any], clock: Callable[[], float] = time.monotonic) -> FakeBackend:
        """Builds a fake from a JSON string, a JSON file path or a mapping (keys: module doc).

        Raises:
            ConfigError: the spec is not valid JSON or names an unknown key.
        """
        data = _load_spec(spec)
        known = {
            "devices", "nvlinks", "visible", "unavailable", "read_delay_s", "xid", "ecc", "retired_pending",
            "remap_pending", "remap_failed", "lost", "nvlink_down", "throttle", "temperature", "fabric",
            "fabric_error", "recovery_action", "unsupported",
        }
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"HPRESIL_HEALTH_FAKE has unknown keys {sorted(unknown)}: use {sorted(known)}")
        try:
            fake = cls(int(data.get("devices", 8)), nvlinks=int(data.get("nvlinks", 18)),
                       unavailable=data.get("unavailable"), read_delay=float(data.get("read_delay_s", 0.0)), clock=clock)
            if "visible" in data:
                fake.visible = int(data["visible"])
            for entry in data.get("xid", []):
                device, xid, *after = entry
                fake.inject_xid(None if device is None else int(device), int(xid), float(after[0]) if after else 0.0)
            for device, count in _by_device(data.get("ecc", {})):
                fake.set_ecc(device, int(count))
            for device in data.get("retired_pending", []):
                fake.set_retired_pending(int(device))
            for device in data.get("remap_pending", []):
                fake.gpus[int(device)].remap_pending = True
            for device in data.get("remap_failed", []):
                fake.gpus[int(device)].remap_failed = True
            for device in data.get("lost", []):
                fake.lose(int(device))
            for device, links in _by_device(data.get("nvlink_down", {})):
                fake.set_nvlink_down(device, *map(int, links))
            for device, reasons in _by_device(data.get("throttle", {})):
                fake.set_throttle(device, *reasons)
            for device, celsius in _by_device(data.get("temperature", {})):
                fake.set_temperature(device, int(celsius))
            fabric = data.get("fabric")
            if isinstance(fabric, str) or fabric is None:
                for device in range(len(fake.gpus)):
                    fake.set_fabric(device, fabric)
            else:
                for device, state in _by_device(fabric):
                    fake.set_fabric(device, state)
            for device in data.get("fabric_error", []):
                fake.gpus[int(device)].fabric_status_ok = False
            for device, action in _by_device(data.get("recovery_action", {})):
                fake.set_recovery_action(device, action)
            for device, checks in _by_device(data.get("unsupported", {})):
                bad = set(checks) - CHECKS
                if bad:
                    raise ConfigError(f"HPRESIL_HEALTH_FAKE unsupported checks {sorted(bad)}: use {sorted(CHECKS)}")
                fake.set_unsupported(device, *checks)
        except ConfigError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as exc:
            # a value of the wrong type, or a device index the fake does not have
            raise ConfigError(f"HPRESIL_HEALTH_FAKE: {type(exc).__name__}: {exc}; "
                              "e.g. '{\"devices\": 8, \"xid\": [[3, 79]]}' (see hpresil.health.fake)") from exc
        return fake


def _load_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        return dict(spec)
    text = spec.strip()
    if not text.startswith("{") and os.path.isfile(text):
        with open(text) as f:
            text = f.read()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(
            f"HPRESIL_HEALTH_FAKE is neither JSON nor a JSON file ({exc}): e.g. '{{\"devices\": 8, \"xid\": [[3, 79]]}}'"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError("HPRESIL_HEALTH_FAKE must be a JSON object, e.g. '{\"devices\": 8}'")
    return data


def _by_device(mapping: Mapping[Any, Any]) -> list[tuple[int, Any]]:
    return [(int(device), value) for device, value in mapping.items()]
