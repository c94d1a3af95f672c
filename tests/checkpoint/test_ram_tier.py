"""The RAM tier: arena layout and reuse, slot choice and locking, sealing,
verified reads, crash safety, integrity fallback, and a full /dev/shm."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any, Iterator

import pytest
import torch

from hpresil.checkpoint import Checkpointer, integrity
from hpresil.checkpoint.api import CommitRecord, slot_path
from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.integrity import Checksum, checksum
from hpresil.checkpoint.ram import source as ram_source
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.pin import SlotGone, pin
from hpresil.checkpoint.ram.sealer import Sealer, SealerConfig
from hpresil.checkpoint.ram.source import RamSource, read_verified
from hpresil.checkpoint.ram.writer import RamWriter
from hpresil.errors import ConfigError, IntegrityError
from hpresil.testing import RecordingSink as ListSink

from _procs import process


def _save(w: RamWriter, step: int, state: dict[str, Any]) -> int | None:
    return w.save(step, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1)


def _slot_of(shm: str, step: int, rank: int = 0) -> int:
    return next(i.slot for i in scan(shm, [rank]) if i.record.step == step)


def _hold(shm: str, step: int) -> int:
    """A reader's shared lock on the slot of ``step`` (close the descriptor to release it)."""
    fd = os.open(slot_path(shm, 0, _slot_of(shm, step), "bin"), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def test_layout_is_aligned_record_is_parseable_and_arena_is_reused(shm: str) -> None:
    state = {"a": torch.randn(3), "b": {"w": torch.randn(5, 7, dtype=torch.float64), "n": (1, b"x")}, "e": torch.empty(0)}
    w = RamWriter(shm, 0, slots=2, run_id="run")
    for step in (1, 2):
        assert _save(w, step, state) == 64 + 320 + 0
    ptrs = [s.buf.data_ptr() for s in w._slots]
    for step in (3, 4, 5):
        state["a"].add_(1)
        _save(w, step, state)
    assert [s.buf.data_ptr() for s in w._slots] == ptrs  # no re-allocation while the layout holds
    rec = CommitRecord.from_json(open(slot_path(shm, 0, _slot_of(shm, 5), "json")).read())
    entries = {e.key: e for e in rec.entries}
    assert rec.step == 5 and rec.world_size == 1 and rec.run_id == "run"
    assert all(e.offset % 64 == 0 for e in rec.entries if e.kind == "tensor")
    assert entries["b.w"].dtype == "float64" and entries["b.w"].shape == [5, 7] and entries["b.w"].path == ["b", "w"]
    assert entries["b.n"].kind == "json" and entries["b.n"].value == {"__tuple__": [1, {"__bytes__": "eA=="}]}
    w.close()


def test_slot_choice_keeps_newest_and_last_known_good_and_skips_rather_than_lose_them(shm: str) -> None:
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r")
    _save(w, 1, state)
    assert Sealer(shm_dir=shm).flush()
    _save(w, 2, state)
    _save(w, 3, state)
    s1, s2 = _slot_of(shm, 1), _slot_of(shm, 2)
    _save(w, 4, state)  # oldest is step 1, but it is the newest *sealed* one: step 2's slot is taken
    assert _slot_of(shm, 4) == s2 and _slot_of(shm, 1) == s1
    s3 = _slot_of(shm, 3)
    fd = _hold(shm, 3)  # a reader (drainer) holds step 3
    w.slot_wait = 0.05
    # the only other slot holds the last known good step (1, the newest sealed and healthy):
    # the snapshot is skipped rather than leave a rollback nothing to restore
    assert _save(w, 5, state) is None and _slot_of(shm, 1) == s1
    os.close(fd)
    _save(w, 5, state)
    assert _slot_of(shm, 5) == s3 and {i.record.step for i in scan(shm)} == {1, 4, 5}
    assert not [f for f in os.listdir(os.path.dirname(slot_path(shm, 0, 0, "bin"))) if f.endswith(".reclaim")]
    w.close()


@pytest.mark.parametrize("sealed_in_time", [True, False])
def test_a_snapshot_flagged_for_the_durable_tier_is_overwritten_only_after_the_wait(shm: str,
                                                                                   sealed_in_time: bool) -> None:
    """Newest unsealed, the last known good older, the durable-flagged one between
    them: the next save waits (a seal landing frees the old slot) and takes the
    durable slot only once its wait is spent."""
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=5.0 if sealed_in_time else 0.05)
    _save(w, 1, state)
    assert Sealer(shm_dir=shm).flush()  # step 1: the last known good
    w.save(2, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    _save(w, 3, state)
    s1, s2 = _slot_of(shm, 1), _slot_of(shm, 2)
    if sealed_in_time:
        sealer = threading.Timer(0.2, lambda: Sealer(shm_dir=shm).flush())  # steps 2 and 3 sealed
        sealer.start()
        t0 = time.monotonic()
        assert _save(w, 4, state) is not None
        waited = time.monotonic() - t0
        sealer.join()
        assert _slot_of(shm, 4) == s1 and _slot_of(shm, 2) == s2, "the durable-flagged step 2 survives"
        assert 0.15 < waited < 4.0, waited
    else:
        assert _save(w, 4, state) is not None
        assert _slot_of(shm, 4) == s2 and _slot_of(shm, 1) == s1, "the durable slot is the last resort"
    w.close()


def test_a_newer_snapshot_flagged_for_the_durable_tier_takes_the_older_ones_slot_without_waiting(shm: str) -> None:
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=5.0)
    _save(w, 1, state)
    assert Sealer(shm_dir=shm).flush()  # step 1: the last known good
    w.save(2, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    _save(w, 3, state)
    s1, s2 = _slot_of(shm, 1), _slot_of(shm, 2)
    t0 = time.monotonic()
    assert w.save(4, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    assert time.monotonic() - t0 < 1.0, "step 4 supersedes step 2 for the durable tier: no wait for a seal"
    assert _slot_of(shm, 4) == s2 and _slot_of(shm, 1) == s1
    w.close()


def test_the_agreed_snapshot_yields_before_the_durable_one_while_an_older_healthy_one_stays(shm: str) -> None:
    """Four slots: an old healthy step, the agreed one (divergence check), the
    durable-flagged one and the newest. With the old one held by a reader the
    agreed one goes at once: a divergence rollback still has the old one, and
    the durable step survives for the drainer."""
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=4, run_id="r", slot_wait=5.0)
    _save(w, 1, state)
    _save(w, 2, state)
    w.save(3, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    _save(w, 4, state)
    assert Sealer(shm_dir=shm).flush()
    w.keep(2)
    s2, s3 = _slot_of(shm, 2), _slot_of(shm, 3)
    fd = _hold(shm, 1)
    w.slot_wait = 0.05  # the wait for the reader of step 1 is short
    t0 = time.monotonic()
    assert _save(w, 5, state) is not None
    os.close(fd)
    assert time.monotonic() - t0 < 1.0
    assert _slot_of(shm, 5) == s2 and _slot_of(shm, 3) == s3, "the durable-flagged step 3 survives"
    assert {i.record.step for i in scan(shm)} == {1, 3, 4, 5}
    w.close()


def test_the_agreed_snapshot_a_divergence_rollback_needs_is_never_overwritten(shm: str) -> None:
    """No healthy snapshot older than the agreed one: it is kept like the last
    known good one, and with the only other slot held the snapshot is skipped."""
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=0.05)
    for step in (1, 2, 3):
        _save(w, step, state)
    assert Sealer(shm_dir=shm).flush()
    w.keep(1)  # the replicas agreed on step 1 only
    fd = _hold(shm, 2)
    assert _save(w, 4, state) is None, "skipped: the agreed step 1 is what a divergence rollback restores"
    os.close(fd)
    assert _save(w, 4, state) is not None
    assert {i.record.step for i in scan(shm)} == {1, 3, 4}
    w.close()


def test_the_agreed_snapshot_that_is_the_last_known_good_is_kept(shm: str) -> None:
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=0.05)
    _save(w, 1, state)
    assert Sealer(shm_dir=shm).flush()  # step 1: agreed and the last known good
    w.save(2, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    _save(w, 3, state)  # steps 2 and 3 unsealed
    w.keep(1)
    s1, s2 = _slot_of(shm, 1), _slot_of(shm, 2)
    assert _save(w, 4, state) is not None
    assert _slot_of(shm, 1) == s1, "the only sealed healthy snapshot is never overwritten"
    assert _slot_of(shm, 4) == s2, "the durable slot is the last resort"
    w.close()


def test_a_save_flagged_for_the_durable_tier_waits_for_a_seal_with_the_budget_spent(shm: str) -> None:
    """The budget is spent and the only free slot is held: a plain snapshot is
    skipped, one flagged for the durable tier waits (its skip would drop a
    durable step) and takes the slot a seal landing frees meanwhile."""
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=5.0)
    _save(w, 1, state)
    _save(w, 2, state)
    assert Sealer(shm_dir=shm).flush()
    _save(w, 3, state)  # newest, unsealed: step 2 is the last known good
    s2 = _slot_of(shm, 2)
    fd = _hold(shm, 1)
    w._table.spend(100.0)
    assert _save(w, 4, state) is None
    sealer = threading.Timer(0.2, lambda: Sealer(shm_dir=shm).flush())  # step 3 sealed: step 2 may go
    sealer.start()
    try:
        assert w.save(4, flatten(state).leaves, world_size=1, durable=True, durable_url="file:///unused", keep=1)
    finally:
        sealer.join()
        os.close(fd)
    assert _slot_of(shm, 4) == s2 and {i.record.step for i in scan(shm)} == {1, 3, 4}
    w.close()


