"""Helpers to run ``hpresil-run`` (and torchrun) as a real subprocess in tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(tmp_path: Any, warm: bool = False, **extra: str) -> dict[str, str]:
    """Environment for a launcher subprocess: repo importable, 1 thread, private shm root.

    ``warm=False`` turns hpresil-run's warm start off: for the many short jobs of
    light test scripts the fork server's preload (torch, dynamo, DCP: seconds)
    costs more than it saves. The fault-recovery, chaos and elastic tests and
    the warm-start tests run with it on, as users do.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "HPRESIL_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["HPRESIL_SHM_ROOT"] = str(tmp_path / "shm")
    env["HPRESIL_WARM_START"] = "auto" if warm else "off"
    env.update(extra)
    return env


def hpresil_run(
    args: list[str], tmp_path: Any, env: dict[str, str] | None = None, timeout: float = 90, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m hpresil.run ARGS`` and returns the completed process (text output).

    Without a log directory in ``args`` the job's logs go under ``tmp_path``, not
    hpresil-run's default in the system's temporary directory."""
    if not any(a.split("=", 1)[0] in ("--log-dir", "--log_dir", "--job-log-dir", "--job_log_dir") for a in args):
        args = ["--job-log-dir", os.path.join(str(tmp_path), "hpresil-logs"), *args]
    return subprocess.run(
        [sys.executable, "-m", "hpresil.run", *args],
        env=env if env is not None else base_env(tmp_path),
        cwd=cwd or str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def script(name: str) -> str:
    """Path of a test worker script in tests/scripts."""
    return os.path.join(SCRIPTS, name)


def events(path: Any) -> list[dict[str, Any]]:
    """The events of an ``events.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
