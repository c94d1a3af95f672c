"""Is a floating-point entry finite? The exponent test, fused with the copy.

A value of an IEEE binary format (and bfloat16) is NaN or Inf exactly when
all its exponent bits are set, so the test needs no conversion: one AND and
one compare per value. The native module (``_finite.c``, built at install
time when a C compiler is there) runs it vectorized:

* fused with the snapshot's copy into its slot (:func:`copy_check`), where
  it rides on values already in registers and the copy, bound by memory
  bandwidth, takes no longer for it (``bench/seal.py``: ``copy + check``);
* over bytes already in cache (:func:`holds_nonfinite`), as the sealer's
  probe of entries nobody checked in their copy.

Without the native module the same verdicts come from two numpy integer
maxima over views of the bytes (:data:`NATIVE` says which one runs).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

__all__ = ["Encoding", "encoding", "NATIVE", "holds_nonfinite", "copy_check"]

log = logging.getLogger(__name__)

try:
    from hpresil.checkpoint import _finite as _native  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the numpy fallback
    _native = None

#: Whether the vectorized native checks run (else the numpy fallback).
NATIVE: bool = _native is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Encoding:
    """Where a dtype keeps its exponent."""

    #: bytes per value (per component, for complex dtypes)
    width: int
    #: the exponent bits
    mask: int
    #: numpy integer views of the same width
    signed: Any
    unsigned: Any

    @property
    def sign(self) -> int:
        return 1 << (8 * self.width - 1)


_F64 = Encoding(8, 0x7FF0_0000_0000_0000, np.int64, np.uint64)
_F32 = Encoding(4, 0x7F80_0000, np.int32, np.uint32)
_ENCODINGS: dict[str, Encoding] = {
    "float64": _F64,
    "float32": _F32,
    "complex64": _F32,
    "complex128": _F64,
    "float16": Encoding(2, 0x7C00, np.int16, np.uint16),
    "bfloat16": Encoding(2, 0x7F80, np.int16, np.uint16),
}


def encoding(dtype: str) -> Encoding | None:
    """The encoding of ``dtype`` (torch's name without ``torch.``); ``None``
    for dtypes without NaN/Inf (integers, bool) or without a checked encoding
    (8-bit floats)."""
    return _ENCODINGS.get(dtype)


def holds_nonfinite(raw: np.ndarray, enc: Encoding) -> bool:
    """Whether the contiguous bytes ``raw`` (whole values of ``enc``) hold a NaN or Inf."""
    if not raw.size:
        return False
    if _native is not None:
        return bool(_native.check(raw, enc.width, enc.mask))
    # (bits & ~sign) >= mask: signed max >= mask (positive NaN/Inf) or unsigned max >= sign | mask (negative ones)
    return int(raw.view(enc.signed).max()) >= enc.mask or int(raw.view(enc.unsigned).max()) >= enc.sign | enc.mask


def copy_check(dst: torch.Tensor, src: torch.Tensor, enc: Encoding) -> bool | None:
    """Copies host tensor ``src`` into ``dst`` (same dtype and size, both
    contiguous, not overlapping) and says whether it holds a NaN or Inf, in
    one native pass on the calling thread with the GIL released.

    Returns:
        ``None``, with nothing copied, when the native module is not built or
        the tensors do not qualify; the caller copies and checks otherwise.
    """
    if (_native is None or src.dtype != dst.dtype or src.numel() != dst.numel() or src.is_cuda or dst.is_cuda
            or not src.is_contiguous() or not dst.is_contiguous() or src.is_conj() or src.is_neg()):
        return None
    nbytes = src.numel() * src.element_size()
    if not nbytes:
        return False
    return bool(_native.copy_check(dst.data_ptr(), src.data_ptr(), nbytes, enc.width, enc.mask))
