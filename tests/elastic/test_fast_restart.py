"""The fast-restart agreement (hpresil.elastic.fast_restart) against a real TCPStore,
one thread per simulated agent."""

from __future__ import annotations

import os
import signal
import threading
from datetime import timedelta

import pytest
from torch.distributed import PrefixStore, TCPStore

from hpresil.elastic.fast_restart import FastRestart, free_port, poll_interval


@pytest.fixture()
def store():
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield PrefixStore("round1/", server)


def _client(store: PrefixStore, world: int, rank: int, timeout: float = 2.0) -> FastRestart:
    return FastRestart(store, rank, world, timeout=timeout, poll=0.005)


def test_polling_scales_with_the_number_of_nodes() -> None:
    # Each agent polls the store while watching for a peer's failure mark; together
    # they stay within a fixed request rate at any job size.
    assert poll_interval(2, 0.1, 1000) == 0.1 and poll_interval(100, 0.1, 1000) == 0.1
    assert poll_interval(2048, 0.1, 1000) == 2.048
    big = FastRestart(None, 0, 2048, timeout=1.0)
    assert big.watch_interval * 1000 >= 2048 and big.poll * 10000 >= 2048
    small = FastRestart(None, 0, 2, timeout=1.0)
    assert small.watch_interval == 0.1 and small.poll == 0.02


def _agree_all(agents: list[FastRestart], ports: dict[int, int | None], give_up=lambda: False,
               skip: tuple[int, ...] = ()) -> dict[int, int | None]:
    out: dict[int, int | None] = {}

    def run(a: FastRestart) -> None:
        out[a.group_rank] = a.agree(coordinator=a.group_rank == 0, port=ports.get(a.group_rank), give_up=give_up)

    threads = [threading.Thread(target=run, args=(a,)) for a in agents if a.group_rank not in skip]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_every_node_marks_then_all_agree_on_the_coordinators_port(store):
    agents = [_client(store, 3, r) for r in range(3)]
    assert not agents[1].all_failed() and agents[2].failed_count() == 0
    agents[0].mark_failed()
    agents[0].mark_failed()  # idempotent within a generation
    assert agents[2].failed_count() == 1
    agents[1].mark_failed()
    agents[2].mark_failed()
    assert all(a.all_failed() for a in agents)
    got = _agree_all(agents, {0: 4242})
    assert got == {0: 4242, 1: 4242, 2: 4242}
    assert [a.gen for a in agents] == [1, 1, 1]
    # The next generation starts clean: nobody failed in it yet, and it agrees again.
    assert agents[1].failed_count() == 0
    for a in agents:
        a.mark_failed()
    assert _agree_all(agents, {0: 4343}) == {0: 4343, 1: 4343, 2: 4343}
    assert [a.gen for a in agents] == [2, 2, 2]


def test_a_node_that_never_gets_ready_sends_everyone_to_the_rendezvous(store):
    agents = [_client(store, 3, r, timeout=0.3) for r in range(3)]
    got = _agree_all(agents, {0: 4242}, skip=(2,))  # node 2 never stops its workers
    assert got == {0: None, 1: None}
    assert [a.gen for a in agents] == [0, 0, 0]
    # The decision stands: a late agent follows it instead of starting alone.
    assert agents[2].agree(coordinator=False, port=None, give_up=lambda: False) is None


def test_give_up_and_a_missing_coordinator_fall_back(store):
    agents = [_client(store, 2, r, timeout=0.2) for r in range(2)]
    assert _agree_all(agents, {0: 4242}, give_up=lambda: True) == {0: None, 1: None}
    other = [_client(PrefixStore("round2/", store), 2, r, timeout=0.2) for r in range(2)]
    # Group rank 0 (the coordinator) is gone: the other waits timeout + 2 s, then decides "slow" itself.
    assert _agree_all(other, {}, skip=(0,)) == {1: None}


def test_single_node_needs_no_store_and_a_dead_store_means_rendezvous(store):
    solo = FastRestart(object(), 0, 1, timeout=1.0)  # never touches the store
    solo.mark_failed()
    assert solo.failed_count() == 0 and solo.agree(coordinator=True, port=1234, give_up=lambda: False) == 1234
    assert solo.agree(coordinator=True, port=1, give_up=lambda: True) is None
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=1))
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=1))
    a = FastRestart(client, 1, 2, timeout=0.5)
    del server  # the store's host is gone
    a.mark_failed()  # only the fast path is lost: no error reaches the agent
    assert a._marked != a.gen  # not counted: a later call tries again
    assert a.failed_count() == 0
    assert a.agree(coordinator=False, port=None, give_up=lambda: False) is None


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("", port))


