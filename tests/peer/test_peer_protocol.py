"""Peer replication: placement, the frame codec against a live server (garbage,
truncated, oversized, wrong secret), replication between two in-process node
services over loopback, and restoring a lost rank from a peer replica."""

from __future__ import annotations

import collections
import os
import random
import socket
import struct
import time
from datetime import timedelta
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist

from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.checkpoint.ram.sealer import Sealer
from hpresil.checkpoint.api import CommitRecord, Seal
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.restore import restore_state
from hpresil.errors import StorageError
from hpresil.checkpoint.peer import wire
from hpresil.checkpoint.peer.api import FRAME, MAGIC, VERSION, AuthError, ReplicatorConfig, replica_root
from hpresil.checkpoint.peer.client import PeerClient
from hpresil.checkpoint.peer.placement import plan
from hpresil.checkpoint.peer.replicator import Replicator
from hpresil.checkpoint.peer.server import PeerServer
from hpresil.checkpoint.peer.source import PeerSource
from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo
from hpresil.testing import RecordingSink

SECRET = b"s3cret-for-tests"
FAST = dict(host="127.0.0.1", connect_timeout=timedelta(seconds=1), io_timeout=timedelta(seconds=2),
            scan_interval=timedelta(milliseconds=20), backoff_initial=timedelta(milliseconds=50),
            backoff_max=timedelta(milliseconds=200), discovery_timeout=timedelta(seconds=5))


# -- placement -------------------------------------------------------------------------------

def _check_plan(nodes: int, r: int, domains: list[str | None] | None) -> list[list[int]]:
    peers = plan(nodes, r, domains)
    want = min(r, nodes - 1)
    received = collections.Counter(p for ps in peers for p in ps)
    for g, ps in enumerate(peers):
        assert len(ps) == want and len(set(ps)) == want and g not in ps
    assert all(received[g] == want for g in range(nodes)) if want else not received
    return peers


@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_placement_small(nodes: int) -> None:
    peers = _check_plan(nodes, 1, None)
    if nodes == 2:
        assert peers == [[1], [0]]
    _check_plan(nodes, 2, None)  # capped at nodes - 1
    _check_plan(nodes, 1, ["a"] * nodes)


def test_placement_prefers_other_domains_and_stays_balanced_at_2048() -> None:
    rng = random.Random(4)
    domains: list[str | None] = []
    rack = 0
    while len(domains) < 2048:  # NVL72-like racks of 18 trays, some partly filled
        domains += [f"rack{rack:03d}"] * min(rng.randint(5, 18), 2048 - len(domains))
        rack += 1
    rng.shuffle(domains)
    for r in (1, 2, 3):
        peers = _check_plan(2048, r, domains)
        assert all(domains[p] != domains[g] for g, ps in enumerate(peers) for p in ps)
    peers = _check_plan(2048, 2, None)
    assert max(collections.Counter(p for ps in peers for p in ps).values()) == 2


def test_placement_uneven_domains() -> None:
    # 3 nodes in one rack, 1 alone: balance wins, as many replicas as possible leave their rack
    domains = ["a", "a", "b", "a"]
    peers = _check_plan(4, 1, domains)
    assert sum(domains[p[0]] != domains[g] for g, p in enumerate(peers)) == 2
    domains2: list[str | None] = ["x", None, "x", None, "y"]  # unknown labels are domains of their own
    peers = _check_plan(5, 2, domains2)
    assert all(domains2[p] is None or domains2[p] != domains2[g] for g, ps in enumerate(peers) for p in ps[:1])


# -- a server and its clients -----------------------------------------------------------------

def _snapshot(shm: str, step: int, rank: int = 0, seed: int = 0, world_size: int = 2) -> dict[str, torch.Tensor]:
    """A sealed RAM snapshot of ``rank`` at ``step`` in ``shm``; returns the state saved."""
    torch.manual_seed(seed + step)
    state = {"w": torch.randn(1000, 37), "b": torch.arange(13, dtype=torch.int16), "odd": torch.rand(3), "epoch": step}
    writer = RamWriter(shm, rank, slots=3, run_id="job")
    writer.save(step, flatten(state).leaves, world_size=world_size, durable=False, durable_url=None, keep=1)
    writer.close()
    assert Sealer(shm_dir=shm).flush(timedelta(seconds=5))
    return {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[PeerServer, RecordingSink, str]]:
    shm = str(tmp_path / "srv")
    os.makedirs(shm)
    sink = RecordingSink()
    srv = PeerServer(shm, lambda: SECRET, ReplicatorConfig(**FAST, max_snapshot_bytes=1 << 20), sink, node="srv")
    srv.start()
    yield srv, sink, shm
    srv.stop()


