"""Warm start: workers forked from hpresil-run's preloaded fork server behave
like ``python -u script.py`` workers (argv, sys.path, environment, exit status,
atexit, unbuffered output), every attempt is forked from the same warm server,
and ``--warm-start off`` gives torchrun's fresh interpreters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _launch import SCRIPTS, base_env, events, hpresil_run, script
from hpresil.errors import ConfigError
from hpresil.run.warm import DEFAULT_PRELOAD, ScriptMain, preload_modules

pytestmark = pytest.mark.slow


def _info(out: Path, rank: int, attempt: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.attempt{attempt}.json").read_text())


def _run(tmp_path: Path, mode: str, *extra: str, nproc: int = 2, env: dict | None = None):
    env = env or base_env(tmp_path, warm=True)
    out = tmp_path / "out"
    args = ["--standalone", "--nproc-per-node", str(nproc), "--monitor-interval", "0.1",
            "--job-log-dir", str(tmp_path / "logs"), *extra, script("warm_probe.py"), str(out), mode]
    return out, hpresil_run(args, tmp_path, env=env)


def test_worker_runs_as_main_with_script_argv_path_and_env(tmp_path: Path) -> None:
    out, proc = _run(tmp_path, "atexit", env=base_env(tmp_path, warm=True, HPRESIL_TEST_LATE_VAR="seen"))
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        info = _info(out, rank)
        assert info["preloaded"], "torch was imported by the fork server before the script ran"
        assert info["name"] == "__main__" and info["file"] == script("warm_probe.py")
        assert info["argv"] == [script("warm_probe.py"), str(out), "atexit"]
        assert info["path0"] == SCRIPTS, "sys.path[0] is the script's directory, as with `python script.py`"
        assert info["late_var"] == "seen" and info["cwd"] == str(tmp_path)
    assert _info(out, 0)["ppid"] == _info(out, 1)["ppid"], "both forked by the one fork server"
    assert (out / "atexit0").exists() and (out / "atexit1").exists(), "atexit handlers run"


def test_warm_start_off_starts_fresh_interpreters(tmp_path: Path) -> None:
    out, proc = _run(tmp_path, "ok", "--warm-start", "off")
    assert proc.returncode == 0, proc.stderr
    assert not _info(out, 0)["preloaded"] and _info(out, 0)["path0"] == SCRIPTS


def test_restart_forks_from_the_same_warm_server(tmp_path: Path) -> None:
    out, proc = _run(tmp_path, "restart-once", "--max-restarts", "1")
    assert proc.returncode == 0, proc.stderr
    first, second = _info(out, 1, 0), _info(out, 1, 1)
    assert first["preloaded"] and second["preloaded"]
    assert first["ppid"] == second["ppid"], "both attempts forked by one fork server"
    starts = [e for e in events(tmp_path / "logs" / "events.jsonl") if e["event"] == "workers_start"]
    assert len(starts) == 2


def test_exit_status_is_the_scripts(tmp_path: Path) -> None:
    _, proc = _run(tmp_path, "exit-msg", "--max-restarts", "0")
    assert proc.returncode == 1, proc.stderr
    assert "exited with code 1" in proc.stderr and "fatal: bad config" in proc.stderr
    assert (tmp_path / "out" / "atexit1").exists(), "atexit handlers run on a failing sys.exit too"


def test_output_is_unbuffered(tmp_path: Path) -> None:
    _, proc = _run(tmp_path, "print-then-kill", "--max-restarts", "0")
    assert proc.returncode == 1
    assert "marker-before-kill rank 1" in proc.stdout + proc.stderr
    assert "killed by SIGKILL" in proc.stderr


def test_keyboard_interrupt_dies_by_sigint(tmp_path: Path) -> None:
    _, proc = _run(tmp_path, "interrupt", "--max-restarts", "0")
    assert proc.returncode == 1
    assert "killed by SIGINT" in proc.stderr or "SIGINT" in proc.stderr, proc.stderr[-3000:]


def test_bad_preload_exits_2_naming_the_fix(tmp_path: Path) -> None:
    _, proc = _run(tmp_path, "ok", "--preload", "numpy,not a module")
    assert proc.returncode == 2
    assert "--preload" in proc.stderr and "pass e.g." in proc.stderr


def test_preload_list_and_entry_pickling() -> None:
    assert preload_modules(" numpy, torch ,,json") == (*DEFAULT_PRELOAD, "numpy", "json")
    with pytest.raises(ConfigError):
        preload_modules("../evil")
    # An s3:// durable URL among the script's arguments preloads s3fs (installed in the dev extra).
    assert preload_modules(None, ["--durable", "s3://bucket/run"])[-1] == "s3fs"
    assert "s3fs" not in preload_modules(None, ["--durable", "file:///tmp/x"])
    import pickle

    entry = ScriptMain("train.py")
    os.environ["HPRESIL_TEST_PICKLED"] = "1"
    try:
        state = pickle.dumps(entry)
    finally:
        del os.environ["HPRESIL_TEST_PICKLED"]
    saved = dict(os.environ)
    try:
        copy = pickle.loads(state)
        assert os.environ.get("HPRESIL_TEST_PICKLED") == "1", "unpickling installs the launcher's environment"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert copy.__qualname__ == "train.py" and copy.target == "train.py" and not copy.module


def test_a_process_forked_after_a_launch_starts_its_own_fork_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, script("fork_after_launch.py")], env=base_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
