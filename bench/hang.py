"""Hang detection latency and recovery time: hpresil-run vs torchrun defaults.

Scenario: 2 workers in a gloo all_reduce loop; at step ``--hang-step`` rank 1
stops making progress (``--fault hang``: sleeps while rank 0 waits inside the
collective; ``spin``: spins holding the GIL; ``stop``: SIGSTOP). Measured from
the last step rank 1 completed (the hang start):

* detection: hang start -> the ``hang_detected`` event (hpresil only);
* kill: hang start -> the hung group's workers exited;
* recovery: hang start -> the first step completed after the restart.

torchrun runs the same script with its defaults and ``--max-restarts 1``; it
has no hang detection, so it waits for the gloo timeout (30 min by default),
capped here at ``--cap`` seconds and reported as ">cap".

A rank asleep or spinning outside any collective (``hang``, ``spin``) is busy in
its own code, not certainly stuck: hpresil-run reports it at the step timeout and
kills it at ``--hang-busy-timeout`` (600 s by default, as NCCL's collective
timeout). This bench passes ``--busy-timeout`` (default 1 s) so that it measures
detection; ``stop`` keeps the fast verdict whatever it is.

    python bench/hang.py --fault hang --cap 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "scripts", "hang_worker.py")


def _steps(path: str) -> list[tuple[int, float]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(int(a), float(b)) for a, b in (line.split() for line in f if line.strip())]


def _kill_workers(marker: str) -> None:
    """SIGKILLs every process whose command line mentions ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), 9)
        except OSError:
            pass


def run(launcher: str, fault: str, hang_step: int, steps: int, cap: float, busy: float) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        out, logs = os.path.join(tmp, "out"), os.path.join(tmp, "logs")
        os.makedirs(out)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
               "HPRESIL_FAULTS": json.dumps([{"rank": 1, "step": hang_step, "action": fault}])}
        common = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", logs]
        if launcher == "hpresil-run":
            cmd = [sys.executable, "-m", "hpresil.run", "--shm-root", os.path.join(tmp, "shm"),
                   "--hang-busy-timeout", str(busy), *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", *common]
        cmd += [WORKER, out, str(steps)]
        start = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=cap)
            capped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            _kill_workers(out)  # elastic workers run in sessions of their own
            capped = True
        first = _steps(os.path.join(out, "rank1.attempt0"))
        hang_start = first[-1][1] if first else start
        result: dict[str, float | str] = {"launcher": launcher}
        events_path = os.path.join(logs, "events.jsonl")
        events = [json.loads(line) for line in open(events_path)] if os.path.exists(events_path) else []
        det = [e for e in events if e["event"] == "hang_detected"]
        exits = [e for e in events if e["event"] == "worker_exit"]
        result["detection_s"] = round(det[0]["ts"] - hang_start, 2) if det else f">{cap:.0f}"
        result["suspect"] = str(det[0]["suspects"]) if det else "-"
        result["kill_s"] = round(max(e["ts"] for e in exits) - hang_start, 2) if exits else f">{cap:.0f}"
        again = _steps(os.path.join(out, "rank0.attempt1"))
        result["recovery_s"] = round(again[0][1] - hang_start, 2) if again and not capped else f">{cap:.0f}"
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault", choices=["hang", "spin", "stop"], default="hang")
    parser.add_argument("--hang-step", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cap", type=float, default=60.0)
    parser.add_argument("--busy-timeout", type=float, default=1.0, help="hpresil-run --hang-busy-timeout")
    args = parser.parse_args()
    rows = [run(name, args.fault, args.hang_step, args.steps, args.cap, args.busy_timeout)
            for name in ("hpresil-run", "torchrun")]
    print(f"fault={args.fault} at step {args.hang_step}, 2 workers, gloo, 20 ms steps; times from the hang start; "
          f"hpresil-run --hang-busy-timeout {args.busy_timeout:g}")
    print(f"{'launcher':12s} {'detection s':>12s} {'suspect':>8s} {'kill s':>8s} {'recovery s':>11s}")
    for r in rows:
        print(f"{r['launcher']:12s} {str(r['detection_s']):>12s} {r['suspect']:>8s} {str(r['kill_s']):>8s} "
              f"{str(r['recovery_s']):>11s}")
    h, t = rows
    if isinstance(h["recovery_s"], float):
        base = t["recovery_s"] if isinstance(t["recovery_s"], float) else args.cap
        prefix = "" if isinstance(t["recovery_s"], float) else ">="
        print(f"recovery speed-up vs torchrun: {prefix}{base / h['recovery_s']:.1f}x")


if __name__ == "__main__":
    main()
