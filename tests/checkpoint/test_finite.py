"""The NaN/Inf test fused with the snapshot copy (hpresil/checkpoint/_finite.c)
against torch.isfinite, and its numpy fallback against the same."""

from __future__ import annotations

import os
import shutil
import sysconfig

import numpy as np
import pytest
import torch

from hpresil.checkpoint import finite
from hpresil.checkpoint.finite import copy_check, encoding, holds_nonfinite
from hpresil.checkpoint.ram.copier import copy_checked

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64]
# values around the fused kernel's 64 KiB blocks and vector widths
_SIZES = [0, 1, 7, 33, 16_411, 65_536 // 2 + 3, (3 << 20) // 4 + 5]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finite_data(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = dtype.to_real() if dtype.is_complex else dtype
    data = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
    if dtype.is_complex:
        data = torch.complex(data, data.flip(0))
    data = data.to(dtype)
    info = torch.finfo(real)
    extremes = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0, 0.0], dtype=torch.float64).to(dtype)
    data[: min(n, len(extremes))] = extremes[: min(n, len(extremes))]  # largest, subnormal, signed zeros: finite
    return data


@pytest.fixture(params=["native", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "native" and not finite.NATIVE:
        pytest.skip("the native module is not built here")
    if request.param == "numpy":
        monkeypatch.setattr(finite, "_native", None)
    return str(request.param)


def test_the_native_module_is_built_where_a_compiler_is() -> None:
    """The install builds it wherever a C compiler and Python's headers are found
    (the fused check's speed depends on it); HPRESIL_NO_NATIVE=1 marks a
    deliberate build without."""
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if os.environ.get("HPRESIL_NO_NATIVE") == "1" or not (shutil.which("cc") or shutil.which("gcc")) or not headers:
        pytest.skip("no C compiler or no Python headers here: the numpy fallback runs")
    assert finite.NATIVE, "hpresil.checkpoint._finite was not built: reinstall hpresil (pip install -e .)"


@pytest.mark.parametrize("dtype", _DTYPES, ids=_name)
def test_the_fused_copy_is_bitwise_and_finds_every_nonfinite_value(dtype: torch.dtype, backend: str) -> None:
    enc = encoding(_name(dtype))
    assert enc is not None
    bads = [float("nan"), float("inf"), float("-inf"), -float("nan")]
    for n in _SIZES:
        src = _finite_data(dtype, n, n)
        dst = torch.full_like(src, 7)
        assert copy_checked(dst, src) is False, f"{n} finite {dtype} flagged"
        assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))
        assert not holds_nonfinite(src.view(torch.uint8).numpy(), enc)
        for i, where in enumerate(sorted({0, n // 2, max(n - 1, 0), min(n - 1, 16_384)}) if n else []):
            bad = src.clone()
            bad[where] = bads[i % len(bads)]
            dst = torch.zeros_like(bad)
            assert copy_checked(dst, bad) is True, f"{bads[i % len(bads)]} at {where} of {n} missed"
            assert torch.equal(dst.view(torch.uint8), bad.view(torch.uint8))  # the rest is still copied
            assert holds_nonfinite(bad.view(torch.uint8).numpy(), enc)
            if backend == "native":
                assert copy_check(torch.zeros_like(bad), bad, enc) is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
def test_every_bit_pattern_is_judged_like_torch_isfinite(dtype: torch.dtype, backend: str) -> None:
    width = dtype.itemsize
    ints = torch.randint(-(1 << (8 * width - 1)), 1 << (8 * width - 1), (200_000,),
                         dtype=torch.int64, generator=torch.Generator().manual_seed(width))
    raw = ints.to({2: torch.int16, 4: torch.int32}[width]).view(dtype)
    enc = encoding(_name(dtype))
    assert enc is not None
    for chunk in raw.split(997):  # many small pieces: each judged alone, like torch
        want = not bool(torch.isfinite(chunk).all())
        assert holds_nonfinite(chunk.contiguous().view(torch.uint8).numpy(), enc) is want


def test_integers_and_non_contiguous_tensors_are_copied_unchecked() -> None:
    ints = torch.arange(1000)
    dst = torch.empty_like(ints)
    assert copy_checked(dst, ints) is None and torch.equal(dst, ints)
    t = torch.randn(64, 64).t()
    enc = encoding("float32")
    assert enc is not None and copy_check(torch.empty(64, 64), t, enc) is None
    out = torch.empty(64, 64)
    assert copy_checked(out, t) is None and torch.equal(out, t)


def test_bad_arguments_to_the_native_module_are_refused() -> None:
    if not finite.NATIVE:
        pytest.skip("the native module is not built here")
    from hpresil.checkpoint import _finite  # type: ignore[attr-defined]

    buf = np.zeros(16, dtype=np.uint8)
    with pytest.raises(ValueError, match="width=3"):
        _finite.check(buf, 3, 0x7F80)
    with pytest.raises(ValueError, match="mask"):
        _finite.check(buf, 2, 0x7F800000)
    with pytest.raises(ValueError, match="null address"):
        _finite.copy_check(0, buf.ctypes.data, 16, 4, 0x7F800000)
    assert _finite.check(np.full(3, 0xFF, dtype=np.uint8), 4, 0x7F800000) is False  # a partial value is not judged
