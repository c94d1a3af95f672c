"""Topology-aware rank order: pure functions every agent evaluates identically.

torchrun's c10d rendezvous numbers nodes in the order they joined (static: by
``--node-rank``), so the nodes of one NVL72 rack end up scattered over the
global ranks and every mesh built on rank order straddles racks. hpresil-run
re-orders nodes before assigning global ranks:

1. The domain of the rendezvous' node 0 comes first, and node 0 first inside it:
   global rank 0 must stay on node 0, whose host serves the workers'
   ``MASTER_ADDR`` store.
2. The other domains follow, the largest first (a domain with failed or spare
   trays missing is smaller), ties by their smallest host name (natural order:
   ``node2`` < ``node10``), then the domain id. Equal full domains therefore start
   at multiples of the domain size, and a short domain only misaligns the
   domains placed after it: the short ones go last.
3. Inside a domain, nodes by tray index when a source gives one, else by host
   name (natural order), then by their rendezvous rank.

Every agent reads every node's :class:`NodeTopology` from the rendezvous store
and computes the same permutation, so no extra round of messages is needed.
"""

from __future__ import annotations

import re
from typing import Sequence

from hpresil.topology.api import NodeTopology

__all__ = ["natural_key", "node_order", "rank_bases"]

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that orders embedded numbers numerically (``n2`` < ``n10``)."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part)


def node_order(nodes: Sequence[NodeTopology], ranks_per_node: Sequence[int], first: int = 0) -> list[int]:
    """The rendezvous ranks of ``nodes`` in topology order (see the module docstring).

    Args:
        nodes: each node's topology, indexed by rendezvous (group) rank.
        ranks_per_node: workers on each node.
        first: the node that must come first (the rendezvous' rank 0).

    Returns:
        A permutation of ``range(len(nodes))``: position ``k`` holds the node that
        gets the ``k``-th block of global ranks.
    """
    size: dict[str, int] = {}
    lowest: dict[str, tuple[object, ...]] = {}
    for node, count in zip(nodes, ranks_per_node):
        size[node.domain] = size.get(node.domain, 0) + count
        key = natural_key(node.host)
        if node.domain not in lowest or key < lowest[node.domain]:
            lowest[node.domain] = key
    head = nodes[first].domain if nodes else ""

    def domain_key(domain: str) -> tuple[object, ...]:
        return (domain != head, -size[domain], lowest[domain], domain)

    def key(i: int) -> tuple[object, ...]:
        node = nodes[i]
        tray = node.tray if node.tray is not None else 1 << 62
        return (*domain_key(node.domain), i != first, tray, natural_key(node.host), i)

    return sorted(range(len(nodes)), key=key)


def rank_bases(order: Sequence[int], ranks_per_node: Sequence[int]) -> list[int]:
    """The first global rank of each node (indexed by rendezvous rank) under ``order``."""
    bases = [0] * len(order)
    base = 0
    for node in order:
        bases[node] = base
        base += ranks_per_node[node]
    return bases