def test_save_asks_readers_for_a_slot_and_waits_for_the_first_released(shm: str) -> None:
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=3, run_id="r", slot_wait=30.0)
    for step in (1, 2, 3):
        _save(w, step, state)
    assert Sealer(shm_dir=shm).flush()  # step 3 sealed: sealing 1 or 2 again gives a restore nothing newer
    held = {k: os.open(slot_path(shm, 0, k, "bin"), os.O_RDONLY) for k in (_slot_of(shm, 1), _slot_of(shm, 2))}
    for fd in held.values():
        fcntl.flock(fd, fcntl.LOCK_SH)  # two readers hold every slot the writer may take
    asked: list[bool] = []

    def reader_finishes(k: int) -> None:
        deadline = time.monotonic() + 10
        while not os.path.exists(slot_path(shm, 0, k, "reclaim")) and time.monotonic() < deadline:
            time.sleep(0.001)
        asked.append(os.path.exists(slot_path(shm, 0, k, "reclaim")))
        os.close(held[k])  # releases its lock

    k2 = _slot_of(shm, 2)
    t = threading.Thread(target=reader_finishes, args=(k2,))
    t.start()
    assert _save(w, 4, state) is not None
    t.join()
    assert asked == [True], "the writer asked for the slot back"
    assert _slot_of(shm, 4) == k2 and {i.record.step for i in scan(shm)} == {1, 3, 4}
    assert not [f for f in os.listdir(os.path.dirname(slot_path(shm, 0, 0, "bin"))) if f.endswith(".reclaim")]
    for k, fd in held.items():
        if k != k2:
            os.close(fd)
    w.close()


