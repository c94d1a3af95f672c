"""Tiered checkpointing: RAM (this node's shared memory) → peer RAM → durable storage.

Users need :class:`Checkpointer` (and :class:`RNGState` to checkpoint random
number generators); the contract between the pieces is in
:mod:`hpresil.checkpoint.api`.
"""

from hpresil.checkpoint.api import CheckpointConfig
from hpresil.checkpoint.checkpointer import Checkpointer, RNGState

__all__ = ["Checkpointer", "CheckpointConfig", "RNGState"]
