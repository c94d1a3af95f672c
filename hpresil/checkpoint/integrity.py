"""Checksums for snapshot data.

``sum64``: the bytes read as little-endian 64-bit words (zero-padded at the
end), summed modulo 2**64, plus the byte length. Any single corrupted word
changes it, and it runs at memory bandwidth through torch (about 3x faster
than the copy it protects on the reference machine; crc32 runs at ~2.4 GB/s
there, slower than the copy). It guards against corruption, not tampering:
the peer transport authenticates separately.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["checksum", "checksum_cancellable", "checksum_bytes", "verify"]

_ALGO = "sum64"

#: Bytes summed between two looks at ``cancelled`` (a multiple of 8).
CHUNK = 64 << 20


def checksum(data: torch.Tensor) -> str:
    """Returns the checksum of a tensor's bytes as ``"sum64:<hex>:<len>"``.

    Args:
        data: any contiguous CPU tensor; its raw bytes are summed.

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU.
    """
    result = checksum_cancellable(data, None)
    assert result is not None
    return result


def checksum_cancellable(data: torch.Tensor, cancelled: Callable[[], bool] | None, chunk: int | None = None) -> str | None:
    """:func:`checksum`, summed ``chunk`` bytes (default :data:`CHUNK`) at a time; ``None`` as soon as
    ``cancelled()`` (asked before each chunk) is true. The sealer uses it so a
    writer that needs the slot back waits for one chunk, not a whole snapshot.

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU, or ``chunk``
            is not a positive multiple of 8.
    """
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError("checksum() needs a contiguous CPU tensor; call .contiguous().cpu() first")
    chunk = CHUNK if chunk is None else chunk
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk={chunk}: must be a positive multiple of 8 bytes")
    raw = data.reshape(-1).view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
    n = raw.numel()
    whole = n - n % 8
    total = 0
    for lo in range(0, whole, chunk):
        if cancelled is not None and cancelled():
            return None
        total += int(raw[lo : min(lo + chunk, whole)].view(torch.int64).sum(dtype=torch.int64).item())
    if cancelled is not None and not whole and cancelled():
        return None
    if n > whole:
        tail = bytes(raw[whole:].tolist()) + b"\0" * (8 - (n - whole))
        total += int.from_bytes(tail, "little", signed=True)
    return f"{_ALGO}:{total & 0xFFFFFFFFFFFFFFFF:016x}:{n}"


def checksum_bytes(data: bytes | bytearray | memoryview) -> str:
    """Same as :func:`checksum` for a bytes-like object."""
    buf = bytearray(data) if isinstance(data, bytes) else data
    if len(buf) == 0:
        return f"{_ALGO}:{0:016x}:0"
    return checksum(torch.frombuffer(buf, dtype=torch.uint8))


def verify(data: torch.Tensor, expected: str) -> bool:
    """True when ``data`` has checksum ``expected``."""
    return checksum(data) == expected
