"""NVLink topology: discovery per node, topology-aware ranks, and the rank-level map.

In a worker, :func:`load_map` returns which node and NVLink domain each global
rank is on, as ``hpresil-run`` ordered them; :mod:`hpresil.mesh` builds parallel
groups on it. See ``docs/architecture.md`` ("Topology and meshes").
"""

from __future__ import annotations

import logging
import os

from hpresil import _env
from hpresil.topology.api import MAP_FILE, NodeTopology, TopologyConfig, TopologyMap
from hpresil.topology.backends import discover
from hpresil.topology.order import node_order, rank_bases
from hpresil.topology.simulate import simulated

__all__ = ["MAP_FILE", "NodeTopology", "TopologyConfig", "TopologyMap", "discover", "load_map", "node_order",
           "rank_bases", "simulated"]

log = logging.getLogger(__name__)


def load_map(world_size: int | None = None, local_world_size: int | None = None) -> TopologyMap:
    """The job's rank-level topology, in a worker.

    Under ``hpresil-run`` (topology on) it is the map the agents agreed on at
    this rendezvous. Otherwise (torchrun, ``--topology off``, one process),
    each node of ``LOCAL_WORLD_SIZE`` consecutive ranks is its own domain.

    Args:
        world_size: default ``$WORLD_SIZE`` (1 when unset).
        local_world_size: default ``$LOCAL_WORLD_SIZE`` (else ``world_size``).
    """
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    local = local_world_size if local_world_size is not None else int(os.environ.get("LOCAL_WORLD_SIZE", world))
    shm_dir = _env.get(_env.SHM_DIR)
    path = os.path.join(shm_dir, MAP_FILE) if shm_dir else None
    if path and os.path.exists(path):
        topo = TopologyMap.load(path)
        if topo.world_size == world:
            return topo
        log.warning("%s describes %d ranks, not %d: ignoring it", path, topo.world_size, world)
    if world % local:
        local = world
    return TopologyMap.uniform(world, local)
