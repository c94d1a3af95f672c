"""End to end elastic rescale: 3 simulated nodes (hpresil-run agents on
127.0.0.1, 1 worker each, ``--nnodes 2:3``) lose a node and grow back, with the
data order and the restored state checked exactly."""

from __future__ import annotations

import signal
import time
from collections import defaultdict

import pytest

from _launch import free_port
from elastic_nodes import Node, listening, read_records, wait_for
from hpresil.elastic import ElasticSampler

pytestmark = pytest.mark.slow

G, MICRO, NUM_SAMPLES = 12, 2, 90  # as in tests/scripts/elastic_worker.py


def _agent_args(port: int, extra: list[str] = ()) -> list[str]:
    return ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "elastic", "--max-restarts", "0", "--monitor-interval", "0.1", *extra]


def _worker_args(out: str, steps: int) -> list[str]:
    return ["--out", out, "--steps", str(steps), "--durable", f"file://{out}/durable"]


def _steps(out: str, world: int, since: float = 0.0) -> int:
    """Steps rank 0 completed at ``world`` since the Unix time ``since``."""
    return sum(1 for r in read_records(out) if r["kind"] == "step" and r["world"] == world and r["rank"] == 0
               and r["t"] >= since)


def _committed(out: str) -> int:
    """The newest step committed to the durable tier (its manifest written)."""
    import glob

    steps = [int(p.split("step_")[1].split("/")[0]) for p in glob.glob(f"{out}/durable/step_*/.hpresil/manifest.json")]
    return max(steps, default=0)


def _wait_for_commit_at_3(out: str, nodes: list[Node]) -> None:
    """Waits for a durable commit made once all 3 nodes train. On a loaded host a
    node may miss the first round's last call: the job then starts at 2 nodes and
    grows to 3 first, and a commit from those 2 must not count."""
    wait_for(lambda: _steps(out, 3) >= 1, 120, "a step at 3 nodes", nodes)
    at3 = _committed(out)
    wait_for(lambda: _committed(out) >= max(4, at3 + 1), 120, "a durable commit at 3 nodes", nodes)


def _check_data_and_state(out: str) -> list[dict]:
    """Every step saw exactly its slice of the global order; every restore
    reproduced bitwise a state some earlier attempt saved."""
    recs = read_records(out)
    steps = 1 + max(r["step"] for r in recs if r["kind"] == "step")
    ref = ElasticSampler(NUM_SAMPLES, global_batch=G, seed=7)
    saved: dict[int, set[str]] = defaultdict(set)  # checkpoint step -> digests saved
    ranks_at: dict[tuple[int, int], set[int]] = defaultdict(set)
    restores = []
    for r in recs:
        if r["kind"] == "restore":
            restores.append(r)
            assert r["position"] == r["step"] * G, r
            if r["step"] > 0:
                assert r["digest"] in saved[r["step"]], f"restored state differs from the saved one: {r}"
            continue
        share = G // r["world"]
        want = ref.global_indices(r["step"] * G + r["rank"] * share, share)
        assert r["ids"] == want, f"step {r['step']} rank {r['rank']} world {r['world']}: {r['ids']} != {want}"
        assert r["accum"] * MICRO * r["world"] == G
        saved[r["step"] + 1].add(r["digest"])
        ranks_at[(r["step"], r["world"])].add(r["rank"])
    for step in range(steps):
        assert any(ranks == set(range(w)) for (s, w), ranks in ranks_at.items() if s == step), f"step {step} incomplete"
    return restores


#: torch forgets a dead node after 1 s x 10 here, the liveness ring after 3 s: the survivors must evict it.
_SLOW_EXPIRY = ["--rdzv-conf", "keep_alive_max_attempt=10"]


