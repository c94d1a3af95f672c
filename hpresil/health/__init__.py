"""GPU health checks: NVML pre-flight and periodic checks; a node with a fatal
GPU fault leaves the job so the others can rescale (see :mod:`hpresil.health.service`).

``pynvml`` (``pip install 'hpresil[nvml]'``) is optional: without it, or without
a driver, the checks report themselves unavailable and the job runs on.
"""

from hpresil.health.api import (
    CHECKS,
    EXIT_UNHEALTHY,
    DeviceReading,
    Finding,
    HealthBackend,
    HealthConfig,
    HealthReport,
    Verdict,
    XidEvent,
)
from hpresil.health.checks import XID_CATALOG, classify_xid, evaluate
from hpresil.health.fake import FakeBackend
from hpresil.health.nvml import NvmlBackend
from hpresil.health.service import VERDICT_FILE, HealthService, select_backend

__all__ = [
    "CHECKS",
    "EXIT_UNHEALTHY",
    "VERDICT_FILE",
    "XID_CATALOG",
    "DeviceReading",
    "FakeBackend",
    "Finding",
    "HealthBackend",
    "HealthConfig",
    "HealthReport",
    "HealthService",
    "NvmlBackend",
    "Verdict",
    "XidEvent",
    "classify_xid",
    "evaluate",
    "select_backend",
]
