"""Rescale latency: node loss -> first step at the smaller size, node join ->
first step at the larger size; hpresil-run vs plain torchrun, same --nnodes.

Three simulated nodes (agents on 127.0.0.1, 1 worker each, ``--nnodes 2:3``,
c10d rendezvous) train tests/scripts/elastic_worker.py (ElasticSampler +
constant global batch, Checkpointer to RAM and a file:// durable tier). The
bench SIGKILLs one node's agent and worker, waits for a step at world size 2,
starts a fresh agent and waits for a step at world size 3. torchrun runs with
its defaults (keep-alive 5 s x 3, last call 30 s) and ``--max-restarts 3``;
each wait is capped (``--cap``), a capped wait prints as ``>cap``.

    python bench/rescale.py [--cap 120] [--only hpresil|torchrun]
    python bench/rescale.py --goodput 300

``--goodput SECONDS`` measures goodput instead (hpresil-run only): the same
three nodes train for SECONDS of wall time, one node is SIGKILLed at 1/3 of it
and a replacement node starts at 2/3; then every agent is stopped through the
workers' stop file and ``hpresil.report`` computes goodput (productive step time
/ wall time, first ``runtime_start`` to last ``runtime_stop``, start-up and
shutdown included) from all nodes' events.jsonl. It prints the report, the
goodput against the >= 90% target, and the goodput of the steady part (wall time
less start-up and shutdown, which a 5-minute run weighs far more than a real one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import TYPE_CHECKING

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from elastic_nodes import Node, listening, read_records, wait_for  # noqa: E402

if TYPE_CHECKING:
    from hpresil.report import GoodputReport


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step(out: str | list[dict], world: int, after: float) -> dict | None:
    for r in read_records(out) if isinstance(out, str) else out:
        if r["kind"] == "step" and r["world"] == world and r["t"] > after:
            return r
    return None


def _event_after(nodes: list[Node], name: str, after: float) -> float | None:
    times = [e["ts"] for n in nodes for e in n.events() if e["event"] == name and e["ts"] > after]
    return min(times) - after if times else None


def scenario(launcher: str, cap: float, step_sleep: float) -> dict[str, float | None]:
    root = tempfile.mkdtemp(prefix=f"hpresil-rescale-{launcher}-")
    out = os.path.join(root, "out")
    os.makedirs(out)
    port = _free_port()
    agent = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "bench", "--monitor-interval", "0.1",
             "--max-restarts", "0" if launcher == "hpresil" else "3"]
    worker = ["--out", out, "--steps", "100000", "--durable", f"file://{out}/durable", "--step-sleep", str(step_sleep)]
    env = {"HPRESIL_SHM_ROOT": os.path.join(root, "shm")}
    nodes: list[Node] = []
    result: dict[str, float | None] = {"loss_s": None, "join_s": None, "rollback_steps": None}
    try:
        for i in range(3):
            nodes.append(Node(root, f"node{i}", agent, worker, launcher=launcher, env=env))
            if i == 0:
                wait_for(lambda: listening(port), 60, "the store", nodes)
        wait_for(lambda: sum(r["kind"] == "step" and r["world"] == 3 for r in read_records(out)) >= 3 * 40, 180,
                 "40 steps at 3 nodes", nodes)
        last_before = max(r["step"] for r in read_records(out) if r["kind"] == "step")
        t_kill = time.time()
        nodes[2].kill()
        try:
            rec = wait_for(lambda: _first_step(out, 2, t_kill), cap, "a step at 2 nodes", [], poll=0.02)
            result["loss_s"] = rec["t"] - t_kill
            result["rollback_steps"] = last_before + 1 - rec["step"]
            result["loss_detect_s"] = _event_after(nodes[:2], "workers_restart", t_kill)
            result["loss_rdzv_s"] = _event_after(nodes[:2], "workers_start", t_kill)
        except AssertionError:
            return result
        wait_for(lambda: sum(r["kind"] == "step" and r["world"] == 2 and r["t"] > t_kill for r in read_records(out)) >= 10,
                 60, "10 steps at 2 nodes", nodes)
        t_join = time.time()
        nodes.append(Node(root, "node3", agent, worker, launcher=launcher, env=env))
        try:
            rec = wait_for(lambda: _first_step(out, 3, t_join), cap, "a step at 3 nodes", [], poll=0.02)
            result["join_s"] = rec["t"] - t_join
            result["join_detect_s"] = _event_after(nodes[:2], "workers_restart", t_join)
            result["join_rdzv_s"] = _event_after(nodes[:2], "workers_start", t_join)
        except AssertionError:
            pass
        return result
    finally:
        for n in nodes:
            n.close()
        shutil.rmtree(root, ignore_errors=True)


def summary(report: "GoodputReport", records: list[dict], t_kill: float, t_join: float, target: float = 0.90) -> str:
    """The goodput lines: measured goodput vs ``target``, the rescale latencies,
    and goodput without the job's one-off first start-up and final shutdown."""
    loss, join = _first_step(records, 2, t_kill), _first_step(records, 3, t_join)
    first_init = sum(s.duration for s in report.segments if s.kind == "init" and s.epoch <= 0)
    rest = report.wall_s - first_init - report.seconds("shutdown")
    return "\n".join([
        f"\nworld sizes per worker-group start: {[w for _, w in report.world_sizes]}; "
        f"restarts: {dict(report.restarts)}",
        f"loss -> first step at 2: {loss['t'] - t_kill:.1f} s; join -> first step at 3: {join['t'] - t_join:.1f} s"
        if loss and join else "a rescale never reached a step",
        f"goodput, {report.wall_s:.0f} s run with one node lost and one joining: {100 * report.goodput:.1f}% "
        f"(target >= {100 * target:.0f}%: {'met' if report.goodput >= target else 'NOT met'})",
        f"goodput without the job's first start-up ({first_init:.1f} s) and final shutdown "
        f"({report.seconds('shutdown'):.1f} s): {100 * report.productive_s / rest:.1f}%",
    ])


