"""The timeline picture of a run (matplotlib, the optional ``report`` extra).

Top: the last kept step over time, with failures, hangs, restores, durable
commits, rollbacks, unhealthy snapshots and replica divergences marked. Middle: the world size. Bottom: where each second went
(the report's segments, coloured by kind).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from hpresil.errors import ConfigError
from hpresil.report.api import KINDS, GoodputReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["build_figure", "draw_timeline", "COLORS"]

log = logging.getLogger(__name__)

#: Colour of each segment kind.
COLORS = {
    "productive": "#2ca02c",
    "lost_work": "#d62728",
    "detection": "#e377c2",
    "checkpoint": "#1f77b4",
    "restore": "#17becf",
    "restart": "#ff7f0e",
    "rescale": "#bcbd22",
    "hang_detection": "#9467bd",
    "init": "#7f7f7f",
    "shutdown": "#c7c7c7",
}
#: Vertical lines: colour and line style (solid or dashed, wide enough to show in the legend).
_MARKS = {"exit": ("#d62728", "-"), "hang": ("#9467bd", "-"), "restore": ("#17becf", "--"), "durable": ("#ff7f0e", "--"),
          "rollback": ("#8c564b", "-"), "poisoned": ("#000000", ":"), "suspect": ("#7f7f7f", ":"),
          "divergence": ("#e377c2", "-.")}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on cluster nodes
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--png needs matplotlib: pip install 'hpresil[report]' (or pip install matplotlib)") from None
    return plt


def draw_timeline(report: GoodputReport, path: str) -> str:
    """Writes the timeline of ``report`` as a PNG.

    Args:
        report: the analysed run.
        path: the PNG to write (its directory is created).

    Returns:
        The path written.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    plt = _pyplot()
    fig = plt.figure(figsize=(12, 6.5))
    try:
        build_figure(report, fig)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    log.info("timeline written to %s", path)
    return path


def build_figure(report: GoodputReport, fig: "Figure") -> None:
    """Draws the timeline into ``fig``: three rows on one time axis (steps with
    the marks, the world size, where the time went)."""
    t0 = report.start
    top, sizes, bottom = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 0.8, 0.7]})
    for epoch in sorted({e for _, _, e in report.progress}):  # one line per start: restores jump back
        points = [(t - t0, s) for t, s, e in report.progress if e == epoch]
        top.plot([x for x, _ in points], [y for _, y in points], ".-", color="#2ca02c", markersize=3,
                 linewidth=1, label="step" if epoch == report.progress[0][2] else None)
    top.set_ylabel("step")
    seen: set[str] = set()
    for t, kind, _label in report.marks:
        if kind in _MARKS:
            color, style = _MARKS[kind]
            top.axvline(t - t0, color=color, linestyle=style, linewidth=1.5,
                        label=None if kind in seen else kind)
            seen.add(kind)
    saves = [t - t0 for t, kind, _ in report.marks if kind.startswith("save:")]
    if saves:
        top.plot(saves, [0] * len(saves), "|", color="#1f77b4", markersize=8, label="save")
    top.legend(loc="upper left", fontsize=8, ncol=6, handlelength=3)
    top.set_title(f"goodput {100 * report.goodput:.1f}% over {report.wall_s:.1f} s "
                  f"({len(report.nodes)} node(s), {len(report.epochs)} start(s))")
    if report.world_sizes:
        xs = [t - t0 for t, _ in report.world_sizes] + [report.wall_s]
        ys = [w for _, w in report.world_sizes]
        sizes.step(xs, ys + ys[-1:], where="post", color="#555555", linewidth=1.5)
        sizes.set_ylim(0, max(ys) * 1.25 + 0.5)
    sizes.set_ylabel("world size")
    for kind in KINDS:
        spans = [(s.start - t0, s.duration) for s in report.segments if s.kind == kind]
        if spans:
            bottom.broken_barh(spans, (0, 1), facecolors=COLORS[kind], label=kind)
    bottom.set_yticks([])
    bottom.set_xlabel("seconds since start")
    bottom.set_xlim(0, max(report.wall_s, 1e-3))
    bottom.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=len(KINDS), fontsize=7)
    fig.tight_layout()
