"""Frames, the authentication handshake, and verified streaming (format in :mod:`.api`).

Payloads are never buffered whole: a sender streams arena bytes with
``sendfile`` from the slot file, a receiver ``recv_into``s them straight into
their destination (a replica slot, or a tensor being restored) in 4 MiB
chunks and sums each chunk while it is still in cache, so verifying the
checksums (:class:`~hpresil.checkpoint.integrity.Checksum`) costs a fraction of the transfer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
from typing import Any

import torch

from hpresil.checkpoint.integrity import Checksum
from hpresil.checkpoint.peer.api import FRAME, MAGIC, MAX_HELLO, VERSION, AuthError, FrameError

__all__ = [
    "send_frame",
    "read_frame",
    "recv_exact",
    "recv_into",
    "recv_verified",
    "send_file",
    "client_handshake",
    "server_handshake",
    "CHUNK",
]

#: Bytes received (and hashed) per step.
CHUNK = 4 << 20


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview | None = None,
               payload_len: int | None = None) -> None:
    """Sends one frame; with ``payload_len`` and no ``payload`` the caller streams the payload next."""
    data = json.dumps(header, separators=(",", ":")).encode()
    n = len(payload) if payload is not None else (payload_len or 0)
    sock.sendall(FRAME.pack(MAGIC, VERSION, 0, 0, len(data), n) + data)
    if payload is not None and n:
        sock.sendall(payload)


def recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fills ``view`` from the socket.

    Raises:
        FrameError: the peer closed the connection first (a truncated frame).
    """
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise FrameError(f"connection closed after {got} of {n} bytes: truncated frame")
        got += r


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Receives exactly ``n`` bytes (see :func:`recv_into`)."""
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return bytes(buf)


def read_frame(sock: socket.socket, max_header: int, max_payload: int) -> tuple[dict[str, Any], int]:
    """Reads a frame's fixed part and JSON header; the payload is left on the socket.

    Returns:
        The header object and the payload length the caller must consume.
        A connection closed cleanly between frames gives ``({"op": "eof"}, 0)``.

    Raises:
        FrameError: wrong magic or version, a header or payload over the limits,
            a header that is not a JSON object with a string ``op``, or a
            connection closed mid-frame.
    """
    first = sock.recv(FRAME.size)
    if not first:
        return {"op": "eof"}, 0
    fixed = first + (recv_exact(sock, FRAME.size - len(first)) if len(first) < FRAME.size else b"")
    magic, version, _flags, _reserved, hlen, plen = FRAME.unpack(fixed)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not an hpresil peer")
    if version != VERSION:
        raise FrameError(f"protocol version {version}, this node speaks {VERSION}")
    if hlen > max_header:
        raise FrameError(f"header of {hlen} bytes exceeds the limit of {max_header}")
    if plen > max_payload:
        raise FrameError(f"payload of {plen} bytes exceeds the limit of {max_payload}")
    try:
        header = json.loads(recv_exact(sock, hlen))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise FrameError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise FrameError("header is not a JSON object with a string 'op'")
    return header, plen


def expect(sock: socket.socket, op: str, max_header: int, max_payload: int = 0) -> tuple[dict[str, Any], int]:
    """Reads a frame and checks its ``op``; an ``error`` frame raises with the peer's message.

    Raises:
        FrameError: another op, or a malformed frame.
        StorageError: the peer answered ``error``.
    """
    from hpresil.errors import StorageError

    header, plen = read_frame(sock, max_header, max_payload)
    if header["op"] == "error":
        raise StorageError(f"peer: {header.get('error')}")
    if header["op"] != op:
        raise FrameError(f"expected {op!r}, got {header['op']!r}")
    return header, plen


def recv_verified(sock: socket.socket, out: torch.Tensor, expected: str | None) -> bool:
    """Receives ``out.numel()`` bytes into the ``uint8`` tensor ``out``, hashing
    each chunk as it lands.

    Returns:
        Whether the checksum of the bytes equals ``expected`` (True when ``None``).

    Raises:
        FrameError: the connection closed early.
    """
    n = out.numel()
    view = memoryview(out.numpy()) if n else memoryview(b"")
    running = Checksum.like(expected)
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        recv_into(sock, view[lo:hi])
        if expected is not None:
            running.update(out[lo:hi])
    return expected is None or running.hexdigest() == expected


def skip(sock: socket.socket, n: int) -> None:
    """Reads and drops ``n`` bytes."""
    buf = memoryview(bytearray(min(n, CHUNK) or 1))
    while n > 0:
        k = min(n, len(buf))
        recv_into(sock, buf[:k])
        n -= k


def send_file(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    """Streams ``count`` bytes at ``offset`` of ``fd`` with ``sendfile`` (no user-space copy)."""
    if count <= 0:
        return
    with os.fdopen(os.dup(fd), "rb") as f:
        sent = sock.sendfile(f, offset, count)
    if sent != count:
        raise OSError(f"sendfile sent {sent} of {count} bytes")


def _mac(secret: bytes, role: bytes, a: bytes, b: bytes) -> str:
    return hmac.new(secret, b"hpresil-peer/" + role + b"/" + a + b"/" + b, hashlib.sha256).hexdigest()


def _proof_ok(proof: object, expected: str) -> bool:
    if not isinstance(proof, str):
        return False
    return hmac.compare_digest(proof.encode("utf-8", "replace"), expected.encode())


def _nonce(header: dict[str, Any], key: str) -> bytes:
    value = header.get(key)
    if not isinstance(value, str) or len(value) != 64:
        raise FrameError(f"bad {key} in {header.get('op')!r}")
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise FrameError(f"bad {key} in {header.get('op')!r}") from exc


def client_handshake(sock: socket.socket, secret: bytes, node: str) -> None:
    """Authenticates both ends with the job secret (client side).

    Raises:
        AuthError: the server does not know the secret or refused ours.
        FrameError: the server broke the protocol.
    """
    cnonce = os.urandom(32)
    send_frame(sock, {"op": "hello", "node": node[:128], "nonce": cnonce.hex()})
    header, _ = read_frame(sock, MAX_HELLO, 0)
    if header["op"] == "error":
        raise AuthError(f"peer refused the connection: {header.get('error')}")
    if header["op"] != "challenge":
        raise FrameError(f"expected 'challenge', got {header['op']!r}")
    snonce = _nonce(header, "nonce")
    if not _proof_ok(header.get("proof"), _mac(secret, b"server", cnonce, snonce)):
        raise AuthError("the peer does not know this job's secret")
    send_frame(sock, {"op": "auth", "proof": _mac(secret, b"client", snonce, cnonce)})
    header, _ = read_frame(sock, MAX_HELLO, 0)
    if header["op"] != "ok":
        raise AuthError(f"peer refused our secret: {header.get('error')}")


def server_handshake(sock: socket.socket, secret: bytes | None) -> str:
    """Authenticates a client (server side).

    Returns:
        The node name the client gave.

    Raises:
        AuthError: the client does not know the secret (it was told and must be closed).
        FrameError: the client broke the protocol.
    """
    header, _ = read_frame(sock, MAX_HELLO, 0)
    if header["op"] != "hello":
        raise FrameError(f"expected 'hello', got {header['op']!r}")
    cnonce = _nonce(header, "nonce")
    node = str(header.get("node", "?"))[:128]
    if secret is None:
        send_frame(sock, {"op": "error", "error": "not ready: job secret unknown yet"})
        raise AuthError("job secret not known yet")
    snonce = os.urandom(32)
    send_frame(sock, {"op": "challenge", "nonce": snonce.hex(), "proof": _mac(secret, b"server", cnonce, snonce)})
    header, _ = read_frame(sock, MAX_HELLO, 0)
    if header["op"] != "auth" or not _proof_ok(header.get("proof"), _mac(secret, b"client", snonce, cnonce)):
        try:
            send_frame(sock, {"op": "error", "error": "authentication failed"})
        except OSError:
            pass
        raise AuthError(f"client {node!r} failed authentication (unknown job secret)")
    send_frame(sock, {"op": "ok"})
    return node
