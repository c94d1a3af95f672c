"""hpresil: keep large distributed PyTorch training jobs making progress when hardware fails.

Integrate in about five lines::

    ckpt = hpresil.Checkpointer(state={"model": model, "optim": opt})
    step = ckpt.restore()
    for step in range(step, total):
        ...train...
        ckpt.save(step + 1)

and launch with ``hpresil-run`` instead of ``torchrun``.
"""

from hpresil import _errorfile
from hpresil.errors import (
    CheckpointError,
    ConfigError,
    HpresilError,
    IntegrityError,
    LaunchError,
    NoCheckpointError,
    StateMismatchError,
    StorageError,
)

from hpresil.hang.heartbeat import heartbeat, phase, section
from hpresil.checkpoint import Checkpointer, RNGState

__version__ = "0.1.0"

_errorfile.install()

__all__ = [
    "__version__",
    "CheckpointError",
    "Checkpointer",
    "RNGState",
    "ConfigError",
    "HpresilError",
    "IntegrityError",
    "LaunchError",
    "NoCheckpointError",
    "StateMismatchError",
    "StorageError",
    "heartbeat",
    "phase",
    "section",
]
