"""Where each node's snapshots are replicated: a pure function of the node ranks.

Nodes are ordered so that each failure domain is a contiguous block (sorted
by domain label, then node rank; a node without a label is a domain of its
own). Replica ``k`` of the node at position ``i`` goes to position
``(i + s_k) mod N`` for a set of distinct shifts ``s_1..s_R``. Every shift is
a permutation of the nodes, so each node receives exactly ``R`` replicas
whatever ``N`` (balanced at 2 nodes and at 2,048), and a non-zero shift never
maps a node to itself.

A shift ``s`` keeps every replica out of its source's domain exactly when
``M <= s <= N - M`` for the largest domain size ``M``; those shifts are used
first. When there are fewer of them than ``R`` (a domain holds more than half
of the nodes) the remaining shifts are the ones that cross domains for the
most nodes: with blocks of sizes ``b_j``, shift ``s`` keeps
``sum_j max(0, b_j - s) + max(0, b_j - (N - s))`` replicas inside their
domain, computed in O(domains) per shift. Balance wins over domain diversity
there: sending every replica of a big domain to the few nodes outside it
would overload them.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["plan", "place", "domain_order"]


def domain_order(nodes: int, domains: Sequence[str | None] | None = None) -> list[int]:
    """Node ranks ordered with each failure domain contiguous (unlabelled nodes last,
    each alone)."""
    if domains is None:
        return list(range(nodes))
    if len(domains) != nodes:
        raise ValueError(f"{len(domains)} domain labels for {nodes} nodes: need one label (or None) per node")
    return sorted(range(nodes), key=lambda g: (domains[g] is None, str(domains[g] or ""), g))


def _blocks(order: list[int], domains: Sequence[str | None] | None) -> list[int]:
    if domains is None:
        return [1] * len(order)
    sizes: list[int] = []
    prev: object = object()
    for g in order:
        label = domains[g]
        if label is not None and label == prev:
            sizes[-1] += 1
        else:
            sizes.append(1)
        prev = label if label is not None else object()
    return sizes


def _shifts(nodes: int, replicas: int, blocks: list[int]) -> list[int]:
    biggest = max(blocks)
    safe = list(range(biggest, nodes - biggest + 1))[:replicas]
    if len(safe) == replicas:
        return safe
    big = sorted((b for b in blocks if b > 1), reverse=True)

    def same(s: int) -> int:
        short = min(s, nodes - s)
        total = 0
        for b in big:
            if b <= short:
                break  # sorted: no smaller block contributes either
            total += max(0, b - s) + max(0, b - (nodes - s))
        return total

    rest = sorted((s for s in range(1, nodes) if s not in safe), key=lambda s: (same(s), s))
    return safe + rest[: replicas - len(safe)]


def plan(nodes: int, replicas: int, domains: Sequence[str | None] | None = None) -> list[list[int]]:
    """The peers of every node.

    Args:
        nodes: number of nodes (group world size).
        replicas: replicas per snapshot; capped at ``nodes - 1``.
        domains: failure-domain label per node rank (``None`` where unknown).

    Returns:
        ``result[g]``: the node ranks that receive node ``g``'s snapshots,
        replica 1 first; never ``g`` itself; each node appears in exactly
        ``min(replicas, nodes - 1)`` lists.

    Raises:
        ValueError: ``nodes < 1``, ``replicas < 0`` or a label list of the wrong length.
    """
    if nodes < 1 or replicas < 0:
        raise ValueError(f"nodes={nodes} replicas={replicas}: need nodes >= 1 and replicas >= 0")
    order = domain_order(nodes, domains)
    r = min(replicas, nodes - 1)
    if r == 0:
        return [[] for _ in range(nodes)]
    shifts = _shifts(nodes, r, _blocks(order, domains))
    position = {g: i for i, g in enumerate(order)}
    return [[order[(position[g] + s) % nodes] for s in shifts] for g in range(nodes)]


def place(node: int, nodes: int, replicas: int, domains: Sequence[str | None] | None = None) -> list[int]:
    """The peers of one node (see :func:`plan`)."""
    if not 0 <= node < nodes:
        raise ValueError(f"node rank {node} is not in 0..{nodes - 1}")
    return plan(nodes, replicas, domains)[node]
