"""torch's rendezvous made cheaper at scale: the event names from a frame walk
give exactly torch's names, and a lost compare-and-set backs off and answers
with the state as it is after the wait. Real torch handlers and backends on a
real TCPStore."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any, Iterator

import pytest

from _launch import free_port
from hpresil.elastic import torch_rdzv
from hpresil.elastic.torch_rdzv import BackoffBackend, method_name


@pytest.fixture
def torch_naming(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch's own ``get_method_name``, restored after the test."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    original = dynamic_rendezvous.get_method_name
    monkeypatch.setattr(dynamic_rendezvous, "get_method_name", original)
    return original


def test_method_name_is_torchs_name_at_every_depth(torch_naming: Any) -> None:
    def nest(levels: int, depth: int) -> tuple[str, str]:
        if levels:
            return nest(levels - 1, depth)
        return method_name(depth), torch_naming(depth)

    for depth in (0, 1, 2, 3, 5):
        fast, torchs = nest(4, depth)
        # depth 0 names the helper itself, which differs by construction
        assert fast == torchs or depth == 0, (depth, fast, torchs)
    fast, torchs = nest(0, 10_000)
    assert fast == torchs == "no_method_name"


def test_install_points_torch_at_the_frame_walk_and_keeps_its_events(torch_naming: Any) -> None:
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    assert torch_rdzv.install() and torch_rdzv.install()  # idempotent
    assert dynamic_rendezvous.get_method_name is method_name

    class Recorder:
        def _record(self) -> str:  # torch's _record calls it with the default depth
            return dynamic_rendezvous.get_method_name()

        def _add_to_participants(self) -> str:
            return self._record()

    assert Recorder()._add_to_participants() == "_add_to_participants"


@pytest.fixture
def c10d_backends() -> Iterator[Any]:
    """A factory of torch's c10d rendezvous backends of one run on a fresh TCPStore."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))

    def make() -> Any:
        return C10dRendezvousBackend(TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30)), "bk")

    yield make
    del server


def test_a_lost_compare_and_set_backs_off_and_answers_with_the_state_after_the_wait(c10d_backends: Any) -> None:
    first = BackoffBackend(c10d_backends(), base_s=0.01, cap_s=0.04, rng=random.Random(1))
    second = BackoffBackend(c10d_backends(), base_s=0.01, cap_s=0.04, rng=random.Random(2))
    assert first.name == "c10d"
    state, token, won = first.set_state(b"v1")
    assert won and state == b"v1" and first.lost == 0
    _, stale_token = second.get_state()

    assert first.set_state(b"v2", token)[2]
    got = second.set_state(b"second", stale_token)  # its token is one write behind: it loses
    assert got is not None and got[0] == b"v2" and got[2] is False
    assert second.lost == 1 and 0 <= second.waited_s <= 0.01

    got = second.set_state(b"second", stale_token)  # loses again: the window doubled
    assert got is not None and got[2] is False and second.lost == 2 and second.waited_s <= 0.01 + 0.02
    assert 0 < second.write_s < 0.01  # a loopback TCPStore writes in well under the base window
    assert [second.window(n) for n in (1, 2, 3, 4, 50)] == [0.01, 0.02, 0.04, 0.04, 0.04]
    second.write_s = 0.015  # a slower store (etcd's raft) widens the window from its own write time
    assert [second.window(n) for n in (1, 2, 3)] == [0.015, 0.03, 0.04]
    second.write_s = 0.0

    # the state the loser got back carries the token that now wins
    state, token, won = second.set_state(b"second", got[1])
    assert won and state == b"second"
    assert second.get_state()[0] == b"second"


def test_backoff_rejects_a_window_that_cannot_grow() -> None:
    with pytest.raises(ValueError, match="base_s"):
        BackoffBackend(object(), base_s=0.0)
    with pytest.raises(ValueError, match="cap_s"):
        BackoffBackend(object(), base_s=0.5, cap_s=0.1)


def test_c10d_handlers_with_backoff_complete_a_contended_rendezvous() -> None:
    """Eight handlers built as hpresil-run builds them join one round at once."""
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    n = 8
    handlers = [torch_rdzv.c10d_handler(RendezvousParameters(
        backend="c10d", endpoint=f"127.0.0.1:{port}", run_id="contended", min_nodes=n, max_nodes=n,
        join_timeout="60", last_call_timeout="1")) for _ in range(n)]
    assert all(isinstance(h._state_holder._backend, BackoffBackend) for h in handlers)
    out: list[Any] = [None] * n

    def join(i: int) -> None:
        try:
            out[i] = handlers[i].next_rendezvous()
        except Exception as exc:  # noqa: BLE001 - asserted below
            out[i] = exc

    threads = [threading.Thread(target=join, args=(i,), daemon=True) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert all(not isinstance(o, BaseException) and o is not None for o in out), out
        assert sorted(o.rank for o in out) == list(range(n)) and {o.world_size for o in out} == {n}
    finally:
        for h in handlers:
            h._stop_heartbeats()
        del server
