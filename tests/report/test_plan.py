"""``hpresil-run plan``: the goodput model, its inputs from the benches' JSON, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from hpresil.report.plan import (Costs, check_against, costs_from_goodput, fleet_mtbf_h, main,
                                 membership_change_s, predict, young_daly_s)


def _goodput_json() -> dict:
    """The shape bench/goodput.py --json writes (numbers of a small run)."""
    return {
        "args": {"budget": 300.0, "replace_after": 20.0},
        "ideal_step_s": 0.25, "dcp_save_s": 1.2, "snapshot_s": 0.15, "ckpt_every": 16, "dcp_every": 40,
        "state_bytes_per_gpu": 37e6,
        "faults": [{"kind": k, "at": 60.0 * i + 30} for i, k in
                   enumerate(["worker_hang", "worker_kill", "node_loss", "s3_outage", "worker_hang"])],
        "results": {
            "hpresil": {"goodput": 0.745, "seconds": {"startup": 10.0}, "recoveries": [
                {"kind": "s3_outage", "at_s": 30.0, "step_before": 80, "start_after_s": None},  # trained through
                {"kind": "worker_hang", "at_s": 90.0, "step_before": 320, "start_after_s": 5.0},
                {"kind": "worker_kill", "at_s": 150.0, "step_before": 520, "start_after_s": 1.0},
                {"kind": "node_loss", "at_s": 210.0, "step_before": 740, "start_after_s": 6.0},
                {"kind": "node_join", "at_s": 230.0, "step_before": 790, "start_after_s": 13.0},
                {"kind": "worker_hang", "at_s": 270.0, "step_before": 930, "start_after_s": 7.0}]},
            "baseline": {"goodput": 0.315, "seconds": {"startup": 9.0}, "recoveries": [
                {"kind": "s3_outage", "at_s": 30.0, "step_before": 80, "start_after_s": 40.0},
                {"kind": "worker_hang", "at_s": 90.0, "step_before": 150, "start_after_s": None},  # stuck until 150 s
                {"kind": "worker_kill", "at_s": 150.0, "step_before": 150, "start_after_s": 3.0},
                {"kind": "node_loss", "at_s": 210.0, "step_before": 330, "start_after_s": 25.0},
                {"kind": "worker_hang", "at_s": 270.0, "step_before": 400, "start_after_s": None}]},
        },
    }


def test_fleet_mtbf_goes_through_the_published_points() -> None:
    assert fleet_mtbf_h(1024) == pytest.approx(7.9) and fleet_mtbf_h(16384) == pytest.approx(1.8)
    assert fleet_mtbf_h(512) > 7.9 > fleet_mtbf_h(4096) > 1.8 > fleet_mtbf_h(32768)
    assert young_daly_s(0.5, 3600) == pytest.approx(math.sqrt(3600))


def test_costs_come_from_the_bench_json_and_scale_with_the_state() -> None:
    obj = _goodput_json()
    ours = costs_from_goodput(obj, "hpresil")
    # medians per kind; the S3 outage was trained through (240 steps of 0.25 s in its 60 s window)
    assert ours.recovery_s == {"s3_outage": 0.0, "worker_hang": 6.0, "worker_kill": 1.0, "node_loss": 6.0}
    assert ours.rejoin_s == 13.0 and ours.startup_s == 10.0 and ours.save_s == 0.15
    assert ours.scaled(74e6).save_s == pytest.approx(0.30)
    theirs = costs_from_goodput(obj, "baseline")
    assert theirs.save_s == 1.2 and theirs.recovery_s["s3_outage"] == 40.0
    # stuck: no step between the hang (90 s) and the next fault (150 s); the last hang has no window
    assert theirs.recovery_s["worker_hang"] == pytest.approx(60.0)
    from hpresil.errors import ConfigError

    with pytest.raises(ConfigError, match="goodput.py --json"):
        costs_from_goodput({"results": {}}, "hpresil")


def test_prediction_known_answer() -> None:
    costs = Costs(step_s=0.25, save_s=0.2, startup_s=10.0, recovery_s={"worker_kill": 2.0})
    p = predict(costs, budget_s=100.0, faults={"worker_kill": 2, "s3_outage": 1}, interval_s=4.0)
    # (100 - 10 - 2 x (2 + 4/2)) x (1 - 0.2/4) / 100
    assert p.goodput == pytest.approx(82 * 0.95 / 100) and p.lost_per_fault_s == pytest.approx(4.0)
    # a replayed schedule: the fault 1 s before the end costs that second, not 4
    q = predict(costs, budget_s=100.0, faults={}, interval_s=4.0, fault_times=[("worker_kill", 50.0),
                                                                               ("worker_kill", 99.0)])
    assert q.goodput == pytest.approx((100 - 10 - 4 - 1) * 0.95 / 100)


def test_check_predicts_each_system_of_a_run() -> None:
    got = check_against(_goodput_json())
    assert set(got) == {"hpresil", "baseline"}
    for r in got.values():
        assert 0 < r["predicted"] < 1 and r["ratio"] == pytest.approx(r["predicted"] / r["measured"])
    assert got["hpresil"]["predicted"] > got["baseline"]["predicted"]


def test_membership_change_from_the_control_plane_fit() -> None:
    cp = {"summary": {"etcd": {"fit": {"change_s": {"a": 6.0, "b": 0.01}}}}}
    assert membership_change_s(cp, "etcd", 256) == pytest.approx(8.56)
    assert membership_change_s(cp, "tcpstore", 256) is None


def test_cli_recommends_intervals_and_compares_with_torchrun_dcp(tmp_path, capsys) -> None:
    gp, cp = tmp_path / "goodput.json", tmp_path / "cp.json"
    gp.write_text(json.dumps(_goodput_json()))
    cp.write_text(json.dumps({"summary": {"etcd": {"fit": {"change_s": {"a": 6.0, "b": 0.01}}}}}))
    assert main(["--goodput-json", str(gp), "--control-plane-json", str(cp), "--gpus", "16384",
                 "--state-gb", "3.7"]) == 0
    out = capsys.readouterr().out
    assert "MTBF 1.80 h (fleet data)" in out and "2048 nodes" in out and "--replicas 2" in out
    assert "expected goodput: hpresil" in out and "torchrun + DCP" in out
    assert main(["--goodput-json", str(gp), "--check"]) == 0
    assert "hpresil   predicted" in capsys.readouterr().out
    assert main(["--goodput-json", str(tmp_path / "missing.json")]) == 2
    assert main(["--goodput-json", str(gp), "--mix", "bogus=1"]) == 2