def test_save_waits_for_the_newest_seal_without_asking_and_within_its_budget(shm: str) -> None:
    """No sealed commit is newer than the one a reader holds: the writer waits
    for it without a reclaim request, and what it waited is spent from its budget."""
    state = {"t": torch.zeros(4)}
    w = RamWriter(shm, 0, slots=2, run_id="r", slot_wait=0.5)
    _save(w, 1, state)
    _save(w, 2, state)
    k1 = _slot_of(shm, 1)
    fd = _hold(shm, 1)
    seen: list[str] = []

    def reader_finishes() -> None:
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            seen.extend(f for f in os.listdir(os.path.dirname(slot_path(shm, 0, 0, "bin"))) if f.endswith(".reclaim"))
            time.sleep(0.005)
        os.close(fd)

    t = threading.Thread(target=reader_finishes)
    t.start()
    assert _save(w, 3, state) is not None and _slot_of(shm, 3) == k1
    t.join()
    assert not seen, "nothing newer is sealed: the writer must not ask a seal to stop"
    assert w._table._refill() <= 0.5 - 0.2 + 0.01, "the wait was spent from the budget"
    w.close()


def test_sealer_yields_a_slot_the_writer_reclaims(monkeypatch: pytest.MonkeyPatch, shm: str) -> None:
    """A sealer still sealing a commit older than a sealed one gives its slot up
    mid-seal: the save that needs it neither waits for the whole seal nor is skipped."""
    from hpresil.checkpoint.ram import sealer as sealer_mod

    sealing = threading.Event()
    slow = threading.Event()
    slow.set()

    def slow_checksum(data: torch.Tensor, cancelled: Any, chunk: int | None = None, *, probe: Any = None) -> str | None:
        def look() -> bool:
            sealing.set()
            if slow.is_set():
                time.sleep(0.02)  # 4 KiB chunks every 20 ms: a seal of 1 MiB would take 5 s
            return cancelled()
        return integrity.checksum_cancellable(data, look, 4096 if slow.is_set() else chunk, probe=probe)

    state = {"t": torch.randn(1 << 18)}  # 1 MiB
    w = RamWriter(shm, 0, slots=2, run_id="r", slot_wait=30.0)
    events = ListSink()
    _save(w, 1, state)
    _save(w, 2, state)
    assert Sealer(shm_dir=shm).seal_once()  # the newest first: step 2 is sealed, step 1 not yet
    monkeypatch.setattr(sealer_mod, "checksum_cancellable", slow_checksum)
    s = Sealer(SealerConfig(interval=timedelta(milliseconds=5)), shm_dir=shm, events=events)
    s.start_background()
    try:
        assert sealing.wait(10)  # the sealer holds step 1's slot
        t0 = time.monotonic()
        assert _save(w, 3, state) is not None  # step 1's slot, taken back from the sealer
        waited = time.monotonic() - t0
        slow.clear()
        assert s.flush(timedelta(seconds=10))
    finally:
        s.stop()
    sealed = [e["step"] for e in events.named("checkpoint_sealed")]
    assert 1 not in sealed, f"the sealer finished a seal whose slot was reclaimed (save waited {waited:.2f}s)"
    assert {i.record.step: i.seal is not None for i in scan(shm)} == {2: True, 3: True}
    w.close()


