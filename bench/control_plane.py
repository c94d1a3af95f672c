"""What the control plane costs as the job grows: N simulated agents against a
TCPStore and against a 3-member etcd cluster.

Each simulated agent is a thread holding what a real ``hpresil-run`` agent
holds: torch's ``DynamicRendezvousHandler`` (its keep-alive thread included) and
hpresil's liveness ring (:class:`hpresil.elastic.membership.Liveness`) on the
round's store. Agents run in a few processes (``--procs``) so the stores see
many clients. Per backend and N it measures:

* ``round_s``: every agent calls ``next_rendezvous`` at once; until the last returns;
* ``req_per_s``: store requests per second of the steady state (liveness beats
  plus torch's keep-alive, counted at the client), over ``--measure`` seconds,
  and ``state_bytes_per_s``: the bytes of torch's rendezvous state those
  requests moved (each keep-alive reads and rewrites all of it);
* ``agent_cpu`` / ``server_cpu``: cores the agents' processes and the store
  server (the TCPStore process, or the etcd members together) used then;
* ``change_s``: one agent stops without leaving (as a SIGKILLed node does); until
  every survivor was told by its liveness ring, evicted it from torch's
  rendezvous (:mod:`hpresil.elastic.evict`, off with ``--no-evict``) and
  completed the next round; with ``change_ops``/``change_failed_sets``, the
  rendezvous-state operations of that re-join and the compare-and-sets among
  them that lost.

The agents' handlers are built as hpresil-run builds them: torch's keep-alive
interval is the tuned one for N (:func:`hpresil.elastic.membership.keep_alive_interval`)
unless ``--keep-alive``; a lost compare-and-set backs off and torch's event
naming is a frame walk (:mod:`hpresil.elastic.torch_rdzv`) unless
``--no-backoff`` / ``--torch-naming``.

It fits ``a + b N`` to each figure, states the expected value at 2,048 nodes,
and prints the targets of issue 22: ``change_s`` at the largest N within 2x its
value at 3 agents, and the store load per agent constant (at most linear in N).
``--json FILE`` writes everything for the planner (``hpresil-run plan``).

Run: ``python bench/control_plane.py [--agents 3,16,64,256] [--backends tcpstore,etcd]``
(etcd from Debian's ``etcd-server``; python-etcd from PyPI).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

KEEP_ALIVE_ATTEMPTS, LAST_CALL_S = 3, 2  # hpresil-run's tuned rendezvous defaults (the interval grows with N)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counting:
    """Forwards to a store or a rendezvous backend and counts the calls (thread-safe enough:
    one counter per agent)."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.calls, self.failed_sets, self.state_bytes = inner, 0, 0, 0
        self.last_win = 0.0  # when a compare-and-set last won

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **k: Any) -> Any:
            self.calls += 1
            got = attr(*a, **k)
            if name == "set_state" and a and isinstance(a[0], bytes):
                self.state_bytes += len(a[0])
            if name in ("get_state", "set_state") and isinstance(got, tuple) and isinstance(got[0], bytes):
                self.state_bytes += len(got[0])  # torch's whole rendezvous state, both ways
            if name == "set_state" and isinstance(got, tuple) and len(got) == 3 and not got[2]:
                self.failed_sets += 1  # a compare-and-set that lost: another node wrote first
            elif name == "set_state" and got is not None:
                self.last_win = time.time()
            return got

        return call


def _handler(backend: str, endpoint: str, run_id: str, n: int, keep_alive_s: int,
             backoff: bool) -> tuple[Any, Counting]:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    from hpresil.elastic.torch_rdzv import BackoffBackend

    params = RendezvousParameters(backend="c10d" if backend == "tcpstore" else "etcd-v2", endpoint=endpoint,
                                  run_id=run_id, min_nodes=max(1, n - 1), max_nodes=n, read_timeout="30",
                                  keep_alive_interval=str(keep_alive_s), keep_alive_max_attempt=str(KEEP_ALIVE_ATTEMPTS),
                                  last_call_timeout=str(LAST_CALL_S), join_timeout="600")
    if backend == "tcpstore":
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

        host, port = endpoint.split(":")
        store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60))
        rdzv_backend: Any = Counting(C10dRendezvousBackend(store, run_id))
    else:
        from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend
        from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore

        from hpresil.elastic import etcd as hetcd

        client = hetcd._client(params)
        rdzv_backend = Counting(EtcdRendezvousBackend(client, run_id, key_prefix=hetcd.STATE_PREFIX))
        store = EtcdStore(client, hetcd.STORE_PREFIX, timeout=timedelta(seconds=600))
    # hpresil-run's handlers back off after a lost compare-and-set (hpresil.elastic.torch_rdzv)
    wrapped = rdzv_backend if not backoff else BackoffBackend(rdzv_backend)
    return create_handler(store, wrapped, params), rdzv_backend


