"""Peer replication: the ``peer`` tier of tiered checkpointing.

The node runtime's :class:`~hpresil.checkpoint.peer.replicator.Replicator` streams sealed
RAM snapshots to other nodes' :class:`~hpresil.checkpoint.peer.server.PeerServer`
(authenticated TCP, JSON headers plus raw bytes, checksums verified on
arrival); :class:`~hpresil.checkpoint.peer.source.PeerSource` lets a restore read them.
The contract (file layout, wire format, settings) is in :mod:`hpresil.checkpoint.peer.api`.
"""

from hpresil.checkpoint.peer.api import ReplicatorConfig
from hpresil.checkpoint.peer.placement import place, plan

__all__ = ["ReplicatorConfig", "place", "plan"]
