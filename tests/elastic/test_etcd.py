"""etcd-v2 rendezvous against a real 3-member etcd cluster on loopback: no single
process or node whose loss ends the job.

The job-level cases are in the chaos matrix (``make chaos``); CI runs the client's
failover and store operations against the real cluster. Skipped when ``etcd`` (Debian's ``etcd-server``) or python-etcd is not installed;
``.ci/run`` installs both.
"""

from __future__ import annotations

import os
import threading

import pytest

from _launch import free_port
from elastic_nodes import Node, read_records, wait_for
from etcd_cluster import ETCD, EtcdCluster

pytest.importorskip("etcd", reason="python-etcd is not installed (pip install python-etcd)")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (apt-get install etcd-server)")


@pytest.fixture
def cluster(tmp_path):
    root = tmp_path / "etcd"
    root.mkdir()
    c = EtcdCluster(str(root)).start()
    try:
        yield c
    finally:
        c.stop()


def _params(endpoints: str, run_id: str = "t"):
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(backend="etcd-v2", endpoint=endpoints, run_id=run_id, min_nodes=1, max_nodes=1,
                                read_timeout="5")


def test_store_ops_fail_over_between_members_and_elect_one_writer(cluster) -> None:
    """The handler's store (torch's EtcdStore) serves hpresil's operations through any
    member: with the leader SIGKILLed, a first-writer-wins key still has exactly one
    winner among 8 concurrent writers, and multi_get reads every key."""
    from hpresil.elastic.etcd import create_etcd_v2_handler
    from hpresil.runtime.store_ops import multi_get, set_if_absent

    handler = create_etcd_v2_handler(_params(cluster.endpoints))
    store = handler._store  # torch's EtcdStore, as a round's store wraps it
    from torch.distributed import PrefixStore

    round_store = PrefixStore("round0/", store)
    cluster.kill(cluster.leader())
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: results.append(set_if_absent(round_store, "decision", f"v{i}")))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8 and len(set(results)) == 1, results
    for i in range(3):
        round_store.set(f"k{i}", f"value{i}")
    assert multi_get(round_store, ["k0", "k1", "k2"]) == [b"value0", b"value1", b"value2"]


def test_endpoint_errors_name_the_fix() -> None:
    from hpresil.elastic.etcd import parse_endpoints
    from hpresil.errors import ConfigError

    assert parse_endpoints("a:1,b,[::1]:3") == [("a", 1), ("b", 2379), ("::1", 3)]
    for bad in ("", "a:x", "a:70000", ","):
        with pytest.raises(ConfigError, match="rdzv-endpoint"):
            parse_endpoints(bad)


G = 12  # the worker's global batch


def _agent_args(endpoints: str, extra: list[str] = ()) -> list[str]:
    return ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-backend", "etcd-v2", "--rdzv-endpoint", endpoints,
            "--rdzv-id", f"etcd{free_port()}", "--rdzv-conf", "read_timeout=5", "--max-restarts", "3",
            "--monitor-interval", "0.1", *extra]


def _worker_args(out: str, steps: int) -> list[str]:
    return ["--out", out, "--steps", str(steps), "--durable", f"file://{out}/durable", "--step-sleep", "0.1"]


def _max_step(out: str, world: int | None = None) -> int:
    return max((r["step"] for r in read_records(out) if r["kind"] == "step"
                and (world is None or r["world"] == world)), default=-1)


def _start(tmp_path, cluster: EtcdCluster, steps: int) -> tuple[str, list[Node]]:
    out = str(tmp_path / "out")
    os.makedirs(out, exist_ok=True)
    args = _agent_args(cluster.endpoints)
    nodes = [Node(str(tmp_path), f"node{i}", args, _worker_args(out, steps)) for i in range(3)]
    wait_for(lambda: _max_step(out, 3) >= 3, 180, "steps at 3 nodes", nodes)
    return out, nodes


