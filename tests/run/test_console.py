"""The console of ``hpresil-run``: workers' stderr copied with tracebacks held back,
one line per failure and per recovery, one report for a failed job."""

from __future__ import annotations

import io
import os
import time

import pytest

from _launch import base_env, hpresil_run, script
from hpresil.testing import faults
from hpresil.run.console import ConsoleConfig, WorkerConsole
from hpresil.run.failure import exception_line
from hpresil.run.recovery import RecoveryReport, rank_ranges

TB = [
    "Traceback (most recent call last):",
    '  File "train.py", line 4, in <module>',
    '    raise KeyError("k")',
    "KeyError: 'k'",
]
PEER_TB = [
    "Traceback (most recent call last):",
    '  File "train.py", line 9, in <module>',
    "    dist.barrier()",
    "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:1. GLHF!",
]


def _console(tmp_path, hold_s: float = 60.0) -> tuple[WorkerConsole, io.StringIO, dict[int, str]]:
    out = io.StringIO()
    console = WorkerConsole(out, ConsoleConfig(hold_s=hold_s, poll_s=0.01))
    files = {r: str(tmp_path / f"{r}.log") for r in (0, 1)}
    console.start_attempt(files, {0: "[default0]:", 1: "[default1]:"}, {0: 0, 1: 1})
    return console, out, files


def _write(path: str, lines: list[str], end: str = "\n") -> None:
    with open(path, "a") as f:
        f.write("\n".join(lines) + end)


