"""Rollback: real DDP ranks over gloo, a NaN or a poisoned batch written into
one rank's memory, every rank rolling back together in-process, and a job
that ends bitwise equal to the run the fault never hit."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from hpresil.checkpoint import Checkpointer
from hpresil.checkpoint.rollback import RollbackPolicy
from hpresil.errors import UnhealthyStateError
from hpresil.testing import RecordingSink, bitflip_at, maybe_inject, nan_at, to_env

from _procs import process

STEPS = 14


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _batch(step: int, rank: int, poison: int | None) -> torch.Tensor:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))
    if step == poison:
        x[0, 0] = float("inf")  # a batch that makes the loss non-finite every time it is seen
    return x


def _worker(rank: int, world: int, shm: str, out: str, env: dict[str, str], policy: dict[str, Any],
            poison: int | None, durable: str | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(env)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=world)
    model, opt = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    events = RecordingSink()
    ckpt = Checkpointer({"model": model, "optim": opt}, shm_dir=shm, durable=durable, durable_every=2 if durable else 0,
                        events=events, run_services=True, rollback=RollbackPolicy(**policy))
    error = ""
    try:
        start = ckpt.restore()
        for step in ckpt.steps(start + 1, STEPS + 1):
            loss = ddp(_batch(step, rank, poison if rank == world - 1 else None)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            maybe_inject(step, rank, state=model)
            ckpt.save(step, loss=loss.detach())
            ckpt.wait()  # seal before the next step, so the test sees a verdict at a fixed step
    except UnhealthyStateError as exc:
        error = str(exc)
    ckpt.close(final_durable=False)
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"params": [p.detach().flatten().tolist() for p in model.parameters()],
                   "events": [{"name": name, **fields} for name, fields in events.events], "error": error}, f,
                  default=str)


def _run(tmp_path: Any, shm: str, name: str, world: int, env: dict[str, str] | None = None,
         policy: dict[str, Any] | None = None, poison: int | None = None, durable: bool = False) -> list[dict[str, Any]]:
    out = str(tmp_path / name)
    url = f"file://{tmp_path}/{name}-durable" if durable else None
    return _ranks(world, out, _worker, lambda r: (r, world, os.path.join(shm, name), out, env or {}, policy or {},
                                                  poison, url))


def _ranks(world: int, out: str, target: Any, args: Any, timeout: float = 120) -> list[dict[str, Any]]:
    """Runs ``target(*args(rank))`` in one forked process per rank; returns each rank's ``<out>.rank<R>`` JSON."""
    procs = [process(target, args(r)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * world
    results = []
    for r in range(world):
        with open(f"{out}.rank{r}") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("world", [1, 2], ids=["single", "ddp2"])
def test_a_nan_in_one_rank_is_rolled_back_on_every_rank_and_the_run_ends_bitwise(
    tmp_path: Any, shm: str, world: int
) -> None:
    clean = _run(tmp_path, shm, "clean", world)
    hit = _run(tmp_path, shm, "hit", world, env=to_env([nan_at(world - 1, 6, key="0.weight")]))
    for r in range(world):
        rollbacks = [e for e in hit[r]["events"] if e["name"] == "rollback"]
        assert len(rollbacks) == 1, hit[r]["events"]
        rb = rollbacks[0]
        # poisoned at step 6, in the vote of step 6 or 7 (as the seal comes), acted on at the next: back to step 5
        assert (rb["cause"], rb["bad_step"], rb["to_step"]) == ("nonfinite", 6, 5) and rb["from_step"] in (7, 8)
        assert hit[r]["params"] == clean[r]["params"], "the job did not end bitwise equal to the clean run"
        assert not [e for e in clean[r]["events"] if e["name"] in ("rollback", "snapshot_poisoned")]
    poisoned = [e for e in hit[world - 1]["events"] if e["name"] == "snapshot_poisoned"]
    assert poisoned[0]["step"] == 6 and poisoned[0]["keys"] == ["model.0.weight"]


def test_a_poisoned_batch_rolls_back_further_each_time_then_stops_naming_the_step(tmp_path: Any, shm: str) -> None:
    results = _run(tmp_path, shm, "loop", 2, policy={"max_tries": 3}, poison=9, durable=True)
    for res in results:
        rollbacks = [(e["to_step"], e["attempt"], e["tier"]) for e in res["events"] if e["name"] == "rollback"]
        # RAM keeps the last known good step (and usually one before it); older ones come from the durable tier
        assert rollbacks[0] == (8, 1, "ram") and [a for _, a, _ in rollbacks] == [1, 2, 3], rollbacks
        targets = [t for t, _, _ in rollbacks]
        assert targets == sorted(targets, reverse=True) and len(set(targets)) == 3, rollbacks
        assert all(tier == "durable" for t, _, tier in rollbacks if t < 7), rollbacks
        assert "step 9" in res["error"] and "again after 3 rollbacks" in res["error"]


def test_stop_policy_stops_every_rank_at_the_same_step(tmp_path: Any, shm: str) -> None:
    results = _run(tmp_path, shm, "stop", 2, policy={"on_nonfinite": "stop"}, poison=4)
    for res in results:
        assert "step 4" in res["error"] and "--on-nonfinite stop" in res["error"]
        assert not [e for e in res["events"] if e["name"] == "rollback"]


@pytest.mark.parametrize("world", [3, 2], ids=["three-replicas", "two-replicas"])
def test_a_flipped_bit_in_one_replica_is_found_named_and_rolled_back_bitwise(tmp_path: Any, shm: str, world: int) -> None:
    clean = _run(tmp_path, shm, "clean", world)
    hit = _run(tmp_path, shm, "flip", world, env=to_env([bitflip_at(1, 6, key="2.weight")]))
    named = [1] if world == 3 else [0, 1]  # the minority of three; both of two, which cannot tell
    for r in range(world):
        rollbacks = [(e["cause"], e["bad_step"], e["to_step"]) for e in hit[r]["events"] if e["name"] == "rollback"]
        assert rollbacks == [("divergence", 6, 5)], hit[r]["events"]
        divergences = [e for e in hit[r]["events"] if e["name"] == "replica_divergence"]
        if r in named:
            assert [(e["step"], e["ranks"]) for e in divergences] == [(6, named)]
        else:
            assert not divergences
        assert hit[r]["params"] == clean[r]["params"], "the job did not end bitwise equal to the clean run"
        assert not [e for e in hit[r]["events"] if e["name"] == "snapshot_poisoned"]  # the value stayed finite
        assert not [e for e in clean[r]["events"] if e["name"] in ("rollback", "replica_divergence")]
    with open(os.path.join(shm, "flip", "divergence.json")) as f:
        assert json.load(f)["ranks"] == named


class _MaskedNormNet(torch.nn.Module):
    """A -inf causal-mask buffer and BatchNorm statistics that differ per rank
    (DDP without broadcast_buffers): both legitimately fail a naive check."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.register_buffer("mask", torch.full((8, 8), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = (x @ x.T)[:8, :8] + self.mask[: x.shape[0], : x.shape[0]]
        return self.norm(self.lin(torch.softmax(scores, -1) @ x))


def _quiet_worker(rank: int, world: int, shm: str, out: str, steps: int) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}.init", rank=rank, world_size=world)
    model = _MaskedNormNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    events = RecordingSink()
    ckpt = Checkpointer({"model": model, "optim": opt}, shm_dir=shm, durable_every=0, events=events,
                        run_services=True, rollback=RollbackPolicy(on_spike="rollback"))
    for step in ckpt.steps(ckpt.restore() + 1, steps + 1):
        x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1000 * rank + step))
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.save(step, loss=loss.detach())
        if step % 20 == 0:
            ckpt.wait()  # now and then the seals keep up, so every rank compares
    guard = ckpt._guard
    assert guard is not None and guard._div is not None
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"events": sorted({name for name, _ in events.events}), "groups": guard._div._groups,
                   "agreed": guard._agreed, "mask": bool(torch.isinf(model.mask).any()),
                   "buffers_differ": float(model.norm.running_mean.sum())}, f)
    ckpt.close(final_durable=False)


def test_no_false_positive_over_200_steps_with_a_mask_buffer_and_per_rank_batchnorm(tmp_path: Any, shm: str) -> None:
    world, out = 3, str(tmp_path / "quiet")
    results = _ranks(world, out, _quiet_worker, lambda r: (r, world, shm, out, 200), timeout=180)
    for res in results:
        assert not set(res["events"]) & {"snapshot_poisoned", "snapshot_suspect", "replica_divergence", "rollback"}
        assert res["groups"] == [[0, 1, 2]], "the replicas were not compared"
        assert res["agreed"] is not None and res["agreed"] > 150 and res["mask"]
    assert len({res["buffers_differ"] for res in results}) == world  # the statistics do differ per rank


def test_a_loss_spike_rolls_back_and_its_data_is_skipped(shm: str) -> None:
    model, opt = _model()
    events = RecordingSink()
    ckpt = Checkpointer({"model": model, "optim": opt}, shm_dir=shm, durable_every=0, events=events,
                        run_services=True, rollback=RollbackPolicy(on_spike="rollback", skip_spike_data=True))
    ran = []
    for step in ckpt.steps(ckpt.restore() + 1, 41):
        ran.append(step)
        x = _batch(step, 0, None) * (30.0 if step == 30 else 1.0)  # one batch far off the distribution
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.save(step, loss=loss.detach())
        ckpt.wait()
    (rollback,) = events.named("rollback")
    assert (rollback["cause"], rollback["bad_step"]) == ("spike", 30) and rollback["to_step"] < 30
    assert [e["step"] for e in events.named("snapshot_suspect")] == [30]
    after = ran[ran.index(30) + 1:]
    assert 30 not in after and after[-1] == 40, "the spike's data was trained on again"
    assert ckpt._skip.steps == {30}  # travels with the checkpoint (hpresil_skip)
    ckpt.close(final_durable=False)


def test_a_rollback_by_hand_marks_the_newer_durable_steps_like_an_automatic_one(shm: str, tmp_path: Any) -> None:
    import time

    from hpresil.checkpoint.durable.stores import open_store
    from hpresil.checkpoint.durable.writer import list_committed, list_unhealthy

    model, opt = _model()
    url = f"file://{tmp_path}/durable"
    events = RecordingSink()
    ckpt = Checkpointer({"model": model, "optim": opt}, shm_dir=shm, durable=url, durable_every=2, events=events,
                        run_services=True)
    for step in ckpt.steps(ckpt.restore() + 1, 7):
        opt.zero_grad()
        model(_batch(step, 0, None)).square().mean().backward()
        opt.step()
        ckpt.save(step)
        ckpt.wait()
    store = open_store(url)
    assert [s for s, _ in list_committed(store)] == [6, 4, 2]
    assert ckpt.rollback(before=3) == 2
    deadline = time.monotonic() + 10
    while list_unhealthy(store, [4, 6]) != {4: "manual", 6: "manual"}:  # rank 0 marks them on a thread
        assert time.monotonic() < deadline, list_unhealthy(store, [4, 6])
        time.sleep(0.05)
    (rollback,) = events.named("rollback")
    assert (rollback["cause"], rollback["to_step"], rollback["bad_step"]) == ("manual", 2, 3)
    ckpt.close(final_durable=False)