@pytest.mark.parametrize("nbytes", [0, 7, 8, 9, 64, 1000, 4099])
@pytest.mark.parametrize("chunk", [8, 24, 4096])
def test_chunked_checksum_equals_the_whole_and_stops_when_cancelled(nbytes: int, chunk: int) -> None:
    data = torch.randint(-(2**62), 2**62, ((nbytes + 7) // 8,), dtype=torch.int64).view(torch.uint8)[:nbytes].clone()
    assert integrity.checksum_cancellable(data, lambda: False, chunk) == checksum(data)
    assert integrity.checksum_cancellable(data, lambda: True, chunk) is None
    with pytest.raises(ValueError, match="positive"):
        integrity.checksum_cancellable(data, None, 0)


@pytest.mark.parametrize("nbytes", [0, 5, 8, 67, 1000, 4096 + 3])
def test_streaming_checksum_matches_integrity(monkeypatch: pytest.MonkeyPatch, shm: str, nbytes: int) -> None:
    monkeypatch.setattr(ram_source, "CHUNK", 64)  # many chunks, threaded
    monkeypatch.setattr(integrity, "LEAF", 64)  # ... that merge as whole leaves
    data = torch.randint(0, 256, (nbytes + 16,), dtype=torch.uint8)
    path = os.path.join(shm, "blob")
    with open(path, "wb") as f:
        f.write(bytes(data.tolist()))
    fd = os.open(path, os.O_RDONLY)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        for start in (0, 8, 3):  # 3: a destination that is not 8-byte aligned
            out = torch.zeros(nbytes + 3, dtype=torch.uint8)[start % 3 : start % 3 + nbytes]
            expected = checksum(data[start : start + nbytes].clone())
            read_verified(fd, start, out, expected, pool)
            assert torch.equal(out, data[start : start + nbytes])
            if nbytes:
                with pytest.raises(IntegrityError):
                    read_verified(fd, start, out, expected.replace(expected[7], "f" if expected[7] != "f" else "0"), pool)
    os.close(fd)


def _write_then_die(shm: str, overlapped: bool) -> None:
    """Child: commits step 1, then is SIGKILLed half way through copying step 2
    (``overlapped``: in the commit thread's copy, after ``save`` returned)."""
    from hpresil.checkpoint.ram import copier

    state = {"a": torch.full((1000,), 1.0), "b": torch.full((1000,), 1.0)}
    w = RamWriter(shm, 0, slots=2, run_id="r")
    _save(w, 1, state)
    if overlapped:
        real_copy = copier.copy_checked

        def copy_then_die(dst: torch.Tensor, src: torch.Tensor) -> bool | None:
            real_copy(dst, src)
            os.kill(os.getpid(), signal.SIGKILL)

        copier.copy_checked = copy_then_die
        state["a"].fill_(2.0), state["b"].fill_(2.0)
        w.save(2, flatten(state).leaves, world_size=1, durable=False, durable_url=None, keep=1, guarded=[True, True])
        time.sleep(30)  # killed by the commit thread
        return
    real = copier.Copier.copy

    def copy_half_then_die(self: Any, slot: Any, views: list[torch.Tensor], tensors: list[torch.Tensor],
                           *args: Any) -> Any:
        views[0].copy_(tensors[0])
        os.kill(os.getpid(), signal.SIGKILL)
        return real(self, slot, views, tensors, *args)

    copier.Copier.copy = copy_half_then_die
    state["a"].fill_(2.0), state["b"].fill_(2.0)
    _save(w, 2, state)


@pytest.mark.parametrize("overlapped", [False, True], ids=["in_save", "after_save_returned"])
def test_sigkill_mid_copy_never_damages_the_previous_snapshot(shm: str, overlapped: bool) -> None:
    proc = process(_write_then_die, (shm, overlapped))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    infos = scan(shm)
    assert [i.record.step for i in infos] == [1]  # step 2's slot has no record: never trusted
    assert Sealer(shm_dir=shm).flush()
    state = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    ckpt = Checkpointer(state=state, shm_dir=shm, durable_every=0, run_services=False)
    assert ckpt.restore() == 1
    assert torch.equal(state["a"], torch.ones(1000)) and torch.equal(state["b"], torch.ones(1000))
    ckpt.close(keep_ram=True)
    # Once the writer lock is free again, the half-written slot is reused first.
    w = RamWriter(shm, 0, slots=2, run_id="r")
    _save(w, 3, state)
    assert sorted(i.record.step for i in scan(shm)) == [1, 3]
    w.close()


def _ckpt(shm: str, state: dict[str, Any], events: ListSink, **kw: Any) -> Checkpointer:
    return Checkpointer(state=state, shm_dir=shm, durable_every=0, events=events, **kw)


def test_corrupt_newest_snapshot_is_skipped_and_its_timeline_dropped(shm: str) -> None:
    sink = ListSink()
    state = {"w": torch.zeros(64)}
    ckpt = _ckpt(shm, state, sink, run_services=True)
    for step in (1, 2, 3):
        state["w"].fill_(float(step))
        ckpt.save(step)
    ckpt.wait()
    ckpt.close(keep_ram=True)
    info = next(i for i in scan(shm) if i.record.step == 3)
    with open(slot_path(shm, 0, info.slot, "bin"), "r+b") as f:  # a bit flip in the sealed data
        f.seek(info.load_record(shm).entries[0].offset + 5)
        f.write(b"\x7f")
    state["w"].zero_()
    ckpt = _ckpt(shm, state, sink, run_services=False)
    assert ckpt.restore() == 2
    assert torch.equal(state["w"], torch.full((64,), 2.0))
    assert sink.named("integrity_failed")[0]["step"] == 3 and sink.named("integrity_failed")[0]["tier"] == "ram"
    restored = sink.named("checkpoint_restored")[-1]
    assert restored == {
        "step": 2, "tier": "ram", "duration_s": restored["duration_s"], "bytes": 256, "world_size_saved": 1,
        "skipped": restored["skipped"],
    }
    (skipped,) = restored["skipped"]  # the newer step it passed over, and why
    assert skipped.startswith("step 3 (rank 0:") and "failed verification" in skipped
    assert 3 not in {i.record.step for i in scan(shm)}  # abandoned timeline
    ckpt.close(keep_ram=True)


def test_unsealed_commit_is_unverified(shm: str) -> None:
    state = {"w": torch.zeros(8)}
    ckpt = _ckpt(shm, state, ListSink(), run_services=False)  # nobody seals: like a runtime that lags
    state["w"].fill_(1.0)
    ckpt.save(1)
    assert Sealer(shm_dir=shm).flush()
    state["w"].fill_(2.0)
    ckpt.save(2)  # committed, never sealed
    ckpt.close(keep_ram=True)
    state["w"].zero_()
    ckpt = _ckpt(shm, state, ListSink(), run_services=False, verify_on_restore=False)
    assert ckpt.restore() == 2 and state["w"][0] == 2.0  # opted out of verification
    ckpt.close(keep_ram=True)
    ckpt = _ckpt(shm, state, ListSink(), run_services=False)
    assert ckpt.restore() == 1 and state["w"][0] == 1.0  # newest *sealed* one
    ckpt.close(keep_ram=False)
    assert not os.path.exists(os.path.join(shm, "ckpt", "rank0"))  # close() frees the RAM when asked


@pytest.fixture
def tiny_tmpfs() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="hpresil-tinyshm-")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", d], capture_output=True)
    if res.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=False)
        os.rmdir(d)