def _wait_for(out: io.StringIO, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in out.getvalue():
        assert time.monotonic() < deadline, out.getvalue()
        time.sleep(0.01)


def test_exception_line_is_the_last_tracebacks_exception() -> None:
    chained = TB + ["", "During handling of the above exception, another exception occurred:", "", *PEER_TB]
    assert exception_line(TB) == "KeyError: 'k'"
    assert exception_line(chained).startswith("RuntimeError: [pair.cc:553]")
    assert exception_line(["plain line"]) is None


def test_a_restart_folds_each_traceback_to_one_line_and_keeps_other_lines(tmp_path) -> None:
    console, out, files = _console(tmp_path)
    _write(files[0], ["step 1 loss 2.0", *PEER_TB])
    _write(files[1], ["injecting a fault", *TB])
    _wait_for(out, "[default1]:injecting a fault")
    time.sleep(0.1)
    assert "Traceback" not in out.getvalue()  # held while the outcome is unknown
    console.end_attempt(restarting=True)
    console.close()
    lines = out.getvalue().splitlines()
    assert "[default0]:step 1 loss 2.0" in lines and "[default1]:injecting a fault" in lines
    assert f"[default1]:KeyError: 'k'  [traceback in {files[1]}]" in lines
    assert any(line.startswith("[default0]:RuntimeError: a collective lost its peer") for line in lines)
    assert len(lines) == 4 and "Traceback" not in out.getvalue()


def test_a_traceback_whose_worker_lives_on_is_printed_in_full(tmp_path) -> None:
    console, out, files = _console(tmp_path, hold_s=0.2)
    _write(files[0], [*TB, "continuing after a handled error"])
    _wait_for(out, "[default0]:continuing after a handled error", timeout=5)
    assert [f"[default0]:{line}" for line in TB] == out.getvalue().splitlines()[:4]
    console.close()


def test_a_failed_job_leaves_the_root_causes_traceback_to_the_report(tmp_path) -> None:
    console, out, files = _console(tmp_path)
    _write(files[0], PEER_TB)
    _write(files[1], TB)
    console.end_attempt(restarting=False)  # the last attempt: the outcome comes with close()
    console.close(failed=True, root_rank=1)
    text = out.getvalue()
    assert "KeyError" not in text and "Traceback" not in text
    assert text.startswith("[default0]:RuntimeError: a collective lost its peer") and text.count("\n") == 1


def test_success_and_stop_print_held_tracebacks_and_unterminated_lines_in_full(tmp_path) -> None:
    console, out, files = _console(tmp_path)
    _write(files[0], TB)
    _write(files[1], ["no newline at the end"], end="")
    console.close()
    lines = out.getvalue().splitlines()  # each rank's lines in order (ranks may interleave)
    assert [line for line in lines if line.startswith("[default0]:")] == [f"[default0]:{line}" for line in TB]
    assert [line for line in lines if line.startswith("[default1]:")] == ["[default1]:no newline at the end"]


def test_recovery_line_waits_for_every_rank_of_the_restarted_group(caplog) -> None:
    report = RecoveryReport()
    caplog.set_level("INFO", logger="hpresil.run.recovery")
    stream = [
        {"event": "worker_exit", "ts": 10.0, "rank": 1, "signal": "SIGKILL", "exitcode": -9},
        {"event": "workers_restart", "ts": 10.1, "reason": "worker_failed"},
        {"event": "workers_start", "ts": 10.2, "attempt": 1, "ranks": [0, 1, 2]},
        {"event": "checkpoint_restored", "ts": 10.5, "attempt": 0, "rank": 0, "step": 9, "tier": "ram"},
        {"event": "checkpoint_restored", "ts": 10.6, "attempt": 1, "rank": 0, "step": 25, "tier": "ram",
         "duration_s": 0.2},
        {"event": "checkpoint_restored", "ts": 10.7, "attempt": 1, "rank": 1, "step": 25, "tier": "peer",
         "duration_s": 0.3},
    ]
    for event in stream:
        report.observe(event)
    assert not caplog.records  # rank 2 has not restored yet (and attempt 0's event is not this recovery)
    report.observe({"event": "checkpoint_restored", "ts": 11.0, "attempt": 1, "rank": 2, "step": 25, "tier": "ram",
                    "duration_s": 0.1})
    (record,) = caplog.records
    assert record.getMessage() == ("recovered from rank 1 killed by SIGKILL: ranks 0-2 restored step 25 from "
                                   "peer+ram (0.30 s); training again 1.00 s after the failure (attempt 1)")
    assert rank_ranges([5, 0, 1, 2, 7, 6]) == "0-2, 5-7"


@pytest.mark.slow
def test_a_recovered_failure_prints_one_line_per_failure_and_recovery(tmp_path) -> None:
    """A worker SIGKILLed mid-run: no traceback on the console (the survivor's broken
    collective included), one line for the failure and one for the recovery; the
    tracebacks stay in the log dir."""
    logs = tmp_path / "logs"
    env = base_env(tmp_path, warm=True, **faults.to_env([faults.fail_at(rank=1, step=12)]))
    result = hpresil_run(["--nproc-per-node", "2", "--max-restarts", "2", "--job-log-dir", str(logs),
                          script("goodput_worker.py"), "--steps", "30"], tmp_path, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "ProcessExitedException" not in out, out[-3000:]
    assert out.count("worker rank 1 (local 1") == 1 and "was killed by SIGKILL (attempt 0)" in out
    assert "recovered from rank 1 killed by SIGKILL: ranks 0-1 restored step" in out
    agent_log = (logs / "agent.log").read_text()
    assert "ProcessExitedException" in agent_log  # the full record of torch's agent is kept
    stderr_logs = [os.path.join(d, f) for d, _, fs in os.walk(logs / "workers") for f in fs if f == "stderr.log"]
    assert len(stderr_logs) == 4  # 2 ranks x 2 attempts, in the job log dir
    if "a collective lost its peer" in out:  # the survivor's folded line points at its full traceback
        assert any("Traceback (most recent call last)" in open(p).read() for p in stderr_logs)


@pytest.mark.slow
def test_a_failed_job_reports_once_and_exits_like_torchrun(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nif os.environ['RANK'] == '1':\n    raise KeyError('missing_config_key')\n")
    result = hpresil_run(["--nproc-per-node", "2", "--max-restarts", "1", str(bad)], tmp_path)
    err = result.stderr
    assert result.returncode == 1  # torchrun's status for a failed job
    assert err.count("Traceback (most recent call last)") == 1, err  # the report's, of the root cause
    # per attempt the agent's failure line, attempt 0's folded traceback, and the report's traceback
    assert err.count("KeyError: 'missing_config_key'") == 4, err
    assert "ChildFailedError" not in err and "no error file defined" not in err
    assert "hpresil-run: job failed; 1 of --max-restarts 1 restarts used" in err
