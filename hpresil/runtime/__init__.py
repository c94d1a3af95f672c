"""The node runtime (see :mod:`hpresil.runtime.api`)."""

from hpresil.runtime.api import NodeService, RuntimeConfig, RuntimeContext, WorkerGroupInfo

__all__ = ["NodeService", "RuntimeConfig", "RuntimeContext", "WorkerGroupInfo"]
