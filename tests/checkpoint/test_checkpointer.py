"""The Checkpointer: state round trips, mismatches, optimizer state, events,
and bitwise resume after SIGKILL (one process; two DDP ranks over gloo)."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

import hpresil
from hpresil.checkpoint import Checkpointer, RNGState
from hpresil.checkpoint.flatten import decode_json, encode_json
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.sealer import Sealer, SealerConfig
from hpresil.errors import CheckpointError, StateMismatchError
from hpresil.testing import fail_at, maybe_inject, to_env
from hpresil.testing import RecordingSink as ListSink

from _procs import process








def _ckpt(shm: str, state: dict[str, Any], **kw: Any) -> Checkpointer:
    kw.setdefault("durable_every", 0)
    kw.setdefault("run_services", True)
    return Checkpointer(state=state, shm_dir=shm, **kw)


def test_json_codec_round_trips_what_json_cannot() -> None:
    value = {
        "t": (1, (2.5, "x")),
        "b": b"\x00\xff",
        "ints": {0: "a", 7: [None, True]},
        "s": {3, 4},
        "tag_like": {"__tuple__": [1]},
        "dtype": torch.bfloat16,
        "inf": float("inf"),
    }
    assert decode_json(json.loads(json.dumps(encode_json(value)))) == value
    with pytest.raises(CheckpointError, match="data.obj: cannot store a object"):
        encode_json(object(), "data.obj")


def test_state_round_trip_in_place(shm: str) -> None:
    model = torch.nn.Linear(3, 2)
    buf = torch.arange(6.0)
    data = {"epoch": 3, "order": [5, 1, 2], "pos": (7, 8), "by_id": {1: "a"}}
    state = {"model": model, "buf": buf, "data": data, "nested": [torch.ones(2), {"k": torch.zeros(1)}], "rng": RNGState()}
    ckpt = _ckpt(shm, state)
    assert ckpt.restore() == 0
    random.seed(1)
    torch.manual_seed(1)
    assert ckpt.save(4)
    expect_py, expect_torch = random.random(), torch.rand(3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.close(keep_ram=True)

    with torch.no_grad():
        model.weight.zero_()
    buf.zero_()
    data.clear()
    state["nested"][0].zero_()
    random.seed(99)
    torch.manual_seed(99)
    ckpt = _ckpt(shm, state)
    assert ckpt.restore() == 4
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert torch.equal(buf, torch.arange(6.0)) and state["buf"] is buf  # in place
    assert data == {"epoch": 3, "order": [5, 1, 2], "pos": (7, 8), "by_id": {1: "a"}}
    assert torch.equal(state["nested"][0], torch.ones(2))
    assert random.random() == expect_py and torch.equal(torch.rand(3), expect_torch)
    ckpt.close()


def test_every_and_events(shm: str) -> None:
    sink = ListSink()
    ckpt = _ckpt(shm, {"w": torch.zeros(10)}, every=2, events=sink)
    assert [ckpt.save(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    saved = sink.named("checkpoint_saved")
    assert [e["step"] for e in saved] == [2, 4]
    assert saved[0]["tier"] == "ram" and saved[0]["bytes"] == 64 and saved[0]["blocking_s"] >= 0
    ckpt.wait()
    assert len(sink.named("checkpoint_sealed")) >= 1
    ckpt.close()


def test_mismatched_state_names_keys_shapes_and_dtypes(shm: str) -> None:
    ckpt = _ckpt(shm, {"model": torch.nn.Linear(4, 3), "extra": torch.zeros(2)})
    ckpt.save(1)
    ckpt.close(keep_ram=True)
    other = {"model": torch.nn.Linear(4, 5), "other": torch.zeros(2, dtype=torch.int32)}
    with pytest.raises(StateMismatchError) as err:
        _ckpt(shm, other).restore()
    msg = str(err.value)
    assert "missing from the snapshot: other" in msg
    assert "model.weight: snapshot has float32[3, 4], state has float32[5, 4]" in msg
    with pytest.raises(StateMismatchError, match=r"extra: snapshot has float32\[2\], state has int32\[2\]"):
        _ckpt(shm, {"model": torch.nn.Linear(4, 3), "extra": torch.zeros(2, dtype=torch.int32)}).restore()
    with pytest.raises(StateMismatchError, match="unexpected in the snapshot"):  # a module is strict
        _ckpt(shm, {"model": torch.nn.Linear(4, 3, bias=False), "extra": torch.zeros(2)}).restore()


def test_optimizer_without_state_yet_is_restored_bitwise(shm: str) -> None:
    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1)
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    m, opt, sched = make()
    ckpt = _ckpt(shm, {"model": m, "optim": opt, "sched": sched})
    for step in range(3):
        _step(m, opt, step)
        sched.step()
    ckpt.save(3)
    ckpt.close(keep_ram=True)
    m2, opt2, sched2 = make()
    assert not opt2.state
    ckpt = _ckpt(shm, {"model": m2, "optim": opt2, "sched": sched2})
    assert ckpt.restore() == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and sched2.last_epoch == 3
    for step in range(3, 6):
        for mm, oo, ss in ((m, opt, sched), (m2, opt2, sched2)):
            _step(mm, oo, step)
            ss.step()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    ckpt.close()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, model[0].in_features, generator=g)
    loss = (model(x) - 1).pow(2).mean() + torch.rand(()) * 0  # draws from the global RNG too
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_durable_tier_in_process_drain_and_restore(shm: str, tmp_path: Any) -> None:
    pytest.importorskip("hpresil.checkpoint.durable.drain")
    sink = ListSink()
    model = torch.nn.Linear(6, 4)
    state = {"model": model, "data": {"epoch": 0}}
    url = f"file://{tmp_path}/durable"
    ckpt = Checkpointer(state=state, shm_dir=shm, durable=url, every=1, durable_every=2, keep=1, events=sink)
    for step in (1, 2, 3, 4, 5):
        state["data"]["epoch"] = step
        ckpt.save(step)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt.close()  # drains the final step 5 (a lagging drain skips 4), then frees this rank's RAM
    assert [e["step"] for e in sink.named("checkpoint_drained")][-1] == 5
    with torch.no_grad():
        model.weight.zero_()
    ckpt = Checkpointer(state=state, shm_dir=shm, durable=url, durable_every=2, events=sink)
    assert ckpt.restore() == 5
    assert ckpt.last_restore is not None and ckpt.last_restore.tier == "durable"
    assert state["data"]["epoch"] == 5
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    ckpt.close()


def test_default_directory_without_hpresil_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import socket
    import uuid

    run_id = f"test-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("HPRESIL_SHM_DIR", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    ckpt = Checkpointer(state={"w": torch.ones(3)}, durable_every=0)
    try:
        assert ckpt.shm_dir == f"/dev/shm/hpresil/{run_id}/{socket.gethostname()}" and ckpt.run_services
        assert ckpt.save(1)
        ckpt.wait()
        assert scan(ckpt.shm_dir)[0].seal is not None  # sealed by the in-process sealer
        ckpt.close()
        assert not os.path.exists(f"/dev/shm/hpresil/{run_id}"), "the directories it made are gone"
        assert not os.path.isdir("/dev/shm/hpresil") or os.listdir("/dev/shm/hpresil"), "an empty root is removed"
    finally:
        shutil.rmtree(f"/dev/shm/hpresil/{run_id}", ignore_errors=True)


# -- SIGKILL and restart -------------------------------------------------------------------------

STEPS = 12


def _make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def _train_worker(rank: int, world: int, shm: str, out: str, init: str, attempt: int, kill_step: int, in_process: bool) -> None:
    """One training process: restore, train to STEPS saving every step, report."""
    torch.set_num_threads(1)
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
    os.environ.update(to_env([fail_at(rank=world - 1, step=kill_step)]))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, opt = _make_model()
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    data = {"seen": []}
    state = {"model": model, "optim": opt, "data": data, "rng": RNGState()}
    ckpt = Checkpointer(state=state, shm_dir=None if not in_process else shm, durable_every=0, run_services=in_process)
    start = ckpt.restore()
    torch.manual_seed(1000 + rank) if start == 0 else None  # per-rank RNG streams, restored on resume
    for step in range(start, STEPS):
        x = torch.randn(4, 6)  # global RNG: must continue exactly after a restore
        data["seen"].append(step)
        loss = train_model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ckpt.save(step + 1)
        if step + 2 == kill_step:
            _until_sealed(ckpt, shm, rank, step + 1)
        maybe_inject(step + 1, rank=rank)
    result = {"start": start, "seen": data["seen"], "params": [p.detach().clone() for p in model.parameters()]}
    torch.save(result, f"{out}.rank{rank}")
    ckpt.close(keep_ram=True)


def _until_sealed(ckpt: Checkpointer, shm: str, rank: int, step: int) -> None:
    # Makes "the restart restores from RAM" deterministic: the step before the
    # fault is sealed (by this process's sealer, or by the test acting as the runtime).
    ckpt.wait()
    deadline = time.monotonic() + 20
    while not any(i.record.step == step and i.seal is not None for i in scan(shm, [rank])):
        assert time.monotonic() < deadline, "snapshot never sealed"
        time.sleep(0.01)


def _reference(world: int) -> list[torch.Tensor]:
    """Parameters of an uninterrupted run, computed in this process (DDP with
    identical inputs on every rank averages identical gradients)."""
    model, opt = _make_model()
    torch.set_num_threads(1)
    gens = [torch.Generator().manual_seed(1000 + r) for r in range(world)]
    for _ in range(STEPS):
        grads = []
        for r in range(world):
            x = torch.randn(4, 6, generator=gens[r])
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in grads) / world if world > 1 else grads[0][i]
        opt.step()
    return [p.detach() for p in model.parameters()]


def _run_group(world: int, shm: str, out: str, attempt: int, kill_step: int, in_process: bool) -> list[int | None]:
    init = f"{out}.init{attempt}"
    procs = [
        process(_train_worker, (r, world, shm, out, init, attempt, kill_step, in_process)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    # Like the elastic agent: once one worker dies, the group is torn down.
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.02)
    for p in procs:
        p.join(5)
    return [p.exitcode for p in procs]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2], ids=["single", "ddp2"])
def test_sigkill_and_restart_resumes_bitwise_from_ram(world: int, shm: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "result")
    in_process = world == 1
    runtime = None
    if not in_process:
        # Stand in for hpresil-run: workers see $HPRESIL_SHM_DIR and leave sealing to the runtime.
        monkeypatch.setenv("HPRESIL_SHM_DIR", shm)
        runtime = Sealer(SealerConfig(interval=timedelta(milliseconds=10)), shm_dir=shm)
        runtime.start_background()
    kill_step = 7
    try:
        codes = _run_group(world, shm, out, 0, kill_step, in_process)
        assert codes[world - 1] == -signal.SIGKILL, codes
        assert _run_group(world, shm, out, 1, kill_step, in_process) == [0] * world
    finally:
        if runtime is not None:
            runtime.stop(timedelta(seconds=5))
    reference = _reference(world)
    for r in range(world):
        res = torch.load(f"{out}.rank{r}")
        assert 0 < res["start"] <= kill_step  # resumed from RAM, not from scratch
        assert res["seen"] == list(range(STEPS))  # plain data restored: no step repeated or skipped
        assert all(torch.equal(a, b) for a, b in zip(res["params"], reference)), f"rank {r} diverged"


def test_public_api_exports() -> None:
    assert hpresil.Checkpointer is Checkpointer and hpresil.RNGState is RNGState
    threading.enumerate()  # no background threads required to import


# -- a durable store every node must share -------------------------------------------------------

def _node_worker(rank: int, init: str, durable: str, shm: str, out: str) -> None:
    """One rank on its own simulated node (LOCAL_RANK 0), with its own view of ``durable``."""
    import logging

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = "0"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    sink = ListSink()
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: warnings.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("hpresil.checkpoint.restoring").addHandler(handler)
    ckpt = Checkpointer({"w": torch.zeros(3)}, durable=durable, durable_every=1, shm_dir=shm, events=sink,
                        run_services=True)
    ckpt.restore()
    ckpt.restore()  # checked once per process
    ckpt.close(keep_ram=False)
    dist.destroy_process_group()
    json.dump({"events": sink.named("tier_degraded"), "warnings": warnings}, open(out, "w"))


@pytest.mark.parametrize("shared", [True, False])
def test_a_durable_url_not_shared_by_all_nodes_is_reported_at_start(tmp_path: Any, shared: bool) -> None:
    procs = []
    for rank in range(2):
        durable = f"file://{tmp_path}/{'shared' if shared else f'node{rank}'}/ckpt"
        p = process(_node_worker, (rank, str(tmp_path / "init"), durable,
                                                      str(tmp_path / f"shm{rank}"), str(tmp_path / f"out{rank}")))
        p.start()
        procs.append(p)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank in range(2):
        got = json.load(open(tmp_path / f"out{rank}"))
        if shared:
            assert got["events"] == [] and not [w for w in got["warnings"] if "not shared" in w]
            assert not os.listdir(tmp_path / "shared" / "ckpt" / ".hpresil" / "shared"), "the marker is removed"
        else:
            (ev,) = got["events"]  # every rank hears it, once
            assert ev["tier"] == "durable" and ev["reason"] == "not_shared" and "s3://" in ev["error"]
            assert len([w for w in got["warnings"] if "is not shared by all nodes" in w]) == 1


# -- close() leaves the final state durable --------------------------------------------------------

@pytest.mark.parametrize("final_durable", [True, False])
def test_close_makes_the_last_step_durable(tmp_path: Any, final_durable: bool) -> None:
    """60 steps with ``durable_every=50``: after ``close()`` a rerun on a fresh node (no
    RAM) resumes at 60 with the final parameters; with ``final_durable=False`` at 50."""
    url = f"file://{tmp_path}/ckpt"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpointer({"model": model}, durable=url, durable_every=50, shm_dir=str(tmp_path / "shm1"),
                        events=ListSink(), run_services=True)
    start = ckpt.restore()
    for step in range(start, 60):
        with torch.no_grad():
            model.weight.mul_(0.9).add_(step)
        ckpt.save(step + 1)
        if step + 1 == 50:
            ckpt.wait()  # step 50 drained before later saves may reuse its slot
    final = model.weight.detach().clone()
    ckpt.close(final_durable=final_durable)
    with torch.no_grad():
        model.weight.zero_()
    again = Checkpointer({"model": model}, durable=url, durable_every=50, shm_dir=str(tmp_path / "shm2"),
                         events=ListSink(), run_services=True)
    assert again.restore() == (60 if final_durable else 50)
    assert torch.equal(model.weight, final) == final_durable
    again.close(final_durable=False)


def test_close_after_an_exception_takes_no_final_snapshot(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with Checkpointer({"model": model}, durable=url, durable_every=5, shm_dir=str(tmp_path / "shm"),
                          events=ListSink(), run_services=True) as ckpt:
            ckpt.restore()
            for step in range(7):
                ckpt.save(step + 1)
            raise RuntimeError("boom")  # the state may be half-updated here
    fresh = Checkpointer({"model": model}, durable=url, durable_every=5, shm_dir=str(tmp_path / "shm2"),
                         events=ListSink(), run_services=True)
    assert fresh.restore() == 5
    fresh.close(final_durable=False)
