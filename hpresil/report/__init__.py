"""Goodput report of a run: ``hpresil-run report LOG_DIR`` (see :mod:`hpresil.report.api`)."""

from hpresil.report.api import CAUSES, KINDS, Epoch, GoodputReport, Segment, TierStats
from hpresil.report.goodput import analyse, build_report

__all__ = ["CAUSES", "KINDS", "Epoch", "GoodputReport", "Segment", "TierStats", "analyse", "build_report"]
