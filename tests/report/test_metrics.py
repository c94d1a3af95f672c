"""The Prometheus exporter: scraped over HTTP, parsed with prometheus-client's parser."""

from __future__ import annotations

import os
import urllib.request

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from _goodput_run import RecordedRun, record_once  # noqa: E402
from hpresil.errors import ConfigError  # noqa: E402
from hpresil.events.jsonl import JsonlEventLog  # noqa: E402
from hpresil.hang.heartbeat import Heartbeat, record_path  # noqa: E402
from hpresil.metrics.api import MetricsConfig  # noqa: E402
from hpresil.metrics.exporter import MetricsExporter  # noqa: E402
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo  # noqa: E402


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    return record_once(tmp_path_factory)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_exporter_serves_heartbeats_and_events(tmp_path) -> None:
    shm, logs = tmp_path / "shm", tmp_path / "logs"
    sink = JsonlEventLog(str(logs / "events.jsonl"), node="n0")
    ctx = RuntimeContext(run_id="r", node_id="n0", shm_dir=str(shm), log_dir=str(logs), events=sink)
    exporter = MetricsExporter(MetricsConfig(port=0, addr="127.0.0.1"))
    exporter.start(ctx)
    try:
        assert exporter.port and exporter.port > 0
        hb = Heartbeat(record_path(str(shm), 0), rank=5)
        group = WorkerGroupInfo(attempt=0, group_rank=0, group_world_size=1, world_size=8, global_ranks=(5,),
                                pids=(os.getpid(),))
        hb.beat(3)
        exporter.on_workers_started(group)
        exporter.refresh()
        for step in (4, 5, 6, 7):
            hb.beat(step)
        sink.emit("workers_start", world_size=8)
        sink.emit("checkpoint_saved", rank=5, step=7, tier="ram", blocking_s=0.004, bytes=1000)
        sink.emit("checkpoint_saved", rank=5, step=7, tier="ram", blocking_s=0.02, bytes=1000)
        sink.emit("checkpoint_restored", rank=5, step=5, tier="durable", duration_s=1.5, bytes=10)
        sink.emit("checkpoint_skipped", rank=5, step=8, reason="slots_busy", waited_s=0.25)
        sink.emit("checkpoint_drained", step=7, tier="durable", duration_s=0.3, bytes=2000, committed=True)
        sink.emit("checkpoint_replicated", step=7, tier="peer", bytes=1000, duration_s=0.1, lag_s=0.25)
        sink.emit("hang_detected", phase="step", suspects=[5])
        sink.emit("workers_restart", cause="failure")
        sink.emit("workers_restart", cause="membership")
        sink.emit("tier_degraded", tier="durable", error="x")
        exporter.refresh()
        got = _samples(_scrape(exporter.port))
    finally:
        exporter.stop(timedelta_zero())
    assert got[("hpresil_step", (("rank", "5"),))] == 7
    assert got[("hpresil_steps_total", ())] == 4
    assert got[("hpresil_step_seconds", (("rank", "5"),))] > 0
    assert got[("hpresil_checkpoint_blocking_seconds_count", (("tier", "ram"),))] == 2
    assert got[("hpresil_checkpoint_blocking_seconds_sum", (("tier", "ram"),))] == pytest.approx(0.024)
    assert got[("hpresil_checkpoint_bytes_total", (("tier", "ram"),))] == 2000
    assert got[("hpresil_checkpoint_last_step", (("tier", "ram"),))] == 7
    assert got[("hpresil_checkpoint_skipped_total", (("reason", "slots_busy"),))] == 1
    assert got[("hpresil_restore_seconds_count", (("tier", "durable"),))] == 1
    assert got[("hpresil_restarts_total", (("cause", "hang"),))] == 1  # the restart that followed the hang
    assert got[("hpresil_restarts_total", (("cause", "membership"),))] == 1
    assert got[("hpresil_hang_detections_total", (("phase", "step"),))] == 1
    assert got[("hpresil_durable_upload_bytes_total", ())] == 2000
    assert got[("hpresil_durable_upload_lag_seconds", ())] >= 0
    assert got[("hpresil_durable_last_step", ())] == 7
    assert got[("hpresil_replication_lag_seconds", ())] == 0.25
    assert got[("hpresil_tier_degraded_total", (("tier", "durable"),))] == 1
    assert got[("hpresil_world_size", ())] == 8


def timedelta_zero():
    from datetime import timedelta

    return timedelta(0)


def test_off_by_default_and_config_errors(tmp_path) -> None:
    exporter = MetricsExporter()
    sink = JsonlEventLog(str(tmp_path / "events.jsonl"), node="n0")
    exporter.start(RuntimeContext(run_id="r", node_id="n0", shm_dir=str(tmp_path), log_dir=str(tmp_path), events=sink))
    exporter.tick()
    assert exporter.port is None and not (tmp_path / "events.jsonl").exists()
    with pytest.raises(ConfigError, match="0..65535"):
        MetricsConfig(port=70000)
    from hpresil.run.cli import main

    with pytest.raises(ConfigError, match="--metrics-port"):
        main(["--standalone", "--metrics-port", "eighty", "--grace-period", "5", "train.py"])
    with pytest.raises(ConfigError, match="--grace-period"):
        main(["--standalone", "--grace-period", "-1", "train.py"])


@pytest.mark.slow
def test_recorded_run_scrape(recorded_run) -> None:
    got = _samples(recorded_run.metrics_text)
    assert got[("hpresil_restarts_total", (("cause", "failure"),))] == 1
    assert got[("hpresil_steps_total", ())] > 0
    assert got[("hpresil_checkpoint_blocking_seconds_count", (("tier", "ram"),))] > 0
    assert got[("hpresil_world_size", ())] == 2
    assert {("rank", "0"), ("rank", "1")} <= {lbl[0] for (name, lbl) in got if name == "hpresil_step" and lbl}
