"""Fuzz pass over peer replication (untrusted input): mutated frames against a
live :class:`~hpresil.checkpoint.peer.server.PeerServer`, before and after the HMAC
handshake, mutated replicas offered with ``put``, and damaged replica files
read back over TCP by the peer tier's restore path.

Starting point: a real sealed RAM snapshot, pushed by a real client into the
server's replica store; the frames mutated are the bytes the real client
sends. For every input the server must refuse (an ``error`` answer, a refused
``put``, or a closed connection counted as ``peer_refused``) or serve it
correctly, never die nor hit an unexpected exception (a logged traceback
counts as a failure), and keep serving a good client. A replica the server
accepts, and every damaged replica read back, must restore bit for bit equal
to what was saved, or be refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from datetime import timedelta
from typing import Any, Iterator

import pytest
import torch

from fuzzing import Fuzzer, Tally, deadline, quiet
from hpresil import errors
from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.restore import restore_state
from hpresil.checkpoint.ram.sealer import Sealer
from hpresil.checkpoint.peer import wire
from hpresil.checkpoint.peer.api import FRAME, SECRET_ENV, ReplicatorConfig, peer_dir, replica_root
from hpresil.checkpoint.peer.client import PeerClient
from hpresil.checkpoint.ram.pin import arena_bytes
from hpresil.checkpoint.peer.server import PeerServer
from hpresil.checkpoint.peer.source import PeerSource
from hpresil.testing import RecordingSink

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

SECRET = b"fuzz-secret"
STEP = 5
FAST = dict(host="127.0.0.1", connect_timeout=timedelta(seconds=1), io_timeout=timedelta(seconds=1),
            max_snapshot_bytes=1 << 20, max_header_bytes=1 << 16)


class _Tracebacks(logging.Handler):
    """Collects the server's logged tracebacks: a bug that cost a connection."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 3, generator=g), "b": torch.arange(13, dtype=torch.int16) * seed,
            "odd": torch.rand(3, generator=g).double(), "meta": {"epoch": seed, "tag": f"t{seed}"}}


def _values(state: dict[str, Any]) -> dict[str, Any]:
    return {leaf.key: (bytes(leaf.value.reshape(-1).view(torch.uint8).tolist()) if isinstance(leaf.value, torch.Tensor)
                       else repr(leaf.value)) for leaf in flatten(state).leaves}


class Peer:
    """A live server holding a replica pushed by a real client, plus the frames that client sends."""

    def __init__(self, root: str) -> None:
        self.src, self.shm = os.path.join(root, "src"), os.path.join(root, "srv")
        for d in (self.src, self.shm):
            os.makedirs(d)
        state = _state(STEP)
        writer = RamWriter(self.src, 0, slots=2, run_id="job")
        writer.save(STEP, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1)
        writer.close()
        assert Sealer(shm_dir=self.src).flush(timedelta(seconds=5))
        self.saved = _values(state)
        self.info = scan(self.src)[0]
        self.sink = RecordingSink()
        self.server = PeerServer(self.shm, lambda: SECRET, ReplicatorConfig(**FAST), self.sink, node="srv")  # type: ignore[arg-type]
        self.port = self.server.start()[1]
        os.makedirs(peer_dir(self.shm))  # what the replicator publishes for the node's restoring ranks
        with open(os.path.join(peer_dir(self.shm), "node.json"), "w") as f:
            json.dump({"node": "srv", "host": "127.0.0.1", "port": self.port, "attempt": 0}, f)
        assert self.client().put(self.src, self.info) == "sent"
        self.replica = {p: open(p, "rb").read() for p in self._replica_files()}
        for via in ("peer", "ram"):
            assert self.restore_from_replicas(via, "unmodified") == ("accepted", via), via
        record = open(self.info.path(self.src, "json")).read()
        seal = open(self.info.path(self.src, "seal.json")).read()
        self.nbytes = arena_bytes(self.info.load_record(self.src))
        self.arena = open(self.info.path(self.src, "bin"), "rb").read()[: self.nbytes]
        self.commit_id = self.info.record.commit_id
        self.put = {"op": "put", "rank": 0, "record": record, "seal": seal, "nbytes": self.nbytes}

    def _replica_files(self) -> list[str]:
        base = os.path.join(replica_root(self.shm), "ckpt", "rank0")
        return sorted(os.path.join(base, n) for n in os.listdir(base))

    def client(self) -> PeerClient:
        return PeerClient("127.0.0.1", self.port, SECRET, "fuzz", connect_timeout=timedelta(seconds=1),
                          io_timeout=timedelta(seconds=1))

    def reset_replicas(self) -> None:
        shutil.rmtree(replica_root(self.shm), ignore_errors=True)
        for path, data in self.replica.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def still_serving(self) -> None:
        client = self.client()
        try:
            held = client.list()
        finally:
            client.close()
        assert any(h[3] == self.commit_id for h in held), held

    def restore_from_replicas(self, via: str, what: str) -> tuple[str, str]:
        """Restores a fresh state from the replica store: over TCP (``peer``) or from its files (``ram``)."""
        state = _state(99)
        fresh = _values(state)
        if via == "peer":  # a rank of this node whose own RAM is gone reads the replica over TCP
            src: Any = PeerSource(self.shm, rank=0, world_size=1, io_timeout=timedelta(seconds=1),
                                  ready_timeout=timedelta(seconds=1))
        else:
            src = RamSource(replica_root(self.shm))
        try:
            with deadline(10, what):
                result = restore_state(state, [src], events=RecordingSink())
        except errors.HpresilError as exc:
            if type(exc) is errors.CheckpointError and "failed on rank" in str(exc):
                raise AssertionError(f"unexpected error restoring after [{what}]: {exc}") from exc
            return "rejected", type(exc).__name__  # raised: nothing is passed off as restored
        got = _values(state)
        if result is None:
            return ("rejected", "none") if got == fresh else ("silent", f"{what}: nothing restored, state changed")
        return ("accepted", result.tier) if got == self.saved else ("silent", f"{what}: restored state differs")


