"""``hpresil-run report LOG_DIR``: goodput, time lost per cause, checkpoint statistics.

Prints a text summary (or JSON with ``--json``) and, with ``--png FILE``,
draws the timeline (needs matplotlib: ``pip install 'hpresil[report]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from hpresil.errors import ConfigError
from hpresil.report.api import CAUSES, GoodputReport, TierStats
from hpresil.report.goodput import build_report

__all__ = ["main", "format_report", "build_parser"]

_LABELS = {
    "lost_work": "lost work (steps recomputed)",
    "detection": "detection (last step -> seen)",
    "checkpoint": "checkpoint blocking",
    "restore": "restore",
    "restart": "restart (failure -> new group)",
    "rescale": "rescale (membership change)",
    "hang_detection": "hang detection",
    "init": "init (start-up, rendezvous)",
    "shutdown": "shutdown (after the last step)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``report`` subcommand's parser."""
    p = argparse.ArgumentParser(prog="hpresil-run report", description=__doc__.split("\n\n")[0])
    p.add_argument("log_dir", help="the job's log directory (holds each node's events.jsonl), or one events.jsonl")
    p.add_argument("--png", metavar="FILE", help="write a timeline picture (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--run-id", help="the run to report when the directory holds several (default: the newest)")
    return p


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _tier_row(t: TierStats) -> str:
    """One row of the tier table; ``-`` where a column does not apply (a tier
    that uploads has no saves, one that only saves has no uploads)."""
    saved, uploaded = t.saves > 0 or t.skipped > 0, t.uploads > 0
    dash = "-"
    per_copy = t.bytes_per_save if t.saves else t.bytes_per_upload
    return (f"{t.tier:8s} {t.saves if saved else dash:>6} {t.skipped if saved else dash:>7} {t.steps:6d} "
            f"{f'{t.blocking_s_mean:.4f}s' if saved else dash:>11s} {f'{t.blocking_s_max:.4f}s' if saved else dash:>10s} "
            f"{_mb(per_copy) if per_copy else dash:>10s} {t.restores:8d} "
            f"{f'{t.restore_s_max:.3f}s' if t.restores else dash:>11s} {t.uploads if uploaded else dash:>7} "
            f"{f'{t.upload_mb_per_s:.1f}' if uploaded else dash:>7s} {f'{t.upload_lag_s_max:.2f}s' if uploaded else dash:>8s} "
            f"{t.degraded + t.integrity_failures:8d}")


def format_report(report: GoodputReport) -> str:
    """The text summary."""
    wall = report.wall_s
    lines = [
        f"hpresil report: {report.log_dir} ({len(report.nodes)} node(s), {len(report.epochs)} worker-group start(s), "
        f"final step {report.final_step})",
        f"  wall time      {wall:10.2f} s",
        f"  goodput        {100 * report.goodput:9.1f} %   (productive step time {report.productive_s:.2f} s)",
        "  time lost per cause:",
    ]
    for cause in CAUSES:
        s = report.seconds(cause)
        pct = 100 * s / wall if wall > 0 else 0.0
        lines.append(f"    {_LABELS[cause]:32s} {s:10.2f} s {pct:6.1f} %")
    restarts = ", ".join(f"{c} {n}" for c, n in sorted(report.restarts.items())) or "none"
    lines.append(f"  restarts: {restarts}; hang detections: {report.hang_detections}; stragglers: {report.stragglers}")
    if report.tiers:
        lines.append("  checkpoints per tier:")
        lines.append(f"    {'tier':8s} {'saves':>6s} {'skipped':>7s} {'steps':>6s} {'block mean':>11s} {'block max':>10s} {'per copy':>10s}"
                     f" {'restores':>8s} {'restore max':>11s} {'uploads':>7s} {'MB/s':>7s} {'lag max':>8s} {'degraded':>8s}")
        for name in sorted(report.tiers):
            lines.append("    " + _tier_row(report.tiers[name]))
    lines += _health_lines(report)
    for ep in report.epochs:
        restored = f"restored step {ep.base_step} from {ep.restore_tier}" if ep.restore_tier else "no restore"
        lines.append(f"  start {ep.index}: +{ep.start - report.start:.2f} s, world size {ep.world_size}, {restored}, "
                     f"reached step {ep.max_step}, ended by {ep.fault or 'stop'}")
    return "\n".join(lines)


def _steps(items: list[dict[str, object]]) -> str:
    steps = sorted({int(str(i["step"])) for i in items})
    shown = ", ".join(map(str, steps[:8])) + (" ..." if len(steps) > 8 else "")
    return f"{len(steps)} (step{'s' if len(steps) != 1 else ''} {shown})" if steps else "0"


def _health_lines(report: GoodputReport) -> list[str]:
    """The state-health section (nothing when every snapshot was healthy)."""
    h = report.health
    if h.empty:
        return []
    causes = sorted({str(c) for s in h.suspect for c in s.get("causes", [])})  # type: ignore[union-attr]
    lines = [f"  state health: poisoned snapshots {_steps(h.poisoned)}; suspect {_steps(h.suspect)}"
             + (f" ({', '.join(causes)})" if causes else "") + f"; replica divergences {len(h.divergences)}; "
             f"rollbacks {len(h.rollbacks)}"]
    for d in h.divergences:
        lines.append(f"    divergence at step {d['step']}: ranks {d['ranks']} (node {', '.join(map(str, d['nodes']))})")
    for r in h.rollbacks:
        lines.append(f"    rollback at +{float(r['ts']) - report.start:.2f} s: step {r['from_step']} -> {r['to_step']} "
                     f"from {r['tier']} ({r['cause']} at step {r['bad_step']}, try {r['attempt']}) in "
                     f"{float(r['duration_s']):.3f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the subcommand; returns the exit status (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        report = build_report(args.log_dir, args.run_id)
        png = None
        if args.png:
            from hpresil.report.timeline import draw_timeline

            png = draw_timeline(report, args.png)
    except ConfigError as exc:
        print(f"hpresil-run report: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        obj = report.to_json_obj()
        obj["png"] = png
        print(json.dumps(obj, indent=2))
    else:
        print(format_report(report))
        if png:
            print(f"  timeline: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
