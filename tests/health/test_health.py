"""GPU health checks: classification on the fake backend, NVML without a driver,
the service's events, verdict and rate limiting, config validation."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from hpresil.errors import ConfigError, HealthUnavailableError, NodeUnhealthyError
from hpresil.health import (
    EXIT_UNHEALTHY,
    FakeBackend,
    HealthConfig,
    HealthService,
    NvmlBackend,
    classify_xid,
    evaluate,
    select_backend,
)
from hpresil.health.api import DeviceReading
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo
from hpresil.testing import RecordingSink as ListSink





class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ctx(tmp_path, sink: ListSink) -> RuntimeContext:
    return RuntimeContext(run_id="r", node_id="nodeA", shm_dir=str(tmp_path / "shm"), log_dir=str(tmp_path),
                          events=sink)


def _service(tmp_path, fake: FakeBackend, clock: FakeClock | None = None, **cfg: Any) -> tuple[HealthService, ListSink]:
    sink = ListSink()
    service = HealthService(HealthConfig(**cfg), backend=fake, threaded=False, clock=clock or FakeClock())
    service.start(_ctx(tmp_path, sink))
    return service, sink


def _check(fake: FakeBackend, device: int = 0, **cfg: Any) -> list:
    return evaluate(fake.read(device, HealthConfig(**cfg).checks), HealthConfig(**cfg), fake.source)


@pytest.fixture(autouse=True)
def _no_cuda_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in ("HPRESIL_HEALTH", "HPRESIL_HEALTH_INTERVAL", "HPRESIL_HEALTH_ACTION", "HPRESIL_HEALTH_FAKE"):
        monkeypatch.delenv(name, raising=False)


# -- classification -------------------------------------------------------------


@pytest.mark.parametrize(
    "xid,severity",
    [(79, "fatal"), (48, "fatal"), (63, "fatal"), (64, "fatal"), (74, "fatal"), (94, "fatal"), (95, "fatal"),
     (119, "fatal"), (120, "fatal"), (13, "warn"), (31, "warn"), (43, "warn"), (92, "warn"), (9999, "warn")],
)
def test_xid_classification(xid: int, severity: str) -> None:
    assert classify_xid(xid)[0] == severity


def test_xid_override_wins() -> None:
    assert classify_xid(13, {13: "fatal"})[0] == "fatal"
    assert classify_xid(79, {79: "warn"})[0] == "warn"


def test_healthy_fake_has_no_findings() -> None:
    fake = FakeBackend(2)
    fake.set_fabric(0, "completed")
    assert _check(fake) == [] and _check(fake, 1) == []


def _script(fake: FakeBackend, how: str) -> None:
    {
        "ecc": lambda: fake.set_ecc(0, 2),
        "retired": lambda: fake.set_retired_pending(0),
        "remap_pending": lambda: fake.set_remap(0, pending=True),
        "remap_failed": lambda: fake.set_remap(0, failed=True),
        "lost": lambda: fake.lose(0),
        "nvlink_down": lambda: fake.set_nvlink_down(0, 3, 7),
        "fabric_error": lambda: fake.set_fabric(0, "completed", status_ok=False),
        "fabric_not_started": lambda: fake.set_fabric(0, "not_started"),
        "fabric_in_progress": lambda: fake.set_fabric(0, "in_progress"),
        "fabric_degraded": lambda: fake.set_fabric(0, "completed", degraded_bw=True),
        "hw_slowdown": lambda: fake.set_throttle(0, "hw_slowdown"),
        "hw_thermal": lambda: fake.set_throttle(0, "hw_thermal", "sw_power_cap"),
        "power_brake": lambda: fake.set_throttle(0, "hw_power_brake"),
        "sw_power_cap": lambda: fake.set_throttle(0, "sw_power_cap", "gpu_idle"),
        "hot": lambda: fake.set_temperature(0, 91),
        "recovery": lambda: fake.set_recovery_action(0, "gpu_reset"),
    }[how]()


@pytest.mark.parametrize(
    "how,check,severity",
    [
        ("ecc", "ecc", "fatal"),
        ("retired", "retired_pages", "fatal"),
        ("remap_pending", "row_remap", "fatal"),
        ("remap_failed", "row_remap", "fatal"),
        ("lost", "gpu_lost", "fatal"),
        ("nvlink_down", "nvlink", "fatal"),
        ("fabric_error", "fabric", "fatal"),
        ("fabric_not_started", "fabric", "fatal"),
        ("fabric_in_progress", "fabric", "warn"),
        ("fabric_degraded", "fabric", "warn"),
        ("hw_slowdown", "throttle", "warn"),
        ("hw_thermal", "throttle", "warn"),
        ("power_brake", "throttle", "warn"),
        ("sw_power_cap", None, None),
        ("hot", "temperature", "warn"),
        ("recovery", "recovery_action", "fatal"),
    ],
)
def test_each_check_on_the_fake(how: str, check: str | None, severity: str | None) -> None:
    fake = FakeBackend(2)
    _script(fake, how)
    findings = _check(fake)
    if check is None:
        assert findings == []
        return
    assert [(f.device, f.check, f.severity) for f in findings] == [(0, check, severity)], findings
    assert findings[0].source == f"fake:{check}" and findings[0].detail
    assert _check(fake, 1) == [], "other GPUs stay healthy"


def test_lost_gpu_is_one_finding_and_thresholds_apply() -> None:
    fake = FakeBackend(1)
    fake.set_ecc(0, 3)
    fake.lose(0)
    assert [f.check for f in _check(fake)] == ["gpu_lost"]
    fake = FakeBackend(1)
    fake.set_ecc(0, 3)
    assert _check(fake, ecc_uncorrected_limit=3) == []
    fake.set_temperature(0, 80)
    assert [f.check for f in _check(fake, temperature_warn_c=80, ecc_uncorrected_limit=3)] == ["temperature"]


def test_unsupported_and_disabled_checks_are_skipped() -> None:
    fake = FakeBackend(1, nvlinks=0)  # a PCIe GPU without NVLink
    fake.set_ecc(0, 5)
    fake.set_unsupported(0, "ecc")
    assert _check(fake) == []
    fake = FakeBackend(1)
    fake.set_ecc(0, 5)
    assert _check(fake, checks=frozenset({"temperature"})) == []


def test_nvlink_baseline_detects_a_link_going_down() -> None:
    reading = DeviceReading(device=0, nvlink_active=(True,) * 17 + (False,))
    findings = evaluate(reading, HealthConfig(), lambda c: c, baseline_links=18)
    assert findings[0].severity == "fatal" and "since pre-flight" in findings[0].detail
    all_down = DeviceReading(device=0, nvlink_active=(False,) * 4)  # links present but never cabled
    assert evaluate(all_down, HealthConfig(), lambda c: c) == []


# -- service ------------------------------------------------------------------------


def test_preflight_healthy_emits_one_ok_event(tmp_path) -> None:
    service, sink = _service(tmp_path, FakeBackend(8))
    checks = sink.named("health_check")
    assert len(checks) == 1 and checks[0]["ok"] is True and checks[0]["kind"] == "preflight"
    assert checks[0]["devices"] == list(range(8)) and checks[0]["duration_s"] >= 0
    assert service.verdict() is None and service.fatal() is None
    assert not os.path.exists(tmp_path / "unhealthy.json")


def test_preflight_fatal_records_the_verdict(tmp_path) -> None:
    (tmp_path / "unhealthy.json").write_text("{}")  # stale, from an earlier run
    fake = FakeBackend(8)
    fake.lose(3)
    fake.set_remap(5, pending=True)
    service, sink = _service(tmp_path, fake)
    verdict = service.verdict()
    assert verdict is not None and verdict.exit_code == EXIT_UNHEALTHY == 69
    assert [(f.device, f.check) for f in verdict.findings] == [(3, "gpu_lost"), (5, "row_remap")]
    assert "GPU 3" in verdict.message and "gpu_lost" in verdict.message and "unhealthy.json" in verdict.message
    err = verdict.error()
    assert isinstance(err, NodeUnhealthyError) and err.exit_code == 69
    record = json.loads((tmp_path / "unhealthy.json").read_text())
    assert record["action"] == "leave" and record["node"] == "nodeA" and record["exit_code"] == 69
    assert [f["device"] for f in record["findings"]] == [3, 5]
    bad = sink.named("gpu_unhealthy")
    assert [(e["device"], e["check"], e["severity"], e["action"]) for e in bad] == [
        (3, "gpu_lost", "fatal", "leave"), (5, "row_remap", "fatal", "leave")]
    assert sink.named("health_check")[0]["ok"] is False and sink.named("health_check")[0]["fatal"] is True


def test_action_warn_reports_but_does_not_leave(tmp_path) -> None:
    fake = FakeBackend(2)
    fake.set_ecc(1, 1)
    service, sink = _service(tmp_path, fake, action_on_fatal="warn")
    assert service.verdict() is None
    assert [f.check for f in service.fatal() or []] == ["ecc"]
    assert not os.path.exists(tmp_path / "unhealthy.json")
    assert sink.named("gpu_unhealthy")[0]["action"] == "warn"


def test_periodic_checks_are_rate_limited_and_quiet(tmp_path) -> None:
    clock = FakeClock()
    fake = FakeBackend(8, clock=clock)
    service, sink = _service(tmp_path, fake, clock, interval=timedelta(seconds=30),
                             summary_every=timedelta(seconds=60))
    reads = fake.reads
    assert reads == 8  # pre-flight
    for _ in range(290):  # 29 s of 100 ms ticks
        clock.now += 0.1
        service.tick()
    assert fake.reads == reads, "no full check before the interval"
    assert 27 <= fake.polls <= 30, "XID queue polled about once a second"
    clock.now += 1.1
    service.tick()
    assert fake.reads == reads + 8, "one full check per interval"
    service.tick()
    assert fake.reads == reads + 8
    assert len(sink.named("health_check")) == 1, "nothing changed: no new event"
    clock.now += 31
    service.tick()
    assert len(sink.named("health_check")) == 2, "summary after summary_every"
    assert sink.named("health_check")[1]["kind"] == "periodic"


def test_xid_event_turns_fatal_within_a_poll(tmp_path) -> None:
    clock = FakeClock()
    fake = FakeBackend(8, clock=clock)
    service, sink = _service(tmp_path, fake, clock)
    fake.inject_xid(2, 13)  # application error: warn, once
    fake.inject_xid(2, 13)
    clock.now += 1.0
    service.tick()
    warn = sink.named("gpu_unhealthy")
    assert [(e["device"], e["check"], e["severity"]) for e in warn] == [(2, "xid", "warn")]
    assert "Xid 13" in warn[0]["detail"] and service.verdict() is None
    fake.inject_xid(2, 31)  # another application error on the same GPU is a new finding
    fake.inject_xid(6, 79)
    clock.now += 1.0
    service.tick()
    assert [(e["device"], e["code"]) for e in sink.named("gpu_unhealthy")] == [(2, 13), (2, 31), (6, 79)]
    verdict = service.verdict()
    assert verdict is not None and verdict.findings[0].device == 6 and "Xid 79" in verdict.findings[0].detail
    assert sink.named("health_check")[-1]["kind"] == "events"
    clock.now += 30
    service.tick()  # full check: the fatal XID stays, the warn ones have been reported
    assert len(sink.named("gpu_unhealthy")) == 3
    assert [f.check for f in service.last_report.fatal] == ["xid"]


def test_gpu_going_bad_after_preflight(tmp_path) -> None:
    clock = FakeClock()
    fake = FakeBackend(8, clock=clock)
    service, sink = _service(tmp_path, fake, clock)
    fake.set_nvlink_down(4, 0)
    fake.visible = 7
    group = WorkerGroupInfo(attempt=0, group_rank=0, group_world_size=1, world_size=8,
                            global_ranks=tuple(range(8)), pids=tuple(range(8)))
    service.on_workers_stopped(group)  # checks at once, before the agent restarts workers
    checks = {(f.device, f.check) for f in service.fatal() or []}
    assert checks == {(4, "nvlink"), (None, "device_count")}
    assert service.verdict() is not None


def test_a_backend_bug_is_a_warning_not_a_crash(tmp_path) -> None:
    class Broken(FakeBackend):
        def read(self, device: int, checks: frozenset[str]) -> DeviceReading:
            if device == 1:
                raise RuntimeError("boom")
            return super().read(device, checks)

    service, sink = _service(tmp_path, Broken(2))
    assert [(e["device"], e["check"], e["severity"]) for e in sink.named("gpu_unhealthy")] == [
        (1, "nvml_error", "warn")]
    assert "boom" in sink.named("gpu_unhealthy")[0]["detail"] and service.verdict() is None


def test_cuda_visible_devices_limits_the_checked_gpus(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBackend(8)
    fake.lose(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"4,{fake.uuid(5)[:12]},7")
    service, _ = _service(tmp_path, fake)
    assert service.devices == (4, 5, 7) and service.verdict() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    service, _ = _service(tmp_path, fake, devices=(0,))  # explicit config wins
    assert service.devices == (0,) and service.verdict() is not None


def test_mode_off_and_unavailable_backend_are_quiet(tmp_path) -> None:
    fake = FakeBackend(8)
    service, sink = _service(tmp_path, fake, mode="off")
    assert sink.events == [] and fake.reads == 0
    service.tick()
    service, sink = _service(tmp_path, FakeBackend(8, unavailable="no driver here"))
    assert sink.named("health_check") == [
        {"ok": None, "available": False, "reason": "no driver here", "kind": "preflight"}]
    service.tick()
    service.on_workers_stopped(None)  # type: ignore[arg-type]
    assert service.verdict() is None and service.check_now() is None
    service.stop(timedelta(seconds=1))


def test_threaded_checks_and_wedged_driver(tmp_path) -> None:
    fake = FakeBackend(2)
    sink = ListSink()
    config = HealthConfig(check_timeout=timedelta(milliseconds=100), event_poll_interval=timedelta(milliseconds=10))
    service = HealthService(config, backend=fake)
    service.start(_ctx(tmp_path, sink))
    assert service.last_report is not None and service.last_report.ok
    fake.read_delay = 0.15  # each device read now takes 150 ms: a wedged driver
    assert service.check_now() is None, "the caller is not held past check_timeout"
    time.sleep(0.12)
    service.tick()
    assert [e["check"] for e in sink.named("gpu_unhealthy")] == ["driver_hang"]
    fake.read_delay = 0.0
    service.stop(timedelta(seconds=1))
    assert fake.closed


# -- environment and config -----------------------------------------------------------


def test_fake_backend_from_env_json_and_file(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPRESIL_HEALTH_FAKE", '{"devices": 8, "xid": [[3, 79]], "ecc": {"1": 2}}')
    service = HealthService(threaded=False)
    sink = ListSink()
    service.start(_ctx(tmp_path, sink))
    assert {(f.device, f.check) for f in service.fatal() or []} == {(3, "xid"), (1, "ecc")}
    spec = tmp_path / "fake.json"
    spec.write_text(json.dumps({"devices": 4, "fabric": "completed", "throttle": {"2": ["hw_thermal"]}}))
    fake = select_backend({"HPRESIL_HEALTH_FAKE": str(spec)})
    assert isinstance(fake, FakeBackend) and fake.device_count() == 4
    with pytest.raises(ConfigError, match="unknown keys"):
        FakeBackend.from_spec('{"gpus": 8}')
    with pytest.raises(ConfigError, match="neither JSON nor a JSON file"):
        FakeBackend.from_spec("not json")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"interval": timedelta(0)}, "interval=.* must be a positive timedelta"),
        ({"interval": 30}, "must be a positive timedelta, e.g. timedelta"),
        ({"checks": frozenset({"ecc", "smart"})}, r"unknown health checks \['smart'\]: choose from"),
        ({"action_on_fatal": "drain"}, "use 'leave' or 'warn'"),
        ({"mode": "yes"}, "use 'auto', 'on' or 'off'"),
        ({"event_poll_interval": timedelta(minutes=1)}, "lower event_poll_interval"),
        ({"summary_every": timedelta(seconds=1)}, "set summary_every >= interval"),
        ({"temperature_warn_c": 0}, r"must be in \(0, 150\)"),
        ({"xid_severity": {79: "bad"}}, "xid_severity"),
        ({"devices": ()}, "non-negative NVML indices"),
    ],
)
def test_config_errors_name_the_fix(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HealthConfig(**kwargs)


def test_config_from_env_and_explicit_wins() -> None:
    env = {"HPRESIL_HEALTH": "ON", "HPRESIL_HEALTH_INTERVAL": "0.5", "HPRESIL_HEALTH_ACTION": "warn"}
    config = HealthConfig.from_env(env)
    assert config.mode == "on" and config.interval == timedelta(seconds=0.5) and config.action_on_fatal == "warn"
    assert config.event_poll_interval == timedelta(seconds=0.5)
    assert HealthConfig.from_env(env, action_on_fatal="leave").action_on_fatal == "leave"
    assert HealthConfig.from_env({}).mode == "auto" and HealthConfig.from_env({}).enabled
    with pytest.raises(ConfigError, match="HPRESIL_HEALTH='maybe': use off, on or auto"):
        HealthConfig.from_env({"HPRESIL_HEALTH": "maybe"})
    with pytest.raises(ConfigError, match="seconds between checks"):
        HealthConfig.from_env({"HPRESIL_HEALTH_INTERVAL": "-3"})


# -- NVML backend -----------------------------------------------------------------


def test_nvml_without_pynvml_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(HealthUnavailableError, match="pip install"):
        NvmlBackend().open()


def test_nvml_without_driver_is_unavailable(tmp_path) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present")
    with pytest.raises(HealthUnavailableError, match="no NVIDIA driver"):
        NvmlBackend().open()
    # The default service on this host: no exception, one "unavailable" event, no verdict.
    sink = ListSink()
    service = HealthService(HealthConfig(), threaded=False)
    service.start(_ctx(tmp_path, sink))
    assert sink.named("health_check")[0]["available"] is False and service.verdict() is None


def _patched_pynvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The real pynvml (its error classes and structs) with the driver calls faked:
    GPU 0 healthy H100 with 18 NVLinks (link 5 down), GPU 1 lost."""
    nv = pytest.importorskip("pynvml")
    handles = [ctypes.c_void_p(0x1000), ctypes.c_void_p(0x2000)]
    index = {0x1000: 0, 0x2000: 1}
    queue = [(0x2000, 48)]

    def dev(h: Any) -> int:
        i = index[ctypes.cast(h, ctypes.c_void_p).value]
        if i == 1:
            raise nv.NVMLError(nv.NVML_ERROR_GPU_IS_LOST)
        return i

    def nvlink(h: Any, link: int) -> int:
        dev(h)
        if link >= 18:
            raise nv.NVMLError(nv.NVML_ERROR_INVALID_ARGUMENT)
        return 0 if link == 5 else 1

    def fabric(h: Any, ref: Any) -> int:
        dev(h)
        ref._obj.state, ref._obj.status = nv.NVML_GPU_FABRIC_STATE_COMPLETED, nv.NVML_SUCCESS
        return 0

    def not_supported(*args: Any) -> Any:
        raise nv.NVMLError(nv.NVML_ERROR_NOT_SUPPORTED)

    def wait(event_set: Any, timeout_ms: int) -> Any:
        assert timeout_ms == 0
        if not queue:
            raise nv.NVMLError(nv.NVML_ERROR_TIMEOUT)
        address, xid = queue.pop()
        return nv.c_nvmlEventData_t(device=ctypes.cast(address, nv.c_nvmlDevice_t),
                                    eventType=nv.nvmlEventTypeXidCriticalError, eventData=xid)

    fakes = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: None,
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: handles[i],
        "nvmlDeviceGetUUID": lambda h: f"GPU-{dev(h)}",
        "nvmlEventSetCreate": lambda: object(),
        "nvmlEventSetFree": lambda s: None,
        "nvmlDeviceGetSupportedEventTypes": lambda h: nv.nvmlEventTypeXidCriticalError,
        "nvmlDeviceRegisterEvents": lambda h, mask, s: None,
        "nvmlEventSetWait_v2": wait,
        "nvmlDeviceGetTotalEccErrors": lambda h, t, c: [0, 0][dev(h)],
        "nvmlDeviceGetRetiredPagesPendingStatus": not_supported,  # Hopper: row remapping instead
        "nvmlDeviceGetRemappedRows": lambda h: (dev(h), 0, 1, 0),  # remap pending
        "nvmlDeviceGetNvLinkState": nvlink,
        "nvmlDeviceGetGpuFabricInfoV": fabric,
        "nvmlDeviceGetCurrentClocksEventReasons": lambda h: 0x8 | 0x4 | dev(h),  # HW slowdown + SW power cap
        "nvmlDeviceGetTemperature": lambda h, s: 50 + dev(h),
        "nvmlDeviceGetFieldValues": not_supported,
    }
    for name, fn in fakes.items():
        monkeypatch.setattr(nv, name, fn)
    return nv


