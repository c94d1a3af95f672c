"""Checksums for snapshot data: one streaming object that every writer,
reader and the peer wire use.

``xxh3`` (written by everything new): the bytes are cut into 1 MiB leaves,
each hashed with XXH3-64 (the ``xxhash`` package, which releases the GIL);
the checksum is XXH3-128 of the leaf digests followed by the byte length,
written ``"xxh3:<32 hex>:<length>"``. Unlike an additive sum it catches
swapped words and changes that cancel out, which the replica-divergence check
(:mod:`hpresil.checkpoint.health`) relies on. Because leaves are independent,
pieces of one byte string that start at multiples of :data:`LEAF` can be
hashed on different threads and joined with :meth:`Checksum.merge`.

``sum64`` (read only: seals written before ``xxh3``): the bytes as
little-endian 64-bit words summed modulo 2**64, plus the length, written
``"sum64:<hex>:<length>"``. :meth:`Checksum.like` picks the algorithm of an
expected value, so old seals still verify.

Both guard against corruption, not tampering: the peer transport
authenticates separately. :class:`Checksum` also takes pieces of any length
in order (it carries an incomplete leaf or word to the next piece).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xxhash

__all__ = [
    "ALGORITHM",
    "ALGORITHMS",
    "LEAF",
    "Checksum",
    "checksum",
    "checksum_cancellable",
    "checksum_bytes",
    "verify",
    "CHUNK",
]

ALGORITHM = "xxh3"
ALGORITHMS = ("xxh3", "sum64")
_MASK = (1 << 64) - 1

#: Bytes per ``xxh3`` leaf: pieces hashed apart must start at multiples of it.
LEAF = 1 << 20
#: Bytes hashed between two looks at ``cancelled``.
CHUNK = 64 << 20


def _as_bytes(data: torch.Tensor) -> np.ndarray:
    if data.device.type != "cpu" or not data.is_contiguous():
        raise ValueError("checksums need a contiguous CPU tensor; call .contiguous().cpu() first")
    if not data.numel():
        return np.empty(0, dtype=np.uint8)
    return data.reshape(-1).view(torch.uint8).numpy()


class Checksum:
    """A running checksum over bytes fed in order.

    Args:
        algorithm: ``"xxh3"`` (default) or ``"sum64"`` (to verify old seals).

    Example::

        c = Checksum.like(expected)   # or Checksum() to write a new one
        for piece in pieces:          # CPU tensors, any dtype, contiguous
            c.update(piece)
        c.hexdigest() == expected

    Raises:
        ValueError: an unknown algorithm.
    """

    __slots__ = ("algorithm", "_n", "_total", "_rest", "_leaves")

    def __init__(self, algorithm: str = ALGORITHM) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self._n = 0
        self._total = 0  # sum64: the running sum
        self._rest = b""  # bytes after the last whole word (sum64) or leaf (xxh3)
        self._leaves = bytearray()  # xxh3: the digests of the whole leaves so far

    @classmethod
    def like(cls, expected: str | None) -> "Checksum":
        """A checksum of the algorithm ``expected`` was written with (the
        default for ``None`` or an unknown prefix, which then fails to match)."""
        algorithm = expected.split(":", 1)[0] if expected else ALGORITHM
        return cls(algorithm if algorithm in ALGORITHMS else ALGORITHM)

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
        unit = 8 if self.algorithm == "sum64" else LEAF
        start = 0
        if self._rest:
            take = min(unit - len(self._rest), n)
            self._rest += raw[:take].tobytes()
            start = take
            if len(self._rest) < unit:
                return self
            self._fold(np.frombuffer(self._rest, dtype=np.uint8))
            self._rest = b""
        whole = start + (n - start) // unit * unit
        if whole > start:
            self._fold(raw[start:whole])
        if whole < n:
            self._rest = raw[whole:].tobytes()
        return self

    def _fold(self, whole: np.ndarray) -> None:
        """Adds whole units (words or leaves)."""
        if self.algorithm == "sum64":
            self._total += int(np.add.reduce(whole.view(np.uint64), dtype=np.uint64))
            return
        for lo in range(0, whole.size, LEAF):
            self._leaves += xxhash.xxh3_64_digest(whole[lo : lo + LEAF])

    def merge(self, later: "Checksum") -> "Checksum":
        """Appends the bytes ``later`` hashed, as if they had been fed here.

        Raises:
            ValueError: the algorithms differ, or this checksum ends inside a
                unit (a word for ``sum64``, a leaf for ``xxh3``), so ``later``'s
                units are not aligned with ours.
        """
        if later.algorithm != self.algorithm:
            raise ValueError(f"Checksum.merge: {self.algorithm} and {later.algorithm} do not combine")
        if self._rest and later._n:
            unit = 8 if self.algorithm == "sum64" else LEAF
            raise ValueError(f"Checksum.merge: the first part must end on a multiple of {unit} bytes")
        self._total += later._total
        self._leaves += later._leaves
        self._n += later._n
        self._rest = later._rest if later._n else self._rest
        return self

    def hexdigest(self) -> str:
        """``"<algorithm>:<hex>:<length>"`` of everything fed."""
        if self.algorithm == "sum64":
            total = self._total
            if self._rest:
                total += int.from_bytes(self._rest + b"\0" * (8 - len(self._rest)), "little")
            return f"sum64:{total & _MASK:016x}:{self._n}"
        tail = xxhash.xxh3_64_digest(self._rest) if self._rest else b""
        return f"xxh3:{xxhash.xxh3_128_hexdigest(bytes(self._leaves) + tail + self._n.to_bytes(8, 'little'))}:{self._n}"


def checksum(data: torch.Tensor, like: str | None = None) -> str:
    """Returns the checksum of a tensor's bytes (``"xxh3:<hex>:<len>"``).

    Args:
        data: any contiguous CPU tensor; its raw bytes are hashed.
        like: an expected value: hash with its algorithm (to verify old seals).

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU.
    """
    return Checksum.like(like).update(data).hexdigest()


def checksum_cancellable(
    data: torch.Tensor,
    cancelled: Callable[[], bool] | None,
    chunk: int | None = None,
    *,
    probe: Callable[[np.ndarray], None] | None = None,
) -> str | None:
    """:func:`checksum`, hashed ``chunk`` bytes (default :data:`CHUNK`) at a
    time; ``None`` as soon as ``cancelled()`` (asked before each chunk) is
    true. The sealer uses it so a writer that needs the slot back waits for one
    chunk, not a whole snapshot.

    Args:
        probe: called with each leaf right after it was hashed, while it is
            still in cache (the sealer's health check rides this pass).

    Raises:
        ValueError: ``data`` is not contiguous or not on the CPU, or ``chunk``
            is not positive.
    """
    raw = _as_bytes(data)
    chunk = CHUNK if chunk is None else chunk
    if chunk <= 0:
        raise ValueError(f"chunk={chunk}: must be a positive number of bytes")
    c = Checksum()
    if not raw.size and cancelled is not None and cancelled():
        return None
    for lo in range(0, raw.size, chunk):
        if cancelled is not None and cancelled():
            return None
        hi = min(lo + chunk, raw.size)
        for leaf in range(lo, hi, LEAF):
            piece = raw[leaf : min(leaf + LEAF, hi)]
            c.update_array(piece)
            if probe is not None:
                probe(piece)
    return c.hexdigest()


def checksum_bytes(data: bytes | bytearray | memoryview, like: str | None = None) -> str:
    """Same as :func:`checksum` for a bytes-like object."""
    return Checksum.like(like).update_bytes(data).hexdigest()


def verify(data: torch.Tensor, expected: str) -> bool:
    """True when ``data`` has checksum ``expected`` (in its algorithm)."""
    return checksum(data, like=expected) == expected
