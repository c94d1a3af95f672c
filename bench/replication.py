"""Peer replication: throughput against raw loopback TCP, the blocking time it
adds to ``save()``, and restoring a lost rank from a peer against the durable tier.

All in one run, so the ratios compare like with like on a loaded machine:

* ``raw TCP``: ``sendall`` of a warm ``--mib`` buffer from this process to a
  second process that ``recv_into``s a warm buffer and acknowledges with one
  byte: the physical ceiling on loopback.
* ``replication``: :meth:`PeerClient.put` of a sealed ``--mib`` snapshot to a
  :class:`PeerServer` in a second process (``sendfile`` from the slot, HMAC
  handshake done once, per-entry ``sum64`` verified on arrival, commit
  record written) until the receiver acknowledges. Median of ``--iters``
  after the receiver's two replica slots are warm.
* ``save() blocking``: a training process saves ``--save-mib`` every step
  between steps of ``--step-ms`` of matrix multiplies, while a node-runtime
  process seals (both runs) and replicates to a peer-node process (one run);
  median ``save()`` time per run.
* ``restore``: a lost rank restores ``--mib`` into its state from the peer
  (``PeerSource``: pooled listing, fetch over TCP into the tensors, verify)
  and from the durable tier (``file://``, DCP layout, written by the drainer;
  page cache warm and evicted with ``POSIX_FADV_DONTNEED``).

Usage: ``python bench/replication.py [--mib 512] [--iters 5] [--save-mib 128] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

SECRET = b"bench-secret"


def _state(mib: int, tensors: int = 16) -> dict[str, Any]:
    per = mib * 2**20 // 4 // tensors
    return {"model": {f"layer{i}": torch.randn(per) for i in range(tensors)}, "epoch": 3}


def _sealed_snapshot(shm: str, state: dict[str, Any], step: int, durable_url: str | None = None) -> None:
    from hpresil.checkpoint.flatten import flatten
    from hpresil.checkpoint.ram.writer import RamWriter
    from hpresil.checkpoint.ram.sealer import Sealer

    writer = RamWriter(shm, 0, slots=3, run_id="bench")
    writer.save(step, flatten(state).leaves, world_size=1, durable=durable_url is not None, durable_url=durable_url, keep=1)
    writer.close()
    Sealer(shm_dir=shm).flush(timedelta(seconds=60))


# -- child processes -----------------------------------------------------------------------------

def _raw_receiver(port_q: Any, nbytes: int, rounds: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = memoryview(bytearray(nbytes))
    for _ in range(rounds):
        got = 0
        while got < nbytes:
            got += conn.recv_into(buf[got:], nbytes - got)
        conn.sendall(b"k")
    conn.close()


def _peer_server(port_q: Any, shm: str, stop: Any) -> None:
    from hpresil.checkpoint.peer.api import ReplicatorConfig
    from hpresil.checkpoint.peer.server import PeerServer

    os.makedirs(shm, exist_ok=True)
    srv = PeerServer(shm, lambda: SECRET, ReplicatorConfig(host="127.0.0.1"))
    port_q.put(srv.start()[1])
    stop.wait()
    srv.stop()


def _runtime(shm: str, node: str, group_rank: int, store_port: int, replicas: int, stop: Any, ready: Any) -> None:
    """A node runtime's checkpoint services (sealer + replicator) on ``shm``."""
    import logging

    import torch.distributed as dist

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING").upper())

    from hpresil.checkpoint.ram.sealer import Sealer
    from hpresil.events import NullEventLog
    from hpresil.checkpoint.peer.api import ReplicatorConfig
    from hpresil.checkpoint.peer.replicator import Replicator
    from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo

    os.environ["HPRESIL_JOB_SECRET"] = SECRET.decode()
    os.makedirs(shm, exist_ok=True)
    ctx = RuntimeContext(run_id="bench", node_id=node, shm_dir=shm, log_dir=shm, events=NullEventLog())
    store = dist.PrefixStore("round0", dist.TCPStore("127.0.0.1", store_port, is_master=False))
    services: list[Any] = [Sealer(), Replicator(ReplicatorConfig(replicas=replicas, host="127.0.0.1"))]
    for s in services:
        s.start(ctx)
    group = WorkerGroupInfo(attempt=0, group_rank=group_rank, group_world_size=2, world_size=2,
                            global_ranks=(group_rank,), pids=(0,), store=store)
    for s in services:
        s.on_workers_started(group)
    ready.set()
    while not stop.is_set():
        for s in services:
            s.tick()
        time.sleep(0.05)
    for s in services:
        s.stop(timedelta(seconds=2))


