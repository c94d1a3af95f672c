"""A real etcd cluster on loopback for tests: N members, each its own ``etcd`` process.

Started with the v2 API on (torch's etcd-v2 rendezvous needs it). ``kill``
sends SIGKILL to one member, ``leader`` names the current leader, ``stop``
ends every member and removes the data directories.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from typing import Any

from _launch import free_port

ETCD = shutil.which("etcd")


def _get(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
        return json.loads(r.read())


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, data under ``root``."""

    def __init__(self, root: str, size: int = 3) -> None:
        if ETCD is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server)")
        self.root = root
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[Any] = []

    @property
    def endpoints(self) -> str:
        """``127.0.0.1:p1,127.0.0.1:p2,...``: every member, for ``--rdzv-endpoint``."""
        return ",".join(f"127.0.0.1:{p}" for p in self.client_ports)

    def start(self, timeout: float = 30.0) -> "EtcdCluster":
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        for name, cport, pport in zip(self.names, self.client_ports, self.peer_ports):
            log = open(os.path.join(self.root, f"{name}.log"), "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.procs[name] = subprocess.Popen(
                [ETCD, "--name", name, "--data-dir", os.path.join(self.root, name), "--enable-v2=true",
                 "--listen-client-urls", f"http://127.0.0.1:{cport}", "--advertise-client-urls",
                 f"http://127.0.0.1:{cport}", "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}", "--initial-cluster", cluster,
                 "--initial-cluster-state", "new", "--heartbeat-interval", "100", "--election-timeout", "1000"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.healthy() == len(self.names):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd cluster not healthy after {timeout}s; logs in {self.root}")
            time.sleep(0.2)
        return self

    def healthy(self) -> int:
        """Members that answer ``/health`` with a leader."""
        up = 0
        for name, port in zip(self.names, self.client_ports):
            if name not in self.procs:
                continue
            try:
                up += _get(f"http://127.0.0.1:{port}/health").get("health") == "true"
            except (OSError, ValueError):
                pass
        return up

    def leader(self, timeout: float = 10.0) -> str:
        """The member that leads now."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, port in zip(self.names, self.client_ports):
                if name not in self.procs:
                    continue
                try:
                    if _get(f"http://127.0.0.1:{port}/v2/stats/self").get("state") == "StateLeader":
                        return name
                except (OSError, ValueError):
                    pass
            time.sleep(0.1)
        raise RuntimeError("no etcd leader")

    def kill(self, name: str) -> None:
        """SIGKILLs member ``name``."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()
        for log in self._logs:
            log.close()
        for name in self.names:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
