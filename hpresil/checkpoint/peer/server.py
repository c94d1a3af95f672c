"""The peer server: receives replicas and serves snapshots to restoring ranks.

One thread per connection. A new connection first has to authenticate (the
HMAC handshake, tiny frame limits) within ``connect_timeout`` in all, however
slowly its bytes drip in; at most ``max_handshakes`` connections handshake at
once, and a new one makes room by dropping the oldest. Only an authenticated
connection takes one of the ``max_connections`` slots, so a flood of
unauthenticated sockets can delay a peer by one handshake at most and never
takes its slot. A client that sends garbage, truncates a frame, exceeds a
limit, is too slow to authenticate or does not know the job secret is logged,
reported as a ``peer_refused`` event and disconnected, and the server goes on
serving the next client. Nothing received is ever unpickled: headers are JSON, payloads
are bytes that land in a replica slot and are checked against the seal.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

from hpresil.checkpoint.api import CommitRecord, Seal, record_digest
from hpresil.errors import HpresilError, StorageError
from hpresil.events import NullEventLog
from hpresil.events.api import EventSink
from hpresil.checkpoint.peer import wire
from hpresil.checkpoint.peer.api import AuthError, FrameError, ReplicatorConfig
from hpresil.checkpoint.peer.replicas import Incoming, ReplicaStore, validate

__all__ = ["PeerServer"]

log = logging.getLogger(__name__)


class PeerServer:
    """Serves one node's replicas and RAM snapshots over TCP.

    Args:
        shm_dir: the job's shared-memory directory on this node.
        secret: returns the job secret, or ``None`` while it is not known
            (connections are then refused as not ready).
        config: limits and timeouts (``host``/``port`` are where it binds).
        events: where ``peer_refused`` and ``replica_received`` go.
        node: this node's id (for logs).
    """

    def __init__(
        self,
        shm_dir: str,
        secret: Callable[[], bytes | None],
        config: ReplicatorConfig | None = None,
        events: EventSink | None = None,
        node: str = "",
    ) -> None:
        self.config = config or ReplicatorConfig()
        self.secret = secret
        self.events: EventSink = events or NullEventLog()
        self.node = node
        self.store = ReplicaStore(shm_dir, self.config.slots, self.config.max_snapshot_bytes)
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(self.config.max_connections)
        self._conns: set[socket.socket] = set()
        # connections still authenticating -> (accepted at, remote address), oldest first
        self._pending: dict[socket.socket, tuple[float, Any]] = {}
        # why the server cut a pending connection (kind, reason), for the serving thread's refusal
        self._cut: dict[socket.socket, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._refusals: dict[str, list[float]] = {}  # kind -> times reported in the last minute
        self._suppressed: dict[str, int] = {}  # kind -> refusals not reported since
        #: connections and requests refused so far (tests and metrics)
        self.refused = 0

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` it listens on (host as bound)."""
        assert self._sock is not None, "start() first"
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> tuple[str, int]:
        """Binds, listens and starts accepting; returns the bound address.

        Raises:
            OSError: the address cannot be bound.
        """
        sock = socket.create_server((self.config.host or "", self.config.port), backlog=128, reuse_port=False)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="hpresil-peer-server", daemon=True)
        self._thread.start()
        log.info("peer server of %s listening on %s:%d", self.node, *self.address)
        return self.address

    def stop(self) -> None:
        """Stops accepting and closes every connection."""
        self._stopping = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            for conn in list(self._conns):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.25)  # wake up to cut handshakes that overran their bound
        while not self._stopping:
            self._cut_overdue()
            try:
                conn, addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping:
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            conn.settimeout(None)
            with self._lock:
                if len(self._pending) >= self.config.max_handshakes:
                    oldest = next(iter(self._pending))
                    self._cut_locked(oldest, "flood", f"{len(self._pending)} connections were authenticating at "
                                                      f"once (max_handshakes); dropped the oldest for a new one")
                self._pending[conn] = (time.monotonic(), addr)
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, addr), name="hpresil-peer-conn", daemon=True).start()

    def _too_slow(self) -> tuple[str, str]:
        """(kind, reason) of a connection that did not authenticate within the handshake bound."""
        return "slow", f"did not authenticate within {self.config.connect_timeout.total_seconds():g}s (connect_timeout)"

    def _cut_overdue(self) -> None:
        bound = self.config.connect_timeout.total_seconds()
        now = time.monotonic()
        with self._lock:
            for conn, (since, _) in list(self._pending.items()):
                if now - since > bound:
                    self._cut_locked(conn, *self._too_slow())

    def _cut_locked(self, conn: socket.socket, kind: str, reason: str) -> None:
        # The serving thread's blocked receive then returns: it refuses with this reason.
        self._pending.pop(conn, None)
        self._cut[conn] = (kind, reason)
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _refuse(self, addr: Any, reason: str, node: str | None = None, kind: str = "protocol") -> None:
        remote = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        now = time.monotonic()
        with self._lock:
            self.refused += 1
            # At most 20 reports a minute of each kind: a scanner or a flood must not fill the
            # log and the event log, nor hide the other kinds.
            recent = self._refusals[kind] = [t for t in self._refusals.get(kind, []) if now - t < 60]
            report = len(recent) < 20
            if report:
                recent.append(now)
                suppressed = self._suppressed.pop(kind, 0)
            else:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        if not report:
            log.debug("peer server %s refused %s: %s", self.node, remote, reason)
            return
        more = f" ({suppressed} more refusals were not reported)" if suppressed else ""
        log.warning("peer server %s refused %s%s: %s%s", self.node, remote, f" ({node})" if node else "", reason, more)
        self.events.emit("peer_refused", remote=remote, peer=node, kind=kind, reason=reason[:300], suppressed=suppressed)

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        node = None
        slot = False
        try:
            conn.settimeout(self.config.connect_timeout.total_seconds())
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                node = wire.server_handshake(conn, self.secret())
            except AuthError as exc:
                self._refuse(addr, str(exc), kind="auth")
                return
            except (FrameError, OSError, ValueError) as exc:
                with self._lock:
                    cut = self._cut.get(conn)
                if cut is None and isinstance(exc, TimeoutError):  # one receive outlasted the whole bound
                    cut = self._too_slow()
                self._refuse(addr, cut[1] if cut else f"bad handshake: {exc}", kind=cut[0] if cut else "handshake")
                return
            with self._lock:
                cut = self._cut.get(conn)
                self._pending.pop(conn, None)
            if cut is not None:  # authenticated just as the server cut it
                self._refuse(addr, cut[1], node, kind=cut[0])
                return
            slot = self._slots.acquire(blocking=False)
            if not slot:
                reason = f"busy: {self.config.max_connections} authenticated connections already (max_connections)"
                self._refuse(addr, reason, node, kind="busy")
                wire.send_frame(conn, {"op": "error", "error": reason})
                return
            conn.settimeout(self.config.io_timeout.total_seconds())
            while not self._stopping:
                header, plen = wire.read_frame(conn, self.config.max_header_bytes, self.config.max_snapshot_bytes)
                op = header["op"]
                if op == "eof":
                    return
                if plen and op != "data":
                    raise FrameError(f"unexpected payload of {plen} bytes with {op!r}")
                handler = getattr(self, f"_op_{op}", None)
                if handler is None:
                    wire.send_frame(conn, {"op": "error", "error": f"unknown op {op!r}"})
                    continue
                handler(conn, header, (addr, node))
        except (FrameError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            self._refuse(addr, f"bad frame: {exc}", node)
        except (OSError, HpresilError) as exc:
            log.info("peer connection from %s (%s) ended: %s", addr, node, exc)
        except Exception:  # a bug must cost one connection, never the server
            log.exception("peer connection from %s (%s) failed", addr, node)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._pending.pop(conn, None)
                self._cut.pop(conn, None)
            conn.close()
            if slot:
                self._slots.release()

    # -- requests --------------------------------------------------------
    def _op_list(self, conn: socket.socket, header: dict[str, Any], who: tuple[Any, str | None]) -> None:
        snaps = [
            [i.rank, i.record.step, i.record.world_size, i.record.commit_id, i.record.created, i.record.timeline]
            for _, i in self.store.snapshots()
        ]
        wire.send_frame(conn, {"op": "list", "snapshots": snaps})

    def _op_get(self, conn: socket.socket, header: dict[str, Any], who: tuple[Any, str | None]) -> None:
        records, seals = [], []
        for rank, commit_id in header["items"]:
            try:
                record, seal = self.store.load(int(rank), str(commit_id))
            except StorageError:
                record = seal = None
            records.append(record)
            seals.append(seal)
        wire.send_frame(conn, {"op": "get", "records": records, "seals": seals})

    def _op_read(self, conn: socket.socket, header: dict[str, Any], who: tuple[Any, str | None]) -> None:
        rank, commit_id = int(header["rank"]), str(header["commit_id"])
        ranges = [(int(o), int(n)) for o, n in header["ranges"]]
        try:
            with self.store.pinned(rank, commit_id) as (fd, size):
                bad = [(o, n) for o, n in ranges if o < 0 or n < 0 or o + n > size]
                if bad:
                    raise StorageError(f"ranges {bad[:3]} lie outside the {size}-byte snapshot")
                wire.send_frame(conn, {"op": "read"}, payload_len=sum(n for _, n in ranges))
                for offset, n in ranges:
                    wire.send_file(conn, fd, offset, n)
        except StorageError as exc:
            wire.send_frame(conn, {"op": "error", "error": str(exc)})

    def _op_put(self, conn: socket.socket, header: dict[str, Any], who: tuple[Any, str | None]) -> None:
        try:
            record = CommitRecord.from_json(header["record"])
            seal = Seal.from_json(header["seal"])
            reason = validate(header.get("rank"), record, seal, header.get("nbytes"), self.config.max_snapshot_bytes)
            if reason is None and header["nbytes"] != max(
                (e.offset + e.nbytes for e in record.entries if e.kind == "tensor"), default=0
            ):
                reason = "nbytes differs from the record's arena"
            if reason is None and seal.record and seal.record != record_digest(record):
                reason = "the record differs from the one its seal was computed for"
        except (HpresilError, TypeError, AttributeError, KeyError, ValueError) as exc:
            reason = f"malformed put: {exc}"
        if reason is not None:
            # Refused, answered, and the connection stays usable for the next request.
            self._refuse(who[0], f"replica rejected: {reason}", who[1], kind="put")
            wire.send_frame(conn, {"op": "put", "accept": False, "reason": reason})
            return
        got = self.store.begin(record, seal)
        if not isinstance(got, Incoming):
            wire.send_frame(conn, {"op": "put", "accept": False, "reason": got})
            return
        t0 = time.perf_counter()
        try:
            wire.send_frame(conn, {"op": "put", "accept": True})
            data, plen = wire.read_frame(conn, self.config.max_header_bytes, self.config.max_snapshot_bytes)
            if data["op"] != "data" or plen != got.nbytes:
                raise FrameError(f"expected {got.nbytes} bytes of data, got {data['op']!r} with {plen}")
            bad = got.receive(conn)
            if bad is None:
                got.commit()
        finally:
            got.release()
        duration = time.perf_counter() - t0
        if bad is not None:
            log.error("replica of rank %d step %d failed verification: %s", record.rank, record.step, bad)
            self.events.emit("integrity_failed", step=record.step, rank=record.rank, tier="peer", error=bad)
            wire.send_frame(conn, {"op": "put_done", "ok": False, "error": bad})
            return
        log.debug("received replica of rank %d step %d (%d bytes in %.3fs)", record.rank, record.step, got.nbytes, duration)
        wire.send_frame(conn, {"op": "put_done", "ok": True})
