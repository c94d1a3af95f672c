"""``hpresil-run report``: goodput and time lost per cause, over synthetic event
streams with known answers and over a real recorded run with an injected failure."""

from __future__ import annotations

import json
import os
import sys

import pytest

from _goodput_run import RecordedRun, final_step, record_once
from hpresil.errors import ConfigError
from hpresil.report import CAUSES, KINDS, analyse, build_report
from hpresil.report.cli import format_report


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    return record_once(tmp_path_factory)


def _ev(ts: float, event: str, node: str = "n0", **fields: object) -> dict:
    return {"ts": ts, "event": event, "node": node, **fields}


def _two_epochs() -> list[dict]:
    return [
        _ev(0, "runtime_start", run_id="r"),
        _ev(1, "workers_start", world_size=2, attempt=0),
        _ev(3.1, "checkpoint_saved", rank=0, step=10, tier="ram", blocking_s=0.1, bytes=100),
        _ev(3.2, "progress", step=10, t_step=3.0, step_time_s=0.2),
        _ev(5.1, "progress", step=20, t_step=5.0, step_time_s=0.2),
        _ev(5.2, "checkpoint_skipped", rank=1, step=20, reason="slots_busy", waited_s=0.25),
        _ev(6, "worker_exit", rank=1, exitcode=-9, signal="SIGKILL"),
        _ev(6, "workers_restart", cause="failure"),
        _ev(8, "workers_start", world_size=2, attempt=1),
        _ev(9, "checkpoint_restored", rank=0, step=10, tier="ram", duration_s=0.5, bytes=100),
        _ev(11.1, "progress", step=20, t_step=11.0),
        _ev(13.1, "progress", step=30, t_step=13.0),
        _ev(14, "workers_succeeded"),
        _ev(15, "runtime_stop", succeeded=True),
    ]


def _contiguous(report) -> None:
    assert report.segments[0].start == report.start and report.segments[-1].end == report.end
    for a, b in zip(report.segments, report.segments[1:]):
        assert a.end == b.start and a.duration > 0, (a, b)


def test_known_answer_failure_restore_and_lost_work() -> None:
    r = analyse(_two_epochs())
    _contiguous(r)
    got = {k: round(r.seconds(k), 6) for k in KINDS}
    # steps 11..20 were undone by the restore to step 10 (lost work); the second from
    # step 20's completion to the exit is the interrupted step and its detection
    assert got == {"productive": 6.0, "lost_work": 1.9, "detection": 1.0, "checkpoint": 0.1, "restore": 0.5,
                   "restart": 2.0, "rescale": 0.0, "hang_detection": 0.0, "init": 1.5, "shutdown": 2.0}
    assert r.wall_s == 15 and r.goodput == pytest.approx(0.4)
    assert r.restarts == {"failure": 1} and r.final_step == 30
    assert [(e.base_step, e.fault, e.max_step) for e in r.epochs] == [(0, "exit", 20), (10, "succeeded", 30)]
    assert r.tiers["ram"].saves == 1 and r.tiers["ram"].skipped == 1
    text = format_report(r)
    assert "goodput" in text and "40.0 %" in text and "lost work (steps recomputed)" in text and "skipped" in text
    assert "detection (last step -> seen)" in text


def test_tier_rows_show_only_the_columns_that_apply() -> None:
    evs = _two_epochs()
    evs.insert(-2, _ev(12.5, "checkpoint_drained", step=20, tier="durable", duration_s=0.5, bytes=2_000_000,
                        committed=True))
    r = analyse(evs)
    durable, ram = r.tiers["durable"], r.tiers["ram"]
    assert (durable.saves, durable.uploads, durable.steps) == (0, 1, 1)
    rows = {line.split()[0]: line.split() for line in format_report(r).splitlines()[1:]
            if line.strip().startswith(("durable ", "ram "))}
    # tier saves skipped steps block-mean block-max per-copy restores restore-max uploads MB/s lag degraded
    assert rows["durable"][1:6] == ["-", "-", "1", "-", "-"] and rows["durable"][6:8] == ["2.0", "MB"]
    assert rows["durable"][10:12] == ["1", "4.0"]
    assert rows["ram"][1:4] == ["1", "1", "1"] and rows["ram"][10:13] == ["-", "-", "-"]
    assert ram.restores == 1


