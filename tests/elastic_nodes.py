"""Simulated nodes for elastic tests and bench/rescale.py: several ``hpresil-run``
(or ``torchrun``) agents on 127.0.0.1, each with its own node id, shm root and
log dir, that can be SIGKILLed or SIGSTOPped together with their workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "scripts", "elastic_worker.py")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "HPRESIL_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


class Node:
    """One simulated node: an agent process (own session) and its workers (``script``,
    tests/scripts/elastic_worker.py unless given)."""

    def __init__(self, root: str, node_id: str, agent_args: list[str], worker_args: list[str],
                 launcher: str = "hpresil", env: dict[str, str] | None = None, script: str = WORKER) -> None:
        self.node_id = node_id
        self.script = script
        self.dir = os.path.join(root, node_id)
        os.makedirs(self.dir, exist_ok=True)
        if launcher == "hpresil":
            cmd = [sys.executable, "-m", "hpresil.run", "--node-id", node_id, "--shm-root",
                   os.path.join(self.dir, "shm"), "--log-dir", os.path.join(self.dir, "logs")]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run"]
        self.cmd = [*cmd, *agent_args, script, *worker_args]
        self.log = open(os.path.join(self.dir, "agent.log"), "w")
        self.proc = subprocess.Popen(self.cmd, env=_env({**(env or {}), "HPRESIL_NODE_ID": node_id}),
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)

    @property
    def events_path(self) -> str:
        return os.path.join(self.dir, "logs", "events.jsonl")

    def events(self) -> list[dict[str, Any]]:
        try:
            with open(self.events_path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    @staticmethod
    def _ps() -> list[tuple[int, int, str, str]]:
        """``(pid, ppid, state, args)`` of every process."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split(None, 3)
            if len(parts) >= 3:
                rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) == 4 else ""))
        return rows

    def _pids(self) -> list[int]:
        # The agent and its descendants (workers get their own sessions from torch; with
        # hpresil-run's warm start they are children of a fork server and run under its
        # command line), plus workers of this node whose agent already died.
        procs = self._ps()
        children: dict[int, list[int]] = {}
        for pid, ppid, _, _ in procs:
            children.setdefault(ppid, []).append(pid)
        pids, todo = [self.proc.pid], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                pids.append(child)
                todo.append(child)
        for pid, _, _, args in procs:
            if pid in pids or self.script not in args:
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if f"HPRESIL_NODE_ID={self.node_id}".encode() in env:
                pids.append(pid)
        return pids

    def worker_pids(self) -> list[int]:
        """The node's live workers: those of hpresil-run's newest ``workers_start`` event,
        else (torchrun) the processes running the script."""
        state = {pid: (stat, args) for pid, _, stat, args in self._ps()}
        mine = set(self._pids()[1:])
        live = [p for p in mine if p in state and not state[p][0].startswith("Z")]
        starts = [e for e in self.events() if e.get("event") == "workers_start"]
        if starts:
            return [p for p in starts[-1].get("pids", []) if p in live]
        return sorted(p for p in live if self.script in state[p][1])

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the agent and all its workers at once (a node dying or freezing)."""
        for pid in self._pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        with open(os.path.join(self.dir, "agent.log")) as f:
            return f"--- {self.node_id} ---\n" + f.read()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.log.close()


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_records(out: str) -> list[dict[str, Any]]:
    try:
        with open(os.path.join(out, "records.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, nodes: list[Node] = (), poll: float = 0.05) -> Any:
    """Polls ``predicate`` until truthy; on timeout fails with the agents' log tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n" + "\n".join(n.tail() for n in nodes))


def first_step_at(out: str, world: int, after: float = 0.0) -> dict[str, Any] | None:
    """The first step record at ``world`` written after ``after`` (records are in file order)."""
    for rec in read_records(out):
        if rec["kind"] == "step" and rec["world"] == world and rec.get("t", 0.0) >= after:
            return rec
    return None