def _frame(header: dict[str, Any] | str, payload: bytes = b"") -> bytes:
    data = header.encode() if isinstance(header, str) else json.dumps(header, separators=(",", ":")).encode()
    return FRAME.pack(b"HPRP", 1, 0, 0, len(data), len(payload)) + data + payload


def _exchange(sock: socket.socket, data: bytes, done: bool = True, most: int = 8) -> list[dict[str, Any]]:
    """Sends ``data`` (``done``: and nothing more) and reads the server's answers
    until it closes, ``most`` answers came, or it goes quiet."""
    answers: list[dict[str, Any]] = []
    try:
        sock.sendall(data)
        if done:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(1.0)
        while len(answers) < most:
            header, plen = wire.read_frame(sock, 1 << 20, 1 << 20)
            if header["op"] == "eof":
                break
            wire.skip(sock, plen)
            answers.append(header)
    except (OSError, errors.StorageError):  # closed (refused) or quiet (waiting for more)
        pass
    return answers


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with pytest.MonkeyPatch.context() as mp, quiet():
        mp.setenv(SECRET_ENV, SECRET.decode())  # the restoring ranks' secret
        p = Peer(str(tmp_path_factory.mktemp("fuzz-peer")))
    yield p
    p.server.stop()


@pytest.fixture(autouse=True)
def _watch(peer: Peer, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Tracebacks]:
    """Quiet logs, except the server's tracebacks, which fail the test."""
    monkeypatch.setenv(SECRET_ENV, SECRET.decode())
    handler = _Tracebacks()
    server_log = logging.getLogger("hpresil.checkpoint.peer.server")
    old = server_log.level
    server_log.addHandler(handler)
    try:
        with quiet():
            server_log.setLevel(logging.ERROR)
            yield handler
    finally:
        server_log.removeHandler(handler)
        server_log.setLevel(old)
    assert not handler.records, [r.getMessage() for r in handler.records[:3]]
    peer.still_serving()


def _wait_refused(peer: Peer, want: int) -> None:
    with deadline(5, f"waiting for {want} refusals"):
        while peer.server.refused < want:
            pass


def test_fuzz_frames_before_authentication(peer: Peer) -> None:
    """The first frame of a connection (``hello``), mutated, truncated, or random bytes."""
    tally = Tally("peer frames before authentication")
    hello = {"op": "hello", "node": "fuzz", "nonce": "%064x" % 0x5EED}
    frame = _frame(hello)
    fz = Fuzzer(31)
    inputs = [*fz.byte_mutants(frame, 250), *Fuzzer.truncations(frame),
              *((w, _frame(t)) for w, t in fz.json_mutants(hello, 200)),
              *((f"{n} random bytes", bytes(fz.rng.randrange(256) for _ in range(n))) for n in (1, 7, 20, 21, 300, 5000)),
              ("1020 nested arrays (within the 1 KiB limit)", _frame("[" * 1020))]
    refused = peer.server.refused
    for i, (what, data) in enumerate(inputs):
        with deadline(5, what), socket.create_connection(("127.0.0.1", peer.port), timeout=1) as sock:
            answers = _exchange(sock, data)  # and nothing more: a valid hello then fails authentication
        ops = [a["op"] for a in answers]
        assert ops in ([], ["challenge"], ["challenge", "error"], ["error"]), (what, answers)
        # a hello that is still valid is answered; the connection then fails authentication
        tally.add("accepted" if "challenge" in ops else "rejected", "hello answered" if ops else "closed")
        if i % 50 == 0:
            peer.still_serving()
    _wait_refused(peer, refused + len(inputs))  # every connection that did not authenticate was refused and reported
    assert peer.sink.named("peer_refused")
    tally.check(500)