def test_hang_membership_and_multi_node_files(tmp_path) -> None:
    evs = [
        _ev(0, "runtime_start", "a", run_id="r"), _ev(0.5, "runtime_start", "b", run_id="r"),
        _ev(1, "workers_start", "a", world_size=4), _ev(1.2, "workers_start", "b", world_size=4),
        _ev(3, "progress", "a", step=10, t_step=3.0, step_time_s=0.2),
        _ev(4, "progress", "b", step=15, t_step=4.0),
        # last beat at 4.0; the watchdog waited 3 s and diagnosed for 1 s
        _ev(8, "hang_detected", "a", waited_s=3.0, diagnose_s=1.0, phase="step", suspects=[3]),
        _ev(9, "workers_start", "a", world_size=4),
        _ev(9.5, "worker_exit", "b", rank=3),  # b's late report of the previous round
        _ev(10, "workers_start", "b", world_size=4),
        _ev(11, "checkpoint_restored", "a", step=15, tier="durable", duration_s=1.0),
        _ev(12, "progress", "a", step=20, t_step=12.0),
        _ev(13, "workers_restart", "a", cause="membership"),
        _ev(14, "workers_start", "a", world_size=2),
        _ev(15, "checkpoint_restored", "a", step=20, tier="ram", duration_s=0.5),
        _ev(16, "progress", "a", step=25, t_step=16.0),
        _ev(17, "runtime_stop", "a"), _ev(17.5, "runtime_stop", "b"),
    ]
    for node in ("a", "b"):
        os.makedirs(tmp_path / node)
        with open(tmp_path / node / "events.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in evs if e["node"] == node)
    r = build_report(str(tmp_path))
    _contiguous(r)
    assert r.nodes == ["a", "b"] and len(r.files) == 2
    assert [e.fault for e in r.epochs] == ["hang", "membership", None]
    assert r.seconds("hang_detection") == pytest.approx(4.0)
    assert r.seconds("rescale") == pytest.approx(1.0)
    assert r.restarts == {"hang": 1, "membership": 1}
    assert r.world_sizes == [(1, 4), (9, 4), (14, 2)]
    assert sum(r.seconds(k) for k in KINDS) == pytest.approx(r.wall_s) and r.wall_s == 17.5
    assert r.tiers["durable"].restores == 1 and r.tiers["ram"].restores == 1


def test_timeline_keeps_the_world_size_off_the_step_plot_and_shows_every_mark() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from hpresil.report.timeline import build_figure

    evs = _two_epochs()
    evs.insert(-2, _ev(12.5, "checkpoint_drained", step=20, tier="durable", duration_s=0.5, bytes=10, committed=True))
    fig = Figure()
    build_figure(analyse(evs), fig)
    steps, sizes, _segments = fig.axes  # no twin axis over the step plot
    assert sizes.get_ylabel() == "world size" and sizes.get_lines()[0].get_ydata()[0] == 2
    assert all(line.get_label() != "world size" for line in steps.get_lines())
    legend = {t.get_text(): h for t, h in zip(steps.get_legend().get_texts(), steps.get_legend().legend_handles)}
    assert {"step", "exit", "restore", "durable", "save"} <= set(legend)
    for mark in ("exit", "restore", "durable"):  # a line wide and solid or dashed enough to be seen
        assert legend[mark].get_linewidth() >= 1.5 and legend[mark].get_linestyle() in ("-", "--"), mark


def test_reused_log_dir_reports_the_newest_run(tmp_path) -> None:
    old = [_ev(0, "runtime_start", run_id="old"), _ev(1, "workers_start", world_size=1), _ev(2, "runtime_stop")]
    new = [_ev(10 + e["ts"], e["event"], **{k: v for k, v in e.items() if k not in ("ts", "event", "node")})
           for e in _two_epochs()]
    new[0]["run_id"] = "new"
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in old + new) + "garbage\n")
    assert build_report(str(tmp_path)).wall_s == 15
    assert build_report(str(tmp_path), run_id="old").wall_s == 2


