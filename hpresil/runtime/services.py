"""The node services ``hpresil-run`` starts by default.

Each concern contributes its service here; a service whose optional
dependency is missing is left out with a log line instead of failing the job.
"""

from __future__ import annotations

import importlib
import logging

from hpresil.runtime.api import NodeService

__all__ = ["default_services", "DEFAULT_SERVICES"]

log = logging.getLogger(__name__)

#: (module, class) of each default service, in start order.
DEFAULT_SERVICES: tuple[tuple[str, str], ...] = (
    ("hpresil.checkpoint.sealer", "Sealer"),
    ("hpresil.checkpoint.drain", "Drainer"),
)


def default_services() -> list[NodeService]:
    """Instantiates the default services that are importable here."""
    services: list[NodeService] = []
    for module_name, class_name in DEFAULT_SERVICES:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            log.info("node service %s.%s unavailable: %s", module_name, class_name, exc)
            continue
        services.append(cls())
    return services