def test_full_shm_degrades_and_training_continues(tiny_tmpfs: str, tmp_path: Any) -> None:
    sink = ListSink()
    state = {"w": torch.randn(512, 1024)}  # 2 MiB: cannot fit a 1 MiB tmpfs
    ckpt = Checkpointer(state=state, shm_dir=tiny_tmpfs, durable_every=0, events=sink, run_services=True)
    assert ckpt.restore() == 0
    assert ckpt.save(1) is False  # no exception: training goes on
    assert ckpt.save(2) is False
    degraded = sink.named("tier_degraded")
    assert len(degraded) == 1 and degraded[0]["tier"] == "ram" and "No space left" in degraded[0]["error"]
    assert os.statvfs(tiny_tmpfs).f_bfree * os.statvfs(tiny_tmpfs).f_frsize > 900 * 1024  # slots were freed
    ckpt.close()


def test_shm_with_room_for_two_slots_keeps_double_buffering(tiny_tmpfs: str) -> None:
    sink = ListSink()
    state = {"w": torch.randn(100 * 1024)}  # 400 KiB: two slots fit in 1 MiB, three do not
    ckpt = Checkpointer(state=state, shm_dir=tiny_tmpfs, durable_every=0, events=sink, run_services=True, slots=3)
    for step in range(1, 6):
        assert ckpt.save(step)
        ckpt.wait()  # the training step between saves, in which the sealer finishes
    assert not sink.named("tier_degraded")
    assert sorted(i.record.step for i in scan(tiny_tmpfs)) == [4, 5]
    ckpt.close()