def test_nvml_backend_reads_and_classifies(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = _patched_pynvml(monkeypatch)
    backend = NvmlBackend(nv)
    backend.open()
    config = HealthConfig()
    reading = backend.read(0, config.checks)
    assert reading.uuid is None or reading.uuid == "GPU-0"
    assert reading.ecc_uncorrected_volatile == 0 and reading.retired_pages_pending is None
    assert reading.remap_pending is True and reading.remap_failed is False
    assert reading.nvlink_active is not None and len(reading.nvlink_active) == 18 and not reading.nvlink_active[5]
    assert reading.fabric_state == "completed" and reading.fabric_status_ok
    assert reading.throttle_reasons == {"hw_slowdown", "sw_power_cap"}
    assert reading.temperature_c == 50 and reading.recovery_action is None and reading.errors == {}
    found = {(f.check, f.severity) for f in evaluate(reading, config, backend.source)}
    assert found == {("row_remap", "fatal"), ("nvlink", "fatal"), ("throttle", "warn")}
    lost = backend.read(1, config.checks)
    assert lost.lost and "GPU_IS_LOST" in lost.lost
    assert [(e.device, e.xid) for e in backend.poll_xids()] == [(1, 48)]
    assert backend.poll_xids() == []
    assert backend.source("row_remap") == "nvml:nvmlDeviceGetRemappedRows"
    backend.close()
    backend.close()


# -- hpresil-run end to end -------------------------------------------------------------


@pytest.mark.slow
def test_hpresil_run_with_fake_unhealthy_gpu(tmp_path) -> None:
    from _launch import base_env, events, hpresil_run, script

    logs = tmp_path / "logs"
    env = base_env(tmp_path, HPRESIL_HEALTH_FAKE='{"devices": 8, "xid": [[3, 79]]}')
    proc = hpresil_run(["--standalone", "--log-dir", str(logs), script("report_env.py"), str(tmp_path / "out")],
                       tmp_path, env=env)
    evs = events(logs / "events.jsonl")
    bad = [e for e in evs if e["event"] == "gpu_unhealthy"]
    assert bad and bad[0]["device"] == 3 and bad[0]["check"] == "xid", (proc.stderr, evs)
    record = json.loads((logs / "unhealthy.json").read_text())
    assert record["findings"][0]["detail"].startswith("Xid 79")
    assert proc.returncode == 69, proc.stderr[-2000:]
    assert "hpresil-run:" in proc.stderr and "79" in proc.stderr
    leave = [e for e in evs if e["event"] == "node_leave"]
    assert leave and leave[0]["exit_code"] == 69
    assert not (tmp_path / "out").exists(), "an unhealthy node must not start workers"
