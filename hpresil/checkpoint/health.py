"""Health of a snapshot: is the state it holds worth restoring?

A snapshot every step faithfully copies a state that went bad, so the sealer
judges each one in the pass it already makes over the bytes:

* **poisoned**: a floating-point entry that was finite in this rank's earlier
  snapshots now holds NaN or Inf. Entries non-finite from their first
  snapshot on (a ``-inf`` causal-mask buffer) are legitimate; the keys seen
  and the legitimate ones are kept per rank in ``rank<R>/health.json`` so a
  restarted node runtime judges the same way.
* **suspect**: the loss given to ``save(step, loss=...)`` is non-finite
  (cause ``nonfinite``) or spikes above ``median + k * 1.4826 * MAD`` of the
  losses of the previous ``window`` snapshots and at least ``min_rise`` above
  the median (cause ``spike``).

Where the NaN/Inf check runs:

* **device tensors**: the RAM writer computes every floating-point tensor's
  L2 norm on the snapshot's copy stream (``torch._foreach_norm``, one fused
  launch per dtype, reading HBM while the copy crosses PCIe) and copies the
  norms behind the snapshot (:func:`device_finite_flags`). The record then
  says which entries were checked (``checked``) and which norms were not
  finite (``nonfinite``); the sealer probes only those (a norm also overflows
  for huge finite values, so the probe confirms). The sealer's CPU pays
  nothing for them.
* **host tensors**: the RAM writer copies each one into its slot with the
  NaN/Inf test fused into the copy (:func:`hpresil.checkpoint.finite.copy_check`,
  native and vectorized: the copy, bound by memory bandwidth, takes no longer
  for it), and the record's ``checked``/``nonfinite`` cover them too. Entries
  nobody checked (the native module not built, or a layout it does not take)
  are probed by the sealer: :class:`FiniteProbe` tests each leaf right after
  the checksum hashed it, from cache
  (:func:`~hpresil.checkpoint.integrity.checksum_cancellable`'s ``probe``).

Restore, replication and the durable drain never choose an unhealthy
snapshot while a healthy one exists (:mod:`hpresil.checkpoint.restore`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from typing import Literal

import numpy as np
import torch

from hpresil.checkpoint.finite import encoding, holds_nonfinite
from hpresil.checkpoint.flatten import dtype_name
from hpresil.checkpoint.ram.files import write_atomic
from hpresil.errors import ConfigError

__all__ = ["Health", "HEALTHY", "worst", "DeviceFlags", "device_finite_flags", "checked_bitmap", "HealthConfig", "FiniteProbe", "probe_for", "LossWindow", "RankHealth", "Verdict"]

log = logging.getLogger(__name__)

Health = Literal["ok", "suspect", "poisoned"]
HEALTHY: Health = "ok"
_RANK = {"ok": 0, "suspect": 1, "poisoned": 2}


def worst(a: str, b: str) -> str:
    """The worse of two healths (``poisoned`` > ``suspect`` > ``ok``)."""
    return a if _RANK.get(a, 2) >= _RANK.get(b, 2) else b

@dataclasses.dataclass(kw_only=True, slots=True)
class HealthConfig:
    """How the sealer judges snapshots.

    Attributes:
        check_finite: look for NaN/Inf in floating-point entries.
        spike_window: losses of this many earlier snapshots form the baseline.
        spike_k: a loss above ``median + spike_k * 1.4826 * MAD`` is a spike.
        spike_min_rise: ... and only when it is also this fraction above the
            median (a very smooth loss has a tiny MAD).
        spike_min_samples: no spike verdict before this many earlier losses.
    """

    check_finite: bool = True
    spike_window: int = 50
    spike_k: float = 6.0
    spike_min_rise: float = 0.1
    spike_min_samples: int = 20

    def __post_init__(self) -> None:
        if self.spike_window < 3:
            raise ConfigError(f"spike_window={self.spike_window}: a median and MAD need at least 3 losses")
        if not 2 <= self.spike_min_samples <= self.spike_window:
            raise ConfigError(f"spike_min_samples={self.spike_min_samples}: must be between 2 and "
                              f"spike_window={self.spike_window}")
        if not (self.spike_k > 0 and self.spike_min_rise >= 0):
            raise ConfigError(f"spike_k={self.spike_k}, spike_min_rise={self.spike_min_rise}: must be > 0 and >= 0")


class FiniteProbe:
    """Whether the bytes fed (in order, any split) hold a NaN or Inf of ``dtype``."""

    __slots__ = ("_enc", "_rest", "nonfinite")

    def __init__(self, dtype: str) -> None:
        enc = encoding(dtype)
        if enc is None:
            raise ValueError(f"{dtype}: not a checked floating-point dtype")
        self._enc = enc
        self._rest = b""  # a value split between two pieces
        self.nonfinite = False

    def __call__(self, piece: np.ndarray) -> None:
        if self.nonfinite or not piece.size:
            return
        width = self._enc.width
        if self._rest:
            take = min(width - len(self._rest), piece.size)
            self._rest += piece[:take].tobytes()
            piece = piece[take:]
            if len(self._rest) == width:
                self.nonfinite = holds_nonfinite(np.frombuffer(self._rest, dtype=np.uint8), self._enc)
                self._rest = b""
        whole = piece.size - piece.size % width
        if whole and not self.nonfinite:
            self.nonfinite = holds_nonfinite(piece[:whole], self._enc)
        if whole < piece.size:
            self._rest = piece[whole:].tobytes()


def probe_for(dtype: str) -> FiniteProbe | None:
    """A probe for entries of ``dtype`` (torch's name without ``torch.``);
    ``None`` for dtypes without NaN/Inf (integers, bool) or without a checked
    encoding (8-bit floats)."""
    return FiniteProbe(dtype) if encoding(dtype) is not None else None


class DeviceFlags:
    """Per-entry norms computed on the device for one snapshot; read with
    :meth:`result` once the snapshot's copy event completed."""

    __slots__ = ("indices", "host")

    def __init__(self, indices: list[int], host: torch.Tensor) -> None:
        self.indices = indices
        self.host = host

    def nonfinite(self, keys: list[str]) -> list[str]:
        """The keys (of the tensor entries, in layout order) whose norm is not finite."""
        return [keys[i] for i, ok in zip(self.indices, np.isfinite(self.host.numpy())) if not ok]


def device_finite_flags(
    tensors: list[torch.Tensor], cuda: list[int], pinned: dict[int, torch.Tensor]
) -> DeviceFlags | None:
    """Queues, on the current (copy) stream, the L2 norm of every non-empty
    floating-point device tensor among ``tensors[i] for i in cuda`` and their
    copy into a pinned host buffer (kept in ``pinned`` by length and reused).

    Returns:
        What to read at the commit, or ``None`` when no tensor qualifies.
    """
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in cuda:
        t = tensors[i]
        if t.is_floating_point() and t.numel() and encoding(dtype_name(t.dtype)) is not None:
            by_dtype.setdefault(t.dtype, []).append(i)
    if not by_dtype:
        return None
    order = [i for group in by_dtype.values() for i in group]
    norms = [n.float() for group in by_dtype.values()
             for n in torch._foreach_norm([tensors[i].detach() for i in group], 2)]
    host = pinned.get(len(order))
    if host is None:
        host = pinned[len(order)] = torch.empty(len(order), dtype=torch.float32, pin_memory=True)
    host.copy_(torch.stack(norms), non_blocking=True)
    return DeviceFlags(order, host)


def checked_bitmap(indices: list[int], n: int) -> str:
    """Hex bitmap (bit ``i`` of the big number: entry ``i``) of ``indices`` among ``n`` entries."""
    value = 0
    for i in indices:
        value |= 1 << i
    return f"{value:0{(n + 3) // 4}x}" if indices else ""


class LossWindow:
    """The losses of a rank's recent snapshots, by step, for the spike test."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._losses: dict[int, float] = {}

    def judge(self, step: int, loss: float) -> tuple[str, str] | None:
        """Records ``loss`` at ``step``; ``(cause, detail)`` when it is suspect."""
        c = self.config
        if not math.isfinite(loss):
            self._losses.pop(step, None)
            return "nonfinite", f"loss {loss}"
        earlier = sorted(s for s in self._losses if s < step)[-c.spike_window:]
        self._losses[step] = loss
        for s in sorted(self._losses)[: max(0, len(self._losses) - 4 * c.spike_window)]:
            del self._losses[s]
        if len(earlier) < c.spike_min_samples:
            return None
        values = [self._losses[s] for s in earlier]
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        limit = max(median + c.spike_k * 1.4826 * mad, median + c.spike_min_rise * abs(median))
        if loss > limit:
            return "spike", f"loss {loss:.6g} > {limit:.6g} (median {median:.6g} of the {len(values)} earlier snapshots)"
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The sealer's judgement of one snapshot."""

    health: Health
    causes: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # entries that became non-finite
    detail: str = ""


class RankHealth:
    """One rank's memory of which entries may be non-finite, and its losses.

    Args:
        path: where the keys seen and the legitimate non-finite ones persist
            (``<shm_dir>/ckpt/rank<R>/health.json``); ``None`` keeps them in memory.
    """

    def __init__(self, config: HealthConfig, path: str | None) -> None:
        self.config = config
        self.path = path
        self.losses = LossWindow(config)
        self._seen: set[str] = set()
        self._legit: set[str] = set()
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    obj = json.load(f)
                self._seen = {k for k in obj.get("seen", []) if isinstance(k, str)}
                self._legit = {k for k in obj.get("legit", []) if isinstance(k, str)}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("ignoring unreadable %s (%s); the next snapshot sets what is legitimate", path, exc)

    def judge(self, keys: list[str], nonfinite: set[str], step: int, loss: float | None) -> Verdict:
        """Judges a snapshot of ``keys`` whose entries ``nonfinite`` hold NaN/Inf."""
        new = [k for k in keys if k not in self._seen]
        if new:
            self._seen.update(new)
            self._legit.update(k for k in new if k in nonfinite)  # non-finite from its first snapshot on
            self._persist()
        bad = tuple(sorted(nonfinite - self._legit))
        causes: list[str] = []
        details: list[str] = []
        if bad:
            causes.append("nonfinite")
            details.append(f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} became non-finite: {', '.join(bad[:5])}"
                           + (" ..." if len(bad) > 5 else ""))
        if loss is not None:
            judged = self.losses.judge(step, float(loss))
            if judged is not None:
                if judged[0] not in causes:
                    causes.append(judged[0])
                details.append(judged[1])
        if bad:
            return Verdict("poisoned", tuple(causes), bad, "; ".join(details))
        if causes:
            return Verdict("suspect", tuple(causes), (), "; ".join(details))
        return Verdict(HEALTHY)

    def _persist(self) -> None:
        if self.path is None:
            return
        try:
            write_atomic(self.path, json.dumps({"seen": sorted(self._seen), "legit": sorted(self._legit)}))
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
