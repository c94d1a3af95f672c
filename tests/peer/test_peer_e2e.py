"""End to end: two simulated nodes (hpresil-run agents on 127.0.0.1, c10d
rendezvous, one worker each, own shared-memory roots). Node B is killed
whole (agent and worker SIGKILLed, its shared memory deleted); a replacement
node B joins and the lost rank's state comes back from node A's replica over
TCP, bitwise equal to what was saved, and the job completes. Garbage and a
wrong job secret sent to node A's peer server meanwhile are refused and harmless."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

from _launch import base_env, events, free_port, script
from hpresil.checkpoint.ram.files import scan
from hpresil.errors import StorageError
from hpresil.checkpoint.peer.api import replica_root
from hpresil.checkpoint.peer.client import PeerClient

pytestmark = pytest.mark.slow

STEPS, PAUSE = 8, 5


class _Node:
    def __init__(self, tmp: Any, name: str, tag: str, port: int, out: str, host_store: bool) -> None:
        self.name, self.tag = name, tag
        self.shm_root = str(tmp / f"shm-{name}")
        self.logs = str(tmp / f"logs-{tag}")
        args = [sys.executable, "-m", "hpresil.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "peerjob", "--rdzv-conf", f"is_host={str(host_store).lower()}", "--node-id", name, "--max-restarts", "3",
                "--monitor-interval", "0.1", "--shm-root", self.shm_root, "--job-log-dir", self.logs, "--keep-shm",
                "--peer-host", "127.0.0.1", script("peer_worker.py"), out, str(STEPS), str(PAUSE)]
        self.log = open(tmp / f"agent-{tag}.log", "w")
        self.proc = subprocess.Popen(args, env=base_env(tmp), cwd=str(tmp), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def shm_dir(self) -> str:
        return os.path.join(self.shm_root, "peerjob", self.name)

    def events(self) -> list[dict[str, Any]]:
        path = os.path.join(self.logs, "events.jsonl")
        return events(path) if os.path.exists(path) else []

    def kill(self) -> None:
        """SIGKILLs the agent and its workers at once (the workers have their own sessions)."""
        pids = [self.proc.pid] + [p for e in self.events() if e["event"] == "workers_start" for p in e["pids"]]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f"--- {self.tag} ---\n{f.read()[-3000:]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


def _wait(cond: Any, timeout: float, what: str, nodes: list[_Node]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(n.tail() for n in nodes))


def test_lost_node_restores_from_peer_replica(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    # node A hosts the rendezvous store: killing node B must not take it down
    a = _Node(tmp_path, "nodeA", "A", port, str(out), host_store=True)
    b = _Node(tmp_path, "nodeB", "B", port, str(out), host_store=False)
    nodes = [a, b]
    try:
        _wait(lambda: len(list(out.glob("paused_*"))) == 2, 60, "both workers at the pause step", nodes)
        rank_b = next(e["ranks"][0] for e in b.events() if e["event"] == "workers_start")

        def replica() -> bool:
            return any(i.record.step == PAUSE and i.seal is not None for i in scan(replica_root(a.shm_dir), [rank_b]))
        _wait(replica, 30, f"node A holding node B's rank {rank_b} at step {PAUSE}", nodes)

        # garbage and a wrong secret at node A's peer server: refused, harmless
        info = json.load(open(os.path.join(a.shm_dir, "peer", "node.json")))
        with socket.create_connection(("127.0.0.1", info["port"]), timeout=2) as s:
            s.sendall(os.urandom(4096))
        with pytest.raises(StorageError):
            PeerClient("127.0.0.1", info["port"], b"not the job secret", "intruder",
                       connect_timeout=timedelta(seconds=2)).list()

        b.kill()  # node B is gone: agent, worker and its RAM
        shutil.rmtree(b.shm_root)
        b2 = _Node(tmp_path, "nodeB", "B2", port, str(out), host_store=False)
        nodes.append(b2)
        for n in (a, b2):
            assert n.proc.wait(90) == 0, "\n".join(x.tail() for x in nodes)
    finally:
        for n in nodes:
            n.close()

    restored = {r: json.load(open(out / f"restored_r{r}.json")) for r in (0, 1)}
    assert {r["step"] for r in restored.values()} == {PAUSE}
    on_b2 = [r for r, v in restored.items() if v["node"] == "nodeB"]
    assert len(on_b2) == 1 and restored[on_b2[0]]["tier"] == "peer", restored
    for r in (0, 1):
        got = torch.load(out / f"restored_r{r}.pt", weights_only=True)
        assert torch.equal(got, torch.load(out / f"saved_r{r}_s{PAUSE}.pt", weights_only=True)), f"rank {r} differs"
        assert restored[r]["pos"] == {"rank": r, "seen": PAUSE}
        assert (out / f"done_r{r}").read_text() == str(STEPS)
    evs_b2 = b2.events()
    assert any(e["event"] == "checkpoint_restored" and e["tier"] == "peer" and e["step"] == PAUSE for e in evs_b2)
    assert any(e["event"] == "checkpoint_replicated" for e in b.events())
    refused = [e for e in a.events() if e["event"] == "peer_refused"]
    assert len(refused) >= 2 and any("authentication" in e["reason"] for e in refused)
