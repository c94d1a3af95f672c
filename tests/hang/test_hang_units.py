"""Hang detection building blocks: heartbeat records, timeouts, suspects, config."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest

from hpresil.errors import ConfigError
from hpresil.hang.api import HangConfig
from hpresil.hang.config import hang_config, hang_config_from_env
from hpresil.hang.diagnose import RankDiag, busy, find_suspects, in_collective, in_device_wait
from hpresil.hang.heartbeat import Heartbeat
from hpresil.hang.probe import proc_state, read_beat
from hpresil.hang.watchdog import phase_timeout


def _diag(rank: int, step: int = 5, state: str = "S", cpu: float | None = 0.0, coll: bool | None = True) -> RankDiag:
    return RankDiag(rank=rank, node="n", step=step, phase="step", state=state, cpu_rate=cpu, in_collective=coll)


def test_heartbeat_record_round_trip_and_phases(tmp_path) -> None:
    hb = Heartbeat(str(tmp_path / "hb" / "local0"), rank=3)
    beat = read_beat(str(tmp_path / "hb" / "local0"))
    assert beat is not None and beat.phase == 0 and beat.step == -1 and beat.rank == 3 and beat.pid == os.getpid()
    for step in range(4):
        time.sleep(0.01)
        hb.beat(step)
    beat = read_beat(str(tmp_path / "hb" / "local0"))
    assert beat.phase_label == "step" and beat.step == 3 and beat.n_steps == 3
    assert 0.005 < beat.step_max < 1.0 and beat.step_last > 0
    with hb.phase_scope("eval", timeout=timedelta(seconds=7)):
        inside = read_beat(str(tmp_path / "hb" / "local0"))
        assert inside.phase_label == "eval" and inside.phase_timeout == 7.0
        time.sleep(0.05)
    with hb.phase_scope("checkpoint"):
        time.sleep(0.02)
    hb.beat(4)
    after = read_beat(str(tmp_path / "hb" / "local0"))
    assert after.phase_label == "step" and after.ckpt_max >= 0.02
    assert after.step_last < 0.05, "time spent in phases must not count as step time"
    hb.seed({"step_max": 9.0, "ckpt_max": 3.0, "n_steps": 10})
    seeded = read_beat(str(tmp_path / "hb" / "local0"))
    assert seeded.step_max == 9.0 and seeded.ckpt_max == 3.0 and seeded.n_steps == 10


def test_torn_or_missing_records_read_as_none(tmp_path) -> None:
    assert read_beat(str(tmp_path / "missing")) is None
    (tmp_path / "short").write_bytes(b"\x01" * 10)
    assert read_beat(str(tmp_path / "short")) is None
    (tmp_path / "odd").write_bytes(b"\x01" + b"\x00" * 127)  # seq odd: write in progress forever
    assert read_beat(str(tmp_path / "odd")) is None
    # A stable record with a NaN or negative time is garbage (a NaN is never overdue): None,
    # so the watchdog treats the rank as not beating and times it out.
    from hpresil.hang.api import RECORD, RECORD_SIZE

    good = [2, 5, 100.0, 100.0, 1, 42, 0.2, 0.3, 0.25, 5, 0, 0.0, 0.1, 0, 0.0, b"step"]
    for i, bad in ((2, float("nan")), (3, float("inf")), (7, -1.0)):
        fields = list(good)
        fields[i] = bad
        (tmp_path / "bad").write_bytes(RECORD.pack(*fields).ljust(RECORD_SIZE, b"\0"))
        assert read_beat(str(tmp_path / "bad")) is None, (i, bad)
    (tmp_path / "ok").write_bytes(RECORD.pack(*good).ljust(RECORD_SIZE, b"\0"))
    assert read_beat(str(tmp_path / "ok")).step == 5


def test_phase_timeouts_are_calibrated_with_a_floor(tmp_path) -> None:
    cfg = HangConfig(step_floor=timedelta(seconds=4), factor=2.5, min_samples=3, init_timeout=timedelta(seconds=100))
    hb = Heartbeat(str(tmp_path / "r"), rank=0)
    assert phase_timeout(None, cfg, 0, 0) == (100.0, "init")
    hb.beat(0)
    hb.beat(1)
    b = read_beat(str(tmp_path / "r"))
    assert phase_timeout(b, cfg, 3.0, 0) == (100.0, "step"), "uncalibrated steps use the init timeout"
    hb.seed({"n_steps": 5})
    b = read_beat(str(tmp_path / "r"))
    assert phase_timeout(b, cfg, 3.0, 0) == (7.5, "step")
    assert phase_timeout(b, cfg, 0.1, 0) == (4.0, "step")
    fixed = HangConfig(step_timeout=timedelta(seconds=2), step_floor=timedelta(seconds=1))
    assert phase_timeout(b, fixed, 3.0, 0) == (2.0, "step")
    with hb.phase_scope("checkpoint"):
        assert phase_timeout(read_beat(str(tmp_path / "r")), cfg, 1, 20.0) == (50.0, "checkpoint")
    with hb.phase_scope("eval", timeout=timedelta(seconds=11)):
        assert phase_timeout(read_beat(str(tmp_path / "r")), cfg, 1, 0) == (11.0, "eval")
    hb.exiting()
    assert phase_timeout(read_beat(str(tmp_path / "r")), cfg, 1, 0) == (100.0, "exit")


def test_suspects_by_strongest_evidence() -> None:
    assert find_suspects([_diag(0), _diag(1, state="T", coll=None)]) == ([1], "stopped")
    assert find_suspects([_diag(0, step=6), _diag(1, step=5), _diag(2, step=6)]) == ([1], "behind")
    assert find_suspects([_diag(0), _diag(1, coll=False), _diag(2)]) == ([1], "not_in_collective")
    assert find_suspects([_diag(0, coll=None), _diag(1, coll=None, cpu=0.95)]) == ([1], "spinning")
    assert find_suspects([_diag(0, coll=None), _diag(1, coll=None)]) == ([0, 1], "unknown")
    assert find_suspects([]) == ([], "unknown")
    # round trip through the JSON the nodes exchange
    assert RankDiag.from_json(_diag(4).to_json()) == _diag(4)


def test_in_collective_reads_the_main_thread_only() -> None:
    waiting = ('Thread 0x1 (most recent call first):\n  File "x/threading.py", line 1 in wait\n\n'
               'Current thread 0x2 (most recent call first):\n'
               '  File "/p/torch/distributed/distributed_c10d.py", line 2 in all_reduce\n  File "train.py", line 9 in <module>\n')
    assert in_collective(waiting) is True
    busy = 'Current thread 0x2 (most recent call first):\n  File "train.py", line 3 in compute\n'
    assert in_collective(busy) is False
    assert in_collective(None) is None and in_collective("") is None


def test_proc_state_of_self_and_missing() -> None:
    state, cpu = proc_state(os.getpid())
    assert state in "RS" and cpu >= 0
    assert proc_state(2**22 + 12345) is None


def test_config_validation_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="factor >= 1"):
        HangConfig(factor=0.5)
    with pytest.raises(ConfigError, match="init_timeout"):
        HangConfig(init_timeout=timedelta(seconds=1), step_floor=timedelta(seconds=5))
    with pytest.raises(ConfigError, match="HPRESIL_HANG_FACTOR='x' is not a number"):
        hang_config_from_env({"HPRESIL_HANG_FACTOR": "x"})
    with pytest.raises(ConfigError, match="use on or off"):
        hang_config_from_env({"HPRESIL_HANG": "maybe"})
    cfg = hang_config({"--hang-step-floor": "2", "HPRESIL_HANG_STEP_FLOOR": "9", "HPRESIL_HANG": "off"})
    assert cfg.step_floor == timedelta(seconds=2) and cfg.enabled is False


def test_straggler_detector_needs_consecutive_slow_windows() -> None:
    from hpresil.hang.straggler import StragglerDetector

    det = StragglerDetector(threshold=1.5, windows=2)
    assert det.observe(0, {0: 1.0, 1: 2.0, 2: 1.0}, "cpu") == []
    reports = det.observe(1, {0: 1.0, 1: 2.0, 2: 1.1}, "cpu")
    assert [(r.rank, round(r.ratio, 2)) for r in reports] == [(1, 1.90)]
    assert det.observe(2, {0: 1.0, 1: 2.0, 2: 1.0}, "cpu") == [], "reported once"
    assert det.observe(3, {0: 1.0, 1: 1.0, 2: 1.0}, "cpu") == []  # one calm window: noise, not a recovery
    assert det.observe(4, {0: 1.0, 1: 3.0, 2: 1.0}, "cpu") == []
    assert det.observe(5, {0: 1.0, 1: 3.0, 2: 1.0}, "cpu") == [], "one calm window does not re-arm the report"
    for w in (6, 7):  # recovered for `windows` windows
        assert det.observe(w, {0: 1.0, 1: 1.0, 2: 1.0}, "cpu") == []
    det.observe(8, {0: 1.0, 1: 3.0, 2: 1.0}, "cpu")
    assert [r.rank for r in det.observe(9, {0: 1.0, 1: 3.0, 2: 1.0}, "cpu")] == [1], "reported again after recovery"
    assert det.observe(10, {0: 1.0}, "cpu") == []


def test_checkpoint_persists_and_restores_the_calibration(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import hpresil
    import sys

    hbmod = sys.modules["hpresil.hang.heartbeat"]

    shm = tmp_path / "shm"
    monkeypatch.setenv("HPRESIL_SHM_DIR", str(shm))
    monkeypatch.setattr(hbmod, "_instance", None)
    state = {"w": torch.zeros(8)}
    ckpt = hpresil.Checkpointer(state=state, shm_dir=str(shm / "ckpt-root"), durable_every=0, run_services=True)
    for step in range(1, 6):
        time.sleep(0.03)
        ckpt.save(step)  # each save is also a heartbeat, and runs in the "checkpoint" phase
    before = read_beat(str(shm / "hb" / "local0"))
    assert before.step == 5 and before.n_steps >= 3 and before.step_max >= 0.02 and before.ckpt_max > 0
    ckpt.wait()
    ckpt.close(keep_ram=True)
    # a restarted worker: fresh heartbeat record, calibration comes back from the snapshot
    monkeypatch.setattr(hbmod, "_instance", None)
    (shm / "hb" / "local0").unlink()
    ckpt = hpresil.Checkpointer(state=state, shm_dir=str(shm / "ckpt-root"), durable_every=0, run_services=True)
    assert ckpt.restore() == 5
    after = read_beat(str(shm / "hb" / "local0"))
    assert after.step_max == pytest.approx(before.step_max) and after.n_steps == before.n_steps
    ckpt.close()


def test_busy_in_its_own_code_versus_certainly_stuck() -> None:
    def verdict(diags: list[RankDiag]) -> bool:
        return busy(diags, *find_suspects(diags))

    # rank 1 outside any collective while rank 0 waits in one: busy (host work, a sleep, a spin)
    assert verdict([_diag(0), _diag(1, coll=False)])
    assert verdict([_diag(0), _diag(1, coll=False, cpu=1.0)])
    assert verdict([_diag(0, step=6), _diag(1, step=5, coll=False)])  # behind, in its own code
    assert verdict([_diag(0, coll=False)])  # a lone rank asleep: torchrun would let it run
    # certainly stuck: stopped, blocked in a collective, waiting for the device, or a stack not read
    assert not verdict([_diag(0), _diag(1, state="T", coll=False)])
    assert not verdict([_diag(0), _diag(1)])  # every rank inside a collective: a peer gone or a mismatch
    assert not verdict([_diag(0, step=6), _diag(1, step=5)])  # behind, but blocked in a collective
    assert not verdict([_diag(0, coll=None), _diag(1, coll=None, cpu=0.95)])
    sync = RankDiag(rank=1, node="n", step=5, phase="step", state="S", cpu_rate=0.0, in_collective=False,
                    in_device_wait=True)
    assert not verdict([_diag(0), sync])


def test_device_wait_is_read_from_the_main_stack() -> None:
    stack = ('Current thread 0x1 (most recent call first):\n  File "/x/torch/cuda/__init__.py", line 9 in synchronize\n'
             '  File "train.py", line 3 in <module>\n')
    assert in_device_wait(stack) is True and in_collective(stack) is False
    assert in_device_wait('Current thread 0x1:\n  File "train.py", line 3 in <module>\n') is False
    assert in_device_wait(None) is None