def test_missing_input_and_missing_matplotlib(tmp_path, monkeypatch, capsys) -> None:
    with pytest.raises(ConfigError, match="no events.jsonl"):
        build_report(str(tmp_path))
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _two_epochs()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the 'report' extra were not installed
    from hpresil.report.cli import main

    assert main([str(tmp_path), "--png", str(tmp_path / "t.png")]) == 2
    assert "pip install 'hpresil[report]'" in capsys.readouterr().err


@pytest.mark.slow
def test_recorded_run_adds_up(recorded_run) -> None:
    r = build_report(recorded_run.log_dir)
    evs = recorded_run.events
    wall = max(e["ts"] for e in evs if e["event"] == "runtime_stop") - min(e["ts"] for e in evs if e["event"] == "runtime_start")
    assert r.wall_s == pytest.approx(wall, abs=1e-6)
    _contiguous(r)
    assert sum(r.seconds(k) for k in KINDS) == pytest.approx(wall, abs=1e-6)
    assert r.productive_s + sum(r.lost.values()) == pytest.approx(wall, abs=1e-6)
    assert r.restarts == {"failure": 1}
    first, second = r.epochs
    assert (first.fault, second.fault) == ("exit", None)  # the second ended by SIGTERM
    assert second.base_step == 10 and second.restore_tier == "ram" and first.max_step >= 10
    last = final_step(recorded_run)
    assert r.final_step == last
    # every step sleeps 20 ms: kept steps (0, last] are productive, 11..12 were recomputed
    assert r.productive_s >= 0.9 * 0.02 * last
    assert r.seconds("lost_work") >= 2 * 0.02
    for cause in ("restore", "restart", "init", "shutdown"):
        assert r.seconds(cause) > 0, cause
    assert r.seconds("hang_detection") == 0 and r.seconds("rescale") == 0
    assert 0 < r.goodput < 1
    assert r.tiers["ram"].saves > 0 and r.tiers["durable"].uploads >= 1
    assert set(r.lost) == set(CAUSES)


@pytest.mark.slow
def test_report_subcommand_json_and_png(recorded_run, tmp_path, monkeypatch, capsys) -> None:
    from hpresil.run import cli

    png = tmp_path / "timeline.png"
    monkeypatch.setattr(sys, "argv", ["hpresil-run", "report", recorded_run.log_dir, "--json", "--png", str(png)])
    with pytest.raises(SystemExit) as exit_info:
        cli.console_main()
    assert exit_info.value.code == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["png"] == str(png) and 0 < obj["goodput"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peer_exits_before_the_node_loss_verdict_count_as_rescale() -> None:
    """Survivors' workers exit on broken connections a moment before their agent
    declares the node lost: the epoch ends at the exit, its cause is membership."""
    evs = [
        _ev(0, "runtime_start", "a", run_id="r"),
        _ev(1, "workers_start", "a", world_size=3),
        _ev(3, "progress", "a", step=10, t_step=3.0, step_time_s=0.2),
        _ev(4, "worker_exit", "a", rank=0, exitcode=1),
        _ev(6, "workers_restart", "a", cause="membership", reason="node_lost"),
        _ev(7, "workers_start", "a", world_size=2),
        _ev(8, "checkpoint_restored", "a", step=10, tier="durable", duration_s=0.5),
        _ev(9, "progress", "a", step=15, t_step=9.0),
        _ev(10, "runtime_stop", "a"),
    ]
    r = analyse(evs)
    assert [e.fault for e in r.epochs] == ["membership", None]
    assert r.epochs[0].fault_ts == 4
    assert r.restarts == {"membership": 1}
    assert r.seconds("restart") == 0 and r.seconds("rescale") > 0
    assert sum(r.seconds(k) for k in KINDS) == pytest.approx(r.wall_s)


def test_job_ending_while_a_new_group_starts_keeps_the_earlier_progress() -> None:
    # The budget ends after a node joined and the group restarted, before the
    # new group restored or stepped: that attempt must not erase the earlier steps.
    evs = _two_epochs()[:-2] + [
        _ev(14, "workers_restart", cause="membership", reason="node_joined"),
        _ev(15, "workers_start", world_size=3, attempt=2),
        _ev(16, "runtime_stop", succeeded=False),
    ]
    r = analyse(evs)
    _contiguous(r)
    assert r.final_step == 30
    assert r.seconds("productive") == pytest.approx(6.0)  # nothing of epochs 0-1 is called lost because of epoch 2
