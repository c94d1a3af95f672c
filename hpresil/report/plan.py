"""``hpresil-run plan``: a goodput model for planning, fed by the benches' measurements.

Given the job (GPUs, state bytes per GPU, step time) and a failure rate (an MTBF,
by default from published fleet data), it recommends the RAM snapshot interval
(Young/Daly, ``sqrt(2 C MTBF)`` with hpresil's measured snapshot cost C), the
durable interval and the peer replicas, and predicts goodput against torchrun +
DCP saving at its own Young/Daly interval.

Every cost comes from the JSON a bench wrote, none is typed in here:

* ``bench/goodput.py --json``: the ideal step and snapshot cost of its model and
  state, each system's start-up, and per fault kind the measured recovery (fault
  -> training again) and restore; the baseline's ``dcp.save`` cost;
* ``bench/control_plane.py --json`` (optional): the membership change time,
  extrapolated to the job's node count by its fit.

Costs that move with the state (snapshot, restore, DCP save) scale with the
bytes per GPU against the bench's; the others (detection, restart, rendezvous)
do not. The model per fault: its kind's recovery plus the lost work (half a
checkpoint interval) plus, for a lost node, the steps run with fewer nodes until
a replacement joins. Goodput = (budget - start-up - faults x cost per fault) x
(1 - snapshot cost / interval) / budget.

Fleet MTBF: Meta's HPCA'25 study reports an MTTF of 7.9 h at 1,024 GPUs and
projects 1.8 h at 16,384; :func:`fleet_mtbf_h` interpolates between (and beyond)
them with the power law through both points (MTBF ~ GPUs^-0.53).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from typing import Any, Mapping

from hpresil.errors import ConfigError

__all__ = ["Costs", "Prediction", "costs_from_goodput", "fleet_mtbf_h", "membership_change_s", "predict",
           "young_daly_s", "check_against"]

#: (GPUs, MTTF hours) from Meta's HPCA'25 fleet study: measured at 1,024, projected at 16,384.
FLEET_POINTS = ((1024, 7.9), (16384, 1.8))
#: Fault kinds the model prices (bench/goodput.py's, without the S3 outage, which RAM and peer tiers ride out).
KINDS = ("worker_kill", "worker_hang", "node_loss")


def fleet_mtbf_h(gpus: int) -> float:
    """The job-level MTBF (hours) at ``gpus`` by the power law through :data:`FLEET_POINTS`."""
    (g1, h1), (g2, h2) = FLEET_POINTS
    alpha = math.log(h1 / h2) / math.log(g2 / g1)
    return h1 * (gpus / g1) ** -alpha


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """Young/Daly's checkpoint interval ``sqrt(2 C MTBF)``."""
    return math.sqrt(2.0 * max(cost_s, 1e-9) * mtbf_s)


@dataclasses.dataclass(frozen=True)
class Costs:
    """One system's measured costs (seconds) at the bench's state and step.

    Attributes:
        step_s: the ideal step.
        save_s: one checkpoint's cost to training (hpresil: a RAM snapshot with its
            peer replica; baseline: a blocking ``dcp.save``).
        startup_s: launch to the first training step.
        recovery_s: per fault kind, fault -> training again (detection, restart, restore); a
            fault the system trained through costs the share of its window it did not train.
        rejoin_s: a replacement node's start -> training at full size again (``None``: not measured).
        state_bytes: the state per GPU the costs were measured with (``None``: unknown, no scaling).
    """

    step_s: float
    save_s: float
    startup_s: float
    recovery_s: Mapping[str, float]
    rejoin_s: float | None = None
    state_bytes: float | None = None

    def scaled(self, state_bytes: float | None) -> "Costs":
        """The costs for ``state_bytes`` per GPU: the save scales with the bytes."""
        if not state_bytes or not self.state_bytes:
            return self
        return dataclasses.replace(self, save_s=self.save_s * state_bytes / self.state_bytes, state_bytes=state_bytes)


