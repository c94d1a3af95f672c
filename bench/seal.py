"""Cost of sealing a RAM snapshot: checksum algorithm and health checks.

One rank's snapshot of ``--mib`` MiB (``--tensors`` tensors of ``--dtype``) is
committed to a RAM slot, then sealed again and again by a real
:class:`~hpresil.checkpoint.ram.sealer.Sealer` on this thread, in
interleaved rounds of:

* ``xxh3 + health``: the default: the writer checked every float entry for
  NaN/Inf in its copy (fused natively, :mod:`hpresil.checkpoint.finite`),
  so the sealer hashes and judges;
* ``xxh3``: the same seal with ``HealthConfig(check_finite=False)``;
* ``xxh3 + health, probed by the sealer``: a record nobody checked in its
  copy (written as without the native module): the sealer probes each leaf
  right after hashing it;
* ``sum64``: the seal with the old additive checksum (what seals were
  before ``xxh3``; kept for reading them);
* ``memcpy``: one single-threaded copy of the same bytes (the floor any pass
  over the data pays);
* ``copy``, ``copy + check``, ``copy + probe (numpy)``: the writer's copy of
  the same tensors into warm buffers, plain, with the fused check (what it
  runs), and with the numpy fallback's check behind each chunk. The check's
  cost is where it went: ``copy + check`` over ``copy``.

Prints CPU seconds per snapshot (thread CPU time, best of ``--iters``),
GB/s, and the ratios the targets are stated in: the sealer with health
checks vs without, and the copy with the check vs without (targets <= 1.05x
each), xxh3 vs sum64.

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

from hpresil.checkpoint import finite, integrity
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
            tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-bench-seal-") as unchecked:
        writer = RamWriter(shm, 0, slots=2, run_id="bench")
        writer.save(1, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1, loss=1.0)
        writer.wait()
        native, finite._native = finite._native, None  # a record nobody checked: the sealer probes it
        try:
            plain = RamWriter(unchecked, 0, slots=2, run_id="bench")
            plain.save(1, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1, loss=1.0)
            plain.wait()
        finally:
            finite._native = native
        sealers = {
            "xxh3 + health": (Sealer(shm_dir=shm), shm),
            "xxh3": (Sealer(SealerConfig(health=HealthConfig(check_finite=False)), shm_dir=shm), shm),
            "xxh3 + health, probed by the sealer": (Sealer(shm_dir=unchecked), unchecked),
            "sum64": (Sealer(SealerConfig(health=HealthConfig(check_finite=False)), shm_dir=shm), shm),
        }
        warm = [torch.empty_like(t) for t in state.values()]
        src = torch.cat([t.view(torch.uint8) for t in state.values()])
        dst = torch.empty_like(src)
        copies = {"copy": memcpy, "copy + check": copy_checked, "copy + probe (numpy)": copy_checked}
        best: dict[str, float] = {name: float("inf") for name in [*sealers, "memcpy", *copies]}
        for _ in range(args.iters):
            for name, (sealer, directory) in sealers.items():
                if name == "sum64":  # seals as before xxh3: Checksum's default algorithm swapped
                    default = integrity.Checksum.__init__.__defaults__
                    integrity.Checksum.__init__.__defaults__ = ("sum64",)
                try:
                    best[name] = min(best[name], _seal_cpu(sealer, directory))
                finally:
                    if name == "sum64":
                        integrity.Checksum.__init__.__defaults__ = default
            t0 = time.thread_time()
            dst.copy_(src)
            best["memcpy"] = min(best["memcpy"], time.thread_time() - t0)
            for name, copy in copies.items():
                if name.endswith("(numpy)"):
                    finite._native = None
                try:
                    t0 = time.thread_time()
                    for d, t in zip(warm, state.values()):
                        copy(d, t)
                    best[name] = min(best[name], time.thread_time() - t0)
                finally:
                    finite._native = native
        for directory in (shm, unchecked):
            (info,) = scan(directory)
            assert info.seal is not None and info.seal.health == "ok"
        for sealer, _ in sealers.values():
            sealer.stop()
        writer.close()
        plain.close()
    out: dict[str, Any] = {
        "bytes": nbytes,
        "dtype": args.dtype,
        "native": finite.NATIVE,
        "cpu_s": {k: round(v, 6) for k, v in best.items()},
        "health_vs_none": round(best["xxh3 + health"] / best["xxh3"], 4),
        "copy_check_vs_copy": round(best["copy + check"] / best["copy"], 4),
        "sealer_probe_vs_none": round(best["xxh3 + health, probed by the sealer"] / best["xxh3"], 4),
        "numpy_probe_vs_copy": round(best["copy + probe (numpy)"] / best["copy"], 4),
        "xxh3_vs_sum64": round(best["xxh3"] / best["sum64"], 4),
        "seal_vs_memcpy": round(best["xxh3 + health"] / best["memcpy"], 4),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"CPU per snapshot, {nbytes / 2**20:.0f} MiB of {args.dtype} in {args.tensors} tensors "
          f"(best of {args.iters}; native check {'built' if finite.NATIVE else 'NOT built: numpy fallback'}):")
    for name, v in best.items():
        print(f"  {name:36s} {v * 1e3:8.1f} ms  {nbytes / v / 1e9:6.1f} GB/s")
    print(f"sealer, health checks vs none:   {out['health_vs_none']:.3f}x (target <= 1.05x)")
    print(f"copy, with the check vs without: {out['copy_check_vs_copy']:.3f}x (target <= 1.05x)")
    print(f"  where nobody checked in the copy: sealer {out['sealer_probe_vs_none']:.3f}x; "
          f"numpy check behind the copy {out['numpy_probe_vs_copy']:.3f}x")
    print(f"xxh3 vs sum64:                   {out['xxh3_vs_sum64']:.3f}x")
    print(f"sealing vs memcpy:               {out['seal_vs_memcpy']:.3f}x")


if __name__ == "__main__":
    main()
