"""Cost of sealing a RAM snapshot: checksum algorithm and health checks.

One rank's snapshot of ``--mib`` MiB (``--tensors`` tensors of ``--dtype``) is
committed to a RAM slot, then sealed again and again by a real
:class:`~hpresil.checkpoint.ram.sealer.Sealer` on this thread, in
interleaved rounds of:

* ``xxh3 + health``: the default (checksums, NaN/Inf probe of every float
  leaf, the health verdict);
* ``xxh3``: the same seal with ``HealthConfig(check_finite=False)``;
* ``sum64``: the same seal with the old additive checksum (what seals were
  before ``xxh3``; kept for reading them);
* ``memcpy``: one single-threaded copy of the same bytes (the floor any pass
  over the data pays);
* ``xxh3 + health, checked in copy``: the default seal of the same snapshot
  committed the way the Checkpointer commits what an optimizer step guards
  (overlapped, :mod:`hpresil.checkpoint.ram.copier`): the writer's commit
  thread checked it for NaN/Inf right behind its copy, so the sealer only
  hashes. What that check costs the commit thread is printed too: its copy
  with the check against the plain copy (``copy + probe`` vs ``copy``).

Prints the sealer's CPU seconds per snapshot (thread CPU time, best of
``--iters``), GB/s, and the ratios the targets are stated in: health checks
vs none (target <= 1.05x), xxh3 vs sum64.

    python bench/seal.py --mib 512 --tensors 64 --iters 7
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import torch

from hpresil.checkpoint import integrity
from hpresil.checkpoint.api import slot_path
from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.health import HealthConfig
from hpresil.checkpoint.ram.copier import copy_checked, memcpy
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.sealer import Sealer, SealerConfig
from hpresil.checkpoint.ram.writer import RamWriter


def _seal_cpu(sealer: Sealer, shm: str) -> float:
    """Thread CPU seconds of one seal of the (only) committed snapshot."""
    (info,) = scan(shm)
    try:
        os.unlink(slot_path(shm, info.rank, info.slot, "seal.json"))
    except FileNotFoundError:
        pass
    t0 = time.thread_time()
    assert sealer.seal_once(), "nothing was sealed"
    return time.thread_time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512, help="snapshot size (MiB)")
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    per = (args.mib << 20) // args.tensors // dtype.itemsize
    state = {f"t{i}": torch.randn(per, dtype=torch.float32).to(dtype) for i in range(args.tensors)}
    nbytes = per * dtype.itemsize * args.tensors
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-bench-seal-") as shm, \
            tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-bench-seal-") as shm2:
        writer = RamWriter(shm, 0, slots=2, run_id="bench")
        writer.save(1, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1, loss=1.0)
        writer.wait()
        overlapped = RamWriter(shm2, 0, slots=2, run_id="bench")
        overlapped.save(1, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1, loss=1.0,
                        guarded=[True] * len(state))
        overlapped.wait()
        sealers = {
            "xxh3 + health": Sealer(shm_dir=shm),
            "xxh3": Sealer(SealerConfig(health=HealthConfig(check_finite=False)), shm_dir=shm),
            "sum64": Sealer(SealerConfig(health=HealthConfig(check_finite=False)), shm_dir=shm),
            "xxh3 + health, checked in copy": Sealer(shm_dir=shm2),
        }
        dirs = {name: shm2 if "in copy" in name else shm for name in sealers}
        warm = [torch.empty_like(t) for t in state.values()]
        src = torch.cat([t.view(torch.uint8) for t in state.values()])
        dst = torch.empty_like(src)
        best: dict[str, float] = {name: float("inf") for name in [*sealers, "memcpy"]}
        for _ in range(args.iters):
            for name, sealer in sealers.items():
                if name == "sum64":  # seals as before xxh3: Checksum's default algorithm swapped
                    default = integrity.Checksum.__init__.__defaults__
                    integrity.Checksum.__init__.__defaults__ = ("sum64",)
                try:
                    best[name] = min(best[name], _seal_cpu(sealer, dirs[name]))
                finally:
                    if name == "sum64":
                        integrity.Checksum.__init__.__defaults__ = default
            t0 = time.thread_time()
            dst.copy_(src)
            best["memcpy"] = min(best["memcpy"], time.thread_time() - t0)
            for name, copy in (("copy", memcpy), ("copy + probe", copy_checked)):
                t0 = time.thread_time()
                for d, t in zip(warm, state.values()):
                    copy(d, t)
                best[name] = min(best.get(name, float("inf")), time.thread_time() - t0)
        for directory in (shm, shm2):
            (info,) = scan(directory)
            assert info.seal is not None and info.seal.health == "ok"
        for sealer in sealers.values():
            sealer.stop()
        writer.close()
        overlapped.close()
    out: dict[str, Any] = {
        "bytes": nbytes,
        "dtype": args.dtype,
        "cpu_s": {k: round(v, 6) for k, v in best.items()},
        "health_vs_none": round(best["xxh3 + health"] / best["xxh3"], 4),
        "xxh3_vs_sum64": round(best["xxh3"] / best["sum64"], 4),
        "seal_vs_memcpy": round(best["xxh3 + health"] / best["memcpy"], 4),
        "checked_in_copy_vs_none": round(best["xxh3 + health, checked in copy"] / best["xxh3"], 4),
        "copy_probe_vs_copy": round(best["copy + probe"] / best["copy"], 4),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"sealer CPU per snapshot, {nbytes / 2**20:.0f} MiB of {args.dtype} in {args.tensors} tensors "
          f"(best of {args.iters}):")
    for name, v in best.items():
        print(f"  {name:30s} {v * 1e3:8.1f} ms  {nbytes / v / 1e9:6.1f} GB/s")
    print(f"health checks vs none: {out['health_vs_none']:.3f}x (target <= 1.05x)")
    print(f"  checked in the copy: {out['checked_in_copy_vs_none']:.3f}x (sealer); the commit thread's copy "
          f"{out['copy_probe_vs_copy']:.3f}x its plain copy")
    print(f"xxh3 vs sum64:         {out['xxh3_vs_sum64']:.3f}x")
    print(f"sealing vs memcpy:     {out['seal_vs_memcpy']:.3f}x")


if __name__ == "__main__":
    main()