def costs_from_goodput(obj: Mapping[str, Any], system: str) -> Costs:
    """:class:`Costs` of ``system`` (``hpresil`` or ``baseline``) from bench/goodput.py's JSON.

    Raises:
        ConfigError: the JSON lacks that system or its calibration.
    """
    try:
        result = obj["results"][system]
        step_s = float(obj["ideal_step_s"])
        save_s = float(obj["snapshot_s"] if system == "hpresil" else obj["dcp_save_s"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"bench/goodput.py JSON has no {system} result or calibration ({exc}); "
                          f"rerun: python bench/goodput.py --json FILE") from None
    per_kind: dict[str, list[float]] = {}
    recs = sorted(result.get("recoveries", []), key=lambda r: r["at_s"])
    budget = float(obj.get("args", {}).get("budget", 0.0)) or math.inf
    for i, rec in enumerate(recs):
        if rec.get("start_after_s") is not None:
            per_kind.setdefault(rec["kind"], []).append(float(rec["start_after_s"]))
            continue
        # No worker-group start before the next event: the system either trained through
        # the fault or stayed stuck. Charge the share of the window it did not train.
        end = recs[i + 1]["at_s"] if i + 1 < len(recs) else budget
        after = recs[i + 1]["step_before"] if i + 1 < len(recs) else None
        if after is None or not math.isfinite(end):
            continue
        window = end - rec["at_s"]
        progressed = (after - rec["step_before"]) * step_s / window if window > 0 else 1.0
        per_kind.setdefault(rec["kind"], []).append(window * max(0.0, 1.0 - progressed))
    starts = result.get("seconds", {})
    return Costs(step_s=step_s, save_s=save_s, startup_s=float(starts.get("startup", 0.0)),
                 recovery_s={k: statistics.median(v) for k, v in per_kind.items() if k != "node_join"},
                 rejoin_s=statistics.median(per_kind["node_join"]) if per_kind.get("node_join") else None,
                 state_bytes=obj.get("state_bytes_per_gpu"))


def membership_change_s(control_plane: Mapping[str, Any], backend: str, nodes: int) -> float | None:
    """The membership change time at ``nodes`` by bench/control_plane.py's fit (``None``: not measured)."""
    fit = control_plane.get("summary", {}).get(backend, {}).get("fit", {}).get("change_s")
    return None if fit is None else max(0.0, fit["a"] + fit["b"] * nodes)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What the model expects over ``budget_s``."""

    interval_s: float
    goodput: float
    lost_per_fault_s: float
    checkpoint_fraction: float


def predict(costs: Costs, *, budget_s: float, faults: Mapping[str, float], interval_s: float,
            degraded_s: float = 0.0, degraded_share: float = 0.5,
            fault_times: list[tuple[str, float]] | None = None) -> Prediction:
    """Goodput of one system.

    Args:
        costs: the system's costs.
        budget_s: wall time of the run (or the job).
        faults: expected faults per kind over ``budget_s`` (kinds without a measured
            recovery cost nothing: trained through).
        interval_s: seconds between checkpoints.
        degraded_s: per node loss, seconds trained with fewer nodes until a replacement joins.
        degraded_share: the share of throughput lost meanwhile (one of two nodes: 0.5).
        fault_times: ``(kind, seconds into the budget)`` of known faults (a replayed
            schedule): each then costs at most the budget left after it; ``faults`` is ignored.
    """
    if fault_times is None:
        items = [(k, n, math.inf) for k, n in faults.items()]
    else:
        items = [(k, 1.0, budget_s - at) for k, at in fault_times]
    n_faults = sum(n for k, n, _ in items if k in costs.recovery_s)
    lost = 0.0
    for kind, n, left in items:
        if kind in costs.recovery_s:
            per = costs.recovery_s[kind] + interval_s / 2.0
            if kind == "node_loss":
                per += degraded_s * degraded_share
            lost += n * min(per, max(0.0, left))
    overhead = min(1.0, costs.save_s / interval_s) if interval_s > 0 else 1.0
    useful = max(0.0, budget_s - costs.startup_s - lost) * (1.0 - overhead)
    return Prediction(interval_s=interval_s, goodput=useful / budget_s,
                      lost_per_fault_s=lost / n_faults if n_faults else 0.0, checkpoint_fraction=overhead)


def check_against(goodput_json: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Predicts each system of a bench/goodput.py run from its own costs, fault schedule
    and intervals; returns ``{system: {"predicted", "measured", "ratio"}}``."""
    times = [(f["kind"], float(f["at"])) for f in goodput_json.get("faults", [])]
    args = goodput_json.get("args", {})
    budget = float(args.get("budget", 300.0))
    out: dict[str, dict[str, float]] = {}
    for system in goodput_json.get("results", {}):
        costs = costs_from_goodput(goodput_json, system)
        every = goodput_json["ckpt_every"] if system == "hpresil" else goodput_json["dcp_every"]
        degraded = float(args.get("replace_after", 20.0)) + (costs.rejoin_s or 0.0) if system == "hpresil" else 0.0
        p = predict(costs, budget_s=budget, faults={}, interval_s=every * costs.step_s, degraded_s=degraded,
                    fault_times=times)
        measured = float(goodput_json["results"][system]["goodput"])
        out[system] = {"predicted": p.goodput, "measured": measured, "ratio": p.goodput / measured if measured else math.inf}
    return out


def load_json(path: str) -> dict[str, Any]:
    """A bench's JSON output.

    Raises:
        ConfigError: unreadable or not JSON.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read bench output {path!r}: {exc}") from None


def _mix(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        if kind not in KINDS:
            raise ConfigError(f"--mix: {kind!r} is not one of {', '.join(KINDS)}")
        try:
            out[kind] = float(weight or 1)
        except ValueError:
            raise ConfigError(f"--mix: {part!r} needs a number, e.g. node_loss=2") from None
    total = sum(out.values())
    if total <= 0:
        raise ConfigError("--mix: give at least one kind a positive weight")
    return {k: v / total for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    """``hpresil-run plan``: prints the recommended intervals and the expected goodput."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="hpresil-run plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--goodput-json", required=True, help="bench/goodput.py --json output (measured costs)")
    p.add_argument("--control-plane-json", help="bench/control_plane.py --json output (membership change at scale)")
    p.add_argument("--check", action="store_true", help="only predict the goodput run itself and compare")
    p.add_argument("--gpus", type=int, default=1024)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--state-gb", type=float, default=None, help="checkpointed state per GPU (GB); scales the save cost")
    p.add_argument("--step-s", type=float, default=None, help="step time (default: the bench's)")
    p.add_argument("--mtbf-h", type=float, default=None, help="job MTBF in hours (default: fleet data at --gpus)")
    p.add_argument("--hours", type=float, default=24.0, help="horizon of the prediction")
    p.add_argument("--mix", default="worker_kill=1,worker_hang=1,node_loss=1", help="fault kinds and weights")
    p.add_argument("--backend", default="etcd", help="control-plane backend to price membership changes with")
    args = p.parse_args(argv)
    try:
        bench = load_json(args.goodput_json)
        if args.check:
            for system, r in check_against(bench).items():
                print(f"{system:9s} predicted {100 * r['predicted']:5.1f} %  measured {100 * r['measured']:5.1f} %  "
                      f"ratio {r['ratio']:.3f} ({'within' if abs(r['ratio'] - 1) <= 0.10 else 'NOT within'} 10 %)")
            return 0
        mix = _mix(args.mix)
        mtbf_h = args.mtbf_h or fleet_mtbf_h(args.gpus)
        state = args.state_gb * 1e9 if args.state_gb else None
        nodes = max(1, args.gpus // args.gpus_per_node)
        change = None
        if args.control_plane_json:
            change = membership_change_s(load_json(args.control_plane_json), args.backend, nodes)
    except ConfigError as exc:
        print(f"hpresil-run plan: error: {exc}", file=sys.stderr)
        return 2
    budget, mtbf_s = args.hours * 3600.0, mtbf_h * 3600.0
    faults = {k: w * budget / mtbf_s for k, w in mix.items()}
    print(f"job: {args.gpus} GPUs ({nodes} nodes), MTBF {mtbf_h:.2f} h"
          f"{' (fleet data)' if not args.mtbf_h else ''}: {sum(faults.values()):.1f} faults in {args.hours:g} h")
    rows = []
    for system in ("hpresil", "baseline"):
        costs = costs_from_goodput(bench, system).scaled(state)
        if args.step_s:
            costs = dataclasses.replace(costs, step_s=args.step_s)
        if system == "hpresil" and change is not None and "node_loss" in costs.recovery_s:
            rec = dict(costs.recovery_s)
            rec["node_loss"] = max(rec["node_loss"], change)  # the rendezvous at this size
            costs = dataclasses.replace(costs, recovery_s=rec)
        interval = max(costs.step_s, young_daly_s(costs.save_s, mtbf_s))
        pred = predict(costs, budget_s=budget, faults=faults, interval_s=interval)
        rows.append((system, costs, pred))
        print(f"{system:9s} checkpoint every {interval:7.1f} s ({max(1, round(interval / costs.step_s))} steps; "
              f"cost {costs.save_s:.3f} s each), {pred.lost_per_fault_s:6.1f} s lost per fault, "
              f"goodput {100 * pred.goodput:5.1f} %")
    (_, _, ours), (_, _, theirs) = rows
    durable_h = min(1.0, mtbf_h / 4)
    replicas = 0 if nodes < 2 else (2 if nodes >= 512 else 1)
    print(f"recommended: hpresil snapshot every {ours.interval_s:.0f} s, durable every {durable_h * 60:.0f} min "
          f"(min(1 h, MTBF/4): what a node and its replica holder lost together would cost), --replicas {replicas}"
          + (f"; membership change at {nodes} nodes ~{change:.1f} s ({args.backend})" if change is not None else ""))
    print(f"expected goodput: hpresil {100 * ours.goodput:.1f} % vs torchrun + DCP {100 * theirs.goodput:.1f} % "
          f"({ours.goodput / theirs.goodput if theirs.goodput else math.inf:.2f}x)")
    return 0