def test_shrink_on_node_loss_then_grow_back(tmp_path):
    port, out, steps = free_port(), str(tmp_path / "out"), 500
    (tmp_path / "out").mkdir()
    nodes: list[Node] = []
    try:
        for i in range(3):
            nodes.append(Node(str(tmp_path), f"node{i}", _agent_args(port, _SLOW_EXPIRY), _worker_args(out, steps)))
            if i == 0:  # node0 hosts the c10d store (the default); it is never killed here
                wait_for(lambda: listening(port), 60, "node0's rendezvous store", nodes)
        _wait_for_commit_at_3(out, nodes)
        nodes[2].kill()  # agent + worker SIGKILLed: the node is gone, RAM snapshots too
        killed = time.time()
        wait_for(lambda: _steps(out, 2, since=killed) >= 3, 90, "3 steps at 2 nodes after the loss", nodes)
        joined = time.time()
        nodes.append(Node(str(tmp_path), "node3", _agent_args(port, _SLOW_EXPIRY), _worker_args(out, steps)))
        wait_for(lambda: _steps(out, 3, since=joined) >= 3, 90, "3 steps at 3 nodes after the join", nodes)
        (tmp_path / "out" / "stop").touch()
        for n in (nodes[0], nodes[1], nodes[3]):
            assert n.wait(90) == 0, n.tail()
    finally:
        for n in nodes:
            n.close()
    restores = _check_data_and_state(out)
    # On a loaded host node2 may reach the first rendezvous after its last call:
    # the job then starts at 2 nodes and grows to 3 before the fault (correct, and
    # not what this test is about), so everything is checked from the first group of 3.
    worlds = [r["world"] for r in restores if r["rank"] == 0]
    full = worlds.index(3) if 3 in worlds else len(worlds)
    assert set(worlds[:full]) <= {2} and 2 in worlds[full:] and worlds[-1] == 3, worlds
    first3 = min(r["t"] for r in restores if r["world"] == 3)
    shrink = [r for r in restores if r["world"] == 2 and r["t"] > first3]
    # A lost node's RAM is gone: peer replicas or the durable tier serve it.
    assert shrink and {r["tier"] for r in shrink} <= {"durable", "peer"} and shrink[0]["step"] > 0, shrink
    for n in (nodes[0], nodes[1]):
        evs = n.events()
        restarts = [e for e in evs if e["event"] == "workers_restart"]
        assert {e["cause"] for e in restarts} == {"membership"}, restarts
        assert {e["reason"] for e in restarts} == {"node_lost", "node_joined"}, restarts
        assert all(e["remaining_restarts"] == 0 for e in restarts), "--max-restarts 0 and never consumed"
        lost = [e for e in restarts if e["reason"] == "node_lost"]
        assert lost[0]["lost_nodes"] == [2]
        rescales = [(e["from_nodes"], e["to_nodes"]) for e in evs if e["event"] == "rescale"]
        assert rescales[-2:] == [(3, 2), (2, 3)] and set(rescales[:-2]) <= {(2, 3)} and len(rescales) <= 3, rescales
    # The lost node left torch's rendezvous by eviction (one survivor's compare-and-set wins), not by expiry.
    evictions = [e for n in (nodes[0], nodes[1]) for e in n.events() if e["event"] == "rdzv_evicted"]
    assert [e["group_ranks"] for e in evictions] == [[2]], evictions


@pytest.mark.chaos  # in `make chaos`, not in CI's `make test`
def test_frozen_node_is_lost_and_standalone_store_survives_rank0_loss(tmp_path):
    """A SIGSTOPped node (no FIN, like a network cut: the survivors sit in a gloo
    collective) is declared lost by its stale liveness counter. The rendezvous
    store runs in its own process (every agent ``is_host=false``), so losing the
    node of group rank 0 leaves the job able to rendezvous."""
    import subprocess
    import sys

    from _launch import REPO

    port, out, steps = free_port(), str(tmp_path / "out"), 500
    (tmp_path / "out").mkdir()
    store = subprocess.Popen([sys.executable, "-m", "hpresil.elastic.store", "--host", "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": REPO})
    nodes: list[Node] = []
    try:
        assert "listening" in store.stdout.readline()
        for i in range(3):
            nodes.append(Node(str(tmp_path), f"node{i}", _agent_args(port, ["--rdzv-conf", "is_host=false"]),
                              _worker_args(out, steps)))
        _wait_for_commit_at_3(out, nodes)
        rank0 = next(n for n in nodes if any(e["event"] == "rendezvous" and e["group_rank"] == 0 for e in n.events()))
        rank0.signal(signal.SIGSTOP)
        frozen = time.time()
        wait_for(lambda: _steps(out, 2, since=frozen) >= 3, 90, "3 steps at 2 nodes after freezing group rank 0", nodes)
        rank0.kill()
        (tmp_path / "out" / "stop").touch()
        for n in nodes:
            if n is not rank0:
                assert n.wait(60) == 0, n.tail()
    finally:
        for n in nodes:
            n.close()
        store.kill()
        store.wait()
    _check_data_and_state(out)
    for n in nodes:
        if n is rank0:
            continue
        restarts = [(e["cause"], e["reason"]) for e in n.events() if e["event"] == "workers_restart"]
        late_start = set(restarts[:-1])  # node_joined, when a node missed the first round
        assert restarts[-1:] == [("membership", "node_lost")] and late_start <= {("membership", "node_joined")}, restarts
