"""Network partition of one node: 3 simulated nodes (``--nnodes 2:3``), one of
them (agent and worker) in its own network namespace joined to the root
namespace by a veth pair. Taking the namespace's end of the link down cuts the
node off without a FIN or RST: the survivors sit in a gloo collective with it
until its liveness counter goes stale, then continue at 2 nodes with the data
order and the restored state checked exactly.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for ``ip netns``); skipped with the
reason otherwise. Every address is on the veth subnet, since 127.0.0.1 is
per namespace: the standalone rendezvous store and the two root-side nodes use
the root end, the partitioned node the namespace end (``--local-addr`` for the
workers' store, ``--peer-host`` for peer replication, ``GLOO_SOCKET_IFNAME`` for
gloo).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from typing import Iterator

import pytest

from _launch import REPO, free_port
from elastic_nodes import Node, wait_for
from test_elastic_e2e import _agent_args, _check_data_and_state, _committed, _steps, _worker_args

pytestmark = [pytest.mark.slow, pytest.mark.chaos]  # in `make chaos`, not in CI's `make test`

CLONE_NEWNET = 0x40000000


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise OSError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class Link:
    """A network namespace ``ns`` holding ``ns_if`` (``ns_addr``), the peer of
    ``root_if`` (``root_addr``) in the root namespace; both /24."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.ns, self.root_if, self.ns_if = f"hpresil-part{tag}", f"hpv{tag}r", f"hpv{tag}n"
        net = f"10.77.{tag % 250}"
        self.root_addr, self.ns_addr = f"{net}.1", f"{net}.2"

    def up(self) -> None:
        self.remove()  # a namespace left by a killed run with the same pid
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.ns)
        _ip("addr", "add", f"{self.root_addr}/24", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")
        _ip("addr", "add", f"{self.ns_addr}/24", "dev", self.ns_if, netns=self.ns)
        _ip("link", "set", self.ns_if, "up", netns=self.ns)
        _ip("link", "set", "lo", "up", netns=self.ns)

    def cut(self) -> None:
        """The namespace side loses its link: packets are dropped, nobody is told."""
        _ip("link", "set", self.ns_if, "down", netns=self.ns)

    def remove(self) -> None:
        for args in (["link", "del", self.root_if], ["netns", "del", self.ns]):
            with contextlib.suppress(OSError):
                _ip(*args)

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Runs the block with this thread in the namespace, so processes it starts live there."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns into the test namespace")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), "setns back to the root namespace")
        finally:
            os.close(target)
            os.close(own)


@pytest.fixture
def link() -> Iterator[Link]:
    if not sys.platform.startswith("linux") or shutil.which("ip") is None:
        pytest.skip("network partition test needs Linux and iproute2's `ip`")
    lnk = Link()
    try:
        lnk.up()
    except OSError as e:
        lnk.remove()
        pytest.skip(f"cannot create a network namespace and veth pair (needs root / CAP_NET_ADMIN): {e}")
    try:
        yield lnk
    finally:
        lnk.remove()


def test_partitioned_node_is_lost_and_survivors_continue(tmp_path, link):
    port, out, steps = free_port(), str(tmp_path / "out"), 500
    (tmp_path / "out").mkdir()
    store = subprocess.Popen([sys.executable, "-m", "hpresil.elastic.store", "--host", link.root_addr, "--port", str(port)],
                             stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": REPO})
    nodes: list[Node] = []

    def node(i: int, addr: str, ifname: str) -> Node:
        agent = _agent_args(port, ["--rdzv-conf", "is_host=false", "--local-addr", addr, "--peer-host", addr])
        agent[agent.index("--rdzv-endpoint") + 1] = f"{link.root_addr}:{port}"
        return Node(str(tmp_path), f"node{i}", agent, _worker_args(out, steps), env={"GLOO_SOCKET_IFNAME": ifname})

    try:
        assert "listening" in store.stdout.readline()
        nodes += [node(0, link.root_addr, link.root_if), node(1, link.root_addr, link.root_if)]
        with link.inside():
            nodes.append(node(2, link.ns_addr, link.ns_if))
        wait_for(lambda: _committed(out) >= 4, 120, "a durable commit at 3 nodes", nodes)
        link.cut()
        wait_for(lambda: _steps(out, 2) >= 3, 90, "3 steps at 2 nodes after the partition", nodes)
        (tmp_path / "out" / "stop").touch()
        for n in nodes[:2]:
            assert n.wait(60) == 0, n.tail()
    finally:
        for n in nodes:
            n.close()
        store.kill()
        store.wait()
    restores = _check_data_and_state(out)
    shrink = [r for r in restores if r["world"] == 2]
    assert shrink and shrink[0]["step"] > 0, restores
    cut_rank = [e["group_rank"] for e in nodes[2].events() if e["event"] == "rendezvous"][-1]
    for n in nodes[:2]:
        evs = n.events()
        restarts = [e for e in evs if e["event"] == "workers_restart"]
        assert [(e["cause"], e["reason"]) for e in restarts] == [("membership", "node_lost")], restarts
        assert restarts[0]["lost_nodes"] == [cut_rank], restarts
        assert [(e["from_nodes"], e["to_nodes"]) for e in evs if e["event"] == "rescale"] == [(3, 2)]
