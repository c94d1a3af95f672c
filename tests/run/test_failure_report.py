"""Root-cause selection in the failure report (hpresil/run/failure.py)."""

from __future__ import annotations

import json
import os
import signal

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from hpresil.run.failure import explain_failure, pick_root_cause

_GLOO_PEER_LOSS = """Traceback (most recent call last):
  File "train.py", line 20, in <module>
    dist.barrier()
RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242
"""


def _failure(tmp_path, rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                             error_file=str(tmp_path / f"missing{rank}.json"))
    failure.timestamp = timestamp
    return failure


def test_peer_loss_is_not_the_root_cause_even_when_earlier(tmp_path) -> None:
    stderr1 = tmp_path / "stderr1.log"
    stderr1.write_text(_GLOO_PEER_LOSS)
    failures = {0: _failure(tmp_path, 0, -signal.SIGKILL, 101), 1: _failure(tmp_path, 1, 1, 100)}
    exc = ChildFailedError("train.py", failures)
    assert exc.get_first_failure()[0] == 1  # torch's choice: the earliest timestamp
    rank, failure = pick_root_cause(exc, {1: str(stderr1)})
    assert rank == 0 and failure.exitcode == -signal.SIGKILL
    report = explain_failure(exc, max_restarts=0, restarts_used=0, stderr_paths={1: str(stderr1)})
    assert "root cause: rank 0 (local rank 0, pid 1000) was killed by SIGKILL" in report
    assert "also stopped: ranks 1" in report


def test_same_second_tie_prefers_the_signal_death(tmp_path) -> None:
    failures = {1: _failure(tmp_path, 1, 1, 100), 0: _failure(tmp_path, 0, -signal.SIGKILL, 100)}
    assert pick_root_cause(ChildFailedError("train.py", failures))[0] == 0


def test_earliest_real_error_wins(tmp_path) -> None:
    stderr = {r: tmp_path / f"stderr{r}.log" for r in (0, 1)}
    stderr[0].write_text("Traceback (most recent call last):\nValueError: bad batch\n")
    stderr[1].write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
    failures = {0: _failure(tmp_path, 0, 1, 105), 1: _failure(tmp_path, 1, 1, 103)}
    rank, _ = pick_root_cause(ChildFailedError("train.py", failures), {r: str(p) for r, p in stderr.items()})
    assert rank == 1


def test_rank_stopped_by_the_agent_is_not_the_root_cause(tmp_path) -> None:
    stderr1 = tmp_path / "stderr1.log"
    stderr1.write_text("Traceback (most recent call last):\nValueError: distinctive\n")
    failures = {0: _failure(tmp_path, 0, -signal.SIGTERM, 100), 1: _failure(tmp_path, 1, 1, 100)}
    rank, _ = pick_root_cause(ChildFailedError("train.py", failures), {1: str(stderr1)})
    assert rank == 1


def test_guard_error_files_repairs_only_a_dead_writers_torn_file(tmp_path) -> None:
    import subprocess
    import sys

    from hpresil.run.failure import guard_error_files, process_running

    good, torn, live, absent = (str(tmp_path / n) for n in ("good.json", "torn.json", "live.json", "absent.json"))
    with open(good, "w") as f:
        json.dump({"message": "RuntimeError: x", "timestamp": 1}, f)
    for path in (torn, live):
        with open(path, "w") as f:
            f.write('{"message": {"mess')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not process_running(dead.pid) and process_running(os.getpid())
    checked: set[str] = set()
    files = {0: good, 1: torn, 2: live, 3: absent}
    fixed = guard_error_files(files, lambda: {1: dead.pid, 2: os.getpid()}, checked)
    assert fixed == [torn] and checked == {good, torn}
    with open(torn) as f:
        note = json.load(f)
    assert "unreadable" in note["message"]["message"] and '{"message": {"mess' in note["message"]["message"]
    assert int(note["message"]["extraInfo"]["timestamp"]) > 0
    with open(live) as f:
        assert f.read() == '{"message": {"mess'  # its writer may still be finishing it
    assert guard_error_files(files, lambda: {}, checked) == [live]  # writer gone: repaired now


def test_the_fix_hint_follows_the_kind_of_failure(tmp_path) -> None:
    stderr = tmp_path / "stderr0.log"
    stderr.write_text('Traceback (most recent call last):\n  File "train.py", line 3\n'
                      "hpresil.errors.ConfigError: every=0: snapshot interval must be >= 1 step\n")
    failures = {0: _failure(tmp_path, 0, 1, 100)}
    for restarts in (0, 3):  # an error in the script: restarting never helps
        report = explain_failure(ChildFailedError("train.py", failures), max_restarts=restarts, restarts_used=restarts,
                                 stderr_paths={0: str(stderr)})
        assert "fix: ConfigError is an error in the script, its arguments or its data" in report
        assert "pass --max-restarts N" not in report
    killed = {0: _failure(tmp_path, 0, -signal.SIGKILL, 100)}
    report = explain_failure(ChildFailedError("train.py", killed), max_restarts=0, restarts_used=0)
    assert "fix: the process was killed (SIGKILL); if that was a transient fault, pass --max-restarts N" in report


def test_a_missing_script_is_refused_before_any_worker_starts(tmp_path) -> None:
    from _launch import hpresil_run

    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "no_such_script.py"], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert f"training script 'no_such_script.py' does not exist (looked in {tmp_path})" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 2
