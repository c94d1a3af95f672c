"""Pure parts of bench/goodput.py: the fault schedule, Young/Daly, and the goodput
arithmetic over a step log (tested in tests/report/test_goodput_bench.py).

The step log is what ``examples/llama/train.py --step-log`` writes (rank 0, one
JSON line each): ``{"t", "event": "start", "step", "world", "restore_s"}`` when
a worker group has restored (or found nothing), and ``{"t", "step", "world",
"save_s"}`` after every completed step (``step`` = steps done, ``save_s`` = the
checkpoint call's blocking time). ``t`` is Unix time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from typing import Any, Iterable, Sequence

#: Fault kinds, as the schedule names them.
KINDS: tuple[str, ...] = ("worker_kill", "worker_hang", "node_loss", "s3_outage")
#: Where the wall time of a run went, in table order (``productive`` first).
CAUSES: tuple[str, ...] = ("startup", "restart", "rescale", "restore", "redone", "checkpoint", "other")
LABELS: dict[str, str] = {
    "productive": "productive (final step x ideal)",
    "startup": "start-up (launch -> first group)",
    "restart": "restart/detection",
    "rescale": "rescale (world size changed)",
    "restore": "restore",
    "redone": "redone work",
    "checkpoint": "checkpoint blocking",
    "other": "other (steps above ideal, ...)",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault.

    Attributes:
        at: seconds after the run's start.
        kind: one of :data:`KINDS`.
        target: 0 hits the node hosting the rendezvous store, 1 the other node
            (worker faults; node loss always hits the other node).
        repair_at: node loss: when the replacement node starts; S3 outage: when
            the server restarts; else ``None``.
    """

    at: float
    kind: str
    target: int
    repair_at: float | None = None