# -- measurements --------------------------------------------------------------------------------

def bench_throughput(mib: int, iters: int, tmp: str) -> tuple[float, float]:
    """Median GB/s of raw TCP and of replication, measured alternately (so that
    background load hits both alike); the first two rounds warm the buffers."""
    from hpresil.checkpoint.ram.files import scan
    from hpresil.checkpoint.peer.client import PeerClient

    ctx = mp.get_context("spawn")
    nbytes, rounds = mib * 2**20, iters + 2
    q, stop = ctx.Queue(), ctx.Event()
    raw_p = ctx.Process(target=_raw_receiver, args=(q, nbytes, rounds))
    raw_p.start()
    sock = socket.create_connection(("127.0.0.1", q.get()))
    src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
    peer_p = ctx.Process(target=_peer_server, args=(q, dst, stop))
    peer_p.start()
    client = PeerClient("127.0.0.1", q.get(), SECRET, "bench")
    data = memoryview(bytearray(os.urandom(1 << 20)) * mib)
    state = _state(mib)
    raw, rep = [], []
    for i in range(rounds):
        t0 = time.perf_counter()
        sock.sendall(data)
        sock.recv(1)
        raw.append(time.perf_counter() - t0)
        _sealed_snapshot(src, state, i + 1)
        info = max(scan(src), key=lambda s: s.record.step)
        t0 = time.perf_counter()
        assert client.put(src, info) == "sent"
        rep.append(time.perf_counter() - t0)
    sock.close()
    client.close()
    stop.set()
    raw_p.join()
    peer_p.join()
    return nbytes / statistics.median(raw[2:]) / 1e9, nbytes / statistics.median(rep[2:]) / 1e9


def bench_save_blocking(save_mib: int, steps: int, step_ms: float, tmp: str, replicate: bool) -> float:
    import torch.distributed as dist

    from hpresil.checkpoint import Checkpointer

    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True)
    stop = ctx.Event()
    tag = "rep" if replicate else "norep"
    a_shm, b_shm = os.path.join(tmp, f"{tag}-A"), os.path.join(tmp, f"{tag}-B")
    procs = []
    for node, g, shm, r in (("A", 0, a_shm, 1 if replicate else 0), ("B", 1, b_shm, 0)):
        ready = ctx.Event()
        p = ctx.Process(target=_runtime, args=(shm, node, g, store.port, r, stop, ready))
        p.start()
        ready.wait(60)
        procs.append(p)
    state = _state(save_mib)
    ckpt = Checkpointer(state=state, shm_dir=a_shm, run_services=False, durable_every=0)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    times = []
    for step in range(1, steps + 1):
        t_end = time.perf_counter() + step_ms / 1e3
        while time.perf_counter() < t_end:
            a = torch.tanh(a @ b)
        t0 = time.perf_counter()
        ckpt.save(step)
        times.append(time.perf_counter() - t0)
    ckpt.wait()
    deadline = time.monotonic() + 30
    while replicate and time.monotonic() < deadline and not glob.glob(os.path.join(b_shm, "replicas", "ckpt", "rank0", "slot*.json")):
        time.sleep(0.05)
    replicated = len(glob.glob(os.path.join(b_shm, "replicas", "ckpt", "rank0", "slot*.json")))
    ckpt.close(keep_ram=True)
    stop.set()
    for p in procs:
        p.join()
    if replicate and not replicated:
        raise RuntimeError("nothing was replicated")
    return statistics.median(times[3:])


