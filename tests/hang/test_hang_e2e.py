"""Real hangs under hpresil-run: detected with the right suspect, stacks captured,
the group killed and restarted, training completed; no false alarm on slow phases."""

from __future__ import annotations

import json

import pytest

from _launch import base_env, events, hpresil_run, script
from hpresil.testing import Fault, to_env

pytestmark = pytest.mark.slow

FAST = ["--hang-step-floor", "1", "--hang-stopped-timeout", "1", "--hang-grace", "1", "--monitor-interval", "0.1"]
SHORT_BUSY = ["--hang-busy-timeout", "1"]  # the default (600 s) lets a busy rank run, as torchrun would


def _run(tmp_path, faults: list[Fault], extra: list[str] = (), steps: int = 20, restarts: int = 1,
         options: list[str] = (), timeout: float = 90):
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = base_env(tmp_path, **to_env(faults))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts), "--log-dir",
                        str(logs), *FAST, *options, script("hang_worker.py"), str(out), str(steps), *extra], tmp_path,
                       env=env, timeout=timeout)
    return proc, out, events(logs / "events.jsonl"), logs


@pytest.mark.parametrize(
    "action, reason",
    [("stop", "stopped"), ("spin", "not_in_collective"), ("hang", "not_in_collective")],
    ids=["sigstop", "gil_spin", "sleep_while_peers_in_collective"],
)
def test_hang_is_detected_suspect_named_and_training_resumes(tmp_path, action: str, reason: str) -> None:
    proc, out, evs, logs = _run(tmp_path, [Fault(rank=1, step=8, action=action)], options=SHORT_BUSY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hangs = [e for e in evs if e["event"] == "hang_detected"]
    assert len(hangs) == 1, hangs
    hang = hangs[0]
    assert hang["suspects"] == [1] and hang["reason"] == reason
    busy = [e for e in evs if e["event"] == "rank_busy"]
    if action == "stop":  # certainly stuck: the fast verdict, no busy report
        assert not busy and "busy_timeout_s" not in hang
    else:  # outside any collective: reported busy first, killed at --hang-busy-timeout
        assert len(busy) == 1 and busy[0]["suspects"] == [1] and busy[0]["waiting"] == [0], busy
        assert busy[0]["stacks"]["1"].endswith("rank1.txt") and hang["busy_timeout_s"] == 1
    assert hang["phase"] in ("step", "stopped") and hang["step"] == 7
    # detection within max(5 s, 3x the calibrated step time) of the last progress
    assert hang["waited_s"] < 5.0
    by_rank = {r["rank"]: r for r in hang["ranks"]}
    assert by_rank[0]["in_collective"] is True, "the healthy rank waits inside the collective"
    assert (logs / "stacks" / "rank0.txt").read_text().count("all_reduce") >= 1
    if action != "stop":  # a stopped process cannot run its stack dumper; py-spy could
        assert "maybe_inject" in (logs / "stacks" / "rank1.txt").read_text()
    # the waiting rank's flight recorder shows the collective it is stuck in
    assert by_rank[0]["flight_recorder"]
    trace = json.loads((logs / "flight_recorder" / "rank0.json").read_text())
    assert any(e["profiling_name"] == "gloo:all_reduce" and e["state"] != "completed" for e in trace["entries"])
    restarts = [e for e in evs if e["event"] == "workers_restart"]
    assert [r["cause"] for r in restarts] == ["failure"]
    assert (out / "done.rank0").exists() and (out / "done.rank1").exists()
    assert (out / "rank1.attempt1").read_text().splitlines()[-1].split()[0] == "19"


def test_no_false_positive_on_slow_first_step_checkpoints_and_eval(tmp_path) -> None:
    proc, out, evs, _ = _run(tmp_path, [], ["--slow-first", "3", "--slow-checkpoint", "1.5", "--eval", "1.5"],
                             steps=30, restarts=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [e for e in evs if e["event"] in ("hang_detected", "straggler")]
    assert (out / "done.rank0").exists()


@pytest.mark.parametrize("mode, source", [([], "section"),
                                          # the CPU-time source in `make chaos` only (CI time budget)
                                          pytest.param(["--no-section", "--burn"], "cpu", marks=pytest.mark.chaos)])
def test_straggler_is_reported_not_killed(tmp_path, mode: list[str], source: str) -> None:
    proc, out, evs, _ = _run(tmp_path, [], ["--straggle-rank", "1", "--straggle", "0.1", *mode], steps=80, restarts=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [e for e in evs if e["event"] == "straggler"]
    assert [(r["rank"], r["source"]) for r in reports] == [(1, source)]
    assert reports[0]["ratio"] > 1.5
    assert not [e for e in evs if e["event"] in ("hang_detected", "workers_restart")]


def test_script_without_heartbeats_still_gets_process_supervision(tmp_path) -> None:
    # crash_and_resume.py never calls hpresil.heartbeat: a SIGSTOP is caught by process state.
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    env = base_env(tmp_path, **to_env([Fault(rank=0, step=3, action="stop")]))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", str(logs), *FAST,
                        script("crash_and_resume.py"), str(out), "6"], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hangs = [e for e in events(logs / "events.jsonl") if e["event"] == "hang_detected"]
    assert len(hangs) == 1 and hangs[0]["suspects"] == [0] and hangs[0]["reason"] == "stopped"


def test_two_nodes_agree_on_the_suspect_through_the_rendezvous_store(tmp_path) -> None:
    """Two agents (simulated nodes) with one worker each; rank 1 on node B is SIGSTOPped.
    Each node sees only its own worker; the rendezvous store lets both name rank 1."""
    import subprocess
    import sys

    from _launch import free_port

    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    env = base_env(tmp_path, **to_env([Fault(rank=1, step=8, action="stop")]))
    procs = []
    for node in ("A", "B"):
        args = [sys.executable, "-m", "hpresil.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "--node-id", node,
                "--max-restarts", "1", "--log-dir", str(tmp_path / node), *FAST, script("hang_worker.py"), str(out), "20"]
        procs.append(subprocess.Popen(args, env=env, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=150)
        assert p.returncode == 0, err[-3000:]
    for node in ("A", "B"):
        hangs = [e for e in events(tmp_path / node / "events.jsonl") if e["event"] == "hang_detected"]
        assert len(hangs) == 1, (node, hangs)
        assert hangs[0]["suspects"] == [1] and hangs[0]["reason"] == "stopped"
        assert sorted(r["rank"] for r in hangs[0]["ranks"]) == [0, 1], "both nodes' views were exchanged"
    assert (out / "done.rank0").exists() and (out / "done.rank1").exists()


_BUSY = {"hash": ["--busy-at", "6", "--busy-s", "30", "--busy-mode", "hash"],
         "sleep": ["--busy-at", "6", "--busy-s", "30", "--busy-mode", "sleep"],
         "slow_first_step": ["--busy-at", "0", "--busy-s", "30", "--busy-mode", "hash"]}


@pytest.mark.parametrize("works", [("hash", "sleep"), ("slow_first_step",)], ids=["hash+sleep", "slow_first_step"])
def test_a_rank_busy_in_its_own_code_for_30_s_is_not_killed(tmp_path, works: tuple[str, ...]) -> None:
    """Rank 0 alone spends 30 s on host work (hashing, asleep, or a slow first step)
    while rank 1 waits in the next all-reduce: reported busy, not killed (the
    defaults), and the job ends as under torchrun. The asleep job runs beside the
    hashing one (it needs no CPU), so the 30 s are spent once."""
    import subprocess
    import sys

    jobs = {}
    for work in works:
        work_dir = tmp_path / work
        (work_dir / "out").mkdir(parents=True)
        cmd = [sys.executable, "-m", "hpresil.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "0",
               "--log-dir", str(work_dir / "logs"), *FAST, script("hang_worker.py"), str(work_dir / "out"), "12",
               *_BUSY[work]]
        jobs[work] = subprocess.Popen(cmd, env=base_env(work_dir), cwd=str(work_dir), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
    for work, proc in jobs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        out, evs = tmp_path / work / "out", events(tmp_path / work / "logs" / "events.jsonl")
        assert not [e for e in evs if e["event"] in ("hang_detected", "workers_restart")], work
        assert (out / "done.rank0").exists() and (out / "done.rank1").exists()
        if work != "slow_first_step":  # overran the calibrated step timeout: reported with who waits for it
            (busy,) = [e for e in evs if e["event"] == "rank_busy"]
            assert busy["suspects"] == [0] and busy["waiting"] == [1] and busy["busy_timeout_s"] == 600