def schedule(budget: float, fault_every: float, seed: int, *, replace_after: float = 20.0,
             outage: float = 30.0, kinds: Sequence[str] = KINDS) -> list[Fault]:
    """One fault per ``fault_every`` seconds of ``budget``, at a seeded offset in the
    middle half of its interval; kinds are dealt from shuffled decks of ``kinds``
    (every kind once per ``len(kinds)`` faults), targets drawn at random.

    Raises:
        ValueError: a non-positive budget or interval, or an unknown kind.
    """
    if budget <= 0 or fault_every <= 0:
        raise ValueError(f"budget={budget} and fault_every={fault_every} must be > 0")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; use some of {', '.join(KINDS)}")
    rng = random.Random(seed)
    deck: list[str] = []
    faults = []
    for i in range(int(budget // fault_every)):
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        at = round((i + rng.uniform(0.25, 0.75)) * fault_every, 1)
        target = rng.randrange(2)
        repair = at + replace_after if kind == "node_loss" else at + outage if kind == "s3_outage" else None
        faults.append(Fault(at, kind, target, repair))
    return faults


def young_daly(save_cost_s: float, mtbf_s: float, step_s: float) -> tuple[float, int]:
    """Young/Daly checkpoint interval ``sqrt(2 C MTBF)`` in seconds, and in steps (>= 1).

    Raises:
        ValueError: a non-positive argument.
    """
    if save_cost_s <= 0 or mtbf_s <= 0 or step_s <= 0:
        raise ValueError(f"save cost {save_cost_s}, MTBF {mtbf_s} and step time {step_s} must all be > 0")
    interval = math.sqrt(2.0 * save_cost_s * mtbf_s)
    return interval, max(1, round(interval / step_s))


def calibrate(records: Iterable[dict[str, Any]], *, saved_above: float = 1e-3) -> tuple[float, float | None]:
    """Ideal step time (median of steps without a save, each epoch's first step left
    out) and save cost (median blocking time of steps with one, ``None`` if none)
    from a fault-free step log.

    Raises:
        ValueError: no step without a save.
    """
    plain, saves, prev = [], [], None
    for r in sorted(records, key=lambda r: r["t"]):
        if r.get("event") == "start":
            prev = None  # the first step after a start includes warm-up
            continue
        if r.get("save_s", 0.0) > saved_above:
            saves.append(r["save_s"])
        elif prev is not None:
            plain.append(r["t"] - prev)
        prev = r["t"]
    if not plain:
        raise ValueError("the calibration log holds no step without a save")
    return statistics.median(plain), statistics.median(saves) if saves else None


def quiet_step(records: Iterable[dict[str, Any]]) -> float | None:
    """A run's own fault-free step time: the median step without a save at the
    run's largest world size (each start's first step left out); ``None`` without
    such steps. Against it, goodput does not depend on a calibration taken minutes
    earlier on a host whose speed drifts."""
    recs = list(records)
    worlds = [r["world"] for r in recs if "world" in r]
    if not worlds:
        return None
    top = max(worlds)
    try:
        return calibrate([r for r in recs if r.get("world") == top])[0]
    except ValueError:
        return None


def snapshot_cost(records: Iterable[dict[str, Any]], every: int) -> float:
    """Cost of one snapshot from a fault-free log of a run snapshotting every
    ``every`` steps (at the steps ``step % every == 0``), measured against that
    same run's quiet steps.

    A snapshot costs more than its blocking copy: the node runtime then seals it,
    sends it to the peer and receives the peer's, on cores the training shares,
    which slows the next few steps. So the steps are grouped by their position
    after the last snapshot (``step % every``, each start's first step left
    out); the cost is the sum over positions of (that position's median step -
    the quiet step), the quiet step being the median of the positions in the
    second half of the interval, when the background work is done. A run that
    snapshots every step (the earlier method) hides most of it: the background
    work of consecutive snapshots overlaps and is coalesced. At least 1 ms.

    Raises:
        ValueError: ``every`` < 2, or a position without a step.
    """
    if every < 2:
        raise ValueError(f"every={every}: the cost needs steps without a snapshot (every >= 2)")
    by_pos: dict[int, list[float]] = {}
    prev = None
    for r in sorted(records, key=lambda r: r["t"]):
        if r.get("event") == "start":
            prev = None
            continue
        if "step" not in r:
            continue
        if prev is not None and r["step"] == prev["step"] + 1:
            by_pos.setdefault(r["step"] % every, []).append(r["t"] - prev["t"])
        prev = r
    missing = [k for k in range(every) if k not in by_pos]
    if missing:
        raise ValueError(f"the snapshot calibration log has no step at position(s) {missing} of {every}")
    medians = [statistics.median(by_pos[k]) for k in range(every)]
    quiet = statistics.median(medians[(every + 1) // 2:])
    return max(1e-3, sum(m - quiet for m in medians))


@dataclasses.dataclass(slots=True)
class Accounting:
    """Goodput of one run: ``final_step x ideal_step_s / budget``.

    Attributes:
        budget: the run's wall-clock budget (s).
        ideal_step_s: the fault- and checkpoint-free step time (s).
        final_step: the step reached when the budget ended.
        steps_run: steps completed, redone ones included.
        starts: worker groups that started (restored) within the budget.
        worlds: world size of each of those starts.
        seconds: seconds per kind (``productive`` and every cause of :data:`CAUSES`),
            summing to ``budget``.
    """

    budget: float
    ideal_step_s: float
    final_step: int
    steps_run: int
    starts: int
    worlds: list[int]
    seconds: dict[str, float]
    run_step_s: float | None = None

    @property
    def goodput(self) -> float:
        """Useful progress / wall time."""
        return self.seconds["productive"] / self.budget

    @property
    def goodput_run(self) -> float | None:
        """Goodput against the run's own quiet-step median (:func:`quiet_step`)."""
        return None if self.run_step_s is None else self.final_step * self.run_step_s / self.budget

    def to_json_obj(self) -> dict[str, Any]:
        """A JSON-serialisable dict (goodput included)."""
        return {**dataclasses.asdict(self), "goodput": self.goodput, "goodput_run": self.goodput_run}


def account(records: Iterable[dict[str, Any]], *, t0: float, budget: float, ideal_step_s: float,
            events: Iterable[tuple[float, str]] = ()) -> Accounting:
    """Splits ``[t0, t0 + budget]`` into productive time and time lost per cause.

    ``events`` are ``(unix time, kind)`` of the faults (a kind of :data:`KINDS`) and
    node joins (``node_join``): the time from the last step before one to the event
    is work the restart loses (``redone``). Between two worker groups the rest is
    ``restart`` (``rescale`` when the world size changed) up to the new group's
    restore, which is ``restore``. A step later recomputed after a rollback is
    ``redone``; a kept step counts ``ideal_step_s`` as ``productive``, its save as
    ``checkpoint``; what is left (steps slower than ideal, the unfinished last step)
    is ``other``. A group still recovering when the budget ends: ``redone`` up to the
    fault, then ``restart`` (``rescale`` after a node loss or join).
    """
    end = t0 + budget
    recs = sorted((r for r in records if t0 <= r["t"] <= end), key=lambda r: r["t"])
    marks = sorted((t, kind) for t, kind in events if t0 <= t <= end)
    steps = [r for r in recs if r.get("event") != "start"]
    final_step = steps[-1]["step"] if steps else 0
    last_of = {r["step"]: i for i, r in enumerate(recs) if r.get("event") != "start"}
    kept = {last_of[s] for s in last_of if s <= final_step}
    sec = dict.fromkeys(CAUSES, 0.0)

    def gap(start: float, stop: float, cause: str) -> None:
        """[start, stop] between groups: up to the first event it is redone work."""
        hit = next((m for m, _ in marks if start < m < stop), None)
        if hit is not None:
            sec["redone"] += hit - start
            start = hit
        sec[cause] += max(0.0, stop - start)

    prev_t: float | None = None  # time of the last record of the current group
    worlds: list[int] = []
    for i, r in enumerate(recs):
        if r.get("event") == "start":
            restore = min(r.get("restore_s", 0.0), r["t"] - (prev_t if prev_t is not None else t0))
            began = r["t"] - restore
            if prev_t is None:
                sec["startup"] += began - t0
            else:
                gap(prev_t, began, "rescale" if worlds and r["world"] != worlds[-1] else "restart")
            sec["restore"] += restore
            worlds.append(r["world"])
            prev_t = r["t"]
            continue
        if prev_t is None:  # a step before any start record (a truncated log): count from t0
            prev_t = t0
        took = r["t"] - prev_t
        save = min(r.get("save_s", 0.0), took)
        sec["checkpoint"] += save
        if i not in kept:
            sec["redone"] += took - save
        prev_t = r["t"]
    if prev_t is None:
        sec["startup"] += budget
    else:  # an S3 outage alone does not stop a group; without a fault the tail is the unfinished step
        hit = next(((m, k) for m, k in marks if prev_t < m and k != "s3_outage"), None)
        if hit is not None:
            sec["redone"] += hit[0] - prev_t
            sec["rescale" if hit[1] in ("node_loss", "node_join") else "restart"] += end - hit[0]
    sec["productive"] = final_step * ideal_step_s
    sec["other"] = budget - sum(v for k, v in sec.items() if k != "other")
    return Accounting(budget=budget, ideal_step_s=ideal_step_s, final_step=final_step, steps_run=len(steps),
                      starts=len(worlds), worlds=worlds, seconds=sec, run_step_s=quiet_step(recs))


def clip_segments(segments: Iterable[Any], t0: float, end: float) -> dict[str, float]:
    """Seconds per kind of ``hpresil.report`` segments inside ``[t0, end]``."""
    out: dict[str, float] = {}
    for s in segments:
        d = min(s.end, end) - max(s.start, t0)
        if d > 0:
            out[s.kind] = out.get(s.kind, 0.0) + d
    return out


def table(results: dict[str, Accounting], *, target: float = 0.90, target_ratio: float = 1.3) -> str:
    """The comparison table: one column per system, then hpresil/baseline."""
    names = list(results)
    both = "hpresil" in results and "baseline" in results
    head = f"{'':34s}" + "".join(f"{n:>12s}" for n in names) + (f"{'ratio':>9s}" if both else "")
    lines = [head]

    def row(label: str, values: list[float], fmt: str, ratio: bool = False) -> None:
        line = f"{label:34s}" + "".join(f"{v:>12{fmt}}" for v in values)
        if ratio and both and values[names.index("baseline")]:
            line += f"{values[names.index('hpresil')] / values[names.index('baseline')]:>8.2f}x"
        lines.append(line)

    acc = [results[n] for n in names]
    row("goodput (%)", [100 * a.goodput for a in acc], ".1f", ratio=True)
    row("  without the job's start-up (%)",
        [100 * a.seconds["productive"] / max(1e-9, a.budget - a.seconds["startup"]) for a in acc], ".1f", ratio=True)
    if all(a.goodput_run is not None for a in acc):
        row("goodput vs the run's own step (%)", [100 * (a.goodput_run or 0.0) for a in acc], ".1f", ratio=True)
        row("  its quiet-step median (ms)", [1000 * (a.run_step_s or 0.0) for a in acc], ".0f")
    row("final step", [a.final_step for a in acc], "d", ratio=True)
    row("steps run (redone included)", [a.steps_run for a in acc], "d")
    row("worker-group starts", [a.starts for a in acc], "d")
    lines.append("seconds of the budget:")
    for kind in ("productive", *CAUSES):
        row("  " + LABELS[kind], [a.seconds[kind] for a in acc], ".1f")
    g = {n: a.goodput for n, a in results.items()}
    if "hpresil" in g:
        lines.append(f"target goodput >= {100 * target:.0f}%: {100 * g['hpresil']:.1f}% "
                     f"({'met' if g['hpresil'] >= target else 'NOT met'})")
    if both and g["baseline"] > 0:
        r = g["hpresil"] / g["baseline"]
        lines.append(f"target >= {target_ratio:.1f}x the baseline: {r:.2f}x ({'met' if r >= target_ratio else 'NOT met'})")
    return "\n".join(lines)


def recoveries(records: Iterable[dict[str, Any]], events: Sequence[tuple[float, str]], t0: float) -> list[dict[str, Any]]:
    """Per fault or node join: the first worker-group start after it (before the next
    event): its delay, world size, the step it resumed and the last step completed
    before it (``step_before``; before the event when no group started)."""
    recs = sorted(records, key=lambda r: r["t"])
    evs = sorted(events)
    out = []
    for i, (t, kind) in enumerate(evs):
        horizon = evs[i + 1][0] if i + 1 < len(evs) else math.inf
        start = next((r for r in recs if r.get("event") == "start" and t < r["t"] < horizon), None)
        until = t if start is None else start["t"]
        before = [r["step"] for r in recs if r.get("event") != "start" and r["t"] <= until]
        out.append({
            "at_s": t - t0, "kind": kind, "step_before": before[-1] if before else 0,
            "start_after_s": None if start is None else start["t"] - t,
            "resumed_step": None if start is None else start["step"],
            "world": None if start is None else start["world"],
        })
    return out


def describe(rec: dict[str, Any]) -> str:
    """One line of :func:`recoveries`."""
    head = f"  +{rec['at_s']:6.1f} s {rec['kind']:12s} "
    if rec["start_after_s"] is None:
        return head + f"(step {rec['step_before']}): no worker-group start before the next event"
    lost = rec["step_before"] - rec["resumed_step"]
    return head + (f"-> training resumed {rec['start_after_s']:5.1f} s later at world {rec['world']}, from step "
                   f"{rec['resumed_step']} (last step done {rec['step_before']}: {lost} to redo)")