def _client(srv: PeerServer, secret: bytes = SECRET) -> PeerClient:
    return PeerClient("127.0.0.1", srv.address[1], secret, "test", connect_timeout=timedelta(seconds=1),
                      io_timeout=timedelta(seconds=2))


def _raw(srv: PeerServer, data: bytes) -> bytes:
    """Sends raw bytes, returns what the server answered before closing."""
    with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=2) as s:
        out = b""
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                out += chunk
        except (ConnectionResetError, BrokenPipeError, OSError):  # closed with our bytes unread
            pass
    return out


def test_garbage_truncated_oversized_and_bad_secret_are_refused(server, tmp_path) -> None:
    srv, sink, _ = server
    cases = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # garbage
        FRAME.pack(MAGIC, VERSION, 0, 0, 100, 0) + b'{"op":',  # truncated header
        FRAME.pack(MAGIC, VERSION, 0, 0, 10**9, 0),  # oversized header before auth
        FRAME.pack(MAGIC, VERSION, 0, 0, 2, 1 << 40) + b"{}",  # payload before auth
        FRAME.pack(MAGIC, 99, 0, 0, 2, 0) + b"{}",  # unknown version
        FRAME.pack(MAGIC, VERSION, 0, 0, 4, 0) + b"\xff\xfe[]",  # not JSON
        os.urandom(5000),
    ]
    for data in cases:
        assert _raw(srv, data) == b""  # closed without an answer
    with pytest.raises(AuthError):
        _client(srv, b"wrong secret").list()
    _wait(lambda: srv.refused == len(cases) + 1)
    reasons = [e["reason"] for e in sink.named("peer_refused")]
    assert len(reasons) == len(cases) + 1 and "failed authentication" in reasons[-1]
    # ...and the server still serves a good client
    assert _client(srv).list() == []


def test_client_refuses_a_server_without_the_secret(tmp_path) -> None:
    srv = PeerServer(str(tmp_path), lambda: b"other", ReplicatorConfig(**FAST))
    srv.start()
    try:
        with pytest.raises(AuthError, match="does not know"):
            _client(srv).list()
    finally:
        srv.stop()


def test_put_verifies_checksums_and_keeps_the_last_good_replica(server, tmp_path) -> None:
    srv, sink, shm = server
    src = str(tmp_path / "src")
    _snapshot(src, 1)
    info1 = scan(src)[0]
    client = _client(srv)
    assert client.put(src, info1) == "sent"
    assert client.put(src, info1) == "have"
    # a peer that sends bytes not matching the seal: refused, nothing committed
    _snapshot(src, 2)
    info2 = max(scan(src), key=lambda i: i.record.step)
    sock = client.connect()
    record = CommitRecord.from_json(open(info2.path(src, "json")).read())
    seal = Seal.from_json(open(info2.path(src, "seal.json")).read())
    nbytes = max(e.offset + e.nbytes for e in record.entries if e.kind == "tensor")
    wire.send_frame(sock, {"op": "put", "rank": 0, "record": record.to_json(), "seal": seal.to_json(), "nbytes": nbytes})
    assert wire.expect(sock, "put", 1 << 20)[0]["accept"]
    wire.send_frame(sock, {"op": "data"}, os.urandom(nbytes))
    done, _ = wire.expect(sock, "put_done", 1 << 20)
    assert not done["ok"] and "checksum" in done["error"]
    assert sink.named("integrity_failed")
    held = [i.record.step for i in scan(replica_root(shm))]
    assert held == [1]
    # oversized and inconsistent puts are refused with a reason; the connection stays usable
    wire.send_frame(sock, {"op": "put", "rank": 0, "record": record.to_json(), "seal": seal.to_json(), "nbytes": 1 << 30})
    assert "over the limit" in wire.expect(sock, "put", 1 << 20)[0]["reason"]
    wire.send_frame(sock, {"op": "put", "rank": 3, "record": record.to_json(), "seal": seal.to_json(), "nbytes": nbytes})
    assert "does not match" in wire.expect(sock, "put", 1 << 20)[0]["reason"]
    assert client.put(src, info2) == "sent"
    assert sorted(i.record.step for i in scan(replica_root(shm))) == [1, 2]
    _snapshot(src, 3)
    assert client.put(src, max(scan(src), key=lambda i: i.record.step)) == "sent"
    assert sorted(i.record.step for i in scan(replica_root(shm))) == [2, 3]  # newest two per rank
    client.close()


# -- two node services over loopback ---------------------------------------------------------

