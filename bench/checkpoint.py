"""Checkpoint blocking time and RAM restore time against a bare memcpy.

Every rank (spawned, gloo) holds ``--mib`` MiB of float32 state in
``--tensors`` tensors and measures, with all ranks in lock step (a barrier
before each timed call, so they contend for memory bandwidth as in training):

* ``memcpy``: ``dst.copy_(src)`` for every tensor into warm, preallocated
  buffers: the physical floor every method below is divided by;
* ``hpresil save``: ``Checkpointer.save`` blocking time (the sealer finishes
  between saves, as it would during a training step);
* ``hpresil restore``: ``Checkpointer.restore`` from RAM, checksums verified,
  including the collective agreement on the step;
* ``torch.save`` to ``/dev/shm``; ``dcp.save`` and ``dcp.async_save`` (time
  until it returns) to a local directory;
* with ``--deepspeed STAGE`` (needs ``pip install -e '.[deepspeed]'``): a
  DeepSpeed ZeRO engine holding about ``--mib`` MiB of checkpointed state per
  rank, saved by ``DeepSpeedCheckpointer.save`` and by DeepSpeed's own
  ``engine.save_checkpoint`` to a local directory, against a memcpy of the
  same tensors.

Times are medians over ``--iters`` of the slowest rank; ratios are to memcpy.
The RAM tier lives in ``--shm-root`` (default ``/dev/shm``); ``--huge-shm``
mounts a temporary tmpfs with ``huge=within_size`` for it instead (needs
root), the configuration the docs recommend for restore speed.
Usage: ``python bench/checkpoint.py [--mib 512] [--ranks 2] [--iters 5] [--no-baselines] [--huge-shm] [--deepspeed 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _state(mib: int, tensors: int) -> dict[str, Any]:
    per = mib * 2**20 // 4 // tensors
    layers = {f"layer{i}.weight": torch.randn(per) for i in range(tensors)}
    return {"model": layers, "data": {"epoch": 1, "offset": 12345}}


def _timed(fns: dict[str, Callable[[], Any]], iters: int, between: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Runs the functions interleaved (so background noise hits all of them
    alike), each after a barrier; returns the slowest rank's median per name."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if between and name in between:
                between[name]()
    t = torch.tensor([statistics.median(times[n]) for n in fns], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(fns, t.tolist()))


def _worker(rank: int, args: argparse.Namespace, workdir: str, results: Any) -> None:
    from hpresil.checkpoint import Checkpointer

    dist.init_process_group("gloo", init_method=f"file://{workdir}/rdzv", rank=rank, world_size=args.ranks)
    torch.set_num_threads(args.threads)
    state = _state(args.mib, args.tensors)
    src = list(state["model"].values())
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src):
        d.copy_(s)  # warm: pages faulted in, like a reused arena

    def memcpy() -> None:
        for d, s in zip(dst, src):
            d.copy_(s)

    ckpt = Checkpointer(state=state, shm_dir=f"{workdir}/shm", durable_every=0, run_services=True, slots=3)
    ckpt.restore()
    step = 0

    def save() -> None:
        nonlocal step
        step += 1
        ckpt.save(step)

    for _ in range(3):  # allocate and fault in every slot once
        save()
        ckpt.wait()
    out = _timed({"memcpy": memcpy, "hpresil save": save}, args.iters, between={"hpresil save": ckpt.wait})
    ckpt.close(keep_ram=True)

    def restore() -> None:
        c = Checkpointer(state=state, shm_dir=f"{workdir}/shm", durable_every=0, run_services=False)
        assert c.restore() == step
        c.close(keep_ram=True)

    out.update(_timed({"memcpy (restore run)": memcpy, "hpresil restore (RAM)": restore}, args.iters))
    if not args.no_baselines:
        import torch.distributed.checkpoint as dcp

        path = f"{workdir}/torch_save_rank{rank}.pt"
        out.update(
            _timed({"memcpy (baselines run)": memcpy, "torch.save to shm": lambda: torch.save(state, path)}, args.baseline_iters)
        )
        os.unlink(path)
        ddir = tempfile.mkdtemp(prefix="hpresil-bench-dcp-", dir=args.dcp_dir) if rank == 0 else ""
        obj = [ddir]
        dist.broadcast_object_list(obj)
        ddir = obj[0]
        n = iter(range(10**6))
        futures: list[Any] = []
        out.update(
            _timed(
                {
                    "dcp.save (local dir)": lambda: dcp.save(state, checkpoint_id=f"{ddir}/s{next(n)}"),
                    "dcp.async_save (blocking part)": lambda: futures.append(
                        dcp.async_save(state, checkpoint_id=f"{ddir}/a{next(n)}")
                    ),
                },
                args.baseline_iters,
                between={"dcp.async_save (blocking part)": lambda: futures[-1].result()},
            )
        )
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ddir, ignore_errors=True)
    if args.deepspeed is not None:
        out.update(_deepspeed_rows(rank, args, workdir))
    if rank == 0:
        results.update(out)
    dist.barrier()
    dist.destroy_process_group()


def _deepspeed_rows(rank: int, args: argparse.Namespace, workdir: str) -> dict[str, float]:
    """DeepSpeed's ``save_checkpoint`` vs hpresil's save of the same ZeRO engine."""
    import importlib

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_WORLD_SIZE=str(args.ranks))
    import deepspeed

    from hpresil.checkpoint.flatten import flatten
    from hpresil.integrations.deepspeed import DeepSpeedCheckpointer

    # No JIT-compiled shm all-reduce kernel (minutes of C++ build); gloo is already up.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    stage, width = args.deepspeed, 1024
    # Checkpointed bytes per parameter and rank: fp32 master + 2 Adam moments
    # (partitioned), plus the replicated module weights below ZeRO-3.
    per_param = 12 / args.ranks + (4 if stage < 3 else 0)
    layers = max(1, round(args.mib * 2**20 / per_param / width**2))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage, "reduce_bucket_size": 10**7},
              "steps_per_print": 10**9}
    if stage < 3:
        config["zero_optimization"]["allgather_bucket_size"] = 10**7
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    engine.backward(engine(torch.randn(1, width)).sum())
    engine.step()  # creates the Adam moments
    ckpt = DeepSpeedCheckpointer(engine, shm_dir=f"{workdir}/shm-ds", durable_every=0, run_services=True)
    src = [leaf.value for leaf in flatten(ckpt.state).leaves if leaf.is_tensor]
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src):
        d.copy_(s)

    def memcpy() -> None:
        for d, s in zip(dst, src):
            d.copy_(s)

    step = 0

    def save() -> None:
        nonlocal step
        step += 1
        ckpt.save(step)

    for _ in range(3):
        save()
        ckpt.wait()
    ddir = tempfile.mkdtemp(prefix="hpresil-bench-ds-", dir=args.dcp_dir) if rank == 0 else ""
    obj = [ddir]
    dist.broadcast_object_list(obj)
    ddir = obj[0]
    tags = iter(range(10**6))

    def clear_ds() -> None:
        dist.barrier()
        if rank == 0:
            for name in os.listdir(ddir):
                shutil.rmtree(os.path.join(ddir, name), ignore_errors=True)

    out = _timed(
        {
            "memcpy (deepspeed run)": memcpy,
            f"DeepSpeedCheckpointer.save ZeRO-{stage}": save,
            f"engine.save_checkpoint ZeRO-{stage}": lambda: engine.save_checkpoint(ddir, tag=f"t{next(tags)}"),
        },
        args.baseline_iters,
        between={f"DeepSpeedCheckpointer.save ZeRO-{stage}": ckpt.wait, f"engine.save_checkpoint ZeRO-{stage}": clear_ds},
    )
    ckpt.close()
    if rank == 0:
        shutil.rmtree(ddir, ignore_errors=True)
    nbytes = torch.tensor([sum(t.numel() * t.element_size() for t in src)], dtype=torch.float64)
    dist.all_reduce(nbytes, op=dist.ReduceOp.MAX)
    out["_deepspeed_bytes"] = float(nbytes)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512, help="state size per rank (MiB)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tensors", type=int, default=32, help="tensors the state is split into")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--baseline-iters", type=int, default=3, help="iterations of torch.save and DCP (slow)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--dcp-dir", default=None, help="parent of the DCP directory (default: the temp dir)")
    p.add_argument("--no-baselines", action="store_true", help="skip torch.save and DCP")
    p.add_argument("--shm-root", default="/dev/shm", help="tmpfs holding the RAM tier")
    p.add_argument("--huge-shm", action="store_true", help="mount a temporary huge-page tmpfs as --shm-root (root)")
    p.add_argument("--deepspeed", type=int, choices=(1, 2, 3), default=None, metavar="STAGE",
                   help="also compare with DeepSpeed's save_checkpoint for a ZeRO-STAGE engine (needs deepspeed)")
    args = p.parse_args()
    mounted = None
    if args.huge_shm:
        mounted = tempfile.mkdtemp(prefix="hpresil-bench-huge-")
        size_mib = args.mib * args.ranks * 5 + 1024  # 3 slots + torch.save files + slack
        cmd = ["mount", "-t", "tmpfs", "-o", f"huge=within_size,size={size_mib}m", "tmpfs", mounted]
        if subprocess.run(cmd).returncode != 0:
            os.rmdir(mounted)
            sys.exit("--huge-shm: mounting a tmpfs failed (needs root or CAP_SYS_ADMIN); mount one yourself "
                     "(mount -t tmpfs -o huge=within_size,size=<N>g tmpfs <dir>) and pass --shm-root <dir>")
        args.shm_root = mounted
    from hpresil.runtime.shm import huge_page_mode

    workdir = tempfile.mkdtemp(prefix="hpresil-bench-", dir=args.shm_root)
    try:
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_worker, args=(args, workdir, results), nprocs=args.ranks, join=True)
            res = dict(results)
        huge = huge_page_mode(workdir) or "not a tmpfs"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if mounted:
            subprocess.run(["umount", mounted])
            os.rmdir(mounted)
    # Each method is compared with the memcpy measured interleaved with it.
    print(f"{args.mib} MiB/rank x {args.ranks} ranks, {args.tensors} tensors, median of {args.iters}, slowest rank; "
          f"RAM tier on {args.shm_root} (huge pages: {huge})")
    print(f"{'method':34s} {'seconds':>9s} {'x memcpy':>9s} {'GB/s':>7s}")
    ds_bytes = res.pop("_deepspeed_bytes", None)
    for name, sec in res.items():
        if "deepspeed" in name.lower() or "ZeRO-" in name:  # its own state size and memcpy
            print(f"{name:34s} {sec:9.4f} {sec / res['memcpy (deepspeed run)']:9.2f} {ds_bytes / sec / 1e9:7.2f}")
            continue
        base = res["memcpy (restore run)"] if "restore" in name else res["memcpy"]
        if "torch.save" in name or "dcp" in name:
            base = res["memcpy (baselines run)"]
        if name.startswith("memcpy"):
            base = sec
        print(f"{name:34s} {sec:9.4f} {sec / base:9.2f} {args.mib * 2**20 / sec / 1e9:7.2f}")


if __name__ == "__main__":
    main()