def goodput(duration: float, step_sleep: float, keep: bool = False, target: float = 0.90) -> None:
    """Runs 3 nodes for ``duration`` s (loss at 1/3, join at 2/3) and prints the measured goodput."""
    from hpresil.report import build_report
    from hpresil.report.cli import format_report

    root = tempfile.mkdtemp(prefix="hpresil-goodput-")
    out = os.path.join(root, "out")
    os.makedirs(out)
    port = _free_port()
    agent = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "goodput", "--monitor-interval", "0.1", "--max-restarts", "0"]
    worker = ["--out", out, "--steps", "10000000", "--durable", f"file://{out}/durable", "--step-sleep", str(step_sleep)]
    env = {"HPRESIL_SHM_ROOT": os.path.join(root, "shm")}
    nodes: list[Node] = []
    try:
        t0 = time.monotonic()
        for i in range(3):
            nodes.append(Node(root, f"node{i}", agent, worker, env=env))
            if i == 0:
                wait_for(lambda: listening(port), 60, "the store", nodes)
        time.sleep(max(0.0, t0 + duration / 3 - time.monotonic()))
        t_kill = time.time()
        nodes[2].kill()
        print(f"{time.monotonic() - t0:6.1f} s: node2 SIGKILLed", flush=True)
        time.sleep(max(0.0, t0 + 2 * duration / 3 - time.monotonic()))
        t_join = time.time()
        nodes.append(Node(root, "node3", agent, worker, env=env))
        print(f"{time.monotonic() - t0:6.1f} s: node3 started", flush=True)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        open(os.path.join(out, "stop"), "w").close()
        print(f"{time.monotonic() - t0:6.1f} s: stop requested", flush=True)
        for n in (nodes[0], nodes[1], nodes[3]):
            if n.wait(120) != 0:
                raise SystemExit(f"{n.node_id} failed:\n{n.tail()}")
        report = build_report(root)
    finally:
        for n in nodes:
            n.close()
    print(format_report(report))
    print(summary(report, read_records(out), t_kill, t_join, target))
    if keep:
        print(f"logs kept: hpresil-run report {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap", type=float, default=120.0, help="longest wait for each transition (s)")
    p.add_argument("--step-sleep", type=float, default=0.05, help="extra time per training step (s)")
    p.add_argument("--only", choices=["hpresil", "torchrun"], default=None)
    p.add_argument("--goodput", type=float, metavar="SECONDS", default=None,
                   help="measure goodput of a SECONDS-long run with one loss and one join (e.g. 300)")
    p.add_argument("--keep-logs", action="store_true", help="with --goodput: keep the nodes' log directories")
    args = p.parse_args()
    if args.goodput is not None:
        goodput(args.goodput, args.step_sleep, keep=args.keep_logs)
        return
    results = {}
    for launcher in ("hpresil", "torchrun"):
        if args.only in (None, launcher):
            results[launcher] = scenario(launcher, args.cap, args.step_sleep)
            print(f"{launcher}: {json.dumps(results[launcher])}", flush=True)

    def fmt(v: float | None) -> str:
        return f">{args.cap:.0f} s" if v is None else f"{v:.1f} s"

    print(f"\n{'':10s} {'loss -> step at 2':>18s} {'join -> step at 3':>18s}")
    for name, r in results.items():
        print(f"{name:10s} {fmt(r['loss_s']):>18s} {fmt(r['join_s']):>18s}")
    h, t = results.get("hpresil"), results.get("torchrun")
    if h and t:
        for key, label in (("loss_s", "loss"), ("join_s", "join")):
            if h[key]:
                tv = t[key] if t[key] is not None else args.cap
                print(f"{label}: torchrun / hpresil = {'>' if t[key] is None else ''}{tv / h[key]:.1f}x")


if __name__ == "__main__":
    main()
