"""The main demo: train, kill a worker mid-run, recover from RAM, finish bitwise-identical.

1. Runs the llama example for ``--steps`` steps under ``hpresil-run`` with 2
   workers and SIGKILLs rank 1 at ``--kill-at``; hpresil-run restarts the
   group and the workers restore the newest RAM snapshot. With ``--device
   auto`` (the default) it trains on the GPUs when there are any: 2 workers
   on 2 GPUs, or 1 worker (rank 0 is killed) on a single GPU.
2. Runs the same job without the fault.
3. Prints the timeline from ``events.jsonl`` and compares the final
   parameters of both runs bit for bit.

    python examples/llama/demo.py            # or: make demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def workers_for(device: str) -> tuple[str, int]:
    """The device the workers train on and how many there are (one per GPU, at most 2)."""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and not gpus:
        sys.exit("demo: --device cuda but no CUDA device is visible")
    return ("cuda", min(gpus, 2)) if gpus else ("cpu", 2)


def launch(out: str, logs: str, shm_root: str, steps: int, faults: list[dict], quiet: bool,
           device: str = "cpu", nproc: int = 2) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HPRESIL_FAULTS": json.dumps(faults)}
    cmd = [sys.executable, "-m", "hpresil.run", "--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "3",
           "--log-dir", logs, "--shm-root", shm_root, "--monitor-interval", "0.1",
           os.path.join(HERE, "train.py"), "--steps", str(steps), "--out", out, "--log-every", "10",
           "--device", device]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None,
                          stderr=subprocess.PIPE if quiet else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: hpresil-run failed with exit code {proc.returncode}\n{proc.stderr or ''}")
    return time.perf_counter() - start


def timeline(events_path: str) -> None:
    with open(events_path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    t0 = events[0]["ts"]
    interesting = {"workers_start", "worker_exit", "workers_restart", "checkpoint_restored", "workers_succeeded",
                   "hang_detected", "checkpoint_drained", "tier_degraded"}
    saves = [e for e in events if e["event"] == "checkpoint_saved"]
    for e in events:
        if e["event"] not in interesting:
            continue
        detail = {k: v for k, v in e.items() if k not in ("ts", "event", "node", "message")}
        if e["event"] == "checkpoint_restored" and e.get("rank") not in (None, 0):
            continue
        print(f"  +{e['ts'] - t0:6.2f}s  {e['event']:20s} {json.dumps(detail)[:150]}")
    if saves:
        blocking = sorted(e.get("blocking_s", 0.0) for e in saves)
        print(f"  {len(saves)} RAM snapshots, median blocking {1000 * blocking[len(blocking) // 2]:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-at", type=int, default=25)
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the workers train (auto: the GPUs when there are any)")
    args = parser.parse_args()
    device, nproc = workers_for(args.device)
    victim = nproc - 1
    work = tempfile.mkdtemp(prefix="hpresil-demo-")
    shm_root = os.path.join("/dev/shm", f"hpresil-demo-{os.getpid()}")
    faulty, clean = os.path.join(work, "faulty"), os.path.join(work, "clean")

    print(f"[1/2] training {args.steps} steps with {nproc} worker(s) on {device}; rank {victim} is SIGKILLed at "
          f"step {args.kill_at}")
    t_faulty = launch(os.path.join(faulty, "final.pt"), faulty, shm_root, args.steps,
                      [{"rank": victim, "step": args.kill_at, "action": "kill"}], quiet=False, device=device, nproc=nproc)
    print("\ntimeline of the faulty run (events.jsonl):")
    timeline(os.path.join(faulty, "events.jsonl"))

    print("\n[2/2] the same job without the fault (reference)")
    t_clean = launch(os.path.join(clean, "final.pt"), clean, shm_root, args.steps, [], quiet=True, device=device,
                     nproc=nproc)

    a = torch.load(os.path.join(faulty, "final.pt"), weights_only=True)
    b = torch.load(os.path.join(clean, "final.pt"), weights_only=True)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nwall time: faulty run {t_faulty:.1f} s, clean run {t_clean:.1f} s "
          f"(the failure cost {t_faulty - t_clean:.1f} s)")
    print(f"final parameters of the crashed-and-resumed run vs the uninterrupted run: "
          f"{'BITWISE IDENTICAL' if same else 'DIFFERENT'} ({len(a)} tensors)")
    import shutil

    shutil.rmtree(shm_root, ignore_errors=True)  # hpresil-run cleans its job dirs; this is the demo's parent
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"run directory kept: {work}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
