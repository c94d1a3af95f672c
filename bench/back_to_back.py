"""Back-to-back RAM snapshots while the sealer lags: snapshots kept and blocking time.

One process holds ``--mib`` MiB of float32 state and calls
``Checkpointer.save`` every step, with ``--step-ms`` of simulated compute
between saves: shorter than a seal, so the sealer (a background thread, as
outside hpresil-run) is still checksumming an older commit when the writer
needs its slot back. Two settings, interleaved in rounds so host noise hits
both alike:

* ``slot_wait=0``: a save whose slots are all being read is skipped at once
  (hpresil before this setting existed);
* ``slot_wait=250ms`` (the default): the writer waits for the slot, within a
  budget of 1 % of the wall clock, and asks the sealer to abandon seals of
  commits older than a sealed one (:mod:`hpresil.checkpoint.ram.slots`).

Reports the snapshots kept and sealed and the median and p99 blocking time of
``save``, divided by a ``memcpy`` of the same state into warm buffers measured
in the same run.

Usage: ``python bench/back_to_back.py [--mib 256] [--steps 60] [--step-ms 5] [--rounds 3] [--contend 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hpresil.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from hpresil.testing import RecordingSink  # noqa: E402


def _state(mib: int, tensors: int) -> dict[str, torch.Tensor]:
    per = mib * 2**20 // 4 // tensors
    return {f"layer{i}.weight": torch.randn(per) for i in range(tensors)}


def _memcpy(state: dict[str, torch.Tensor], iters: int) -> float:
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for k, v in state.items():
            dst[k].copy_(v)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(state: dict[str, torch.Tensor], slot_wait: timedelta, steps: int, step_s: float, shm_root: str,
         slots: int) -> tuple[int, int, list[float]]:
    """Returns (snapshots kept, snapshots sealed, blocking times of the saves)."""
    sink = RecordingSink()
    with tempfile.TemporaryDirectory(dir=shm_root, prefix="hpresil-b2b-") as shm:
        cfg = CheckpointConfig(durable_every=0, slot_wait=slot_wait, slots=slots)
        ckpt = Checkpointer(state, config=cfg, shm_dir=shm, run_services=True, events=sink)
        blocking, kept = [], 0
        for step in range(1, steps + 1):
            for t in state.values():
                t[:1].add_(1.0)  # the step changes the state
            time.sleep(step_s)  # the step's compute (on an accelerator: the host core is free)
            t0 = time.perf_counter()
            kept += bool(ckpt.save(step))
            if step > cfg.slots:  # the first save into each slot allocates it
                blocking.append(time.perf_counter() - t0)
        ckpt.close(keep_ram=False)
    return kept, len({e["step"] for e in sink.named("checkpoint_sealed")}), blocking


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="state size (MiB)")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="saves per round and setting")
    p.add_argument("--step-ms", type=float, default=5.0, help="simulated compute between saves")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shm-root", default="/dev/shm")
    p.add_argument("--slots", type=int, default=2,
                   help="RAM slots: 2 is the default 3 while a durable upload holds one (the case where the "
                        "writer needs the very slot the sealer reads)")
    p.add_argument("--contend", type=int, default=0,
                   help="busy processes competing for the cores (a host also running data loading, or a sealer "
                        "slower than the device-to-host copy as on a GPU node)")
    args = p.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        _main(args)
    finally:
        for h in hogs:
            h.kill()


def _main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    state = _state(args.mib, args.tensors)
    settings = {"slot_wait=0 (skip)": timedelta(0), "slot_wait=250ms (default)": CheckpointConfig().slot_wait}
    kept = {name: 0 for name in settings}
    sealed = {name: 0 for name in settings}
    blocking: dict[str, list[float]] = {name: [] for name in settings}
    memcpy = []
    for _ in range(args.rounds):
        memcpy.append(_memcpy(state, 5))
        for name, wait in settings.items():
            k, n, b = _run(state, wait, args.steps, args.step_ms / 1000, args.shm_root, args.slots)
            kept[name] += k
            sealed[name] += n
            blocking[name] += b
    base = statistics.median(memcpy)
    total = args.steps * args.rounds
    print(f"state {args.mib} MiB in {args.tensors} tensors, {total} saves per setting, {args.step_ms:g} ms between "
          f"saves, {args.slots} slots, {args.contend} busy processes; blocking excludes each run's first save into a slot")
    print(f"{'setting':28s} {'kept':>10s} {'sealed':>10s} {'median blocking':>18s} {'p99 blocking':>17s}")
    print(f"{'memcpy (baseline)':28s} {'':>10s} {'':>10s} {base * 1e3:12.1f} ms")
    for name in settings:
        b = sorted(blocking[name])
        med, p99 = statistics.median(b), b[min(len(b) - 1, int(0.99 * len(b)))]
        print(f"{name:28s} {kept[name]:4d}/{total:<5d} {sealed[name]:4d}/{total:<5d} {med * 1e3:9.1f} ms "
              f"({med / base:4.2f}x) {p99 * 1e3:7.1f} ms ({p99 / base:5.2f}x)")


if __name__ == "__main__":
    main()