@pytest.mark.slow
def test_killed_worker_restarts_both_nodes_without_a_new_rendezvous(tmp_path):
    """2 nodes; node1's worker SIGKILLed: both agents agree through the round's store,
    restart with the same ranks (one rendezvous in all), and the restored state is
    the one saved."""
    from _launch import free_port
    from elastic_nodes import Node, listening, read_records, wait_for
    from test_elastic_e2e import _check_data_and_state

    port, out = free_port(), tmp_path / "out"
    out.mkdir()
    agent = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", "fast", "--max-restarts", "3", "--monitor-interval", "0.1"]
    worker = ["--out", str(out), "--steps", "400", "--durable", f"file://{out}/durable", "--every", "1"]
    nodes: list[Node] = []

    def steps_in(attempt: int) -> int:
        return sum(1 for r in read_records(str(out)) if r["kind"] == "step" and r["rank"] == 0 and r["attempt"] == attempt)

    try:
        nodes.append(Node(str(tmp_path), "node0", agent, worker))
        wait_for(lambda: listening(port), 60, "node0's rendezvous store", nodes)
        nodes.append(Node(str(tmp_path), "node1", agent, worker))
        wait_for(lambda: steps_in(0) >= 5, 120, "5 steps", nodes)
        pid = wait_for(lambda: nodes[1].worker_pids(), 30, "node1's worker", nodes)[0]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: steps_in(1) >= 3, 90, "3 steps after the restart", nodes)
        (out / "stop").touch()
        for n in nodes:
            assert n.wait(90) == 0, n.tail()
    finally:
        for n in nodes:
            n.close()
    restores = _check_data_and_state(str(out))
    again = [r for r in restores if r["attempt"] == 1]
    assert len(again) == 2 and {r["tier"] for r in again} == {"ram"} and again[0]["step"] > 0, again
    for n in nodes:
        evs = n.events()
        assert sum(e["event"] == "rendezvous" for e in evs) == 1, "a fast restart needs no new round"
        fast = [e for e in evs if e["event"] == "fast_restart"]
        assert [(e["gen"], e["go"]) for e in fast] == [(0, True)], fast
        restarts = [e for e in evs if e["event"] == "workers_restart"]
        assert len(restarts) == 1 and restarts[0]["cause"] == "failure", restarts
        assert restarts[0]["reason"] in ("worker_failed", "peer_failed")


def test_a_joiner_waits_for_its_fork_server_only_when_the_job_already_trains(caplog):
    """join_when_ready: no wait at job start (no RUNNING_KEY), a wait for the warm
    fork server when the rendezvous store says the job trains; nothing without
    warm start or with a non-c10d backend."""
    import logging

    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from hpresil.elastic.api import RUNNING_KEY
    from hpresil.run.launch import join_when_ready

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    params = RendezvousParameters(backend="c10d", endpoint=f"127.0.0.1:{server.port}", run_id="job7",
                                  min_nodes=1, max_nodes=2)
    assert join_when_ready(params, warm=False) is None
    assert join_when_ready(RendezvousParameters(backend="static", endpoint="127.0.0.1:1", run_id="job7",
                                                min_nodes=1, max_nodes=1), warm=True) is None
    import time

    t0 = time.monotonic()  # --standalone's port 0: nothing to ask (no 2 s connect timeout)
    join_when_ready(RendezvousParameters(backend="c10d", endpoint="localhost:0", run_id="job7", min_nodes=1,
                                         max_nodes=1), warm=True)()
    assert time.monotonic() - t0 < 1.0
    before = join_when_ready(params, warm=True)
    with caplog.at_level(logging.INFO, logger="hpresil"):
        before()  # job start: no key, returns at once
        assert "already trains" not in caplog.text
        server.set(RUNNING_KEY.format(run_id="other-job"), "1")
        before()
        assert "already trains" not in caplog.text, "another job's key"
        server.set(RUNNING_KEY.format(run_id="job7"), "1")
        before()
    assert "already trains" in caplog.text and "fork server ready" in caplog.text
