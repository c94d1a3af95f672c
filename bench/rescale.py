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

The goodput line is an estimate for a 5-minute run with one loss and one join:
1 - (loss latency + join latency + recomputed steps x step time) / 300 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from elastic_nodes import Node, listening, read_records, wait_for  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_step(out: str, world: int, after: float) -> dict | None:
    for r in read_records(out):
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap", type=float, default=120.0, help="longest wait for each transition (s)")
    p.add_argument("--step-sleep", type=float, default=0.05, help="extra time per training step (s)")
    p.add_argument("--only", choices=["hpresil", "torchrun"], default=None)
    args = p.parse_args()
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
    if h and h["loss_s"] and h["join_s"]:
        step_s = args.step_sleep + 0.02
        lost = h["loss_s"] + h["join_s"] + (h["rollback_steps"] or 0) * step_s
        print(f"hpresil goodput estimate, 5-minute run with one loss and one join: {100 * (1 - lost / 300):.1f}%")


if __name__ == "__main__":
    main()
