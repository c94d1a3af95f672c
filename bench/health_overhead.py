"""Cost of the GPU health checks, and their share of a training step.

Measures, on the fake backend (always) and on NVML (when a driver is present):

* one full check of every GPU (all checks, through ``HealthService.check_now``);
* one XID poll (``poll_xids``), which runs every ``event_poll_interval``;
* one ``tick()`` that has nothing due (what the runtime's service thread pays
  every 50 ms);

and prints the share of a step each takes at the default intervals. The checks
run on the node agent's health thread, not in the training processes, so the
amortised share (check time / interval) is the honest overhead; the "if
inline" ratio (check time / step time) is the bound if a check ever landed
inside a step on the same core.

Also counts the NVML calls one full check makes per GPU (with pynvml's driver
calls stubbed), to size the NVML cost on hosts where it cannot be timed.

    python bench/health_overhead.py --devices 8 --step-s 1.0 --repeats 200
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

from hpresil.errors import HealthUnavailableError
from hpresil.health import FakeBackend, HealthConfig, HealthService, NvmlBackend
from hpresil.health.api import HealthBackend
from hpresil.runtime.api import RuntimeContext


class _NullSink:
    def emit(self, event: str, **fields: Any) -> None:
        pass


def _timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def _measure(label: str, backend: HealthBackend, args: argparse.Namespace) -> None:
    config = HealthConfig(mode="on")
    with tempfile.TemporaryDirectory() as tmp:
        service = HealthService(config, backend=backend, threaded=False)
        service.start(RuntimeContext(run_id="bench", node_id="bench", shm_dir=tmp, log_dir=tmp, events=_NullSink()))
        if not service.devices:
            print(f"{label}: no devices")
            return
        full_p50, full_p99 = _timeit(lambda: service.check_now(), args.repeats)
        poll_p50, _ = _timeit(backend.poll_xids, args.repeats)
        tick_p50, _ = _timeit(service.tick, args.repeats * 10)
        service.stop(timedelta(seconds=1))
    interval = config.interval.total_seconds()
    poll_every = config.event_poll_interval.total_seconds()
    step = args.step_s
    amortised = full_p50 / interval + poll_p50 / poll_every + tick_p50 / 0.05
    print(f"{label}: {len(service.devices)} GPUs")
    print(f"  full check      p50 {full_p50 * 1e3:8.3f} ms  p99 {full_p99 * 1e3:8.3f} ms  (every {interval:g} s)")
    print(f"  XID poll        p50 {poll_p50 * 1e6:8.1f} us  (every {poll_every:g} s)")
    print(f"  idle tick       p50 {tick_p50 * 1e6:8.2f} us  (every 0.05 s)")
    print(f"  share of a {step:g} s step, amortised (agent thread): {amortised:.2e} = {amortised * 100:.4f} % "
          f"(target < 1 %)")
    print(f"  share if one full check ran inside a step:        {full_p50 / step:.2e} = {full_p50 / step * 100:.4f} %")


def _count_nvml_calls(devices: int) -> dict[str, int] | None:
    """Calls one full check makes, with the driver stubbed (H100-like: 18 NVLinks, Hopper remap)."""
    try:
        import pynvml as nv
    except ImportError:
        return None
    counts: dict[str, int] = {}
    originals: dict[str, Any] = {}

    def stub(name: str, result: Callable[..., Any]) -> None:
        originals[name] = getattr(nv, name)

        def call(*args: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return result(*args)

        setattr(nv, name, call)

    def not_supported(*_: Any) -> Any:
        raise nv.NVMLError(nv.NVML_ERROR_NOT_SUPPORTED)

    def nvlink(_h: Any, link: int) -> int:
        if link >= 18:
            raise nv.NVMLError(nv.NVML_ERROR_INVALID_ARGUMENT)
        return 1

    def fabric(_h: Any, ref: Any) -> int:
        ref._obj.state, ref._obj.status = nv.NVML_GPU_FABRIC_STATE_COMPLETED, nv.NVML_SUCCESS
        return 0

    def field_values(_h: Any, fields: list[int]) -> Any:
        values = (nv.c_nvmlFieldValue_t * len(fields))()
        return values  # nvmlReturn 0, value 0: recovery action "none"

    handles = [ctypes.c_void_p(0x1000 + i) for i in range(devices)]
    for name, result in {
        "nvmlInit": lambda: None, "nvmlShutdown": lambda: None, "nvmlDeviceGetCount": lambda: devices,
        "nvmlDeviceGetHandleByIndex": lambda i: handles[i], "nvmlDeviceGetUUID": lambda h: "GPU-x",
        "nvmlEventSetCreate": lambda: object(), "nvmlEventSetFree": lambda s: None,
        "nvmlDeviceGetSupportedEventTypes": lambda h: nv.nvmlEventTypeXidCriticalError,
        "nvmlDeviceRegisterEvents": lambda h, m, s: None,
        "nvmlEventSetWait_v2": lambda s, t: (_ for _ in ()).throw(nv.NVMLError(nv.NVML_ERROR_TIMEOUT)),
        "nvmlDeviceGetTotalEccErrors": lambda h, a, b: 0, "nvmlDeviceGetRetiredPagesPendingStatus": not_supported,
        "nvmlDeviceGetRemappedRows": lambda h: (0, 0, 0, 0), "nvmlDeviceGetNvLinkState": nvlink,
        "nvmlDeviceGetGpuFabricInfoV": fabric, "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0,
        "nvmlDeviceGetTemperature": lambda h, s: 40, "nvmlDeviceGetFieldValues": field_values,
    }.items():
        stub(name, result)
    try:
        backend = NvmlBackend(nv)
        backend.open()
        config = HealthConfig()
        for device in range(devices):
            backend.read(device, config.checks)  # first read probes which NVLinks exist
        counts.clear()
        for device in range(devices):
            backend.read(device, config.checks)
        backend.poll_xids()
        snapshot = dict(counts)
        backend.close()
    finally:
        for name, fn in originals.items():
            setattr(nv, name, fn)
    return snapshot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="GPUs of the fake node")
    parser.add_argument("--step-s", type=float, default=1.0, help="training step time to compare with")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    _measure("fake backend", FakeBackend(args.devices), args)
    nvml = NvmlBackend()
    try:
        nvml.open()
        nvml.close()
    except HealthUnavailableError as exc:
        print(f"NVML: unavailable here ({exc})")
    else:
        _measure("NVML", NvmlBackend(), args)
    counts = _count_nvml_calls(args.devices)
    if counts is not None:
        total = sum(counts.values())
        detail = ", ".join(f"{name.replace('nvmlDevice', '')} {n}" for name, n in sorted(counts.items()))
        print(f"NVML calls per periodic full check of {args.devices} H100-like GPUs (driver stubbed): {total} "
              f"({total / args.devices:.0f} per GPU; {detail})")
        for per_call_ms in (0.05, 1.0):
            check_s = total * per_call_ms / 1e3
            print(f"  if each NVML call took {per_call_ms:g} ms: {check_s * 1e3:.0f} ms per check = "
                  f"{check_s / 30 * 100:.3f} % of the agent thread at the 30 s interval (workers unaffected)")


if __name__ == "__main__":
    main()
