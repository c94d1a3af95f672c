"""Overlapped snapshots (hpresil.checkpoint.fence): the copy of what an
optimizer step guards runs after save returned, and every snapshot still
equals the state as of its save bitwise; background arena preparation."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest
import torch

from hpresil.checkpoint import Checkpointer
from hpresil.checkpoint.fence import find_optimizers
from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.ram import arena
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.testing import RecordingSink

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(device: str, norm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    # 16 MiB of parameters, 48 MiB with AdamW's state: under INLINE_PREP, so no snapshot is skipped for the arena
    layers: list[torch.nn.Module] = [torch.nn.Linear(1024, 1024) for _ in range(4)]
    if norm:
        layers.insert(1, torch.nn.BatchNorm1d(1024))
    return torch.nn.Sequential(*layers).to(device)


def _snapshot(shm: str, step: int) -> dict[str, torch.Tensor]:
    """The tensors of rank 0's snapshot of ``step``, read back from the RAM tier."""
    src = RamSource(shm, verify=False)
    try:
        src.steps()
        record = src.records(step)[0]
        out = {}
        for e in record.entries:
            if e.kind == "tensor":
                buf = torch.empty(e.nbytes, dtype=torch.uint8)
                src.read(step, 0, e, buf)
                out[e.key] = buf.view(getattr(torch, e.dtype)).view(e.shape)
        return out
    finally:
        src.close()


def _expected(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {l.key: l.value.detach().cpu().clone() for l in flatten(state).leaves if isinstance(l.value, torch.Tensor)}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) >= set(want)
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"snapshot differs from the state as of save(): {bad[:5]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["optimizer", "buffer_in_forward", "no_optimizer_in_state", "every2"])
def test_snapshot_equals_the_state_as_of_save_while_the_step_runs(shm: str, device: str, case: str) -> None:
    model = _model(device, norm=case == "buffer_in_forward")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state: dict[str, Any] = {"model": model} if case == "no_optimizer_in_state" else {"model": model, "optim": opt}
    every = 2 if case == "every2" else 1
    ckpt = Checkpointer(state=state, shm_dir=shm, durable_every=0, run_services=False, every=every)
    x = torch.randn(64, 1024, device=device)
    try:
        assert ckpt.restore() == 0
        model(x).square().mean().backward()
        for step in range(1, 7):
            opt.step()
            opt.zero_grad()
            model(x).square().mean().backward()  # the next step's gradients, ready before the save
            want = _expected(state)
            ckpt.save(step)
            # What the loop does right away, while the copy may still run: forward
            # updates BatchNorm statistics, the optimizer step changes all it guards.
            if case == "buffer_in_forward":
                with torch.no_grad():
                    model(x)
            opt.step()
            ckpt.wait()
            if step % every == 0:
                _assert_equal(_snapshot(shm, step), want)
    finally:
        ckpt.close()


