"""Snapshot health: NaN/Inf found in the sealer's pass, legitimate non-finite
entries, loss spikes, and restores that never choose an unhealthy snapshot
while a healthy one exists (real sealer, real RAM tier, faults written into
the state in memory)."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any

import pytest
import torch

from hpresil.checkpoint import Checkpointer
from hpresil.checkpoint.health import FiniteProbe, HealthConfig, LossWindow, RankHealth, probe_for
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.restore import choose
from hpresil.checkpoint.rollback import RollbackPolicy
from hpresil.errors import ConfigError
from hpresil.testing import RecordingSink, maybe_inject, nan_at, to_env

_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _feed(probe: FiniteProbe, data: torch.Tensor, seed: int) -> bool:
    raw = data.contiguous().view(torch.uint8).numpy()
    rnd, pos = random.Random(seed), 0
    while pos < raw.size:  # pieces of any length, values split between them
        n = rnd.randint(1, 37)
        probe(raw[pos : pos + n])
        pos += n
    return probe.nonfinite


@pytest.mark.parametrize("dtype", _DTYPES)
def test_probe_finds_every_kind_of_nonfinite_value_and_nothing_else(dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    info = torch.finfo(dtype)
    finite = torch.randn(301, dtype=torch.float64).to(dtype)
    finite[[3, 50, 100, 200]] = torch.tensor([info.max, -info.max, info.tiny / 4, -0.0], dtype=torch.float64).to(dtype)
    assert not _feed(FiniteProbe(name), finite, 0)
    for bad in (float("nan"), float("inf"), float("-inf"), -float("nan")):
        for where in (0, 150, 300):
            data = finite.clone()
            data[where] = bad
            assert _feed(FiniteProbe(name), data, where), f"{bad} at {where} missed in {name}"
    assert probe_for("int64") is None and probe_for("bool") is None and probe_for("float8_e4m3fn") is None


def test_a_poisoned_entry_is_one_that_was_finite(tmp_path: Any) -> None:
    path = str(tmp_path / "health.json")
    judge = RankHealth(HealthConfig(), path)
    keys = ["model.w", "model.mask"]
    assert judge.judge(keys, {"model.mask"}, 1, None).health == "ok"  # -inf mask from the first snapshot on
    assert judge.judge(keys, {"model.mask"}, 2, None).health == "ok"
    # a restarted node runtime remembers what is legitimate
    again = RankHealth(HealthConfig(), path)
    verdict = again.judge(keys, {"model.mask", "model.w"}, 3, None)
    assert (verdict.health, verdict.keys, verdict.causes) == ("poisoned", ("model.w",), ("nonfinite",))
    # an entry that appears later, non-finite from its first snapshot, is legitimate too
    assert again.judge(keys + ["opt.x"], {"model.mask", "opt.x"}, 4, None).health == "ok"
    assert json.loads(open(path).read())["legit"] == ["model.mask", "opt.x"]


def test_loss_spikes_and_nonfinite_losses_are_suspect_and_a_noisy_curve_is_not() -> None:
    window = LossWindow(HealthConfig())
    rnd = random.Random(0)
    for step in range(1, 201):  # a decreasing, noisy training curve
        loss = 4.0 * math.exp(-step / 80) + 1.0 + rnd.gauss(0, 0.05)
        assert window.judge(step, loss) is None, f"false spike at step {step}"
    cause, detail = window.judge(201, 4.5) or ("", "")
    assert cause == "spike" and "median" in detail
    assert window.judge(202, float("nan")) == ("nonfinite", "loss nan")
    assert window.judge(203, 1.3) is None
    with pytest.raises(ConfigError, match="spike_min_samples"):
        HealthConfig(spike_min_samples=100)


def test_choose_prefers_healthy_steps_and_respects_a_rollback_bound() -> None:
    per_rank = {0: {(5, 2): [0, 1], (6, 2): [0, 1], (7, 2): [0, 1]}}
    avail = [per_rank, per_rank]
    assert choose(avail, 2)[0] == 7
    assert choose(avail, 2, {7: "poisoned", 6: "suspect"})[0] == 5
    assert choose(avail, 2, {}, before=6)[0] == 5
    everything_bad = {5: "poisoned", 6: "poisoned", 7: "suspect"}
    assert choose(avail, 2, everything_bad)[0] == 7  # no healthy one: the newest still loads
    assert choose(avail, 2, {}, before=5) is None


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.register_buffer("mask", torch.full((8, 8), float("-inf")).triu(1))


def test_a_nan_in_memory_poisons_the_next_snapshot_and_restore_skips_it(
    shm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = _Net()
    opt = torch.optim.Adam(net.parameters())
    events = RecordingSink()
    monkeypatch.setenv("HPRESIL_FAULTS", to_env([nan_at(0, 6, key="lin.weight")])["HPRESIL_FAULTS"])
    ckpt = Checkpointer({"model": net, "optim": opt}, shm_dir=shm, durable_every=0, events=events, run_services=True,
                        rollback=RollbackPolicy(on_nonfinite="warn"))
    ckpt.restore()
    good = None
    for step in range(1, 8):
        loss = net.lin(torch.ones(2, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        maybe_inject(step, 0, state=net)
        if step == 5:
            good = {k: v.clone() for k, v in net.state_dict().items()}
        ckpt.save(step, loss=loss.detach())
        ckpt.wait()
        assert ckpt._services[0][0].flush()
    seals = {i.record.step: i.seal for i in scan(shm)}
    assert seals[5].health == "ok"  # the -inf mask buffer is legitimate
    assert seals[6].health == "poisoned" and seals[6].poisoned == ["model.lin.weight"]
    assert seals[7].health == "poisoned"  # the NaN spread into the optimizer state by then
    poisoned = events.named("snapshot_poisoned")
    assert [e["step"] for e in poisoned] == [6, 7] and poisoned[0]["keys"] == ["model.lin.weight"]
    ckpt.close(final_durable=False, keep_ram=True)

    net2 = _Net()
    opt2 = torch.optim.Adam(net2.parameters())
    events2 = RecordingSink()
    again = Checkpointer({"model": net2, "optim": opt2}, shm_dir=shm, durable_every=0, events=events2,
                         run_services=True)
    assert again.restore() == 5
    assert all(torch.equal(v, good[k]) for k, v in net2.state_dict().items())
    restored = events2.named("checkpoint_restored")[0]
    assert "unhealthy steps [6, 7] (poisoned)" in restored["skipped"][0]
    again.close(final_durable=False)


def test_device_norms_name_the_nonfinite_entries_and_the_sealer_trusts_the_rest(shm: str) -> None:
    """The device path's logic on CPU tensors: the norms flag NaN, Inf and a
    finite tensor whose norm overflows; the sealer then probes only flagged
    entries (confirming the overflow as finite) and skips the ones the device cleared."""
    from hpresil.checkpoint.api import slot_path
    from hpresil.checkpoint.flatten import flatten
    from hpresil.checkpoint.health import device_finite_flags
    from hpresil.checkpoint.ram.copier import Flight
    from hpresil.checkpoint.ram.sealer import Sealer
    from hpresil.checkpoint.ram.writer import RamWriter

    big = torch.full((4,), 3e38)  # finite, but its L2 norm overflows float32
    nan, fine, ints = torch.tensor([1.0, float("nan")]), torch.ones(3), torch.arange(3)
    tensors = [big, nan, fine, ints, torch.tensor([float("-inf")], dtype=torch.bfloat16)]
    flags = device_finite_flags(tensors, list(range(len(tensors))), {4: torch.empty(4)})
    assert flags is not None
    checked, bad = Flight(flags=flags).verdicts(["big", "nan", "fine", "ints", "bf16"])
    assert bad == ["big", "nan", "bf16"] and int(checked, 16) == 0b10111
    # A record that says the device checked everything and found only "big": the
    # sealer confirms "big" is finite and never looks at "nan" (trusted as checked).
    w = RamWriter(shm, 0, slots=2, run_id="r")
    w.save(1, flatten({"big": big, "nan": nan, "fine": fine}).leaves, world_size=1, durable=False, durable_url=None,
           keep=1)
    w.wait()
    (info,) = scan(shm)
    path = slot_path(shm, 0, info.slot, "json")
    record = json.loads(open(path).read())
    record["checked"], record["nonfinite"] = "7", ["big"]
    with open(path, "w") as f:
        f.write(json.dumps(record))
    assert Sealer(shm_dir=shm).flush()
    (info,) = scan(shm)
    assert info.seal is not None and info.seal.health == "ok"  # "nan" trusted as the device said; "big" confirmed
    record["checked"], record["nonfinite"] = "", []  # not checked on a device: the sealer probes everything
    os.unlink(slot_path(shm, 0, info.slot, "seal.json"))
    with open(path, "w") as f:
        f.write(json.dumps(record))
    assert Sealer(shm_dir=shm).flush()
    (info,) = scan(shm)
    assert info.seal is not None and info.seal.poisoned == ["nan"]
    w.close()


def test_a_node_whose_replicas_diverged_twice_leaves_under_the_leave_policy(tmp_path: Any) -> None:
    from hpresil.checkpoint.divergence_watch import DivergenceWatch
    from hpresil.checkpoint.guard import DIVERGENCE_FILE

    watch = DivergenceWatch(shm_dir=str(tmp_path))
    path = tmp_path / DIVERGENCE_FILE
    watch.tick()
    assert watch.verdict() is None
    path.write_text(json.dumps({"count": 1, "steps": [7], "ranks": [1], "policy": "leave"}))
    watch.tick()
    assert watch.verdict() is None  # once can be a cosmic ray
    path.write_text(json.dumps({"count": 2, "steps": [7, 40], "ranks": [1], "policy": "rollback"}))
    watch.tick()
    assert watch.verdict() is None  # rollback only: the node stays
    path.write_text(json.dumps({"count": 2, "steps": [7, 40], "ranks": [1], "policy": "leave", "x": 1}))
    watch.tick()
    verdict = watch.verdict()
    assert verdict is not None and "diverged from their replicas 2 times" in verdict.message
    assert verdict.findings[0].check == "replica_divergence" and verdict.exit_code != 0
