"""Simulated topologies, to see how a job maps onto hardware you are not on.

Spec grammar (``--simulate-topology``, :func:`simulated`)::

    nvl72x2              2 GB200 NVL72 racks: 18 trays x 4 GPUs each (144 ranks)
    nvl36x4              4 NVL36 racks: 9 trays x 4 GPUs (144 ranks)
    p5x4                 4 p5 nodes, 8 GPUs each; NVLink stops at the node (32 ranks)
    nvl72x228,missing=10 228 racks with 10 trays missing, spread over the racks
    nvlNxM,gpus=G        any domain of N GPUs on trays of G GPUs (default 4)

``missing`` removes trays one per rack, starting from the last rack and going
backwards, as failed or drained trays would; the ranks stay domain-contiguous
as ``hpresil-run`` assigns them (short racks last).
"""

from __future__ import annotations

import re

import numpy as np

from hpresil.errors import ConfigError
from hpresil.topology.api import TopologyMap

__all__ = ["simulated", "SPEC_HELP"]

SPEC_HELP = "nvl72x2, nvl36x4, p5x4, nvl72x228,missing=10 or nvl<N>x<racks>,gpus=<G>"
_SPEC = re.compile(r"^(?P<kind>nvl(?P<n>\d+)|p5)x(?P<count>\d+)(?P<opts>(,\w+=\d+)*)$")


def simulated(spec: str) -> TopologyMap:
    """The rank-level map of a simulated cluster.

    Raises:
        ConfigError: the spec does not parse or its sizes do not fit.
    """
    match = _SPEC.match(spec.strip().lower())
    if not match:
        raise ConfigError(f"topology spec {spec!r} not understood; use e.g. {SPEC_HELP}")
    opts = dict(kv.split("=") for kv in match.group("opts").split(",") if kv)
    unknown = set(opts) - {"missing", "gpus"}
    if unknown:
        raise ConfigError(f"topology spec {spec!r}: unknown option(s) {sorted(unknown)}; use missing=, gpus=")
    count = int(match.group("count"))
    if match.group("kind") == "p5":
        gpus, per_domain = int(opts.get("gpus", 8)), int(opts.get("gpus", 8))
    else:
        gpus, per_domain = int(opts.get("gpus", 4)), int(match.group("n"))
    if count <= 0 or gpus <= 0 or per_domain % gpus:
        raise ConfigError(f"topology spec {spec!r}: need >= 1 domain and gpus={gpus} dividing the domain size {per_domain}")
    trays = np.full(count, per_domain // gpus, dtype=np.int64)
    missing = int(opts.get("missing", 0))
    if missing >= trays.sum():
        raise ConfigError(f"topology spec {spec!r}: missing={missing} leaves no trays (there are {trays.sum()})")
    for k in range(missing):  # one tray per rack, from the last rack backwards
        rack = count - 1 - (k % count)
        while trays[rack] <= 1:
            rack = (rack - 1) % count
        trays[rack] -= 1
    n_nodes = int(trays.sum())
    node_domain = np.repeat(np.arange(count, dtype=np.int64), trays)
    node_of = np.repeat(np.arange(n_nodes, dtype=np.int64), gpus)
    prefix = match.group("kind")
    tray_index = np.arange(n_nodes) - np.repeat(np.cumsum(trays) - trays, trays)
    return TopologyMap(node_of=node_of, domain_of=node_domain[node_of],
                       node_names=tuple(f"{prefix}-r{d}-t{t}" for d, t in zip(node_domain.tolist(), tray_index.tolist())),
                       domain_names=tuple(f"{prefix}-rack{d}" for d in range(count)), gpus_per_node=gpus)