def test_fuzz_requests_after_authentication(peer: Peer) -> None:
    """``list``/``get``/``read`` requests of an authenticated client, mutated."""
    tally = Tally("peer requests after authentication")
    requests = [{"op": "list"}, {"op": "get", "items": [[0, peer.commit_id]]},
                {"op": "read", "rank": 0, "commit_id": peer.commit_id, "ranges": [[0, 64], [64, 128]]}]
    fz = Fuzzer(32)
    inputs: list[tuple[str, bytes]] = []
    for req in requests:
        frame = _frame(req)
        inputs += [*fz.byte_mutants(frame, 60), *Fuzzer.truncations(frame, 25),
                   *((w, _frame(t)) for w, t in fz.json_mutants(req, 80))]
    for i, (what, data) in enumerate(inputs):
        client = peer.client()
        try:
            with deadline(5, what):
                answers = _exchange(client.connect(), data)
        finally:
            client.close()
        ops = [a["op"] for a in answers]
        assert len(ops) <= 1 and set(ops) <= {"list", "get", "read", "error"}, (what, answers)
        if ops and ops[0] == "get":  # an answer for another item must not pass the client's checks
            assert all(r is None or json.loads(r)["commit_id"] == peer.commit_id for r in answers[0]["records"]), what
        tally.add("accepted" if ops and ops[0] != "error" else "rejected", ops[0] if ops else "closed")
        if i % 50 == 0:
            peer.still_serving()
    tally.check(450)


def test_fuzz_put_of_a_mutated_replica(peer: Peer) -> None:
    """``put`` offers with a mutated header (record, seal, sizes) or arena bytes;
    whatever the server stores must restore equal to what was saved."""
    tally = Tally("peer put")
    fz = Fuzzer(33)
    header = peer.put
    inputs: list[tuple[str, dict[str, Any] | str, bytes]] = []
    inputs += [(w, t, peer.arena) for w, t in fz.json_mutants(header, 100)]
    for field in ("record", "seal"):  # inside the JSON strings the header carries
        inputs += [(f"{field}: {w}", {**header, field: t}, peer.arena) for w, t in fz.json_mutants(json.loads(header[field]), 80)]
        inputs += [(f"{field}: {w}", {**header, field: t.decode("utf-8", "replace")}, peer.arena)
                   for w, t in fz.byte_mutants(header[field].encode(), 40)]
    flips = [(w, d) for w, d in fz.byte_mutants(peer.arena, 60) if len(d) == len(peer.arena)]
    inputs += [(f"arena: {w}", header, d) for w, d in flips]
    try:
        for what, head, payload in inputs:
            shutil.rmtree(replica_root(peer.shm), ignore_errors=True)  # else the server answers "have"
            client = peer.client()
            try:
                with deadline(5, what):
                    sock = client.connect()
                    answers = _exchange(sock, _frame(head), done=False, most=1)
                    if answers and answers[0].get("accept") is True:
                        answers += _exchange(sock, _frame({"op": "data"}, payload), done=False, most=1)
            finally:
                client.close()
            ops = [(a["op"], a.get("accept", a.get("ok"))) for a in answers]
            if ops == [("put", True), ("put_done", True)]:
                outcome, how = peer.restore_from_replicas("ram", what)
                tally.add(outcome, f"stored, then {how}")
            else:
                assert ops in ([], [("error", None)], [("put", False)], [("put", True)], [("put", True), ("put_done", False)]), (what, ops)
                assert not [i for i in scan(replica_root(peer.shm)) if i.seal is not None], f"{what}: refused but stored"
                tally.add("rejected", "refused")
    finally:
        peer.reset_replicas()
    tally.check(350)


def test_fuzz_replica_files_read_back_over_tcp(peer: Peer) -> None:
    """The replica's record, seal and arena damaged on the holder's disk, then a
    rank restores from the peer tier over TCP (the server's get/read, the client's checks)."""
    tally = Tally("peer replica files")
    fz = Fuzzer(34)
    try:
        for path, original in peer.replica.items():
            inputs = list(fz.byte_mutants(original, 40)) + list(Fuzzer.truncations(original, 15))
            if path.endswith(".json"):
                inputs += [(w, t.encode()) for w, t in fz.json_mutants(json.loads(original), 40)]
            for what, data in inputs:
                with open(path, "wb") as f:
                    f.write(data)
                outcome, how = peer.restore_from_replicas("peer", f"{os.path.basename(path)}: {what}")
                tally.add(outcome, how)
            peer.reset_replicas()
    finally:
        peer.reset_replicas()
    tally.check(220)
