"""Prometheus metrics of a node (``hpresil-run --metrics-port``); see :mod:`hpresil.metrics.api`."""

from hpresil.metrics.api import ENV_PORT, MetricsConfig

__all__ = ["ENV_PORT", "MetricsConfig"]