def bench_restore(mib: int, iters: int, tmp: str, use_s3: bool) -> dict[str, float]:
    """Median seconds to restore a lost rank from the peer tier and from the
    durable tier (``file://`` on the local disk, page cache warm and evicted;
    S3 on a local SeaweedFS when available)."""
    from hpresil.checkpoint.durable.source import DurableSource
    from hpresil.checkpoint.durable.drain import Drainer
    from hpresil.checkpoint.ram.files import scan
    from hpresil.checkpoint.ram.source import RamSource
    from hpresil.checkpoint.restore import restore_state
    from hpresil.checkpoint.peer.client import PeerClient
    from hpresil.checkpoint.peer.source import PeerSource

    ctx = mp.get_context("spawn")
    os.environ["HPRESIL_JOB_SECRET"] = SECRET.decode()
    holder, lost = os.path.join(tmp, "rholder"), os.path.join(tmp, "rlost")
    os.makedirs(lost)
    disk = tempfile.mkdtemp(prefix="hpresil-bench-durable-")  # a real disk, not tmpfs
    state = _state(mib)
    urls = {"durable file (warm cache)": "file://" + os.path.join(disk, "ckpt")}
    server = None
    if use_s3:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        from s3 import SeaweedServer, find_weed

        weed = find_weed()
        if weed is not None:
            server = SeaweedServer(os.path.join(disk, "weed"), weed, volume_size_mb=1024, volume_max=8)
            server.start()
            os.environ.update(server.env)
            urls["durable s3 (SeaweedFS, loopback)"] = server.url("bench/restore")
    for i, url in enumerate(urls.values()):
        src = os.path.join(tmp, f"rsrc{i}")
        _sealed_snapshot(src, state, 7, durable_url=url)
        assert Drainer(shm_dir=src).drain_once(), f"durable drain to {url} failed"
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_peer_server, args=(q, holder, stop))
    p.start()
    port = q.get()
    push = PeerClient("127.0.0.1", port, SECRET, "bench")
    src0 = os.path.join(tmp, "rsrc0")
    assert push.put(src0, max(scan(src0), key=lambda s: s.record.step)) == "sent"
    push.close()

    class _Remote(PeerSource):
        def share(self) -> dict[str, Any]:  # what the holder node's first rank shares in a real restore
            c = PeerClient("127.0.0.1", port, SECRET, "bench")
            try:
                return {"node": "A", "host": "127.0.0.1", "port": port, "held": c.list()}
            finally:
                c.close()

    files = glob.glob(os.path.join(disk, "ckpt", "**", "*.distcp"), recursive=True)

    def evict() -> None:  # the restoring node never read these files: nothing of them in its page cache
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)

    cases: dict[str, Any] = {"peer": lambda: _Remote(lost, rank=0, world_size=1)}
    for name, url in urls.items():
        cases[name] = lambda url=url: DurableSource(url)
    cases["durable file (page cache evicted)"] = lambda: DurableSource(urls["durable file (warm cache)"])
    target = _state(mib)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(iters):
        for name, make in cases.items():
            if "evicted" in name:
                evict()
            tier = make()
            for v in target["model"].values():
                v.zero_()
            t0 = time.perf_counter()
            res = restore_state(target, [RamSource(lost), tier])
            times[name].append(time.perf_counter() - t0)
            assert res is not None and res.tier == tier.tier and res.step == 7, res
            assert all(torch.equal(target["model"][k], state["model"][k]) for k in state["model"])
    stop.set()
    p.join()
    if server is not None:
        server.stop()
    import shutil

    shutil.rmtree(disk, ignore_errors=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--save-mib", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--step-ms", type=float, default=100.0)
    ap.add_argument("--save-repeats", type=int, default=2, help="alternating off/on runs of the save() benchmark")
    ap.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS durable tier")
    ap.add_argument("--only", choices=["throughput", "save", "restore"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="hpresil-bench-rep-") as tmp:
        if args.only in (None, "throughput"):
            raw, rep = bench_throughput(args.mib, args.iters, tmp)
            print(f"throughput ({args.mib} MiB, median of {args.iters}, alternating): raw loopback TCP {raw:.2f} GB/s, "
                  f"replication {rep:.2f} GB/s = {rep / raw:.0%} of raw (target >= 70%)", flush=True)
        if args.only in (None, "save"):
            off, on = [], []
            for i in range(args.save_repeats):
                off.append(bench_save_blocking(args.save_mib, args.steps, args.step_ms, os.path.join(tmp, f"s{i}"), False))
                on.append(bench_save_blocking(args.save_mib, args.steps, args.step_ms, os.path.join(tmp, f"s{i}"), True))
            o, n = statistics.median(off), statistics.median(on)
            print(f"save() blocking ({args.save_mib} MiB, {args.save_repeats} alternating runs of {args.steps} steps): "
                  f"without replication {o * 1e3:.1f} ms {[round(x * 1e3, 1) for x in off]}, with {n * 1e3:.1f} ms "
                  f"{[round(x * 1e3, 1) for x in on]} ({n / o:.2f}x)", flush=True)
        if args.only in (None, "restore"):
            res = bench_restore(args.mib, args.iters, tmp, not args.no_s3)
            peer = res.pop("peer")
            print(f"restore of a lost rank ({args.mib} MiB, median of {args.iters}): peer {peer:.3f} s; " + "; ".join(
                f"{name} {t:.3f} s ({t / peer:.1f}x)" for name, t in res.items()) + " (target >= 3x)")


if __name__ == "__main__":
    main()