def _restores_match_saves(out: str) -> None:
    """Every restore reproduced bitwise a state some rank saved at that step."""
    saved: dict[int, set[str]] = {}
    for r in read_records(out):
        if r["kind"] == "step":
            saved.setdefault(r["step"] + 1, set()).add(r["digest"])
        elif r["step"] > 0:
            assert r["digest"] in saved.get(r["step"], set()), f"restored state differs from the saved one: {r}"


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.parametrize("member", ["leader", "follower"])
def test_job_survives_an_etcd_member_and_the_rank0_node(tmp_path, cluster, member) -> None:
    """SIGKILL of an etcd member (the leader or not) mid-run, then SIGKILL of the
    training node holding group rank 0: the other two nodes shrink to world 2 and
    train to the end, restoring a state bitwise equal to one that was saved."""
    steps = 40
    out, nodes = _start(tmp_path, cluster, steps)
    try:
        victim = cluster.leader() if member == "leader" else next(n for n in cluster.names if n != cluster.leader())
        cluster.kill(victim)
        at = _max_step(out)
        wait_for(lambda: _max_step(out) >= at + 3, 60, f"training after etcd {member} {victim} was killed", nodes)
        rank0 = next(n for n in nodes if any(r["rank"] == 0 and r["node"] == n.node_id for r in read_records(out)))
        rank0.kill()
        survivors = [n for n in nodes if n is not rank0]
        for node in survivors:
            assert node.wait(timeout=240) == 0, node.tail()
        assert _max_step(out, 2) == steps - 1
        _restores_match_saves(out)
        assert any(r["kind"] == "restore" and r["world"] == 2 for r in read_records(out))
    finally:
        for node in nodes:
            node.close()


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(300)  # the agents meet etcd's and the client's read timeouts before they give up
def test_quorum_loss_fails_with_a_clear_error_and_keeps_the_snapshots(tmp_path, cluster) -> None:
    """Two of three members SIGKILLed: torch's agent syncs the rendezvous state on
    every monitor pass, so each agent ends (within the read timeout) with an error
    that names the quorum; the newest committed snapshot stays in the durable tier."""
    import glob

    out, nodes = _start(tmp_path, cluster, 10_000)
    try:
        wait_for(lambda: glob.glob(f"{out}/durable/step_*/.hpresil/manifest.json"), 120, "a durable commit", nodes)
        for name in list(cluster.names)[:2]:
            cluster.kill(name)
        codes = [n.wait(timeout=240) for n in nodes]
        assert all(c == 1 for c in codes), codes
        for node in nodes:
            text = node.tail(20000)
            assert "1 of 3 etcd members answer" in text and "quorum of 2" in text, text[-4000:]
            assert "Traceback" not in text.split("quorum of 2")[-1]  # one clear line, no launcher traceback
        assert glob.glob(f"{out}/durable/step_*/.hpresil/manifest.json"), "the committed snapshot is gone"
    finally:
        for node in nodes:
            node.close()


def test_reading_counters_costs_etcd_no_write(cluster) -> None:
    """Liveness and fast restart read their peers' counters every beat: on etcd, where
    add(key, 0) is a compare-and-swap through raft, they read with check/get and the
    cluster's write index does not move."""
    import etcd
    from torch.distributed import PrefixStore

    from hpresil.elastic.etcd import create_etcd_v2_handler
    from hpresil.runtime.store_ops import read_counter, writes_to_add

    handler = create_etcd_v2_handler(_params(cluster.endpoints))  # keeps its EtcdStore alive, as an agent does
    store = PrefixStore("round0/", handler._store)
    assert writes_to_add(store)
    store.add("alive/1", 5)
    host, port = cluster.endpoints.split(",")[0].split(":")
    probe = etcd.Client(host=host, port=int(port))
    before = probe.read("/").etcd_index
    assert [read_counter(store, "alive/1") for _ in range(10)] == [5] * 10
    assert read_counter(store, "alive/missing") == 0
    assert probe.read("/").etcd_index == before  # no write, no key created
    assert read_counter(store, "alive/1", write_free=False) == 5  # add(key, 0): a write on etcd
    assert probe.read("/").etcd_index > before
