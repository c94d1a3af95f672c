"""Tiered checkpointing: RAM (this node's shared memory) → peer RAM → durable storage.

Users need :class:`Checkpointer` (and :class:`RNGState` to checkpoint random
number generators, :class:`RollbackPolicy` to choose what an unhealthy state
does); the contract between the pieces is in :mod:`hpresil.checkpoint.api`.
"""

from hpresil.checkpoint.api import CheckpointConfig


def __getattr__(name: str) -> object:
    # Loaded on first use: the node runtime imports the sealer and drainer from
    # this package and must not pay for the Checkpointer's torch imports.
    if name in ("Checkpointer", "RNGState"):
        from hpresil.checkpoint import checkpointer

        return getattr(checkpointer, name)
    if name == "RollbackPolicy":
        from hpresil.checkpoint.rollback import RollbackPolicy

        return RollbackPolicy
    raise AttributeError(f"module 'hpresil.checkpoint' has no attribute {name!r}")

__all__ = ["Checkpointer", "CheckpointConfig", "RNGState", "RollbackPolicy"]
