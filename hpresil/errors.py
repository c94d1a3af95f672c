"""The one error hierarchy of hpresil.

Every error hpresil raises on purpose derives from :class:`HpresilError`, so a
caller can catch all of them at once, and each message names the fix.
"""

from __future__ import annotations

__all__ = [
    "HpresilError",
    "ConfigError",
    "LaunchError",
    "CheckpointError",
    "StorageError",
    "IntegrityError",
    "StateMismatchError",
    "ReshardError",
    "NoCheckpointError",
    "UnhealthyStateError",
    "HealthError",
    "HealthUnavailableError",
    "NodeUnhealthyError",
    "TopologyError",
    "LayoutError",
]


class HpresilError(Exception):
    """Base class of every error hpresil raises deliberately."""


class ConfigError(HpresilError, ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class LaunchError(HpresilError):
    """``hpresil-run`` could not start or supervise the worker group."""


class CheckpointError(HpresilError):
    """Saving or restoring a checkpoint failed."""


class StorageError(CheckpointError):
    """A storage tier (RAM, peer or durable) could not be read or written."""


class IntegrityError(CheckpointError):
    """A snapshot failed its integrity check (checksum, size, layout, or a file
    its commit promised is missing).

    Attributes:
        file: the damaged or missing file, where one is to blame.
    """

    def __init__(self, message: str, *, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


class StateMismatchError(CheckpointError):
    """The saved state does not match the state being restored into."""


class ReshardError(StateMismatchError):
    """The snapshot was saved at another world size and this state cannot be
    resharded (DeepSpeed ZeRO partitions); the message names both sizes and the fix."""


class NoCheckpointError(StorageError):
    """No reachable tier holds a checkpoint, and a tier that may hold one cannot
    be reached: restoring would silently start the job over."""


class UnhealthyStateError(CheckpointError):
    """The training state went bad (NaN/Inf, a loss spike, replicas that
    diverged) and the policy says stop, or rolling back did not help: the
    message names the step, the cause and the flag that sets the policy."""


class HealthError(HpresilError):
    """A GPU health check could not run or found the node unfit for the job."""


class HealthUnavailableError(HealthError):
    """No health backend works here (NVML library or driver missing, no GPUs)."""


class NodeUnhealthyError(HealthError):
    """A fatal GPU finding: this node leaves the job so the others can rescale.

    Attributes:
        exit_code: the process exit code ``hpresil-run`` should end with.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TopologyError(HpresilError):
    """The node's NVLink topology could not be read or is inconsistent across nodes."""


class LayoutError(ConfigError):
    """Parallelism degrees do not fit the world size, nodes or NVLink domains; the
    message gives the formula that failed and the sizes that would fit."""
