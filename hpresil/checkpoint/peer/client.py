"""The client side of the peer protocol (format in :mod:`.api`): used by the
replicator to push replicas and by :class:`~hpresil.checkpoint.peer.source.PeerSource`
to fetch snapshots during a restore. One connection, requests in sequence."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any, Sequence

import torch

from hpresil.checkpoint.api import CommitRecord, Seal, record_digest
from hpresil.checkpoint.ram.files import SlotInfo
from hpresil.checkpoint.ram.pin import SlotGone, arena_bytes, pin
from hpresil.errors import IntegrityError, StorageError
from hpresil.checkpoint.peer import wire
from hpresil.checkpoint.peer.api import MAX_HELLO

__all__ = ["PeerClient"]

log = logging.getLogger(__name__)


class PeerClient:
    """An authenticated connection to one node's peer server.

    Args:
        host: the server's address.
        port: its port.
        secret: the job secret.
        node: our node id (the server logs it).
        connect_timeout: bound on connecting plus the handshake.
        io_timeout: bound on any send/receive that makes no progress.
        max_header: largest header accepted from the server.
    """

    def __init__(
        self,
        host: str,
        port: int,
        secret: bytes,
        node: str = "",
        *,
        connect_timeout: timedelta = timedelta(seconds=5),
        io_timeout: timedelta = timedelta(seconds=30),
        max_header: int = 64 << 20,
    ) -> None:
        self.host, self.port, self.secret, self.node = host, port, secret, node
        self.connect_timeout, self.io_timeout, self.max_header = connect_timeout, io_timeout, max_header
        self._sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        """Connects and authenticates (once; later calls reuse the connection).

        Raises:
            AuthError: the server does not share our secret.
            OSError: it cannot be reached.
        """
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout.total_seconds())
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                wire.client_handshake(sock, self.secret, self.node)
                sock.settimeout(self.io_timeout.total_seconds())
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Closes the connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _request(self, header: dict[str, Any], op: str) -> tuple[socket.socket, dict[str, Any], int]:
        sock = self.connect()
        try:
            wire.send_frame(sock, header)
            reply, plen = wire.expect(sock, op, self.max_header, 1 << 62)
        except BaseException:
            self.close()  # the stream may be mid-frame: never reuse it
            raise
        return sock, reply, plen

    # -- replication -----------------------------------------------------
    def put(self, root: str, info: SlotInfo) -> str:
        """Sends one sealed snapshot held under ``root`` (its RAM tier layout).

        Returns:
            ``"sent"``, ``"have"`` (the peer holds it already), ``"gone"``
            (the slot was reused since it was listed) or the peer's reason to
            refuse it (``"busy"``, a size limit...).

        Raises:
            StorageError, OSError: the transfer failed (the connection is closed).
        """
        try:
            # Held for the whole transfer: the writer skips a slot being read.
            with pin(root, info, timeout=1.0, full=True, sealed=True) as held:
                record, seal = held.record, held.seal
                assert seal is not None
                nbytes = arena_bytes(record)
                header = {"op": "put", "rank": record.rank, "record": record.to_json(), "seal": seal.to_json(),
                          "nbytes": nbytes}
                sock, reply, _ = self._request(header, "put")
                if not reply.get("accept"):
                    return str(reply.get("reason") or "refused")
                try:
                    wire.send_frame(sock, {"op": "data"}, payload_len=nbytes)
                    wire.send_file(sock, held.fd, 0, nbytes)
                    done, _ = wire.expect(sock, "put_done", MAX_HELLO)
                except BaseException:
                    self.close()
                    raise
        except SlotGone:
            return "gone"
        if not done.get("ok"):
            raise StorageError(f"peer {self.host}:{self.port} rejected the replica: {done.get('error')}")
        return "sent"

    # -- restore ---------------------------------------------------------
    def list(self) -> list[list[Any]]:
        """Sealed snapshots the server holds: ``[rank, step, world_size, commit_id, created, timeline]``."""
        _, reply, _ = self._request({"op": "list"}, "list")
        return list(reply["snapshots"])

    def get(self, items: Sequence[tuple[int, str]]) -> list[tuple[CommitRecord, Seal] | None]:
        """Records and seals of ``(rank, commit_id)`` items (``None`` where not held)."""
        _, reply, _ = self._request({"op": "get", "items": [list(i) for i in items]}, "get")
        out: list[tuple[CommitRecord, Seal] | None] = []
        for (rank, commit_id), rec, seal in zip(items, reply["records"], reply["seals"]):
            if rec is None or seal is None:
                out.append(None)
                continue
            record, sealed = CommitRecord.from_json(rec), Seal.from_json(seal)
            if record.commit_id != commit_id or sealed.commit_id != commit_id or record.rank != rank:
                raise IntegrityError(f"peer {self.host}:{self.port} answered another snapshot for rank {rank}")
            if sealed.record and sealed.record != record_digest(record):
                raise IntegrityError(f"peer {self.host}:{self.port}: the record of rank {rank} differs from its seal")
            out.append((record, sealed))
        return out

    def read(self, rank: int, commit_id: str, parts: Sequence[tuple[int, torch.Tensor, str | None, str]]) -> None:
        """Reads byte ranges of a snapshot straight into tensors, verifying each.

        Args:
            parts: ``(arena offset, out, expected checksum or None, key)``; ``out``
                is a contiguous ``uint8`` CPU tensor of the range's length.

        Raises:
            IntegrityError: a range fails its checksum (all are received first).
            StorageError: the server no longer holds the snapshot.
        """
        ranges = [[offset, out.numel()] for offset, out, _, _ in parts]
        sock, _, plen = self._request({"op": "read", "rank": rank, "commit_id": commit_id, "ranges": ranges}, "read")
        bad = None
        try:
            if plen != sum(n for _, n in ranges):
                raise StorageError(f"peer sent {plen} bytes for {len(ranges)} ranges")
            for _, out, expected, key in parts:
                if not wire.recv_verified(sock, out, expected):
                    bad = bad or key
        except BaseException:
            self.close()
            raise
        if bad is not None:
            raise IntegrityError(f"rank {rank} {bad}: checksum of the bytes from {self.host}:{self.port} differs from the seal")