def test_full_shm_stages_durable_snapshots_on_disk(tiny_tmpfs: str, tmp_path: Any) -> None:
    pytest.importorskip("hpresil.checkpoint.durable.drain")
    sink = ListSink()
    state = {"w": torch.randn(512, 1024), "step": {"n": 0}}
    url = f"file://{tmp_path}/durable"
    ckpt = Checkpointer(state=state, shm_dir=tiny_tmpfs, durable=url, every=1, durable_every=2, events=sink, run_services=True)
    assert ckpt.restore() == 0
    for step in (1, 2, 3):
        state["step"]["n"] = step
        ckpt.save(step)
    ckpt.wait()
    assert sink.named("tier_degraded")[0]["fallback"] == "durable"
    assert [e["step"] for e in sink.named("checkpoint_saved")] == [2]
    ckpt.close()
    expected = state["w"].clone()
    state["w"].zero_()
    ckpt = Checkpointer(state=state, shm_dir=tiny_tmpfs, durable=url, durable_every=2, events=sink, run_services=True)
    assert ckpt.restore() == 3  # close() staged and uploaded the final step too
    assert ckpt.last_restore is not None and ckpt.last_restore.tier == "durable"
    assert torch.equal(state["w"], expected) and state["step"]["n"] == 3
    ckpt.close()


def test_sealer_as_node_service_seals_all_ranks(shm: str) -> None:
    from datetime import timedelta

    from hpresil.runtime.api import RuntimeContext

    for rank in (0, 1):
        w = RamWriter(shm, rank, slots=2, run_id="r")
        _save(w, 7, {"t": torch.full((10,), float(rank))})
        w.close()
    sink = ListSink()
    sealer = Sealer()
    sealer.start(RuntimeContext(run_id="r", node_id="n", shm_dir=shm, log_dir=shm, events=sink))
    sealer.tick()
    sealer.stop(timedelta(seconds=10))
    assert all(i.seal is not None for i in scan(shm)) and len(scan(shm)) == 2
    assert sorted(e["rank"] for e in sink.named("checkpoint_sealed")) == [0, 1]
    src = RamSource(shm)
    assert [(r.step, r.world_size, sorted(r.ranks)) for r in src.steps()] == [(7, 1, [0, 1])]
    src.close()


