"""One recorded ``hpresil-run`` job shared by the report, metrics and graceful-stop tests.

Two workers train (``tests/scripts/goodput_worker.py``); rank 1 is SIGKILLed at
step 12 (RAM snapshots every 5 steps, so steps 11-12 are recomputed), the
group restarts and restores; once it has run past step 20 the exporter is
scraped over HTTP and hpresil-run gets SIGTERM, which must end the job with a
final snapshot committed to the durable tier (file://). Import the fixture
through :func:`record_once` from a session fixture of each test module; the job
runs once per pytest session (its result is kept in the session's base temp
directory, which all modules share).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from _launch import base_env, events, script
from hpresil.testing import Fault, to_env

GRACE_S = 30


@dataclasses.dataclass
class RecordedRun:
    log_dir: str
    durable_dir: str
    returncode: int
    output: str
    metrics_text: str
    events: list[dict[str, Any]]


def _wait_events(path: str, pred: Any, proc: subprocess.Popen, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            evs = events(path)
            if pred(evs):
                return evs
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    out = proc.communicate()[0]
    raise AssertionError(f"condition not reached (rc={proc.returncode}):\n{out[-4000:]}")


def _scrape(port: int, proc: subprocess.Popen, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline and proc.poll() is None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        if ("hpresil_restarts_total" in text and "hpresil_checkpoint_blocking_seconds_count" in text
                and "hpresil_steps_total 0.0" not in text):
            return text
        time.sleep(0.3)
    return text


def record_once(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    """The recorded job of this pytest session (run on first use)."""
    tmp = tmp_path_factory.getbasetemp() / "goodput-run"
    saved = tmp / "result.json"
    if saved.exists():
        return RecordedRun(**json.loads(saved.read_text()))
    run = _record(tmp)
    saved.write_text(json.dumps(dataclasses.asdict(run)))
    return run


def _record(tmp: Any) -> RecordedRun:
    tmp.mkdir(parents=True, exist_ok=True)
    log_dir, durable = tmp / "logs", tmp / "durable"
    env = base_env(tmp, warm=True, HPRESIL_PROGRESS_INTERVAL="0.2", HPRESIL_GRACE_PERIOD=str(GRACE_S),
                   **to_env([Fault(rank=1, step=12, action="kill")]))
    cmd = [sys.executable, "-m", "hpresil.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.1", "--log-dir", str(log_dir), "--metrics-port", "0",
           script("goodput_worker.py"), "--steps", "100000", "--every", "5", "--sleep", "0.02",
           "--durable", f"file://{durable}", "--durable-every", "10"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = str(log_dir / "events.jsonl")
    evs = _wait_events(path, lambda evs: any(e["event"] == "checkpoint_saved" and e.get("attempt") == 1
                                            and e["step"] >= 20 for e in evs), proc, timeout=150)
    port = next(e["port"] for e in evs if e["event"] == "metrics_started")
    metrics = _scrape(port, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=GRACE_S + 40)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        raise AssertionError("hpresil-run did not exit within the grace period after SIGTERM:\n" + out[-4000:])
    return RecordedRun(str(log_dir), str(durable), proc.returncode, out, metrics, events(path))


def final_step(run: RecordedRun) -> int:
    """The step of the final snapshot (the newest save)."""
    return max(e["step"] for e in run.events if e["event"] == "checkpoint_saved")


def manifest(run: RecordedRun, step: int) -> dict[str, Any]:
    """The durable manifest of ``step``."""
    with open(os.path.join(run.durable_dir, f"step_{step:010d}", ".hpresil", "manifest.json")) as f:
        return json.load(f)
