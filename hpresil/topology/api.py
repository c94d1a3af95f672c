"""Contract of topology discovery: which NVLink domain each node and rank is in.

An *NVLink domain* is the set of GPUs that reach each other over NVLink: one
node on p5/H100 (8 GPUs), a rack on GB200 NVL72 (18 trays x 4 GPUs) or NVL36.
Collectives inside a domain run at NVLink speed (1.8 TB/s per GPU on GB200);
between domains they cross EFA/InfiniBand, an order of magnitude slower, so
MoE all-to-alls and TP all-reduces must stay inside one.

* :class:`NodeTopology`: what one node learns about itself (``backends.py``).
* :class:`TopologyMap`: the rank-level view every worker shares (which node and
  domain each global rank is on), built by ``hpresil-run`` after its
  topology-aware rank assignment (``order.py``) or simulated from a spec such as
  ``nvl72x2`` (``simulate.py``). :mod:`hpresil.mesh` lays parallel groups out on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from typing import Any, Sequence

import numpy as np

from hpresil.errors import ConfigError, TopologyError

__all__ = ["TopologyConfig", "NodeTopology", "TopologyMap", "SOURCES", "MAP_FILE", "MODES"]

#: Where a node's domain came from, most trusted first (see ``backends.py``).
SOURCES = ("env", "fake", "nvml", "k8s", "slurm", "host")
#: Name of the rank-level map ``hpresil-run`` writes into the job's shm dir for its workers.
MAP_FILE = "topology.json"
#: ``auto``: discover and make ranks domain-contiguous; ``off``: keep torch's rank order.
MODES = ("auto", "off")


@dataclasses.dataclass(kw_only=True, slots=True)
class TopologyConfig:
    """Settings of topology discovery and topology-aware ranks (``--topology``).

    Attributes:
        mode: ``auto`` (discover, order ranks by domain) or ``off`` (torch's order).
        nvml: query NVML fabric info (``nvmlDeviceGetGpuFabricInfoV``).
        slurm_timeout: bound on ``scontrol show topology``.
    """

    mode: str = "auto"
    nvml: bool = True
    slurm_timeout: timedelta = timedelta(seconds=5)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--topology {self.mode!r}: use one of {', '.join(MODES)}")
        if self.slurm_timeout <= timedelta(0):
            raise ConfigError(f"slurm_timeout={self.slurm_timeout} must be > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class NodeTopology:
    """Where one node sits.

    Attributes:
        host: the node's id (``--node-id``, default the host name).
        domain: its NVLink domain (NVML clusterUuid, ultraserver id, Slurm block,
            else the host itself: a node is its own domain).
        clique: NVML cliqueId (the NVLink partition inside the domain), when known.
        tray: the node's position inside the domain, when a source tells it.
        source: which backend answered (one of :data:`SOURCES`).
    """

    host: str
    domain: str
    clique: str | None = None
    tray: int | None = None
    source: str = "host"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "NodeTopology":
        """The inverse of :meth:`to_json`; unknown keys are ignored.

        Raises:
            TopologyError: a required field is missing or has the wrong type.
        """
        try:
            tray = obj.get("tray")
            return cls(host=str(obj["host"]), domain=str(obj["domain"]),
                       clique=None if obj.get("clique") is None else str(obj["clique"]),
                       tray=None if tray is None else int(tray), source=str(obj.get("source", "host")))
        except (KeyError, TypeError, ValueError) as exc:
            raise TopologyError(f"malformed node topology {obj!r}: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TopologyMap:
    """Which node and which NVLink domain each global rank is on.

    Attributes:
        node_of: node index of each rank (``int64[world_size]``).
        domain_of: domain index of each rank (``int64[world_size]``).
        node_names: name of each node index.
        domain_names: name of each domain index.
        gpus_per_node: GPUs (ranks) per node; the most common node size when sizes differ.
    """

    node_of: np.ndarray
    domain_of: np.ndarray
    node_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return int(self.node_of.shape[0])

    @property
    def domain_sizes(self) -> np.ndarray:
        """Ranks in each domain (indexed like :attr:`domain_names`)."""
        return np.bincount(self.domain_of, minlength=len(self.domain_names))

    @classmethod
    def from_nodes(cls, nodes: Sequence[NodeTopology], ranks_per_node: Sequence[int]) -> "TopologyMap":
        """The map of nodes listed in global-rank order, node ``i`` holding ``ranks_per_node[i]`` ranks.

        Raises:
            TopologyError: the lists differ in length or a node has no ranks.
        """
        if len(nodes) != len(ranks_per_node) or not nodes:
            raise TopologyError(f"{len(nodes)} nodes but {len(ranks_per_node)} rank counts")
        counts = np.asarray(ranks_per_node, dtype=np.int64)
        if (counts <= 0).any():
            raise TopologyError(f"every node needs >= 1 rank, got {list(ranks_per_node)}")
        names, domain_idx = np.unique(np.asarray([n.domain for n in nodes], dtype=object).astype(str),
                                      return_inverse=True)
        # Number domains by first appearance so domain 0 holds rank 0.
        first = {}
        for d in domain_idx.tolist():
            first.setdefault(d, len(first))
        remap = np.empty(len(names), dtype=np.int64)
        for old, new in first.items():
            remap[old] = new
        ordered = [""] * len(names)
        for old, new in first.items():
            ordered[new] = str(names[old])
        return cls(node_of=np.repeat(np.arange(len(nodes), dtype=np.int64), counts),
                   domain_of=np.repeat(remap[domain_idx], counts),
                   node_names=tuple(n.host for n in nodes), domain_names=tuple(ordered),
                   gpus_per_node=int(np.bincount(counts).argmax()))

    @classmethod
    def uniform(cls, world_size: int, gpus_per_node: int, ranks_per_domain: int | None = None) -> "TopologyMap":
        """Equal nodes in rank order; ``ranks_per_domain`` ranks per domain (default: one node).

        Raises:
            TopologyError: the sizes do not divide each other.
        """
        per_domain = ranks_per_domain or gpus_per_node
        if world_size <= 0 or gpus_per_node <= 0 or world_size % gpus_per_node or per_domain % gpus_per_node:
            raise TopologyError(f"world_size={world_size}, gpus_per_node={gpus_per_node}, "
                                f"ranks_per_domain={per_domain}: need gpus_per_node | ranks_per_domain and "
                                f"gpus_per_node | world_size")
        ranks = np.arange(world_size, dtype=np.int64)
        n_nodes = world_size // gpus_per_node
        n_domains = -(-world_size // per_domain)
        return cls(node_of=ranks // gpus_per_node, domain_of=ranks // per_domain,
                   node_names=tuple(f"node{i}" for i in range(n_nodes)),
                   domain_names=tuple(f"domain{i}" for i in range(n_domains)), gpus_per_node=gpus_per_node)

    def to_json(self) -> dict[str, Any]:
        """Compact JSON: per node its name, domain and rank count, in rank order."""
        counts = np.bincount(self.node_of, minlength=len(self.node_names))
        node_domain = np.zeros(len(self.node_names), dtype=np.int64)
        node_domain[self.node_of] = self.domain_of
        return {"nodes": [{"host": h, "domain": self.domain_names[int(d)], "ranks": int(c)}
                          for h, d, c in zip(self.node_names, node_domain, counts)]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TopologyMap":
        """The inverse of :meth:`to_json`.

        Raises:
            TopologyError: the document is malformed.
        """
        try:
            nodes = [NodeTopology(host=str(n["host"]), domain=str(n["domain"])) for n in obj["nodes"]]
            ranks = [int(n["ranks"]) for n in obj["nodes"]]
            if any(r < 0 for r in ranks) or sum(ranks) > 1 << 24:  # before allocating per-rank arrays
                raise ValueError(f"rank counts {ranks[:8]} are negative or implausibly large")
            return cls.from_nodes(nodes, ranks)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise TopologyError(f"malformed topology map: {exc}") from exc

    def save(self, path: str) -> None:
        """Writes the map as JSON, atomically (readers never see half a file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "TopologyMap":
        """Reads a map written by :meth:`save`.

        Raises:
            TopologyError: the file is unreadable or malformed.
        """
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON or UTF-8 decoding
            raise TopologyError(f"cannot read topology map {path}: {exc}") from exc

    def describe(self) -> str:
        """One line: ranks, nodes and domain sizes."""
        sizes = self.domain_sizes
        uniq, counts = np.unique(sizes, return_counts=True)
        hist = ", ".join(f"{c} x {u}" for u, c in sorted(zip(uniq.tolist(), counts.tolist()), reverse=True))
        return (f"{self.world_size} ranks on {len(self.node_names)} nodes "
                f"({self.gpus_per_node} GPUs/node) in {len(self.domain_names)} NVLink domains of {hist} ranks")