def _agent(backend: str, endpoint: str, run_id: str, n: int, go: Any, phase: Any, victim_stop: Any,
           out: list[dict[str, Any]], measure_s: float, ready: Any, tuning: tuple[int, bool, bool]) -> None:
    from hpresil.elastic.api import LOST_AFTER, ElasticConfig
    from hpresil.elastic.evict import evict, rejoin_delay, round_of
    from hpresil.elastic.membership import Liveness

    rec: dict[str, Any] = {}
    try:
        keep_alive_s, evicting, backoff = tuning
        handler, counted_backend = _handler(backend, endpoint, run_id, n, keep_alive_s, backoff)
        with ready.get_lock():
            ready.value += 1
        go.wait()
        info = handler.next_rendezvous()
        rec["round_done"] = time.time()
        rank, world = info.rank, info.world_size
        store = Counting(info.store)
        joined = round_of(handler)
        live = Liveness(store, rank, world, ElasticConfig(lost_after=LOST_AFTER)).start()
        phase.wait()  # steady state: count requests for measure_s
        c0, b0, s0, t0 = store.calls, counted_backend.calls, counted_backend.state_bytes, time.time()
        time.sleep(measure_s)
        rec["requests"] = (store.calls - c0) + (counted_backend.calls - b0)
        rec["state_bytes"] = counted_backend.state_bytes - s0
        rec["measured_s"] = time.time() - t0
        if rank == world - 1:  # the victim: stops beating and keeping alive, as a SIGKILLed node
            live.stop()
            handler._stop_heartbeats()
            rec["t_stop"] = time.time()
            victim_stop.set()
            rec["victim"] = True
            return
        victim_stop.wait()
        rec["lost"] = sorted(live.wait_for_loss(60.0))
        rec["verdict_at"] = time.time()
        live.stop()
        ops0, failed0, t_join = counted_backend.calls, counted_backend.failed_sets, time.time()
        if evicting:  # as hpresil-run's agent does on a loss verdict
            evict(handler, joined, rec["lost"])
            time.sleep(rejoin_delay(world))
        counted_backend.last_win = 0.0
        handler._stop_heartbeats()  # as next_rendezvous does first: the next win is this node's join
        threading.Thread(target=_note_join, args=(counted_backend, rec), daemon=True).start()
        handler.next_rendezvous()
        rec["change_done"] = time.time()
        rec["join_s"] = rec["change_done"] - t_join
        rec["change_ops"] = counted_backend.calls - ops0
        rec["change_failed_sets"] = counted_backend.failed_sets - failed0
    except Exception as exc:  # noqa: BLE001 - reported in the results
        rec["error"] = repr(exc)
    finally:
        out.append(rec)


def _note_join(backend: Counting, rec: dict[str, Any]) -> None:  # when this node's join (first winning write) landed
    while "change_done" not in rec and not backend.last_win:
        time.sleep(0.005)
    if backend.last_win:
        rec["joined_at"] = backend.last_win