@pytest.mark.parametrize("mapped", [False, True])
def test_verified_reads_by_preadv_and_by_mapping(shm: str, mapped: bool) -> None:
    """Both read paths (4 KiB-page tmpfs: preadv; huge-page tmpfs: mapping)
    return the saved bytes and reject a flipped byte."""
    state = {"a": torch.arange(3000, dtype=torch.float32), "b": torch.arange(77, dtype=torch.int16)}
    w = RamWriter(shm, 0, slots=2, run_id="r")
    _save(w, 5, state)
    w.close()
    assert Sealer(shm_dir=shm).flush()
    src = RamSource(shm, mapped=mapped)
    (ref,) = src.steps()
    record = src.records(5)[0]
    outs = [torch.empty(e.nbytes, dtype=torch.uint8) for e in record.entries]
    src.read_many(5, [(0, e, out) for e, out in zip(record.entries, outs)])
    assert bool(src._maps) == mapped
    expected = {k: v.contiguous().view(torch.uint8).reshape(-1) for k, v in state.items()}
    for e, out in zip(record.entries, outs):
        assert torch.equal(out, expected[e.key.split(".")[-1]])
    src.close()
    info = scan(shm)[0]
    with open(slot_path(shm, 0, info.slot, "bin"), "r+b") as f:
        f.seek(record.entries[0].offset + 9)
        byte = f.read(1)
        f.seek(record.entries[0].offset + 9)
        f.write(bytes([byte[0] ^ 0x10]))
    src = RamSource(shm, mapped=mapped)
    src.steps()
    with pytest.raises(IntegrityError):
        src.read(5, 0, record.entries[0], torch.empty(record.entries[0].nbytes, dtype=torch.uint8))
    src.close()


def test_huge_page_mode_reads_the_mount_table(tmp_path: Any) -> None:
    from hpresil.runtime.shm import huge_page_mode

    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 0:20 / / rw,relatime - ext4 /dev/vda rw\n"
        "30 22 0:25 / /dev/shm rw,nosuid - tmpfs tmpfs rw,size=100k\n"
        "31 30 0:26 / /dev/shm/huge\\040dir rw - tmpfs tmpfs rw,size=4g,huge=within_size\n"
        "garbage line\n"
    )
    assert huge_page_mode("/dev/shm/job/node", str(table)) == "never"
    assert huge_page_mode("/dev/shm/huge dir/job", str(table)) == "within_size"
    assert huge_page_mode("/work/x", str(table)) == ""
    assert huge_page_mode("/dev/shm/x", str(tmp_path / "missing")) == ""


def test_checkpointer_reports_a_skipped_snapshot(shm: str) -> None:
    from hpresil.checkpoint import CheckpointConfig

    sink = ListSink()
    state = {"t": torch.zeros(8)}
    cfg = CheckpointConfig(slots=2, durable_every=0, slot_wait=timedelta(milliseconds=20))
    ckpt = Checkpointer(state=state, shm_dir=shm, config=cfg, events=sink, run_services=False)
    assert ckpt.save(1) and ckpt.save(2)
    fd = _hold(shm, 1)  # a reader that does not yield holds the only slot a save may take
    try:
        assert not ckpt.save(3)
    finally:
        os.close(fd)
    (skip,) = sink.named("checkpoint_skipped")
    assert skip["step"] == 3 and skip["reason"] == "slots_busy" and skip["waited_s"] >= 0.02
    assert ckpt.save(4) and {i.record.step for i in scan(shm)} == {2, 4}
    ckpt.close()
    with pytest.raises(ConfigError, match="slot_wait"):
        CheckpointConfig(slot_wait=timedelta(seconds=-1))


def _wait_for_a_held_slot(shm: str) -> None:
    """Child: step 3's save waits (for up to 30 s) for a slot a reader holds."""
    w = RamWriter(shm, 0, slots=2, run_id="r", slot_wait=30.0)
    _save(w, 3, {"t": torch.zeros(4)})


def test_reclaim_requests_of_a_killed_writer_do_not_outlive_it(shm: str) -> None:
    """A writer SIGKILLed while it waits for a slot leaves slot<K>.reclaim behind;
    the rank's next writer removes it, so the sealer seals that slot again."""
    w = RamWriter(shm, 0, slots=2, run_id="r")
    _save(w, 1, {"t": torch.zeros(4)})
    _save(w, 2, {"t": torch.zeros(4)})
    w.close()
    assert Sealer(shm_dir=shm).seal_once()  # step 2 sealed: the writer may ask for step 1's slot
    k1 = _slot_of(shm, 1)
    fd = _hold(shm, 1)  # a reader holds step 1's slot
    request = slot_path(shm, 0, k1, "reclaim")
    proc = process(_wait_for_a_held_slot, (shm,))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(request) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert os.path.exists(request), "the waiting writer asked for the slot"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    finally:
        os.close(fd)
    assert proc.exitcode == -signal.SIGKILL and os.path.exists(request)
    assert not Sealer(shm_dir=shm).seal_once(), "the orphaned request still stops the sealer"
    w = RamWriter(shm, 0, slots=2, run_id="r")
    assert not os.path.exists(request)
    assert Sealer(shm_dir=shm).flush() and all(i.seal is not None for i in scan(shm))
    w.close()


