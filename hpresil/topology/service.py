"""Topology as a node service, and the topology-aware rank assignment of ``hpresil-run``.

The service discovers the node's NVLink domain once, at start. After every
rendezvous the agent calls :func:`assign_worker_ranks`: each agent publishes its
:class:`NodeTopology` under a per-round key of the rendezvous store, reads all of
them, computes the same node order (:func:`hpresil.topology.order.node_order`)
and shifts its workers' global ranks to its node's block. It also writes the
rank-level :class:`TopologyMap` to ``<shm_dir>/topology.json`` for the workers
(:func:`hpresil.topology.load_map`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from typing import Any, Sequence

from hpresil.errors import TopologyError
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo
from hpresil.runtime.store_ops import multi_get
from hpresil.topology.api import MAP_FILE, NodeTopology, TopologyConfig, TopologyMap
from hpresil.topology.backends import discover
from hpresil.topology.order import node_order, rank_bases

__all__ = ["TopologyService", "assign_worker_ranks", "KEY_PREFIX"]

log = logging.getLogger(__name__)

#: Keys in the (per-round) rendezvous store: ``<prefix><group rank>`` -> node JSON.
KEY_PREFIX = "hpresil/topology/node/"


class TopologyService(NodeService):
    """Discovers this node's NVLink domain and orders ranks by domain (``name = "topology"``).

    Args:
        config: discovery settings; ``mode="off"`` keeps torch's rank order.
    """

    name = "topology"

    def __init__(self, config: TopologyConfig | None = None) -> None:
        self.config = config or TopologyConfig()
        self.node: NodeTopology | None = None
        self._ctx: RuntimeContext | None = None

    def start(self, ctx: RuntimeContext) -> None:
        self._ctx = ctx
        if self.config.mode == "off":
            return
        start = time.monotonic()
        self.node = discover(ctx.node_id, self.config)
        ctx.events.emit("topology", domain=self.node.domain, clique=self.node.clique, tray=self.node.tray,
                        source=self.node.source, duration_s=round(time.monotonic() - start, 4))
        log.info("NVLink domain %s (source %s, clique %s, tray %s)", self.node.domain, self.node.source,
                 self.node.clique, self.node.tray)

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        pass

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        pass

    def tick(self) -> None:
        pass

    def stop(self, timeout: timedelta) -> None:
        pass

    def assign(self, store: Any, group_rank: int, group_world_size: int, workers: Sequence[Any]) -> list[Any]:
        """Topology-aware global ranks for this node's ``workers`` (see :func:`assign_worker_ranks`)."""
        if self.node is None or self._ctx is None or not workers:
            return list(workers)
        new, topo, moved = assign_worker_ranks(store, group_rank, group_world_size, workers, self.node)
        try:
            topo.save(os.path.join(self._ctx.shm_dir, MAP_FILE))
        except OSError as exc:  # workers then fall back to one domain per node
            log.warning("cannot write %s: %s", MAP_FILE, exc)
        self._ctx.events.emit("topology", phase="ranks", group_rank=group_rank, domains=len(topo.domain_names),
                              domain_sizes=topo.domain_sizes.tolist()[:64], moved=moved,
                              ranks=[w.global_rank for w in new])
        return new


def assign_worker_ranks(store: Any, group_rank: int, group_world_size: int, workers: Sequence[Any],
                        node: NodeTopology) -> tuple[list[Any], TopologyMap, bool]:
    """Re-numbers this node's workers so global ranks are contiguous per NVLink domain.

    Every agent of the round calls this with its own ``node``; all compute the
    same order. World size, local ranks and the rendezvous' group ranks are
    unchanged; only which block of global ranks each node gets changes.

    Args:
        store: the round's rendezvous store.
        group_rank: this node's rendezvous rank.
        group_world_size: number of nodes.
        workers: torch's ``Worker`` objects as torch assigned them (one role).
        node: this node's topology.

    Returns:
        The re-numbered workers, the rank-level map, and whether any node moved.

    Raises:
        TopologyError: the workers have several roles, or a node published garbage.
    """
    from torch.distributed.elastic.agent.server.api import Worker

    if any(w.role_world_size != w.world_size for w in workers):
        raise TopologyError("topology-aware ranks need a single worker role; pass --topology off")
    store.set(f"{KEY_PREFIX}{group_rank}", json.dumps({**node.to_json(), "nproc": len(workers)}))
    keys = [f"{KEY_PREFIX}{i}" for i in range(group_world_size)]
    raw = multi_get(store, keys)
    nodes: list[NodeTopology] = []
    counts: list[int] = []
    for i, blob in enumerate(raw):
        try:
            obj = json.loads(bytes(blob).decode())
            counts.append(int(obj["nproc"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise TopologyError(f"node {i} published malformed topology: {exc}") from exc
        nodes.append(NodeTopology.from_json(obj))
    order = node_order(nodes, counts, first=0)
    bases = rank_bases(order, counts)
    shift = bases[group_rank] - min(w.global_rank for w in workers)
    new = [Worker(local_rank=w.local_rank, global_rank=w.global_rank + shift, role_rank=w.role_rank + shift,
                  world_size=w.world_size, role_world_size=w.role_world_size) for w in workers]
    topo = TopologyMap.from_nodes([nodes[i] for i in order], [counts[i] for i in order])
    return new, topo, order != list(range(group_world_size))
