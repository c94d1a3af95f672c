"""The node services ``hpresil-run`` starts by default.

Each concern contributes its service here; a service whose optional
dependency is missing is left out with a log line instead of failing the job.
"""

from __future__ import annotations

import importlib
import logging
from typing import Mapping

from hpresil.runtime.api import NodeService

__all__ = ["default_services", "DEFAULT_SERVICES"]

log = logging.getLogger(__name__)

#: (module, class) of each default service, in start order.
DEFAULT_SERVICES: tuple[tuple[str, str], ...] = (
    ("hpresil.topology.service", "TopologyService"),
    ("hpresil.health.service", "HealthService"),
    ("hpresil.checkpoint.sealer", "Sealer"),
    ("hpresil.peer.replicator", "Replicator"),  # peer server + replication of sealed snapshots
    ("hpresil.checkpoint.drain", "Drainer"),
    ("hpresil.hang.watchdog", "Watchdog"),
    ("hpresil.report.progress", "ProgressService"),
    ("hpresil.metrics.exporter", "MetricsExporter"),  # idle unless --metrics-port
)


def default_services(configs: Mapping[str, object] | None = None) -> list[NodeService]:
    """Instantiates the default services that are importable here.

    Args:
        configs: a config per service module (e.g. ``{"hpresil.hang.watchdog": HangConfig(...)}``),
            passed to the service's constructor; others use their own defaults.
    """
    configs = configs or {}
    services: list[NodeService] = []
    for module_name, class_name in DEFAULT_SERVICES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            log.info("node service %s.%s unavailable: %s", module_name, class_name, exc)
            continue
        services.append(cls(configs[module_name]) if module_name in configs else cls())
    return services
