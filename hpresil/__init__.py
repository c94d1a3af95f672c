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

__version__ = "0.1.0"

_errorfile.install()

# The checkpoint stack imports torch.distributed's tensor and checkpoint
# packages (seconds of start-up); the launcher and scripts that only beat the
# heartbeat should not pay for it, so it loads on first use.
_LAZY = {"Checkpointer": "hpresil.checkpoint", "RNGState": "hpresil.checkpoint"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpresil' has no attribute {name!r}")

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
