"""Rollback against a plain RAM restore, in one run.

``--ranks`` gloo processes hold a state of ``--mib`` MiB each (parameters and
SGD momentum). Per iteration, after a few sealed snapshots:

* **restore**: ``Checkpointer.restore()`` of the newest snapshot from RAM
  (what a restarted worker pays, without the restart);
* **rollback**: a NaN written into one parameter of the last rank, two more
  saves (the sealer marks the snapshot poisoned; the health vote carries it),
  then the ``save`` in which every rank rolls back to the newest healthy
  snapshot: its whole duration (reading the vote, agreeing, restoring from RAM,
  dropping the abandoned snapshots) until training may go on.

Prints the slowest rank's times (best of ``--iters``) and the ratio the target
is stated in (rollback <= 2x a plain RAM restore); then what the per-snapshot
health vote costs a ``save``: saves with it against saves with the guard
turned off, interleaved, in wall time and in the training thread's CPU time.

    python bench/rollback.py --mib 256 --ranks 2 --iters 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from typing import Any

import torch


def _worker(rank: int, args: argparse.Namespace, shm: str, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=args.ranks)
    from hpresil.checkpoint import Checkpointer
    from hpresil.testing import RecordingSink

    width = 1024
    layers = max(1, (args.mib << 20) // 2 // (width * width * 4))  # parameters + momentum
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    events = RecordingSink()
    ckpt = Checkpointer({"model": model, "optim": opt}, shm_dir=shm, durable_every=0, events=events,
                        run_services=True)
    ckpt.restore()
    step = 0

    cpu: list[float] = []  # the training thread's CPU time of each save

    def train_and_save() -> float:
        nonlocal step
        step += 1
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        t0, c0 = time.perf_counter(), time.thread_time()
        ckpt.save(step)
        took = time.perf_counter() - t0
        cpu.append(time.thread_time() - c0)
        ckpt.wait()
        dist.barrier()
        return took

    restores, rollbacks = [], []
    for _ in range(args.iters):
        for _ in range(3):
            train_and_save()
        t0 = time.perf_counter()
        ckpt.restore()
        restores.append(time.perf_counter() - t0)
        step = ckpt.last_restore.step if ckpt.last_restore else step
        if rank == args.ranks - 1:
            with torch.no_grad():
                next(model.parameters())[0, 0] = float("nan")
        before = len(events.named("rollback"))
        took = [train_and_save() for _ in range(3)]
        assert len(events.named("rollback")) == before + 1, "no rollback happened"
        rollbacks.append(max(took))
        step = events.named("rollback")[-1]["to_step"]
    # The health vote's cost in save(): saves with it against saves with the guard's check and vote
    # turned into no-ops, interleaved, median of each.
    guard = ckpt._guard
    assert guard is not None
    real = (guard.check, guard.vote)
    with_vote, without, cpu_with, cpu_without = [], [], [], []
    for i in range(2 * args.vote_saves):
        off = i % 2 == 1
        guard.check, guard.vote = ((lambda step, restore: False), (lambda step: None)) if off else real
        (without if off else with_vote).append(train_and_save())
        (cpu_without if off else cpu_with).append(cpu[-1])
    guard.check, guard.vote = real

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    times = torch.tensor([min(restores), min(rollbacks), median(with_vote), median(without), median(cpu_with),
                          median(cpu_without)], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"restore_s": float(times[0]), "rollback_s": float(times[1]), "save_s": float(times[2]),
                       "save_no_vote_s": float(times[3]), "save_cpu_s": float(times[4]),
                       "save_no_vote_cpu_s": float(times[5]),
                       "bytes": sum(p.numel() * 4 * 2 for p in model.parameters())}, f)
    ckpt.close(final_durable=False)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="state per rank (MiB)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--vote-saves", type=int, default=10, help="saves timed with and without the health vote")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-bench-rb-") as shm, \
            tempfile.TemporaryDirectory(prefix="hpresil-bench-rb-") as tmp:
        out = os.path.join(tmp, "result.json")
        procs = [ctx.Process(target=_worker, args=(r, args, shm, os.path.join(tmp, "init"), out))
                 for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(600)
        if any(proc.exitcode != 0 for proc in procs):
            raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
    res["rollback_vs_restore"] = round(res["rollback_s"] / res["restore_s"], 3)
    res["vote_ms_per_save"] = round((res["save_s"] - res["save_no_vote_s"]) * 1e3, 3)
    res["vote_cpu_ms_per_save"] = round((res["save_cpu_s"] - res["save_no_vote_cpu_s"]) * 1e3, 3)
    if args.json:
        print(json.dumps(res))
        return
    print(f"state {res['bytes'] / 2**20:.0f} MiB per rank, {args.ranks} ranks (slowest rank, best of {args.iters}):")
    print(f"  plain RAM restore     {res['restore_s'] * 1e3:8.1f} ms")
    print(f"  rollback (in save)    {res['rollback_s'] * 1e3:8.1f} ms")
    print(f"rollback vs restore: {res['rollback_vs_restore']:.2f}x (target <= 2x)")
    print(f"save with the health vote {res['save_s'] * 1e3:.1f} ms, without {res['save_no_vote_s'] * 1e3:.1f} ms "
          f"(median of {args.vote_saves} each): the vote costs {res['vote_ms_per_save']:.2f} ms per save")
    print(f"  the training thread's CPU in save: {res['save_cpu_s'] * 1e3:.2f} ms with the vote, "
          f"{res['save_no_vote_cpu_s'] * 1e3:.2f} ms without: {res['vote_cpu_ms_per_save']:.2f} ms of CPU per save "
          f"(the rest of the wall-time difference is waiting for a core)")


if __name__ == "__main__":
    main()