def test_pin_holds_the_listed_commit_and_refuses_a_reused_held_or_short_slot(shm: str) -> None:
    w = RamWriter(shm, 0, slots=2, run_id="r")
    _save(w, 1, {"t": torch.arange(16.0)})
    assert Sealer(shm_dir=shm).flush()
    (info,) = scan(shm, [0])
    with pin(shm, info, timeout=None, full=True, sealed=True, mapped=True) as held:
        assert held.record.commit_id == info.record.commit_id and held.seal is not None
        assert held.record.entries and held.tensor()[: 64].view(torch.float32)[:16].equal(torch.arange(16.0))
        with open(slot_path(shm, 0, info.slot, "bin"), "rb") as f:  # a writer cannot take it meanwhile
            with pytest.raises(BlockingIOError):
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(slot_path(shm, 0, info.slot, "bin"), "rb") as f:  # released at the end of the block
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SlotGone, match="held by a writer"):
            with pin(shm, info, timeout=None):
                pass
    _save(w, 2, {"t": torch.arange(16.0)})
    assert Sealer(shm_dir=shm).flush()
    assert _save(w, 3, {"t": torch.arange(16.0)})  # reuses step 1's slot
    with pytest.raises(SlotGone, match="replaced"):
        with pin(shm, info, timeout=None):
            pass
    w.close()
    newest = max(scan(shm, [0]), key=lambda i: i.record.step)
    os.truncate(slot_path(shm, 0, newest.slot, "bin"), 8)
    with pytest.raises(IntegrityError, match="shorter"):
        with pin(shm, newest, timeout=None):
            pass


@pytest.mark.parametrize("algorithm", ["xxh3", "sum64"])
@pytest.mark.parametrize("nbytes", [0, 1, 7, 8, 13, 64, 1000, 4099])
def test_streaming_checksum_in_any_pieces_and_merged_parts_equals_the_whole(
    monkeypatch: pytest.MonkeyPatch, nbytes: int, algorithm: str
) -> None:
    monkeypatch.setattr(integrity, "LEAF", 64)  # many leaves in a small input
    unit = 64 if algorithm == "xxh3" else 8
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    whole = Checksum(algorithm).update(data).hexdigest()
    assert whole.startswith(algorithm + ":") and whole.endswith(f":{nbytes}")
    gen = torch.Generator().manual_seed(nbytes)
    c, pos = Checksum(algorithm), 0
    while pos < nbytes:  # pieces of any length, fed in order
        n = int(torch.randint(1, 12, (1,), generator=gen))
        c.update(data[pos : pos + n])
        pos += n
    assert c.hexdigest() == whole and c.nbytes == nbytes
    cut = nbytes // 2 // unit * unit  # parts hashed apart (on other threads) merge when the first ends on a unit
    assert Checksum(algorithm).update(data[:cut]).merge(Checksum(algorithm).update(data[cut:])).hexdigest() == whole
    if nbytes % unit and nbytes > unit:
        with pytest.raises(ValueError, match=f"multiple of {unit}"):
            Checksum(algorithm).update(data[:-1]).merge(Checksum(algorithm).update(data[-1:]))
    assert Checksum.like(whole).algorithm == algorithm and integrity.verify(data, whole)


def test_xxh3_catches_what_an_additive_sum_misses() -> None:
    """Swapped words and changes that cancel out keep sum64 but not xxh3 (the
    divergence check compares replicas by these checksums)."""
    words = torch.arange(1, 1 + (3 << 20) // 8, dtype=torch.int64)
    swapped = words.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    cancel = words.clone()
    cancel[5] += 1
    cancel[(2 << 20) // 8] -= 1  # in another leaf
    for changed in (swapped, cancel):
        assert checksum(changed, like="sum64:0:0") == checksum(words, like="sum64:0:0")
        assert checksum(changed) != checksum(words)
    assert checksum(words).startswith("xxh3:")
