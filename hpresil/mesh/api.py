"""Contract of the mesh helper: parallelism degrees in, a validated layout out.

Two views of the same ranks, as in Megatron-Core and torchtitan:

* dense (attention, dense MLP): torch ``DeviceMesh`` dims ``("pp", "dp", "cp", "tp")``,
  Megatron order ``tp-cp-ep-dp-pp`` with ep = 1 (leftmost varies fastest);
* expert (MoE layers): dims ``("pp", "edp", "ep", "etp")``, Megatron's expert
  generator (``tp`` = etp, ``dp`` = edp = world / (pp * ep * etp), cp = 1).

Placement rules: TP (and CP) inside a node, EP x ETP inside an NVLink domain,
DP and PP across domains. :func:`hpresil.mesh.compute_layout` checks them and
raises :class:`~hpresil.errors.LayoutError` with the failed formula.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from hpresil.errors import LayoutError

__all__ = ["MeshConfig", "DENSE_DIMS", "EXPERT_DIMS", "MEGATRON_ORDER", "Placement", "divisors"]

#: torch DeviceMesh dim names, outermost first (the last dim is contiguous in rank order).
DENSE_DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("pp", "edp", "ep", "etp")
#: Megatron-Core's order string (leftmost is contiguous in rank order).
MEGATRON_ORDER = ("tp", "cp", "ep", "dp", "pp")
#: ``rank``: mesh positions are global ranks (what hpresil-run's domain-contiguous ranks
#: need; DeviceMesh-safe). ``packed``: ranks are regrouped by domain so EP groups avoid
#: domain boundaries even when ranks are not domain-contiguous (explicit rank groups only).
Placement = Literal["rank", "packed"]


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclasses.dataclass(kw_only=True, slots=True)
class MeshConfig:
    """Parallelism degrees.

    Attributes:
        tp: tensor parallel (dense layers).
        cp: context parallel.
        ep: expert parallel (experts are split over ``ep`` ranks).
        etp: expert tensor parallel (each expert split over ``etp`` ranks).
        pp: pipeline parallel.
        dp: data parallel; ``None``: ``world_size / (tp * cp * pp)``.
        placement: see :data:`Placement`.
        allow_cross_node: let TP/ETP groups span nodes (e.g. TP=8 over a GB200 rack's NVLink).
        allow_cross_domain: let EP x ETP groups span NVLink domains (e.g. EP=16 on p5).
    """

    tp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    dp: int | None = None
    placement: Placement = "rank"
    allow_cross_node: bool = False
    allow_cross_domain: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "ep", "etp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name}={value!r}: degrees are integers >= 1")
        if self.dp is not None and (not isinstance(self.dp, int) or self.dp < 1):
            raise LayoutError(f"dp={self.dp!r}: an integer >= 1, or None to infer dp = world_size/(tp*cp*pp)")
        if self.placement not in ("rank", "packed"):
            raise LayoutError(f"placement={self.placement!r}: use 'rank' or 'packed'")
