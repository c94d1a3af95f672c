"""The node services ``hpresil-run`` starts by default, in start order.

Each concern contributes its :class:`~hpresil.runtime.api.NodeService` here;
``hpresil-run`` passes each its own config, keyed by the service's ``name``.
Start order is pipeline order: the sealer seals a snapshot before the
replicator sends it and the drainer uploads it.
"""

from __future__ import annotations

from typing import Mapping

from hpresil.checkpoint.divergence_watch import DivergenceWatch
from hpresil.checkpoint.durable.drain import Drainer
from hpresil.checkpoint.peer.replicator import Replicator
from hpresil.checkpoint.ram.sealer import Sealer
from hpresil.hang.watchdog import Watchdog
from hpresil.health.service import HealthService
from hpresil.metrics.exporter import MetricsExporter
from hpresil.report.progress import ProgressService
from hpresil.run.recovery import RecoveryReport
from hpresil.runtime.api import NodeService
from hpresil.topology.service import TopologyService

__all__ = ["default_services", "DEFAULT_SERVICES"]

DEFAULT_SERVICES: tuple[type[NodeService], ...] = (
    TopologyService,
    HealthService,
    Sealer,
    DivergenceWatch,  # a node whose replicas diverged twice leaves (--on-divergence leave)
    Replicator,  # peer server + replication of sealed snapshots
    Drainer,
    Watchdog,
    ProgressService,
    MetricsExporter,  # idle unless --metrics-port
    RecoveryReport,  # one console line per recovery
)


def default_services(configs: Mapping[str, object] | None = None) -> list[NodeService]:
    """Instantiates the default services.

    Args:
        configs: a config per service name (e.g. ``{"watchdog": HangConfig(...)}``),
            passed to the service's constructor; others use their own defaults.
    """
    configs = configs or {}
    return [cls(configs[cls.name]) if cls.name in configs else cls() for cls in DEFAULT_SERVICES]  # type: ignore[call-arg]