def _node(tmp_path, name: str, group_rank: int, store: Any, sink: RecordingSink, **cfg: Any) -> Replicator:
    shm = str(tmp_path / name)
    os.makedirs(shm, exist_ok=True)
    rep = Replicator(ReplicatorConfig(**{**FAST, **cfg}))
    rep.start(RuntimeContext(run_id="job", node_id=name, shm_dir=shm, log_dir=str(tmp_path), events=sink))
    rep.on_workers_started(WorkerGroupInfo(attempt=0, group_rank=group_rank, group_world_size=2, world_size=2,
                                           global_ranks=(group_rank,), pids=(0,), store=store))
    return rep


def _wait(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _ticking(*reps: Replicator) -> Any:
    def tick() -> bool:
        for r in reps:
            r.tick()
        return False
    return tick


def test_replication_between_two_nodes_and_restore_of_a_lost_rank(tmp_path, monkeypatch) -> None:
    store = dist.PrefixStore("round0", dist.HashStore())
    sink_a, sink_b = RecordingSink(), RecordingSink()
    a = _node(tmp_path, "nodeA", 0, store, sink_a)
    b = _node(tmp_path, "nodeB", 1, store, sink_b)
    try:
        saved = _snapshot(a.shm_dir, 5, rank=0)
        _snapshot(b.shm_dir, 5, rank=1, seed=100)

        def both() -> bool:
            _ticking(a, b)()
            return bool(sink_a.named("checkpoint_replicated")) and bool(sink_b.named("checkpoint_replicated"))
        _wait(both)
        ev = sink_a.named("checkpoint_replicated")[0]
        assert (ev["rank"], ev["step"], ev["peer"]) == (0, 5, "nodeB")
        assert a.secret() == b.secret() and os.stat(os.path.join(a.shm_dir, "peer", "secret")).st_mode & 0o077 == 0

        # node A is lost: rank 0 restores on node B from B's replica of it, over TCP
        monkeypatch.setenv("HPRESIL_ATTEMPT", "0")
        state: dict[str, Any] = {k: torch.zeros_like(v) for k, v in saved.items()}
        state["epoch"] = 0
        sink = RecordingSink()
        peer = PeerSource(b.shm_dir, rank=0, world_size=2, ready_timeout=timedelta(seconds=2))
        res = restore_state(state, [RamSource(b.shm_dir), peer], events=sink)
        assert res is not None and (res.step, res.tier) == (5, "peer")
        assert all(torch.equal(state[k], saved[k]) for k in saved) and state["epoch"] == 5

        # a holder that went away: the peer tier fails over to durable-style fallback (StorageError)
        b.server.stop()  # type: ignore[union-attr]
        peer2 = PeerSource(b.shm_dir, rank=0, world_size=2, ready_timeout=timedelta(seconds=2))
        with pytest.raises(StorageError):
            peer2.pool([peer2.share()])
            peer2.records(5)
        peer2.close()
    finally:
        a.stop(timedelta(seconds=2))
        b.stop(timedelta(seconds=2))


def test_dead_peer_degrades_then_replication_resumes(tmp_path) -> None:
    store = dist.PrefixStore("round0", dist.HashStore())
    sink_a, sink_b = RecordingSink(), RecordingSink()
    a = _node(tmp_path, "nodeA", 0, store, sink_a)
    b = _node(tmp_path, "nodeB", 1, store, sink_b)
    try:
        _wait(lambda: _ticking(a)() or a._senders)
        port = b.port
        b.server.stop()  # type: ignore[union-attr]   the peer dies
        _snapshot(a.shm_dir, 1, rank=0)
        _wait(lambda: _ticking(a)() or len(sink_a.named("tier_degraded")) >= 2)
        assert sink_a.named("tier_degraded")[0]["tier"] == "peer"
        assert not sink_a.named("checkpoint_replicated")
        # it comes back on the same address: the pending snapshot goes through
        b.server = PeerServer(b.shm_dir, b.secret, ReplicatorConfig(**{**FAST, "port": port}), sink_b, node="nodeB")
        b.server.start()
        _wait(lambda: _ticking(a)() or bool(sink_a.named("checkpoint_replicated")))
        assert sink_a.named("checkpoint_replicated")[0]["recovered"] is True
    finally:
        a.stop(timedelta(seconds=2))
        b.stop(timedelta(seconds=2))


def test_pool_offers_only_the_live_timeline() -> None:
    src = PeerSource("/nonexistent", rank=1, world_size=2)
    node_a = {"node": "a", "host": "h", "port": 1,
              "held": [[0, 7, 2, "c0", 200.0, "new", "ok"], [1, 7, 2, "old1", 100.0, "old", "ok"]]}
    node_b = {"node": "b", "host": "g", "port": 2,
              "held": [[1, 6, 2, "c1", 150.0, "new", "ok"], [0, 6, 2, "c2", 150.0, "new", "ok"]]}
    node_c = {"node": "c", "host": "f", "port": 3, "held": [[1, 7, 2, "c3", 201.0, "new", "poisoned"]]}
    src.pool([node_a, None, node_b, node_c])
    refs = {(r.step, r.world_size): (set(r.ranks), r.health) for r in src.steps()}
    # step 7's copy of rank 1 on node c was found poisoned: the whole step is, wherever it is held
    assert refs == {(7, 2): ({0, 1}, "poisoned"), (6, 2): ({0, 1}, "ok")}


def test_frame_limits_after_auth(server) -> None:
    srv, sink, _ = server
    client = _client(srv)
    sock = client.connect()
    sock.sendall(struct.pack("!4sBBHIQ", MAGIC, VERSION, 0, 0, (64 << 20) + 1, 0))
    assert sock.recv(10) == b""  # closed
    assert "exceeds the limit" in sink.named("peer_refused")[-1]["reason"]
    assert _client(srv).list() == []


# -- hostile traffic ----------------------------------------------------------------------------

def _drip(port: int, stop: Any, cut: list[float], started: float) -> None:
    """One attacker: connects and sends one byte of a valid-looking hello every 2-3 s, for as long
    as the server lets it; records when the server cut it."""
    hello = FRAME.pack(MAGIC, VERSION, 0, 0, 40, 0) + b'{"op":"hello","node":"drip","nonce":"00"}'
    rng = random.Random(port + len(cut))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for byte in hello:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(rng.uniform(2.0, 3.0))
            try:
                if s.recv(1) == b"":  # closed by the server
                    break
            except socket.timeout:
                if stop.is_set():
                    return
                continue
            except OSError:
                break
        cut.append(time.monotonic() - started)


@pytest.mark.slow
def test_slow_drip_flood_never_locks_out_an_authenticated_peer(tmp_path) -> None:
    """40 connections that drip a byte every 2-3 s: each is cut within the handshake bound
    (``connect_timeout``) and reported, and a legitimate peer replicates throughout."""
    import threading

    shm, src = str(tmp_path / "srv"), str(tmp_path / "src")
    os.makedirs(shm)
    sink = RecordingSink()
    cfg = ReplicatorConfig(host="127.0.0.1", connect_timeout=timedelta(seconds=2), io_timeout=timedelta(seconds=5),
                           max_connections=4, max_handshakes=8)
    srv = PeerServer(shm, lambda: SECRET, cfg, sink, node="srv")
    srv.start()
    stop = threading.Event()
    cut: list[float] = []
    started = time.monotonic()
    attackers = [threading.Thread(target=_drip, args=(srv.address[1], stop, cut, started), daemon=True) for _ in range(40)]
    try:
        for t in attackers:
            t.start()
        sent = []
        for step in range(1, 9):  # a legitimate peer keeps replicating while the flood goes on
            _snapshot(src, step)
            info = max(scan(src, [0]), key=lambda i: i.record.step)
            client = _client(srv)
            sent.append(client.put(src, info))
            client.close()
            time.sleep(0.5)
        assert sent == ["sent"] * 8
        for t in attackers:
            t.join(15)
        assert len(cut) == 40, "every slow connection is cut by the server"
        kinds = collections.Counter(e["kind"] for e in sink.named("peer_refused"))
        assert kinds["flood"] >= 20  # 40 at once: the oldest made room for new ones (20 reported a minute)
        # fewer than max_handshakes: each is cut by the bound on the whole handshake
        cut.clear()
        before = len(sink.named("peer_refused"))
        started = time.monotonic()
        slow = [threading.Thread(target=_drip, args=(srv.address[1], stop, cut, started), daemon=True) for _ in range(3)]
        for t in slow:
            t.start()
        for t in slow:
            t.join(15)
        assert len(cut) == 3 and all(c < 10 for c in cut)  # the drip would take ~100 s: cut at the 2 s bound
        slow_reasons = [e["reason"] for e in sink.named("peer_refused")[before:] if e["kind"] == "slow"]
        assert len(slow_reasons) == 3 and all("did not authenticate within 2s" in r for r in slow_reasons)
        assert srv.refused >= 43
    finally:
        stop.set()
        srv.stop()


def test_malformed_put_of_an_authenticated_peer_is_answered_and_reported(server) -> None:
    srv, sink, _ = server
    client = _client(srv)
    sock = client.connect()
    wire.send_frame(sock, {"op": "put", "rank": 0, "record": "{}", "seal": "{}", "nbytes": 0})
    reply, _ = wire.expect(sock, "put", 1 << 20)
    assert reply["accept"] is False and "malformed put" in reply["reason"]
    (ev,) = sink.named("peer_refused")
    assert ev["peer"] == "test" and "malformed put" in ev["reason"]
    assert client.list() == []  # the connection stays usable
    client.close()
