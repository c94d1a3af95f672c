"""Peer replication: the ``peer`` tier of tiered checkpointing.

The node runtime's :class:`~hpresil.peer.replicator.Replicator` streams sealed
RAM snapshots to other nodes' :class:`~hpresil.peer.server.PeerServer`
(authenticated TCP, JSON headers plus raw bytes, checksums verified on
arrival); :class:`~hpresil.peer.source.PeerSource` lets a restore read them.
The contract (file layout, wire format, settings) is in :mod:`hpresil.peer.api`.
"""

from hpresil.peer.api import ReplicatorConfig
from hpresil.peer.placement import place, plan

__all__ = ["ReplicatorConfig", "place", "plan"]
