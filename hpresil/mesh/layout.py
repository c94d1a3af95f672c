"""Layout computation: validated dense and expert views of the ranks, their groups,
how they sit on nodes and NVLink domains, and a printable explanation.

All arithmetic is on numpy index arrays (no per-rank Python loop), so a layout
of 16,384 ranks takes milliseconds; the explanation a few more.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpresil.errors import LayoutError
from hpresil.mesh.api import DENSE_DIMS, EXPERT_DIMS, MEGATRON_ORDER, MeshConfig, divisors
from hpresil.topology.api import TopologyMap

__all__ = ["MeshLayout", "compute_layout", "domain_label"]

_WHY = {
    "tp": "all-reduce per layer",
    "cp": "KV exchange per attention layer",
    "ep": "token all-to-all per MoE layer",
    "etp": "all-reduce per MoE layer",
    "dp": "gradient reduction per step",
    "edp": "expert gradient reduction per step",
    "pp": "activations between stages",
}


def domain_label(size: int, gpus_per_node: int) -> str:
    """How an error names a domain of ``size`` ranks (``an NVL72 domain``, ``a node``)."""
    return f"an NVL{size} domain" if size > gpus_per_node else "a node (its NVLink domain)"


def _fits(n: int, unit: int, also: int) -> str:
    return ", ".join(str(d // unit) for d in divisors(math.gcd(n, also)) if d % unit == 0) or "none"


def _validate(cfg: MeshConfig, topo: TopologyMap) -> tuple[int, int]:
    world, g = topo.world_size, topo.gpus_per_node
    tp, cp, ep, etp, pp = cfg.tp, cfg.cp, cfg.ep, cfg.etp, cfg.pp
    model = tp * cp * pp
    if world % model:
        raise LayoutError(f"tp*cp*pp={model} does not divide world_size={world} (tp={tp}, cp={cp}, pp={pp}; "
                          f"{world} % {model} = {world % model})")
    dp = world // model
    if cfg.dp is not None and cfg.dp != dp:
        raise LayoutError(f"tp*cp*dp*pp={tp}*{cp}*{cfg.dp}*{pp}={model * cfg.dp} != world_size={world}; "
                          f"leave dp=None to infer dp = world_size/(tp*cp*pp) = {dp}")
    stage = world // pp
    unit = ep * etp
    if stage % unit:
        raise LayoutError(f"ep*etp={unit} does not divide the {stage} ranks of a pipeline stage "
                          f"(world_size/pp = {world}/{pp}; ep={ep}, etp={etp}); ep that fit with etp={etp}: "
                          f"{_fits(stage, etp, stage)}")
    if not cfg.allow_cross_node:
        for name, value in (("tp", tp), ("etp", etp)):
            if g % value:
                raise LayoutError(f"{name}={value} does not divide the {g} GPUs of a node: {name.upper()} groups "
                                  f"would cross nodes; use {name} in {{{', '.join(map(str, divisors(g)))}}} "
                                  f"or allow_cross_node=True")
    if not cfg.allow_cross_domain:
        size = int(topo.domain_sizes.max())
        where = f"the {size} ranks of {domain_label(size, g)}"
        hint = (f"ep that fit with etp={etp}: {_fits(size, etp, stage)}; or allow_cross_domain=True "
                f"to accept EP all-to-alls across domains")
        if unit > size:
            raise LayoutError(f"ep*etp={unit} exceeds {where} (ep={ep}, etp={etp}): EP groups would cross "
                              f"domains; {hint}")
        if size % unit:
            raise LayoutError(f"ep*etp={unit} does not divide {where} (ep={ep}, etp={etp}; "
                              f"{size} % {unit} = {size % unit}): EP groups would straddle domain boundaries; {hint}")
    return dp, stage // unit


def _packed_order(topo: TopologyMap, chunk: int) -> np.ndarray:
    # Ranks regrouped by domain (domains in order of first appearance, ranks
    # ascending): each domain's whole chunks first, the remainders (spare or
    # missing trays) at the end, where only they can straddle domains.
    dom = topo.domain_of
    n = dom.size
    first_seen = np.full(len(topo.domain_names), n, dtype=np.int64)
    np.minimum.at(first_seen, dom, np.arange(n))
    by_domain = np.lexsort((np.arange(n), first_seen[dom]))
    sorted_dom = dom[by_domain]
    starts = np.flatnonzero(np.r_[True, sorted_dom[1:] != sorted_dom[:-1]])
    pos = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    main = pos < (topo.domain_sizes // chunk * chunk)[sorted_dom]
    return np.concatenate((by_domain[main], by_domain[~main]))


class MeshLayout:
    """Where every rank sits in the dense and expert views; build with :func:`compute_layout`.

    Attributes:
        config: the degrees asked for.
        topology: the rank-level topology it was laid out on.
        dp: data-parallel degree; ``edp``: expert data-parallel degree.
        order: ``order[i]`` is the global rank at mesh position ``i`` (identity for ``placement="rank"``).
        dense: global ranks shaped ``(pp, dp, cp, tp)``.
        expert: global ranks shaped ``(pp, edp, ep, etp)``.
    """

    def __init__(self, config: MeshConfig, topology: TopologyMap, dp: int, edp: int, order: np.ndarray) -> None:
        self.config = config
        self.topology = topology
        self.dp, self.edp = dp, edp
        self.order = order
        c = config
        self.dense = order.reshape(c.pp, dp, c.cp, c.tp)
        self.expert = order.reshape(c.pp, edp, c.ep, c.etp)
        self._position: np.ndarray | None = None

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    def sizes(self) -> dict[str, int]:
        """Every dim's size: ``tp, cp, dp, pp, ep, etp, edp``."""
        c = self.config
        return {"tp": c.tp, "cp": c.cp, "dp": self.dp, "pp": c.pp, "ep": c.ep, "etp": c.etp, "edp": self.edp}

    def groups(self, dim: str) -> np.ndarray:
        """The groups of one dim as ranks, shape ``(n_groups, size)`` (``dim`` from dense or expert dims)."""
        if dim in DENSE_DIMS:
            arr, dims = self.dense, DENSE_DIMS
        elif dim in EXPERT_DIMS:
            arr, dims = self.expert, EXPERT_DIMS
        else:
            raise LayoutError(f"unknown mesh dim {dim!r}; use one of {', '.join(DENSE_DIMS + EXPERT_DIMS[1:])}")
        axis = dims.index(dim)
        return np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis])

    def megatron_groups(self, token: str, *, expert: bool = False) -> list[list[int]]:
        """Rank groups in Megatron-Core's order-string convention (``RankGenerator.get_ranks``).

        Args:
            token: dims joined by ``-``, e.g. ``"tp"``, ``"dp-cp"``, ``"tp-pp"``, ``"ep"``.
            expert: the expert generator (tp = etp, dp = edp, cp = 1) instead of the dense one.

        Raises:
            LayoutError: ``token`` names a dim twice or an unknown dim.
        """
        c = self.config
        sizes = [c.etp, 1, c.ep, self.edp, c.pp] if expert else [c.tp, c.cp, 1, self.dp, c.pp]
        parts = token.split("-")
        if len(set(parts)) != len(parts) or not set(parts) <= set(MEGATRON_ORDER):
            raise LayoutError(f"token {token!r}: dims from {'-'.join(MEGATRON_ORDER)}, each at most once")
        n = len(MEGATRON_ORDER)
        grid = np.arange(self.world_size).reshape(sizes[::-1])  # leftmost Megatron dim = last axis
        masked = sorted(n - 1 - MEGATRON_ORDER.index(p) for p in parts)
        unmasked = [a for a in range(n) if a not in masked]
        size = math.prod(grid.shape[a] for a in masked)
        return self.order[grid.transpose(unmasked + masked).reshape(-1, size)].tolist()

    def position(self, rank: int) -> int:
        """Mesh position (Megatron's rank) of global ``rank``."""
        if self._position is None:
            self._position = np.empty_like(self.order)
            self._position[self.order] = np.arange(self.order.size)
        return int(self._position[rank])

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` in both views: ``{"pp":.., "dp":.., "cp":.., "tp":.., "edp":.., "ep":.., "etp":..}``."""
        pos = self.position(rank)
        dense = np.unravel_index(pos, self.dense.shape)
        expert = np.unravel_index(pos, self.expert.shape)
        return {**dict(zip(DENSE_DIMS, map(int, dense))), **dict(zip(EXPERT_DIMS, map(int, expert)))}

    def crossings(self, dim: str) -> tuple[int, int, int]:
        """``(groups, groups spanning nodes, groups spanning domains)`` of one dim."""
        g = self.groups(dim)
        node = self.topology.node_of[g]
        dom = self.topology.domain_of[g]
        return (g.shape[0], int((node != node[:, :1]).any(axis=1).sum()), int((dom != dom[:, :1]).any(axis=1).sum()))

    def _ascending(self, arr: np.ndarray, dims: tuple[str, ...]) -> None:
        for axis, name in enumerate(dims):
            if arr.shape[axis] > 1 and not (np.diff(arr, axis=axis) > 0).all():
                raise LayoutError(
                    f"ranks are not ascending along mesh dim {name!r} (placement='packed' moved spare nodes): "
                    "torch numbers a process group's members by global rank, so DeviceMesh coordinates would "
                    "disagree with group ranks; use placement='rank' with hpresil-run's domain-contiguous ranks, "
                    "or build groups from megatron_groups()")

    def dense_mesh(self, device_type: str = "cpu") -> Any:
        """torch ``DeviceMesh`` of the dense view, dims ``("pp", "dp", "cp", "tp")`` (a collective: call on every rank).

        Raises:
            LayoutError: the placement is not ascending along some dim (see :meth:`_ascending`).
        """
        return self._mesh(device_type, self.dense, DENSE_DIMS)

    def expert_mesh(self, device_type: str = "cpu") -> Any:
        """torch ``DeviceMesh`` of the expert view, dims ``("pp", "edp", "ep", "etp")`` (a collective).

        Raises:
            LayoutError: the placement is not ascending along some dim.
        """
        return self._mesh(device_type, self.expert, EXPERT_DIMS)

    def _mesh(self, device_type: str, arr: np.ndarray, dims: tuple[str, ...]) -> Any:
        import torch
        from torch.distributed.device_mesh import DeviceMesh

        self._ascending(arr, dims)
        return DeviceMesh(device_type, torch.as_tensor(arr, dtype=torch.int64), mesh_dim_names=dims)

    def _notes(self, dim: str, cross_node: int, cross_dom: int, n: int) -> str:
        c, g = self.config, self.topology.gpus_per_node
        size = self.sizes()[dim]
        if size == 1:
            return "trivial"
        if dim in ("tp", "etp", "cp"):
            span = c.tp * c.cp if dim == "cp" else size
            if not cross_node:
                return "inside a node"
            why = f"tp*cp={span} > {g} GPUs/node" if dim == "cp" else f"{dim}={size} vs {g} GPUs/node"
            return f"spans nodes ({why})" + ("" if cross_dom else ", inside a domain")
        if dim == "ep":
            if not cross_dom:
                return "inside a domain" if cross_node else "inside a node"
            return f"{cross_dom} of {n} cross domains: {self._ep_cause()}"
        return "spans domains by design" if cross_dom else ("inside a domain" if cross_node else "inside a node")

    def _ep_cause(self) -> str:
        unit = self.config.ep * self.config.etp
        sizes = self.topology.domain_sizes
        odd = np.flatnonzero(sizes % unit)
        if unit > sizes.max():
            return f"ep*etp={unit} is larger than any domain ({int(sizes.max())} ranks)"
        if odd.size:
            names = ", ".join(f"{self.topology.domain_names[i]} ({int(sizes[i])})" for i in odd[:4])
            more = f" and {odd.size - 4} more" if odd.size > 4 else ""
            return (f"{odd.size} domain(s) hold a number of ranks not divisible by ep*etp={unit} "
                    f"({names}{more}; missing or spare trays)"
                    + ("; their remainders share groups at the end" if self.config.placement == "packed"
                       else ", which shifts the groups after them"))
        return "ranks are not contiguous per domain (launch with hpresil-run, or placement='packed')"

    def __str__(self) -> str:
        c, s = self.config, self.sizes()
        lines = [
            f"mesh layout: {self.topology.describe()}",
            f"  dense  DeviceMesh (pp={c.pp}, dp={self.dp}, cp={c.cp}, tp={c.tp}); Megatron tp-cp-ep-dp-pp",
            f"  expert DeviceMesh (pp={c.pp}, edp={self.edp}, ep={c.ep}, etp={c.etp}); Megatron tp-ep-dp-pp "
            f"with tp=etp, dp=edp",
            f"  placement: {c.placement}" + ("" if c.placement == "rank" or (self.order == np.arange(self.order.size)).all()
                                             else " (ranks regrouped by domain)"),
            f"  {'dim':<4} {'size':>6} {'groups':>7} {'x-node':>7} {'x-domain':>9}  why / where",
        ]
        for dim in ("tp", "cp", "ep", "etp", "edp", "dp", "pp"):
            n, xn, xd = self.crossings(dim)
            lines.append(f"  {dim:<4} {s[dim]:>6} {n:>7} {xn:>7} {xd:>9}  {self._notes(dim, xn, xd, n)}"
                         + ("" if s[dim] == 1 else f"; {_WHY[dim]}"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MeshLayout(world_size={self.world_size}, {', '.join(f'{k}={v}' for k, v in self.sizes().items())})"


def compute_layout(config: MeshConfig, topology: TopologyMap) -> MeshLayout:
    """Validates ``config`` against ``topology`` and lays the ranks out.

    Raises:
        LayoutError: a degree does not fit; the message gives the formula, e.g.
            ``ep*etp=16 does not divide the 72 ranks of an NVL72 domain``.
    """
    dp, edp = _validate(config, topology)
    world = topology.world_size
    if config.placement == "packed":
        chunk = math.lcm(config.ep * config.etp, topology.gpus_per_node, config.tp)
        order = _packed_order(topology, chunk)
    else:
        order = np.arange(world, dtype=np.int64)
    return MeshLayout(config, topology, dp, edp, order)
