"""bench/goodput.py's pure parts (fault schedule, Young/Daly, goodput over a step
log) and the baseline mode of examples/llama/train.py (plain DCP save + resume)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _launch import REPO, base_env

sys.path.insert(0, os.path.join(REPO, "bench"))

from _goodput_calc import (  # noqa: E402
    CAUSES, KINDS, account, calibrate, recoveries, schedule, snapshot_cost, table, young_daly,
)

TRAIN = os.path.join(REPO, "examples", "llama", "train.py")


# ---- schedule ------------------------------------------------------------------------


def test_schedule_is_seeded_one_per_interval_in_its_middle_half():
    faults = schedule(300, 60, seed=3)
    assert faults == schedule(300, 60, seed=3)
    assert faults != schedule(300, 60, seed=4)
    assert len(faults) == 5
    for i, f in enumerate(faults):
        assert 60 * i + 15 <= f.at <= 60 * i + 45
        assert f.target in (0, 1)
    assert sorted(f.kind for f in faults[:4]) == sorted(KINDS)  # a shuffled deck: each kind once per 4


def test_schedule_repairs_and_short_budgets():
    faults = schedule(600, 60, seed=0, replace_after=20, outage=30)
    for f in faults:
        expected = {"node_loss": f.at + 20, "s3_outage": f.at + 30}.get(f.kind)
        assert f.repair_at == expected
    assert len(schedule(60, 60, seed=0)) == 1
    assert schedule(59, 60, seed=0) == []
    assert {f.kind for f in schedule(600, 60, seed=1, kinds=["worker_hang"])} == {"worker_hang"}
    with pytest.raises(ValueError, match="unknown fault kinds"):
        schedule(60, 60, seed=0, kinds=["meteor"])
    with pytest.raises(ValueError):
        schedule(0, 60, seed=0)


# ---- Young/Daly and calibration --------------------------------------------------------


def test_young_daly():
    interval, steps = young_daly(2.0, 60.0, 0.25)
    assert interval == pytest.approx(math.sqrt(240.0))
    assert steps == round(math.sqrt(240.0) / 0.25) == 62
    assert young_daly(0.001, 1.0, 10.0)[1] == 1  # never below one step
    with pytest.raises(ValueError):
        young_daly(0.0, 60.0, 0.25)


def test_snapshot_cost_sums_the_slowdown_after_each_snapshot():
    # every 4 steps; the step that saves is 30 ms slower, the next 20 ms, the rest quiet at 250 ms
    extra = {0: 0.03, 1: 0.02, 2: 0.0, 3: 0.0}
    recs, t = [{"t": 0.0, "event": "start", "step": 0}, {"t": 5.0, "step": 1, "save_s": 0.0}], 5.0
    for step in range(2, 42):
        t += 0.25 + extra[step % 4] + (0.001 if step % 3 == 0 else 0.0)  # a little noise
        recs.append({"t": t, "step": step, "save_s": 0.01 if step % 4 == 0 else 0.0})
    recs.insert(20, {"t": recs[19]["t"] + 1e-3, "event": "start", "step": recs[19]["step"]})  # a restart: no gap step
    assert snapshot_cost(recs, 4) == pytest.approx(0.05, abs=2e-3)
    flat = [{"t": 0.25 * i, "step": i, "save_s": 0.0} for i in range(1, 20)]
    assert snapshot_cost(flat, 4) == 1e-3  # never below 1 ms
    with pytest.raises(ValueError, match="position"):
        snapshot_cost(recs[:4], 4)
    with pytest.raises(ValueError, match="every >= 2"):
        snapshot_cost(recs, 1)


def test_calibrate_takes_medians_and_skips_warm_up():
    recs = [{"t": 100.0, "event": "start", "step": 0}, {"t": 103.0, "step": 1, "save_s": 0.0}]  # warm-up step
    t = 103.0
    for step in range(2, 22):
        saved = step % 5 == 0
        t += 0.3 + (1.5 if saved else 0.0)
        recs.append({"t": t, "step": step, "save_s": 1.5 if saved else 1e-5})
    step_s, save_s = calibrate(recs)
    assert step_s == pytest.approx(0.3)
    assert save_s == pytest.approx(1.5)
    with pytest.raises(ValueError, match="no step without a save"):
        calibrate(recs[:2])


# ---- goodput over a step log -----------------------------------------------------------


def _steps(first: int, last: int, t: float, every: float, save_at: int, save_s: float, world: int = 2) -> list[dict]:
    out = []
    for step in range(first, last + 1):
        t += every
        out.append({"t": t, "step": step, "world": world, "save_s": save_s if step % save_at == 0 else 0.0})
    return out


def _log(world_after: int = 2) -> list[dict]:
    """Start at +3 s (0.5 s restore), steps 1-7 every 0.5 s (save at 4), a kill at +7.3 s,
    a new group at +12 s (1 s restore) resuming step 4, steps 5-20."""
    recs = [{"t": 1003.0, "event": "start", "step": 0, "world": 2, "restore_s": 0.5}]
    recs += _steps(1, 7, 1003.0, 0.5, 4, 0.1)
    recs += [{"t": 1012.0, "event": "start", "step": 4, "world": world_after, "restore_s": 1.0}]
    recs += _steps(5, 20, 1012.0, 0.5, 4, 0.1, world=world_after)
    return recs


def test_account_splits_the_budget_per_cause():
    acc = account(_log(), t0=1000.0, budget=30.0, ideal_step_s=0.5, events=[(1007.3, "worker_kill")])
    s = acc.seconds
    assert (acc.final_step, acc.steps_run, acc.starts, acc.worlds) == (20, 23, 2, [2, 2])
    assert s["productive"] == pytest.approx(10.0)
    assert s["startup"] == pytest.approx(2.5)
    assert s["restore"] == pytest.approx(1.5)
    assert s["checkpoint"] == pytest.approx(0.5)  # saves of steps 4, 8, 12, 16, 20
    assert s["redone"] == pytest.approx(1.5 + 0.8)  # steps 5-7 of the first group + the interrupted step
    assert s["restart"] == pytest.approx(11.0 - 7.3)
    assert s["rescale"] == 0.0
    assert sum(s.values()) == pytest.approx(30.0)
    assert set(s) == {"productive", *CAUSES}
    assert acc.goodput == pytest.approx(10.0 / 30.0)
    # The run's own quiet steps (no save, largest world) take 0.5 s: the same goodput here.
    assert acc.run_step_s == pytest.approx(0.5) and acc.goodput_run == pytest.approx(acc.goodput)


def test_account_rescale_and_a_budget_ending_mid_recovery():
    acc = account(_log(world_after=1), t0=1000.0, budget=30.0, ideal_step_s=0.5,
                  events=[(1007.3, "node_loss"), (1025.0, "node_join"), (1003.2, "s3_outage")])
    assert acc.seconds["rescale"] == pytest.approx(3.7 + 5.0)  # the loss, then the join until the budget ends
    assert acc.seconds["redone"] == pytest.approx(2.3 + 5.0)  # ... after the last step (+20 s) until the join
    assert acc.seconds["restart"] == 0.0
    assert sum(acc.seconds.values()) == pytest.approx(30.0)
    # Records after the budget do not count; nothing at all is start-up.
    late = account(_log(), t0=1000.0, budget=10.0, ideal_step_s=0.5, events=[(1007.3, "worker_kill")])
    assert late.final_step == 7 and late.seconds["productive"] == pytest.approx(3.5)
    empty = account([], t0=1000.0, budget=10.0, ideal_step_s=0.5)
    assert empty.seconds["startup"] == 10.0 and empty.goodput == 0.0


def test_recoveries_and_table():
    rec = recoveries(_log(), [(1007.3, "worker_kill"), (1025.0, "s3_outage")], t0=1000.0)
    assert rec[0] == {"at_s": pytest.approx(7.3), "kind": "worker_kill", "step_before": 7,
                      "start_after_s": pytest.approx(4.7), "resumed_step": 4, "world": 2}
    assert rec[1]["start_after_s"] is None  # no restart after an outage
    a = account(_log(), t0=1000.0, budget=30.0, ideal_step_s=0.5, events=[(1007.3, "worker_kill")])
    b = account(_log()[:5], t0=1000.0, budget=30.0, ideal_step_s=0.5)
    text = table({"hpresil": a, "baseline": b})
    assert "goodput (%)" in text and "5.00x" in text and "NOT met" in text
    assert "goodput vs the run's own step (%)" in text


# ---- the baseline mode of train.py -------------------------------------------------------


def _train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = base_env(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, TRAIN, "--preset", "tiny", "--steps", "8", "--log-every", "100", *flags],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=90)


@pytest.mark.slow
def test_train_dcp_baseline_saves_and_resumes_bitwise(tmp_path):
    # 8 steps saving every 3: checkpoints 3 and 6; a second run resumes from 6 and must end
    # with the same state as the first (the data position and the optimizer travel in DCP).
    url, log = f"file://{tmp_path}/dcp", tmp_path / "steps.jsonl"
    flags = ["--dcp", url, "--dcp-every", "3", "--step-log", str(log)]
    first = _train(tmp_path, *flags, "--out", str(tmp_path / "first.pt"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "dcp")) == ["step_00000003", "step_00000006"]
    assert os.path.exists(tmp_path / "dcp" / "step_00000006" / ".metadata")
    resumed = _train(tmp_path, *flags, "--out", str(tmp_path / "resumed.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "steps 6..8" in resumed.stdout
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["world"]) for r in recs if r.get("event") == "start"] == [(0, 1), (6, 1)]
    assert [r["step"] for r in recs if "save_s" in r] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8]
    a = torch.load(tmp_path / "first.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: the DCP resume is not bitwise equal to the uninterrupted run"
