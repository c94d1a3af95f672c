"""Whole-process time of ``hpresil-run`` vs ``torchrun``, and restart cost.

Two scripts, both launchers alternated (so drift affects both), median wall
times and their ratio against torchrun measured in the same run:

* ``trivial``: checks ``RANK`` and exits (no torch import): the launcher's own
  cost. With warm start (the default) the fork server imports torch before the
  first worker, a cost a script that never imports torch does not otherwise pay.
* ``torch``: what every training script does first: ``import torch``, a gloo
  process group, an optimizer (whose first param group imports torch._dynamo).
  ``--restart`` also SIGKILLs rank 1 once after that set-up (``--max-restarts 1``),
  so the second attempt's set-up is timed too: the restart cost warm start removes.

    python bench/launcher_overhead.py --repeats 10 --nproc 2 [--script trivial|torch|both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

SCRIPTS = {
    "trivial": "import os\nassert os.environ['RANK']\n",
    "torch": (
        "import os, signal\n"
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "model = torch.nn.Linear(64, 64)\n"
        "opt = torch.optim.AdamW(model.parameters())\n"
        "dist.barrier()\n"
        "if os.environ.get('KILL_ONCE') and os.environ['RANK'] == '1' and os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "dist.destroy_process_group()\n"
    ),
}


def _time(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _launchers(script: str, nproc: int, tmp: str, restart: bool) -> dict[str, list[str]]:
    common = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "1" if restart else "0", script]
    hp = [sys.executable, "-m", "hpresil.run", "--shm-root", os.path.join(tmp, "shm")]
    return {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", *common],
        "hpresil-run (warm start)": [*hp, *common],
        "hpresil-run --warm-start off": [*hp, "--warm-start", "off", *common],
        "hpresil-run --tracebacks off": [*hp, "--tracebacks", "off", *common],
    }


def measure(name: str, repeats: int, nproc: int, restart: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, f"bench_{name}.py")  # not torch.py: it would shadow torch
        with open(script, "w") as f:
            f.write(SCRIPTS[name])
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KILL_ONCE": "1"} if restart else {})}
        # pytorch#135712: a restarted gloo group may read the previous attempt's addresses from the
        # shared rendezvous store; hpresil-run sets this itself, torchrun users must.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        launchers = _launchers(script, nproc, tmp, restart)
        times: dict[str, list[float]] = {label: [] for label in launchers}
        for cmd in launchers.values():  # warm the page cache
            _time(cmd, env)
        for _ in range(repeats):
            for label, cmd in launchers.items():
                times[label].append(_time(cmd, env))
    base = statistics.median(times["torchrun"])
    what = f"{name} script" + (", rank 1 SIGKILLed once after set-up (one restart)" if restart else "")
    print(f"\n{what}, {nproc} workers, {repeats} runs each (alternating)")
    print(f"{'launcher':32s} {'mean s':>8s} {'median s':>9s} {'ratio (median)':>15s}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:32s} {statistics.mean(ts):8.3f} {med:9.3f} {med / base:15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--script", choices=["trivial", "torch", "both", "restart"], default="both",
                        help="restart: only the torch script with one restart")
    args = parser.parse_args()
    names = {"both": ["trivial", "torch"], "restart": []}.get(args.script, [args.script])
    for name in names:
        measure(name, args.repeats, args.nproc, restart=False)
    if args.script in ("torch", "both", "restart"):
        measure("torch", args.repeats, args.nproc, restart=True)


if __name__ == "__main__":
    main()
