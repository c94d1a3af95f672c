"""Whole-process time of ``hpresil-run`` vs ``torchrun`` for a trivial script.

Runs both launchers alternately (so drift affects both) on the same trivial
script and prints the mean and median wall times and their ratio.

    python bench/launcher_overhead.py --repeats 10 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

TRIVIAL = "import os\nassert os.environ['RANK']\n"


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "trivial.py")
        with open(script, "w") as f:
            f.write(TRIVIAL)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        common = ["--standalone", "--nproc-per-node", str(args.nproc), script]
        launchers = {
            "torchrun": [sys.executable, "-m", "torch.distributed.run", *common],
            "hpresil-run": [sys.executable, "-m", "hpresil.run", "--shm-root", os.path.join(tmp, "shm"), *common],
            "hpresil-run --tracebacks off": [
                sys.executable, "-m", "hpresil.run", "--tracebacks", "off", "--shm-root", os.path.join(tmp, "shm"), *common,
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in launchers}
        for name, cmd in launchers.items():  # warm the page cache
            _time(cmd, env)
        for _ in range(args.repeats):
            for name, cmd in launchers.items():
                times[name].append(_time(cmd, env))
    base = statistics.median(times["torchrun"])
    print(f"trivial script, {args.nproc} workers, {args.repeats} runs each (alternating)")
    print(f"{'launcher':32s} {'mean s':>8s} {'median s':>9s} {'ratio (median)':>15s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:32s} {statistics.mean(ts):8.3f} {med:9.3f} {med / base:15.3f}")


if __name__ == "__main__":
    main()
