"""The chaos fault matrix: faults in the checkpoint tiers themselves.

Corrupted bytes in the RAM arena and in a durable shard, a worker SIGKILLed in
the middle of its RAM snapshot, a node SIGKILLed in the middle of a durable
upload, shared memory full, the durable directory's disk full, and the S3
server crashing and coming back. Each case runs the llama example under
``hpresil-run`` (see tests/chaos/test_chaos_workers.py) and checks detection, the tier and
step restored, completion, the last good checkpoint, and bitwise final state.

Cases that need a durable step committed before the fault *hold* the job at
that step (every worker SIGSTOPs itself right after saving it,
``chaos_harness.hold``) until the drainer committed it, instead of betting on
how fast the drain runs on a busy machine; the test releases the workers with
SIGCONT.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

from chaos_harness import (
    PAUSE, STEPS, Fault, KillInWindow, assert_bitwise, committed, corrupt_slot, exclusive_flocks, fill, final_state,
    flip_bytes, frozen, hold, named, newest_saved, ram_slots, reference, remount, restores, shm_root, standalone, tmpfs,
    verify_durable, wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory):
    return reference(tmp_path_factory)


def _held_after_commit(agent, durable: str, step: int, timeout: float = 120) -> None:
    """Waits until the job is held (see ``hold``) and durable ``step`` is committed."""
    wait_for(lambda: agent.held() and step in committed(durable), timeout, f"held, durable step {step}", [agent])


def _restored(evs: list[dict], attempt: int) -> set[tuple[int, str, int]]:
    return {(e["rank"], e["tier"], e["step"]) for e in restores(evs, attempt)}


@pytest.mark.ci
def test_corrupted_ram_arena_falls_back_to_durable(tmp_path, ref) -> None:
    """The job is held at step 10 until durable step 10 is committed; bytes are
    flipped in every sealed RAM snapshot of rank 1 (steps 8-10), then rank 1 is
    SIGKILLed. Rank 1's step 10 fails its checksum on read (``integrity_failed``,
    tier ram) and the same restore round reads it from the next tier that holds
    it: rank 0 restores step 10 from its RAM, rank 1 from the durable tier."""
    durable = tmp_path / "durable"
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=f"file://{durable}", faults=hold(10),
                                       launcher=PAUSE) as agent:
        _held_after_commit(agent, str(durable), 10)
        shm_dir = agent.shm_dir()
        # Corruption before the seal would be sealed in: the sealer vouched for every slot first.
        slots = wait_for(lambda: (s := ram_slots(shm_dir, 1)) and all(i.seal for i in s) and s, 10,
                         "rank 1's snapshots sealed", [agent])
        for info in slots:
            corrupt_slot(shm_dir, info)
        agent.kill_rank(1)
        agent.release()
        evs = agent.finish()
    corrupted = sorted(i.record.step for i in slots)
    # every snapshot rank 1 holds (normally 8-10; a save skipped under load changes the older ones)
    assert corrupted[-1] == 10 and len(corrupted) >= 2, corrupted
    # step 10 fails in RAM and is read from the durable tier in the same round; 8 and 9 are never tried
    bad = named(evs, "integrity_failed", tier="ram", rank=1)
    assert {e["step"] for e in bad} == {10}, bad
    assert _restored(evs, 1) == {(0, "ram", 10), (1, "durable", 10)}
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(str(durable))[-1] == STEPS
    verify_durable(f"file://{durable}", STEPS)


def test_corrupted_durable_shard_falls_back_to_older_step(tmp_path, ref) -> None:
    """The job is held at step 10 and then 20 until each is committed, and its
    node dies at step 20 (agent and workers SIGKILLed, RAM lost: the rerun gets
    a fresh shm root). Bytes are flipped in rank 1's data file of the newest
    durable step, 20. The rerun finds nothing in RAM, fails the checksum of
    step 20 (``integrity_failed``, tier durable) and restores step 10, which is
    intact."""
    durable = tmp_path / "durable"
    url = f"file://{durable}"
    with shm_root() as shm, standalone(tmp_path, "first", shm=shm, durable=url, launcher=PAUSE,
                                       faults=[*hold(10), *hold(20)]) as first:
        _held_after_commit(first, str(durable), 10)
        first.release()
        wait_for(lambda: len(named(first.events(), "checkpoint_saved", step=20)) == 2, 120, "both ranks at step 20",
                 [first])
        _held_after_commit(first, str(durable), 20)
        first.kill_node()
    assert committed(str(durable)) == [10, 20]
    rank1 = json.loads((durable / "step_0000000020" / ".hpresil" / "rank1.json").read_text())
    entry = next(e for e in rank1["entries"] if "data_offset" in e.get("loc", {}) and e["nbytes"] >= 64)
    flip_bytes(str(durable / "step_0000000020" / entry["loc"]["file"]), entry["loc"]["data_offset"])
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=url) as agent:
        evs = agent.finish()
    bad = named(evs, "integrity_failed", tier="durable", step=20)
    assert bad and all(repr(entry["key"]) in e["error"] and "fails its checksum" in e["error"] for e in bad), bad
    assert _restored(evs, 0) == {(0, "durable", 10), (1, "durable", 10)}
    assert_bitwise(final_state(tmp_path, "job"), ref)
    for step in (10, STEPS):
        verify_durable(url, step)


def test_kill_during_ram_snapshot(tmp_path, ref) -> None:
    """Rank 1 is SIGKILLed in the middle of writing a RAM snapshot. A thread
    freezes the worker (SIGSTOP) every few ms and looks, while it is stopped,
    whether it holds the exclusive flock a writer takes on a slot from before
    it unlinks the slot's old commit record until the new one is renamed into
    place, with that slot's record gone (/proc/locks and the slot files): then
    the arena is half copied and the SIGKILL lands in exactly that state;
    otherwise it SIGCONTs the worker. The window is a few ms of every step, so
    it is hit within the first steps watched. The torn slot never gets a
    record; the restart restores rank 1's newest complete snapshot (the step
    before, unless rank 0 had not finished it either), from RAM."""
    durable = tmp_path / "durable"
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=f"file://{durable}") as agent:
        wait_for(lambda: named(agent.events(), "checkpoint_saved", rank=1, step=3), 120, "rank 1's 3 slots", [agent])
        pid = agent.worker_pids()[1]
        shm_dir = agent.shm_dir()
        slot_dir = os.path.join(shm_dir, "ckpt", "rank1")
        inodes = {os.stat(os.path.join(slot_dir, f"slot{k}.bin")).st_ino: k for k in range(3)}

        def torn_slot():
            for ino in exclusive_flocks(pid):
                k = inodes.get(ino)
                if k is not None and not os.path.exists(os.path.join(slot_dir, f"slot{k}.json")):
                    return f"slot{k}"
            return None

        killer = KillInWindow(frozen(pid, torn_slot), timeout=60).start()
        try:
            wait_for(lambda: named(agent.events(), "worker_exit", rank=1), 60, "rank 1 killed in its snapshot", [agent])
        finally:
            killer.stop()
        assert killer.killed == pid, "the poller did not see a snapshot in progress"
        complete = {r: max(i.record.step for i in ram_slots(shm_dir, r)) for r in (0, 1)}
        assert not os.path.exists(os.path.join(slot_dir, f"{killer.seen}.json")), "the torn slot got a record"
        evs = agent.finish()
    # rank 0 ran at most one snapshot ahead (the next step needs rank 1 in its all-reduce)
    rank0 = newest_saved([e for e in evs if e.get("rank") == 0], attempt=0)
    assert rank0 in (complete[1], complete[1] + 1) and complete[0] == rank0
    expected = min(complete.values())
    assert _restored(evs, 1) == {(0, "ram", expected), (1, "ram", expected)}
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(str(durable))[-1] == STEPS


def test_node_killed_during_durable_upload(tmp_path, ref) -> None:
    """The node (agent and workers) is SIGKILLed while its drainer uploads step
    20: a thread freezes the agent (SIGSTOP) every few ms and looks, while it is
    stopped, whether step 20 has a data file but no manifest (the upload writes
    data files, then rank markers, then the manifest: tens of ms on local disk
    with fsync); then the SIGKILL lands in exactly that state. Its RAM goes
    with it (a fresh shm root for the rerun). The half-uploaded step stays
    invisible, step 10 intact, and the rerun restores step 10 from the durable
    tier and uploads 20 again over the debris."""
    durable = tmp_path / "durable"
    url = f"file://{durable}"
    step20 = durable / "step_0000000020"
    # Held at 10 (until its commit), then at 20: step 20 stays the newest snapshot while it uploads (the
    # drainer takes the newest, and 10 steps take less than its scan interval here).
    with shm_root() as shm, standalone(tmp_path, "first", shm=shm, durable=url, faults=[*hold(10), *hold(20)],
                                       launcher=PAUSE) as first:

        def uploading():
            try:
                names = os.listdir(step20)
            except FileNotFoundError:
                return None
            if any(n.endswith(".distcp") for n in names) and not (step20 / ".hpresil" / "manifest.json").exists():
                return sorted(names)
            return None

        _held_after_commit(first, str(durable), 10)
        killer = KillInWindow(frozen(first.proc.pid, uploading), timeout=60).start()
        first.release()
        try:
            killer.join(60)
        finally:
            killer.stop()
        assert killer.killed == first.proc.pid, "the node was not killed during the upload of step 20\n" + first.tail()
        first.kill_node()
    assert committed(str(durable)) == [10], "the half-uploaded step 20 is not committed"
    verify_durable(url, 10)
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=url) as agent:
        evs = agent.finish()
    assert _restored(evs, 0) == {(0, "durable", 10), (1, "durable", 10)}, killer.seen
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(str(durable))[-1] == STEPS
    for step in committed(str(durable)):
        verify_durable(url, step)


@pytest.mark.ci
def test_shared_memory_full_stages_on_disk(tmp_path, ref) -> None:
    """The shm root is a tmpfs with 256 KiB left (a ballast file fills the rest):
    the first RAM snapshot fails ``posix_fallocate`` with ENOSPC, the tier
    degrades (``tier_degraded``, tier ram, fallback durable) and the snapshots
    due for the durable tier are staged on disk and drained by the workers.
    Held at step 14 (sleeping) once step 10 is committed, rank 1 is SIGKILLed:
    the restart restores durable step 10."""
    durable = tmp_path / "durable"
    mount = f"/dev/shm/hpresil-chaos-full-{uuid.uuid4().hex[:8]}"
    try:
        with tmpfs(mount, "16m") as shm:
            fill(shm, leave=256 << 10)
            # A sleeping hold: the staged snapshots drain on threads of the workers.
            with standalone(tmp_path, "job", shm=shm, durable=f"file://{durable}", faults=hold(14, sleep=90),
                            launcher=PAUSE) as agent:
                wait_for(lambda: 10 in committed(str(durable)), 120, "durable step 10", [agent])
                agent.kill_rank(1)
                agent.release()
                evs = agent.finish()
    finally:
        shutil.rmtree(mount, ignore_errors=True)
    degraded = named(evs, "tier_degraded", tier="ram")
    assert {e["rank"] for e in degraded} >= {0, 1} and {e["fallback"] for e in degraded} == {"durable"}, degraded
    assert all("shared memory is full" in e["error"] for e in degraded), degraded
    assert _restored(evs, 1) == {(0, "durable", 10), (1, "durable", 10)}
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(str(durable))[-1] == STEPS
    verify_durable(f"file://{durable}", STEPS)


def test_durable_disk_full_then_freed(tmp_path, ref) -> None:
    """The durable directory is a 4 MiB tmpfs: step 10 (2.8 MB) commits (the
    job is held at step 10 until it has), step 20 fails with ENOSPC
    (``tier_degraded``, tier durable; the job is held at step 20 until then, or a
    lagging drain would skip to a newer step) and training goes on from RAM; rank 1 is
    SIGKILLed at step 23 and restores step 23 from RAM. Then space is freed
    (the tmpfs grows): a later drain commits the final step, and step 10, the
    last good checkpoint, was never touched."""
    mount = str(tmp_path / "durable")
    url = f"file://{mount}"
    with tmpfs(mount, "4m"), shm_root() as shm:
        with standalone(tmp_path, "job", shm=shm, durable=url, launcher=PAUSE,
                        faults=[*hold(10), *hold(20), Fault(rank=1, step=23, action="kill")]) as agent:
            _held_after_commit(agent, mount, 10)
            agent.release()
            full = wait_for(lambda: agent.held() and named(agent.events(), "tier_degraded", tier="durable"), 120,
                            "held at step 20, ENOSPC", [agent])
            agent.release()
            wait_for(lambda: restores(agent.events(), attempt=1), 60, "the restart's restore", [agent])
            assert committed(mount) == [10]
            verify_durable(url, 10)
            remount(mount, "64m")
            evs = agent.finish()
        final = committed(mount)
        for step in final:
            verify_durable(url, step)
    assert "No space left on device" in full[0]["error"] and full[0]["step"] == 20, full
    step = newest_saved(evs, attempt=0)  # 23, the step of the kill (22 if its save was skipped)
    assert _restored(evs, 1) == {(0, "ram", step), (1, "ram", step)} and step >= 22
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert final[0] == 10 and final[-1] == STEPS, final


def test_s3_server_stopped_then_restarted(tmp_path, ref, s3_server) -> None:
    """Durable tier on S3 (SeaweedFS), every 5 steps. Held at step 10 until it
    is committed, the server is SIGKILLed; the uploads of steps 15 and 20
    fail (``tier_degraded``, tier durable) while training goes on from RAM, and
    rank 1 is SIGKILLed at step 17, so the restart must restore from RAM with
    S3 down (the restarted workers cannot open the store: ``tier_degraded``,
    fallback ram). The server comes back (the job is held at step 25 until it
    has) and a later drain commits the final step; step 10 is intact throughout."""
    url = s3_server.url(f"chaos-{uuid.uuid4().hex[:8]}")
    faults = [*hold(10), Fault(rank=1, step=17, action="kill"), *hold(25, attempt=1)]
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=url, faults=faults, launcher=PAUSE,
                                       durable_every=5, env=s3_server.env) as agent:
        wait_for(lambda: agent.held() and named(agent.events(), "checkpoint_drained", step=10, committed=True),
                 120, "held, durable step 10 on S3", [agent])
        s3_server.stop()
        try:
            agent.release()
            wait_for(lambda: named(agent.events(), "tier_degraded", tier="durable"), 60, "the outage noticed", [agent])
            wait_for(lambda: restores(agent.events(), attempt=1), 90, "the restart's restore", [agent])
        finally:
            s3_server.start()
        # held again at step 25 until the server is back: the final drain must not outrun it
        wait_for(agent.held, 60, "held at step 25", [agent])
        agent.release()
        evs = agent.finish()
    # the restarted workers could not open the store: they said so and went on
    down = named(evs, "tier_degraded", tier="durable", attempt=1, fallback="ram")
    assert sorted(e["rank"] for e in down) == [0, 1], down
    step = newest_saved(evs, attempt=0)  # 17, the step of the kill (16 if its save was skipped)
    assert _restored(evs, 1) == {(0, "ram", step), (1, "ram", step)} and step >= 16
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert named(evs, "checkpoint_drained", committed=True)[-1]["step"] == STEPS
    for step in (10, STEPS):
        verify_durable(url, step, s3_server.storage_options)