def _proc(backend: str, endpoint: str, run_id: str, n: int, count: int, go: Any, phase: Any, victim_stop: Any,
          queue: Any, measure_s: float, ready: Any, tuning: tuple[int, bool, bool], torch_naming: bool) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)  # a liveness verdict per survivor is expected here, not news
    # torch warns for each keep-alive that timed out while hundreds of agents share two cores
    logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous").setLevel(logging.ERROR)
    # Import once before the threads do: concurrent first imports of torch.distributed fail.
    import torch.distributed  # noqa: F401
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous  # noqa: F401
    from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend, etcd_store  # noqa: F401

    import hpresil.elastic.etcd  # noqa: F401
    import hpresil.elastic.membership  # noqa: F401
    from hpresil.elastic import torch_rdzv

    if not torch_naming:
        torch_rdzv.install()  # as hpresil-run does when it builds its handler
    out: list[dict[str, Any]] = []
    threads = [threading.Thread(target=_agent, args=(backend, endpoint, run_id, n, go, phase, victim_stop, out,
                                                     measure_s, ready, tuning), daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    phase.wait()
    cpu0 = time.process_time()
    time.sleep(measure_s)
    queue.put({"cpu_s": time.process_time() - cpu0})
    for t in threads:
        t.join(timeout=300)
    queue.put({"agents": out})


def _cpu_ticks(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _tcpstore_server(port: int, ready: Any) -> None:
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=600),
                      use_libuv=True)
    ready.set()
    while True:  # ``server`` serves as long as this frame holds it: until the process is killed
        time.sleep(60)


def measure(backend: str, n: int, procs: int, measure_s: float, keep_alive_s: int | None = None,
            evicting: bool = True, torch_naming: bool = False, backoff: bool = True) -> dict[str, Any]:
    """One backend at ``n`` agents (see the module doc)."""
    ctx = mp.get_context("spawn")
    root = tempfile.mkdtemp(prefix="hpresil-cp-")
    server_pids: list[int] = []
    cluster = server = None
    try:
        if backend == "tcpstore":
            port = _free_port()
            ready = ctx.Event()
            server = ctx.Process(target=_tcpstore_server, args=(port, ready), daemon=True)
            server.start()
            ready.wait(30)
            endpoint, server_pids = f"127.0.0.1:{port}", [server.pid]
        else:
            from etcd_cluster import EtcdCluster

            cluster = EtcdCluster(root).start()
            endpoint, server_pids = cluster.endpoints, [p.pid for p in cluster.procs.values()]
        go, phase, victim_stop, queue, ready = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
        per = [n // procs + (1 if i < n % procs else 0) for i in range(min(procs, n))]
        from hpresil.elastic.membership import keep_alive_interval

        tuning = (keep_alive_s or keep_alive_interval(n, "c10d" if backend == "tcpstore" else "etcd-v2"), evicting,
                  backoff)
        workers = [ctx.Process(target=_proc, args=(backend, endpoint, f"cp{n}", n, c, go, phase, victim_stop, queue,
                                                   measure_s, ready, tuning, torch_naming)) for c in per]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 600
        while ready.value < n and time.monotonic() < deadline:  # every agent built its handler and waits
            time.sleep(0.1)
        t_go = time.time()
        go.set()
        time.sleep(max(3.0, LAST_CALL_S + 1.0))  # the round completes, liveness settles
        srv0 = _cpu_ticks(server_pids)
        phase.set()
        time.sleep(measure_s)
        server_cpu = (_cpu_ticks(server_pids) - srv0) / measure_s
        agents: list[dict[str, Any]] = []
        agent_cpu = 0.0
        for _ in range(2 * len(workers)):
            msg = queue.get(timeout=600)
            agent_cpu += msg.get("cpu_s", 0.0) / measure_s
            agents.extend(msg.get("agents", []))
        for w in workers:  # torch's keep-alive threads would keep them alive: the results are in
            w.join(timeout=2)
            if w.is_alive():
                w.kill()
        errors = [a["error"] for a in agents if "error" in a]
        rounds = [a["round_done"] for a in agents if "round_done" in a]
        changes = [a["change_done"] for a in agents if "change_done" in a]
        stops = [a["t_stop"] for a in agents if "t_stop" in a]
        return {
            "backend": backend, "agents": n, "error_count": len(errors), "errors": errors[:3],
            "keep_alive_s": tuning[0], "evict": evicting, "torch_naming": torch_naming,
            "backoff": backoff,
            "round_s": max(rounds) - t_go if len(rounds) == n else None,
            "req_per_s": sum(a.get("requests", 0) for a in agents) / measure_s,
            "state_bytes_per_s": sum(a.get("state_bytes", 0) for a in agents) / measure_s,
            "agent_cpu": agent_cpu, "server_cpu": server_cpu,
            "change_s": max(changes) - stops[0] if stops and len(changes) == n - 1 else None,
            # the survivors' re-join (after their liveness verdict): rendezvous-state operations in all,
            # the compare-and-sets among them that lost, and the slowest re-join
            "change_ops": sum(a.get("change_ops", 0) for a in agents),
            "change_failed_sets": sum(a.get("change_failed_sets", 0) for a in agents),
            "join_s": max((a["join_s"] for a in agents if "join_s" in a), default=None),
            # until the last survivor's join landed (the round then waits torch's last call and its polls)
            "joined_s": max(a["joined_at"] for a in agents if "joined_at" in a) - stops[0]
            if stops and any("joined_at" in a for a in agents) else None,
            # until the last survivor had the liveness verdict
            "detect_s": max(a["verdict_at"] for a in agents if "verdict_at" in a) - stops[0] if stops else None,
        }
    finally:
        if server is not None:
            server.kill()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", default="3,16,64,128,256", help="comma-separated agent counts")
    p.add_argument("--backends", default="tcpstore,etcd", help="tcpstore, etcd or both")
    p.add_argument("--procs", type=int, default=8, help="processes the agents are spread over")
    p.add_argument("--measure", type=float, default=5.0, help="seconds of steady state measured")
    p.add_argument("--at", type=int, default=2048, help="the node count to extrapolate to")
    p.add_argument("--json", help="write the results here (the planner's input)")
    p.add_argument("--keep-alive", type=int, help="torch's keep-alive interval (s); default: hpresil-run's, by N")
    p.add_argument("--no-evict", action="store_true",
                   help="survivors do not evict the lost node (torch forgets it when its keep-alive expires)")
    p.add_argument("--torch-naming", action="store_true",
                   help="keep torch's inspect.stack() event naming (hpresil-run replaces it: hpresil.elastic.torch_rdzv)")
    p.add_argument("--no-backoff", action="store_true",
                   help="retry a lost compare-and-set at once, as torch does (hpresil-run backs off)")
    args = p.parse_args()
    counts = [int(x) for x in args.agents.split(",")]
    results: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        if backend == "etcd" and shutil.which("etcd") is None:
            print("etcd: skipped (apt-get install etcd-server)")
            continue
        for n in counts:
            r = measure(backend, n, args.procs, args.measure, args.keep_alive, not args.no_evict, args.torch_naming,
                        not args.no_backoff)
            results.append(r)
            print(f"{backend:8s} N={n:4d} keep-alive {r['keep_alive_s']} s{'' if r['evict'] else ', no eviction'}{'' if r['backoff'] else ', no backoff'}{', torch naming' if r['torch_naming'] else ''}  round {r['round_s'] or float('nan'):6.2f} s  change "
                  f"{r['change_s'] or float('nan'):6.2f} s  {r['req_per_s']:8.0f} req/s "
                  f"({r['req_per_s'] / n:5.1f}/agent, rendezvous state {r['state_bytes_per_s'] / 1e3:8.1f} kB/s)  agents {r['agent_cpu']:5.2f} cores  server "
                  f"{r['server_cpu']:5.2f} cores  errors {r['error_count']}; all told {r['detect_s'] or float('nan'):5.2f} s, all joined {r['joined_s'] or float('nan'):5.2f} s, re-join {r['join_s'] or float('nan'):5.2f} s, "
                  f"{r['change_ops']} state ops ({r['change_failed_sets']} lost compare-and-sets)", flush=True)
    summary: dict[str, Any] = {}
    for backend in sorted({r["backend"] for r in results}):
        rows = [r for r in results if r["backend"] == backend and r["round_s"] is not None and r["change_s"] is not None]
        if len(rows) < 2:
            continue
        xs = [float(r["agents"]) for r in rows]
        proj = {}
        for key in ("round_s", "change_s", "req_per_s", "state_bytes_per_s", "agent_cpu", "server_cpu"):
            a, b = fit(xs, [float(r[key]) for r in rows])
            proj[key] = {"a": a, "b": b, f"at_{args.at}": max(0.0, a + b * args.at)}
        small, large = rows[0], rows[-1]
        per_agent = [r["req_per_s"] / r["agents"] for r in rows]
        summary[backend] = {
            "fit": proj,
            "change_ratio": large["change_s"] / small["change_s"],
            "change_target_met": large["change_s"] <= 2 * small["change_s"],
            "req_per_agent": per_agent,
            "load_at_most_linear": max(per_agent[1:]) <= 1.25 * per_agent[0] if len(per_agent) > 1 else True,
        }
        print(f"{backend}: membership change {large['change_s']:.2f} s at N={large['agents']} vs "
              f"{small['change_s']:.2f} s at N={small['agents']} = {summary[backend]['change_ratio']:.2f}x "
              f"(target <= 2x: {'met' if summary[backend]['change_target_met'] else 'NOT met'}); requests per agent "
              f"{', '.join(f'{x:.1f}' for x in per_agent)}/s (at most linear: "
              f"{'yes' if summary[backend]['load_at_most_linear'] else 'NO'})")
        print(f"{backend} expected at {args.at} nodes: " + ", ".join(
            f"{k} {v[f'at_{args.at}']:.2f}" for k, v in proj.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "summary": summary, "keep_alive_s": args.keep_alive or "by N",
                       "keep_alive_attempts": KEEP_ALIVE_ATTEMPTS, "last_call_s": LAST_CALL_S,
                       "evict": not args.no_evict, "torch_naming": args.torch_naming,
                       "backoff": not args.no_backoff}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
