"""Checksums for snapshot data: one streaming object that every writer,
reader and the peer wire use.

``sum64``: the bytes read as little-endian 64-bit words (zero-padded at the
end), summed modulo 2**64, plus the byte length; written as
``"sum64:<hex>:<length>"``. Any single corrupted word changes it, and it runs
at memory bandwidth (numpy's reduction, which releases the GIL and starts no
thread pool of its own: torch's OpenMP workers spin after each parallel sum
and took CPU from a receiving thread). It guards against corruption, not
tampering: the peer transport authenticates separately.

Because the sum is additive, pieces of one byte string that start at
multiples of 8 bytes can be summed on different threads and combined with
:meth:`Checksum.merge`; :class:`Checksum` also takes pieces of any length in
order (it carries an unaligned remainder to the next piece).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["ALGORITHM", "Checksum", "checksum", "checksum_cancellable", "checksum_bytes", "verify", "CHUNK"]

ALGORITHM = "sum64"
_MASK = (1 << 64) - 1

#: Bytes summed between two looks at ``cancelled`` (a multiple of 8).
CHUNK = 64 << 20


def _as_bytes(data: torch.Tensor) -> np.ndarray:
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError("checksums need a contiguous CPU tensor; call .contiguous().cpu() first")
    if not data.numel():
        return np.empty(0, dtype=np.uint8)
    return data.reshape(-1).view(torch.uint8).numpy()


class Checksum:
    """A running ``sum64`` over bytes fed in order.

    Example::

        c = Checksum()
        for piece in pieces:          # CPU tensors, any dtype, contiguous
            c.update(piece)
        c.hexdigest()                 # "sum64:<hex>:<length>"
    """

    __slots__ = ("_total", "_n", "_rest")

    def __init__(self) -> None:
        self._total = 0
        self._n = 0
        self._rest = b""  # bytes after the last whole word, waiting for the next piece

    @property
    def nbytes(self) -> int:
        """Bytes fed so far."""
        return self._n

    def update(self, data: torch.Tensor) -> "Checksum":
        """Adds the raw bytes of a contiguous CPU tensor.

        Raises:
            ValueError: ``data`` is not contiguous or not on the CPU.
        """
        return self.update_array(_as_bytes(data))

    def update_bytes(self, data: bytes | bytearray | memoryview) -> "Checksum":
        """:meth:`update` for a bytes-like object."""
        return self.update_array(np.frombuffer(data, dtype=np.uint8) if len(data) else np.empty(0, dtype=np.uint8))

    def update_array(self, raw: np.ndarray) -> "Checksum":
        """:meth:`update` for a one-dimensional ``uint8`` array."""
        n = raw.size
        if not n:
            return self
        self._n += n
        start = 0
        if self._rest:
            take = min(8 - len(self._rest), n)
            self._rest += raw[:take].tobytes()
            start = take
            if len(self._rest) < 8:
                return self
            self._total += int.from_bytes(self._rest, "little")
            self._rest = b""
        whole = start + (n - start) // 8 * 8
        if whole > start:
            self._total += int(np.add.reduce(raw[start:whole].view(np.uint64), dtype=np.uint64))
        if whole < n:
            self._rest = raw[whole:].tobytes()
        return self

    def merge(self, later: "Checksum") -> "Checksum":
        """Appends the bytes ``later`` summed, as if they had been fed here.

        Raises:
            ValueError: this checksum ends inside a word (its byte count is not
                a multiple of 8), so ``later``'s words are not aligned with ours.
        """
        if self._rest and later._n:
            raise ValueError("Checksum.merge: the first part must end on a multiple of 8 bytes")
        self._total += later._total
        self._n += later._n
        self._rest = later._rest if later._n else self._rest
        return self

    def hexdigest(self) -> str:
        """``"sum64:<hex>:<length>"`` of everything fed (the last word zero-padded)."""
        total = self._total
        if self._rest:
            total += int.from_bytes(self._rest + b"\0" * (8 - len(self._rest)), "little")
        return f"{ALGORITHM}:{total & _MASK:016x}:{self._n}"


def checksum(data: torch.Tensor) -> str:
    """Returns the checksum of a tensor's bytes as ``"sum64:<hex>:<len>"``.

    Args:
        data: any contiguous CPU tensor; its raw bytes are summed.

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU.
    """
    return Checksum().update(data).hexdigest()


def checksum_cancellable(data: torch.Tensor, cancelled: Callable[[], bool] | None, chunk: int | None = None) -> str | None:
    """:func:`checksum`, summed ``chunk`` bytes (default :data:`CHUNK`) at a time; ``None`` as soon as
    ``cancelled()`` (asked before each chunk) is true. The sealer uses it so a
    writer that needs the slot back waits for one chunk, not a whole snapshot.

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU, or ``chunk``
            is not a positive multiple of 8.
    """
    raw = _as_bytes(data)
    chunk = CHUNK if chunk is None else chunk
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk={chunk}: must be a positive multiple of 8 bytes")
    c = Checksum()
    whole = raw.size - raw.size % 8
    for lo in range(0, whole, chunk):
        if cancelled is not None and cancelled():
            return None
        c.update_array(raw[lo : min(lo + chunk, whole)])
    if cancelled is not None and not whole and cancelled():
        return None
    return c.update_array(raw[whole:]).hexdigest()


def checksum_bytes(data: bytes | bytearray | memoryview) -> str:
    """Same as :func:`checksum` for a bytes-like object."""
    return Checksum().update_bytes(data).hexdigest()


def verify(data: torch.Tensor, expected: str) -> bool:
    """True when ``data`` has checksum ``expected``."""
    return checksum(data) == expected