def test_guarded_tensors_are_the_optimizers_parameters_and_state(shm: str) -> None:
    model = _model("cpu", norm=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    held = torch.zeros(3)
    state = {"model": model, "optim": opt, "extra": {"held": held}}
    assert find_optimizers(state) == [opt]
    ckpt = Checkpointer(state=state, shm_dir=shm, durable_every=0, run_services=False)
    try:
        leaves = flatten(ckpt.state).leaves
        guarded = dict(zip([l.key for l in leaves if l.is_tensor], ckpt.fence.guarded(leaves) or []))
        assert guarded["model.0.weight"] and guarded["optim.state.0.exp_avg"] and guarded["optim.state.0.step"]
        assert not guarded["model.1.running_mean"] and not guarded["extra.held"]
    finally:
        ckpt.close()


def test_an_optimizer_step_waits_for_the_copy_in_flight(shm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step pre-hook joins the commit thread's copy: the step starts only
    once it is done, so the snapshot cannot see the step's writes."""
    from hpresil.checkpoint.ram import copier

    model = _model("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    order: list[str] = []
    real = copier.copy_checked

    def slow_copy(dst: torch.Tensor, src: torch.Tensor) -> bool | None:
        if not order or order[-1] != "copy":
            time.sleep(0.2)  # the copy is surely still running when the step is called
            order.append("copy")
        return real(dst, src)

    monkeypatch.setattr(copier, "copy_checked", slow_copy)
    ckpt = Checkpointer(state={"model": model, "optim": opt}, shm_dir=shm, durable_every=0, run_services=False)
    opt.register_step_pre_hook(lambda *_: order.append("step"))  # runs after the fence's own hook
    try:
        model(torch.randn(4, 1024)).sum().backward()
        want = _expected({"model": model})
        ckpt.save(1)
        opt.step()
        assert order == ["copy", "step"]
        ckpt.wait()
        _assert_equal(_snapshot(shm, 1), want)
    finally:
        ckpt.close()


def test_a_large_arena_is_prepared_in_the_background_and_a_save_never_waits_for_it(
        shm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above INLINE_PREP the slots are prepared by a thread; a save whose
    slot is not ready is skipped with ``arena_preparing`` (its old snapshot
    kept), and snapshots resume once the arena is ready."""
    monkeypatch.setattr(arena, "INLINE_PREP", 1 << 20)
    from hpresil.checkpoint.ram import writer as ram

    monkeypatch.setattr(ram, "INLINE_PREP", 1 << 20)
    gate = threading.Event()
    real = arena.Slot.prepare

    def held_prepare(self: Any, nbytes: int, device: Any) -> None:
        gate.wait(30)
        real(self, nbytes, device)

    monkeypatch.setattr(arena.Slot, "prepare", held_prepare)
    sink = RecordingSink()
    model = _model("cpu")
    ckpt = Checkpointer(state={"model": model}, shm_dir=shm, durable_every=0, run_services=False, events=sink)
    try:
        assert ckpt.restore() == 0  # starts the preparation
        assert ckpt.save(1) is False
        skipped = sink.named("checkpoint_skipped")
        assert skipped and skipped[0]["reason"] == "arena_preparing"
        gate.set()
        step = _saves_resume(ckpt)
        assert [i.record.step for i in scan(shm, [0])] == [step]
    finally:
        gate.set()
        ckpt.close()


def _saves_resume(ckpt: Checkpointer) -> int:
    """Saves steps 2, 3, ... until one is taken (the arena got ready); returns that step."""
    for step in range(2, 200):
        if ckpt.save(step):
            ckpt.wait()
            return step
        time.sleep(0.02)
    raise AssertionError("no snapshot was taken after the arena was released")


def test_a_restarted_writer_maps_the_slots_it_finds_without_losing_them(shm: str) -> None:
    state = {"t": torch.arange(300_000, dtype=torch.float32)}
    w = RamWriter(shm, 0, slots=2, run_id="r")
    w.save(1, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1)
    w.close()
    size = os.path.getsize(os.path.join(shm, "ckpt", "rank0", "slot0.bin"))
    w2 = RamWriter(shm, 0, slots=2, run_id="r")
    try:
        small = {"t": torch.zeros(10)}
        w2.save(2, flatten(small).leaves, world_size=1, durable=False, durable_url=None, keep=1)
        w2.wait()
        # the slot kept its size (the full state comes back after the first step), and step 1 survives
        assert os.path.getsize(os.path.join(shm, "ckpt", "rank0", "slot1.bin")) >= 10 * 4
        assert os.path.getsize(os.path.join(shm, "ckpt", "rank0", "slot0.bin")) == size
        assert sorted(i.record.step for i in scan(shm, [0])) == [1, 2]
    finally:
        w2.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: restores into device tensors through pinned staging")
@pytest.mark.parametrize("verify", [True, False])
def test_restore_into_cuda_tensors_is_bitwise_through_pinned_staging(shm: str, verify: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hpresil.checkpoint import h2d

    monkeypatch.setattr(h2d, "GROUP", 8 << 20)  # several groups in flight
    model = _model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 1024, device="cuda")
    ckpt = Checkpointer(state={"model": model, "optim": opt}, shm_dir=shm, durable_every=0, run_services=True)
    model(x).square().mean().backward()
    opt.step()
    ckpt.save(1)
    want = _expected({"model": model, "optim": opt})
    ckpt.wait()
    ckpt.close(keep_ram=True)
    model2 = _model("cuda")
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ckpt2 = Checkpointer(state={"model": model2, "optim": opt2}, shm_dir=shm, durable_every=0, run_services=True,
                         verify_on_restore=verify)
    try:
        assert ckpt2.restore() == 1
        got = _expected({"model": model2, "optim": opt2})
        _assert_equal(got, want)
        assert all(p.is_cuda for p in model2.parameters())
    finally:
        ckpt2.close()


def test_the_arena_is_prepared_for_the_optimizer_state_its_first_step_creates(
        shm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first step AdamW has no state; the arena prepared (in the
    background) at restore already has room for it, so the first snapshot
    after that step is not skipped for a new preparation."""
    from hpresil.checkpoint.ram import writer as ram

    monkeypatch.setattr(ram, "INLINE_PREP", 1 << 20)
    model = _model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(state={"model": model, "optim": opt}, shm_dir=shm, durable_every=0, run_services=False)
    try:
        assert ckpt.restore() == 0
        model(torch.randn(4, 1024)).sum().backward()
        opt.step()
        needed = sum(e.nbytes for e in _layout_entries(ckpt))
        deadline = time.monotonic() + 60
        while True:
            sizes = [os.path.getsize(os.path.join(shm, "ckpt", "rank0", f"slot{k}.bin")) for k in range(3)]
            if min(sizes) >= needed or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert min(sizes) >= needed, (sizes, needed)
        assert ckpt.save(1)
    finally:
        ckpt.close()


def _layout_entries(ckpt: Checkpointer) -> list[Any]:
    from hpresil.checkpoint.ram.arena import build_layout

    return build_layout(flatten(ckpt.state).leaves).entries


def test_device_reads_are_grouped_within_the_pinned_budget() -> None:
    """h2d stages at most GROUP bytes at a time; a larger entry is a group of its own."""
    from hpresil.checkpoint import h2d
    from hpresil.checkpoint.api import Entry

    def item(n: int) -> tuple[int, Entry, torch.Tensor]:
        return 0, Entry(key=f"e{n}", kind="tensor", dtype="uint8", shape=[n], nbytes=n), torch.empty(0)

    mib = 1 << 20
    sizes = [[e.nbytes for _, e, _ in g] for g in h2d._groups([item(n * mib) for n in (10, 30, 30, 100, 5, 60)])]
    assert sizes == [[10 * mib, 30 * mib], [30 * mib], [100 * mib], [5 * mib], [60 * mib]]
    assert all(sum(g) <= h2d.GROUP or len(g) == 1 for g in sizes)


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
def test_the_host_copy_checks_for_nan_and_the_seal_still_judges(
    shm: str, guard: bool, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host entries are checked for NaN/Inf in their copy (the record says
    which, and which hold one): guarded ones always (fused natively, else
    behind the commit thread's copy), unguarded ones where the fused native
    check runs. The sealer skips their probe yet judges the snapshot
    poisoned once a finite entry turns non-finite; it probes the rest."""
    from hpresil.checkpoint import finite
    from hpresil.checkpoint.ram.sealer import Sealer

    if native and not finite.NATIVE:
        pytest.skip("the native module is not built here")
    if not native:
        monkeypatch.setattr(finite, "_native", None)

    state = {"w": torch.ones(300_000), "b": torch.ones(10, dtype=torch.bfloat16), "i": torch.arange(5)}

    def save(step: int) -> None:
        w.save(step, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1,
               guarded=[guard] * 3)
        w.wait()

    w = RamWriter(shm, 0, slots=3, run_id="r")
    sealer = Sealer(shm_dir=shm)
    try:
        save(1)
        assert sealer.flush()  # step 1 is sealed first: "w" was finite
        state["w"][123_456] = float("nan")
        save(2)
        assert sealer.flush()
    finally:
        w.close()
    records = {i.record.step: i.load_record(shm) for i in scan(shm, [0])}
    keys = [e.key for e in records[2].entries if e.kind == "tensor"]
    checked = int(records[2].checked or "0", 16)
    if guard or native:
        assert [k for n, k in enumerate(keys) if checked >> n & 1] == ["w", "b"]  # not the integer entry
        assert records[1].nonfinite == [] and records[2].nonfinite == ["w"]
    else:  # copied by torch: nothing checked in the copy, the sealer probed
        assert checked == 0 and records[2].nonfinite == []
    seals = {i.record.step: i.seal for i in scan(shm, [0])}
    assert seals[1].health == "ok" and seals[2].health == "poisoned" and "nonfinite" in seals[2].causes


def test_a_small_save_never_waits_for_a_slot_the_preparation_thread_holds(
        shm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The arena is being prepared in the background for the state after the
    optimizer's first step; a save of the smaller state before that step does
    not wait for the thread to finish the slot it holds (it is skipped within
    the slot budget), and snapshots go on once the thread is done."""
    from hpresil.checkpoint.ram import writer as ram

    monkeypatch.setattr(ram, "INLINE_PREP", 24 << 20)  # the 16 MiB model inline, its 48 MiB with AdamW not
    gate = threading.Event()
    real = arena.Slot.prepare

    def held_in_background(self: Any, nbytes: int, device: Any, **kw: Any) -> bool:
        if threading.current_thread().name == "hpresil-arena":
            gate.wait(30)
        return real(self, nbytes, device, **kw)

    monkeypatch.setattr(arena.Slot, "prepare", held_in_background)
    sink = RecordingSink()
    model = _model("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = Checkpointer(state={"model": model, "optim": opt}, shm_dir=shm, durable_every=0, run_services=False,
                        events=sink)
    try:
        assert ckpt.restore() == 0  # asks for 48 MiB slots in the background; the thread holds slot 0
        time.sleep(0.1)
        t0 = time.monotonic()
        ckpt.save(1)
        assert time.monotonic() - t0 < 5, "the save waited for the preparation thread"
        gate.set()
        assert _saves_resume(ckpt) in [i.record.step for i in scan(shm, [0])]
    finally:
        gate.set()
        ckpt.close()
