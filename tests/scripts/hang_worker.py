"""Test worker for hang detection: a gloo all_reduce loop with heartbeats.

argv: <out_dir> <steps> [--slow-first S] [--slow-checkpoint S] [--eval S] [--straggle-rank R --straggle S]
      [--busy-at STEP --busy-s S --busy-mode hash|sleep]  (rank 0's host work before that step's all-reduce,
      outside any hpresil phase, while rank 1 waits in the all-reduce)
Faults come from $HPRESIL_FAULTS (stop / spin / hang at a step). Each rank
appends "<step> <unix time>" lines to <out_dir>/rank<R>.attempt<N> and writes
<out_dir>/done.rank<R> at the end.
"""

import argparse
import contextlib
import hashlib
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import hpresil
from hpresil.testing import maybe_inject

p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("steps", type=int)
p.add_argument("--slow-first", type=float, default=0.0)
p.add_argument("--slow-checkpoint", type=float, default=0.0)
p.add_argument("--eval", type=float, default=0.0)
p.add_argument("--straggle-rank", type=int, default=-1)
p.add_argument("--straggle", type=float, default=0.0)
p.add_argument("--step-time", type=float, default=0.02)
p.add_argument("--no-section", action="store_true", help="do not mark local work (straggler falls back to CPU time)")
p.add_argument("--burn", action="store_true", help="the straggler burns CPU instead of sleeping")
p.add_argument("--busy-at", type=int, default=-1)
p.add_argument("--busy-s", type=float, default=0.0)
p.add_argument("--busy-mode", choices=["hash", "sleep"], default="hash")
a = p.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
t = torch.ones(1)
with open(os.path.join(a.out_dir, f"rank{rank}.attempt{attempt}"), "a") as log:
    for step in range(a.steps):
        if rank == 0 and step == a.busy_at:
            if a.busy_mode == "sleep":
                time.sleep(a.busy_s)
            else:  # hashing a large buffer: the GIL is released while the main thread works
                end, digest, block = time.monotonic() + a.busy_s, hashlib.sha256(), b"x" * (1 << 20)
                while time.monotonic() < end:
                    digest.update(block)
        maybe_inject(step)
        with (contextlib.nullcontext() if a.no_section else hpresil.section()):
            if step == 0 and a.slow_first:
                time.sleep(a.slow_first)
            if rank == a.straggle_rank:
                end = time.perf_counter() + a.straggle
                while a.burn and time.perf_counter() < end:
                    pass
                if not a.burn:
                    time.sleep(a.straggle)
            time.sleep(a.step_time)
        dist.all_reduce(t)
        if a.slow_checkpoint and step % 10 == 9:
            with hpresil.phase("checkpoint"):
                time.sleep(a.slow_checkpoint)
        if a.eval and step % 15 == 14:
            with hpresil.phase("eval", timeout=timedelta(seconds=a.eval * 3)):
                time.sleep(a.eval)
        hpresil.heartbeat(step)
        log.write(f"{step} {time.time():.6f}\n")
        log.flush()
open(os.path.join(a.out_dir, f"done.rank{rank}"), "w").close()
with hpresil.phase("teardown"):
    dist.destroy_process_group()
