"""A lost node is evicted from torch's rendezvous at once: the survivors form
the next, smaller round long before its keep-alive could expire. Real torch
handlers (keep-alive threads included) on a real TCPStore and on a real
3-member etcd cluster."""

from __future__ import annotations

import shutil
import threading
import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from _launch import free_port
from hpresil.elastic.api import ElasticConfig
from hpresil.elastic.evict import evict, round_of
from hpresil.events import NullEventLog
from hpresil.run.peers import Peers, nodes_waiting

#: The dead node's keep-alive expires after 60 s x 3; every join below must finish within JOIN_S.
KEEP_ALIVE_S, JOIN_S = 60, 40


def _params(backend: str, endpoint: str, run_id: str) -> Any:
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    return RendezvousParameters(backend=backend, endpoint=endpoint, run_id=run_id, min_nodes=2, max_nodes=3,
                                read_timeout="10", keep_alive_interval=str(KEEP_ALIVE_S), keep_alive_max_attempt="3",
                                last_call_timeout="1", join_timeout=str(JOIN_S))


@pytest.fixture(params=["c10d", "etcd-v2"])
def make_handler(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    """A factory of rendezvous handlers of one job, on a fresh store of the backend."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    cleanup: list[Any] = []
    if request.param == "c10d":
        port = free_port()
        server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        cleanup.append(server)

        def make() -> Any:
            store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
            params = _params("c10d", f"127.0.0.1:{port}", "evict")
            return create_handler(store, C10dRendezvousBackend(store, "evict"), params)
    else:
        pytest.importorskip("etcd", reason="python-etcd is not installed (pip install python-etcd)")
        from etcd_cluster import ETCD, EtcdCluster

        if ETCD is None or shutil.which(ETCD) is None:
            pytest.skip("etcd is not installed (apt-get install etcd-server)")
        from hpresil.elastic.etcd import create_etcd_v2_handler

        root = tmp_path / "etcd"
        root.mkdir()
        cluster = EtcdCluster(str(root)).start()
        cleanup.append(cluster)

        def make() -> Any:
            return create_etcd_v2_handler(_params("etcd-v2", cluster.endpoints, "evict"))
    handlers: list[Any] = []

    def tracked() -> Any:
        handlers.append(make())
        return handlers[-1]

    try:
        yield tracked
    finally:
        for h in handlers:
            h._stop_heartbeats()
        for c in cleanup:
            if hasattr(c, "stop"):
                c.stop()


def _join_all(handlers: list[Any]) -> list[Any]:
    """``next_rendezvous`` on every handler at once; their infos (or errors)."""
    out: list[Any] = [None] * len(handlers)

    def run(i: int) -> None:
        try:
            out[i] = handlers[i].next_rendezvous()
        except Exception as exc:  # noqa: BLE001 - asserted by the caller
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(handlers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S + 20)
    return out


def test_survivors_form_the_next_round_without_waiting_for_the_dead_keep_alive(make_handler: Any) -> None:
    handlers = [make_handler() for _ in range(3)]
    infos = _join_all(handlers)
    assert all(not isinstance(i, BaseException) and i.world_size == 3 for i in infos), infos
    joined = round_of(handlers[0])
    assert joined is not None and all(round_of(h) == joined for h in handlers)
    dead = next(i for i, info in enumerate(infos) if info.rank == 2)
    handlers[dead]._stop_heartbeats()  # it stops as a SIGKILLed agent does: no leave, no more keep-alives
    survivors = [h for i, h in enumerate(handlers) if i != dead]

    assert evict(survivors[0], joined + 1, [2]) == []  # a verdict about another round removes nothing
    evicted = evict(survivors[0], joined, [2])
    assert evicted == [str(handlers[dead]._this_node)]
    assert evict(survivors[1], joined, [2]) == []  # the other survivor finds it done

    # The round is over for the survivors in that one write: both wait for the next round, which
    # torch's agent loop sees as nodes waiting (a survivor that missed the verdict restarts too),
    # and the moved round tells that restart from a join's.
    peers = Peers(ElasticConfig(), NullEventLog())
    peers.round = joined
    group = SimpleNamespace(spec=SimpleNamespace(rdzv_handler=survivors[1]))
    deadline = time.monotonic() + 10  # torch's handler serves its state from a 1 s cache
    while nodes_waiting(group) != 2 and time.monotonic() < deadline:  # type: ignore[arg-type]
        time.sleep(0.1)
    assert nodes_waiting(group) == 2  # type: ignore[arg-type]
    assert round_of(survivors[1]) == joined + 1 and peers.round_ended(group)  # type: ignore[arg-type]

    again = _join_all(survivors)  # without the eviction this waits ~180 s for the keep-alive and times out
    assert all(not isinstance(i, BaseException) for i in again), again
    assert sorted(i.rank for i in again) == [0, 1] and {i.world_size for i in again} == {2}
    assert round_of(survivors[0]) == joined + 1


def test_a_handler_without_torchs_dynamic_state_is_left_alone() -> None:
    class Other:
        pass

    assert round_of(Other()) is None
    assert evict(Other(), 0, [1]) == []


def test_survivors_spread_their_rejoin_inside_the_last_call() -> None:
    import random

    from hpresil.elastic.evict import REJOIN_SPREAD_MAX_S, rejoin_delay

    rng = random.Random(0)
    small = [rejoin_delay(3, rng) for _ in range(200)]
    large = [rejoin_delay(2048, rng) for _ in range(200)]
    assert all(0 <= d <= 0.03 for d in small) and max(small) > 0.02
    assert all(0 <= d <= REJOIN_SPREAD_MAX_S < 2 for d in large) and max(large) > 0.9  # 2 s: hpresil-run's last call
