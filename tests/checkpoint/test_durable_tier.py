"""Durable tier: DCP-compatible layout, commit protocol, retention, integrity, drain, S3 faults."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hpresil.checkpoint.api import CommitRecord, Entry, Seal, slot_path
from hpresil.checkpoint.durable.drain import DrainConfig, Drainer
from hpresil.checkpoint.durable.source import DurableSource
from hpresil.checkpoint.durable.layout import assign_owners, data_file, step_dir, tensor_envelope
from hpresil.checkpoint.durable.stores import open_store, register_store
from hpresil.checkpoint.durable.stores.generic import FsspecStore
from hpresil.checkpoint.durable.stores.local import LocalStore
from hpresil.checkpoint.durable.writer import DurableWriter, mark_unhealthy
from hpresil.checkpoint.restore import choose
from hpresil.checkpoint.integrity import checksum
from hpresil.errors import ConfigError, IntegrityError, StorageError
from hpresil.testing import RecordingSink as Events


pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")





def write_snapshot(
    shm_dir: str,
    *,
    rank: int,
    step: int,
    world_size: int,
    tensors: dict[str, torch.Tensor],
    values: dict[str, Any] | None = None,
    durable_url: str | None,
    slot: int | None = None,
    keep: int = 3,
    shards: dict[str, tuple[list[int], list[int]]] | None = None,
    local: set[str] | None = None,
    run_id: str = "run",
    timeline: str = "",
    upload_timeout: float = 0.0,
) -> CommitRecord:
    """Writes a committed, sealed RAM snapshot in the format of ``hpresil.checkpoint.api``.

    ``shards`` maps a key to (global_shape, global_offset) of this rank's chunk;
    ``local`` keys are per-rank (not replicated) unsharded tensors.
    """
    shards, local, values = shards or {}, local or set(), values or {}
    slot = step % 3 if slot is None else slot
    entries, blobs, pos = [], [], 0
    for key, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        gshape, goff = shards.get(key, (list(t.shape), [0] * t.dim()))
        entries.append(
            Entry(
                key=key, kind="tensor", dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                global_shape=gshape, global_offset=goff, offset=pos, nbytes=raw.numel(),
                replicated=key not in shards and key not in local, path=key.split("/"),
            )
        )  # fmt: skip
        blobs.append((pos, raw))
        pos = (pos + raw.numel() + 63) // 64 * 64
    for key, v in values.items():
        entries.append(Entry(key=key, kind="json", value=v, replicated=key not in local))
    rdir = os.path.dirname(slot_path(shm_dir, rank, slot, "bin"))
    os.makedirs(rdir, exist_ok=True)
    with open(slot_path(shm_dir, rank, slot, "bin"), "wb") as f:
        f.truncate(max(pos, 1))
        for off, raw in blobs:
            f.seek(off)
            f.write(raw.numpy().tobytes())
    rec = CommitRecord(
        version=1, commit_id=uuid.uuid4().hex, run_id=run_id, step=step, rank=rank, world_size=world_size,
        slot=slot, nbytes=pos, durable=durable_url is not None, durable_url=durable_url, keep=keep,
        entries=entries, created=time.time(), timeline=timeline, upload_timeout=upload_timeout,
    )  # fmt: skip
    for suffix, text in (
        ("json", rec.to_json()),
        (
            "seal.json",
            Seal(
                version=1, commit_id=rec.commit_id, step=step, rank=rank, sealed=time.time(),
                checksums={e.key: checksum(t.contiguous()) for e, t in zip(entries, tensors.values())},
            ).to_json(),
        ),  # fmt: skip
    ):
        path = slot_path(shm_dir, rank, slot, suffix)  # type: ignore[arg-type]
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return rec


def model_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.w": torch.randn(16, 8, generator=g),
        "model.b": torch.randn(8, generator=g).to(torch.bfloat16),
        "model.scalar": torch.tensor(seed, dtype=torch.int64),
        "model.empty": torch.empty(0, 4),
    }


def read_back(src: DurableSource, step: int, rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for e in src.records(step)[rank].entries:
        if e.kind != "tensor":
            continue
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        src.read(step, rank, e, buf)
        dtype = getattr(torch, e.dtype)
        out[e.key] = buf.view(dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=dtype)
    return out


# ------------------------------------------------------------------ layout


def test_envelope_is_a_torch_save_file() -> None:
    import io

    for t in (torch.randn(3, 5), torch.arange(7, dtype=torch.int8), torch.tensor(2.5, dtype=torch.float64), torch.empty(0, 3)):
        prefix, suffix = tensor_envelope(t.dtype, tuple(t.shape))
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        back = torch.load(io.BytesIO(prefix + raw + suffix), weights_only=True)
        assert back.dtype == t.dtype and torch.equal(back, t)


def test_owner_assignment_balances_and_is_deterministic() -> None:
    entries = [Entry(key=f"k{i}", kind="tensor", nbytes=1000 * (i + 1)) for i in range(10)]
    a = assign_owners(entries, 4)
    assert a == assign_owners(list(reversed(entries)), 4)
    loads = [sum(e.nbytes for e in entries if a[e.key] == r) for r in range(4)]
    assert max(loads) - min(loads) <= 10000


# ------------------------------------------------------------------ file:// round trip + dcp.load


def drain_world(tmp_path: Any, url: str, states: list[dict[str, torch.Tensor]], step: int, **kw: Any) -> Events:
    ev = Events()
    for rank, state in enumerate(states):
        write_snapshot(str(tmp_path / "shm"), rank=rank, step=step, world_size=len(states), tensors=state,
                       durable_url=url, **kw)  # fmt: skip
    assert Drainer(shm_dir=str(tmp_path / "shm"), events=ev).drain_once()
    return ev


def test_file_roundtrip_and_plain_dcp_load(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    state = model_state(1)
    ev = drain_world(tmp_path, url, [state, state], step=7, values={"step": 7, "sched": {"lr": 0.1, "t": [1, 2]}})
    (drained,) = ev.named("checkpoint_drained")
    assert drained["step"] == 7 and drained["committed"] and drained["ranks"] == [0, 1] and drained["bytes"] > 0

    src = DurableSource(url)
    (ref,) = src.steps()
    assert (ref.step, ref.world_size, ref.ranks) == (7, 2, frozenset({0, 1}))
    for rank in (0, 1):
        back = read_back(src, 7, rank)
        assert all(torch.equal(back[k], state[k]) for k in state)
        assert {e.key: e.value for e in src.records(7)[rank].entries if e.kind == "json"} == {
            "step": 7, "sched": {"lr": 0.1, "t": [1, 2]}
        }
    # replicated entries are stored once, spread over the ranks
    owners: dict[str, list[int]] = {}
    for r in (0, 1):
        rec = json.loads((tmp_path / "ckpt" / step_dir(7) / ".hpresil" / f"rank{r}.json").read_text())
        for e in rec["entries"]:
            if "loc" in e:
                owners.setdefault(e["key"], []).append(r)
    assert all(len(v) == 1 for v in owners.values()) and len(owners) == 6
    assert {r for v in owners.values() for r in v} == {0, 1}

    # plain DCP, no hpresil code
    target = {"model": {k.split(".", 1)[1]: torch.zeros_like(v) for k, v in state.items()}, "step": 0, "sched": None}
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt" / step_dir(7)))
    for k, v in state.items():
        got = target["model"][k.split(".", 1)[1]]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert target["step"] == 7 and target["sched"] == {"lr": 0.1, "t": [1, 2]}


def test_sharded_checkpoint_loads_resharded_with_dcp(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    full = torch.randn(12, 5)
    moments = torch.randn(12, 5)
    shm = str(tmp_path / "shm")
    for rank in range(3):
        rows = slice(4 * rank, 4 * rank + 4)
        write_snapshot(
            shm, rank=rank, step=3, world_size=3, durable_url=url,
            tensors={"w": full[rows].clone(), "optim.m": moments[rows].clone(), "rng": torch.tensor([rank])},
            shards={"w": ([12, 5], [4 * rank, 0]), "optim.m": ([12, 5], [4 * rank, 0])}, local={"rng"},
        )  # fmt: skip
    assert Drainer(shm_dir=shm, events=Events()).drain_once()
    target = {"w": torch.zeros(12, 5), "optim": {"m": torch.zeros(12, 5)}, "rng": torch.tensor([-1])}
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt" / step_dir(3)))
    assert torch.equal(target["w"], full) and torch.equal(target["optim"]["m"], moments)
    assert target["rng"].item() == 0  # per-rank values: DCP sees the lowest rank's copy
    src = DurableSource(url)
    recs = src.records(3)
    assert [e.global_offset for e in recs[2].entries if e.key == "w"] == [[8, 0]]
    assert read_back(src, 3, 2)["rng"].item() == 2  # hpresil keeps every rank's own copy


def test_real_ram_tier_snapshot_drains_to_plain_dcp(tmp_path: Any) -> None:
    """RAM writer + sealer (the RAM engineer's code) -> drainer -> dcp.load and DurableSource."""
    from datetime import timedelta

    ram = pytest.importorskip("hpresil.checkpoint.ram.writer")
    sealer = pytest.importorskip("hpresil.checkpoint.ram.sealer")
    flatten = pytest.importorskip("hpresil.checkpoint.flatten")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    shm, url = str(tmp_path / "shm"), f"file://{tmp_path}/ckpt"
    writer = ram.RamWriter(shm, 0, slots=3, run_id="real")
    try:
        writer.save(5, flatten.flatten({"model": model, "optim": opt, "extra": {"epoch": 2}}).leaves,
                    world_size=1, durable=True, durable_url=url, keep=2)  # fmt: skip
        writer.wait()
        assert sealer.Sealer(shm_dir=shm, events=Events()).flush(timedelta(seconds=10))
        assert Drainer(shm_dir=shm, events=Events()).drain_once()
    finally:
        writer.close()
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    target = {"model": fresh.state_dict(), "extra": {"epoch": 0}}
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt" / step_dir(5)))
    assert all(torch.equal(target["model"][k], v) for k, v in model.state_dict().items())
    assert target["extra"]["epoch"] == 2
    src = DurableSource(url)
    back = read_back(src, 5, 0)
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(back["optim.state.0.exp_avg"], exp_avg)


# ------------------------------------------------------------------ commit protocol, retention


def test_incomplete_step_is_invisible_until_last_rank(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    shm = str(tmp_path / "shm")
    state = model_state(2)
    write_snapshot(shm, rank=0, step=5, world_size=2, tensors=state, durable_url=url)
    ev = Events()
    drainer = Drainer(shm_dir=shm, events=ev)
    assert drainer.drain_once()  # uploads rank 0 only: rank 1 lives on "another node"
    assert not ev.named("checkpoint_drained")[0]["committed"]
    assert DurableSource(url).steps() == []
    assert not drainer.drain_once()  # nothing new
    # the other node's drainer: only rank 1 in its shm
    shm2 = str(tmp_path / "shm2")
    write_snapshot(shm2, rank=1, step=5, world_size=2, tensors=state, durable_url=url)
    ev2 = Events()
    assert Drainer(shm_dir=shm2, events=ev2).drain_once()
    assert ev2.named("checkpoint_drained")[0]["committed"]
    assert [r.step for r in DurableSource(url).steps()] == [5]


def test_markers_of_a_crashed_attempt_never_mix_with_a_new_timeline(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    old, new = model_state(1), model_state(2)
    # attempt A drained rank 1's step 5, then crashed; attempt B (restored earlier) reaches step 5 again
    write_snapshot(str(tmp_path / "a1"), rank=1, step=5, world_size=2, tensors=old, durable_url=url, timeline="A")
    assert Drainer(shm_dir=str(tmp_path / "a1"), events=Events()).drain_once()
    write_snapshot(str(tmp_path / "b0"), rank=0, step=5, world_size=2, tensors=new, durable_url=url, timeline="B")
    assert Drainer(shm_dir=str(tmp_path / "b0"), events=Events()).drain_once()
    assert DurableSource(url).steps() == [], "rank 1's marker is from the abandoned timeline"
    write_snapshot(str(tmp_path / "b1"), rank=1, step=5, world_size=2, tensors=new, durable_url=url, timeline="B")
    assert Drainer(shm_dir=str(tmp_path / "b1"), events=Events()).drain_once()
    src = DurableSource(url)
    assert [r.step for r in src.steps()] == [5]
    got = read_back(src, 5, 1)
    assert torch.equal(got["model.w"], new["model.w"])


def test_a_step_committed_by_an_abandoned_timeline_is_replaced(tmp_path: Any) -> None:
    """Timeline A committed steps 10 and 20; the job restored step 10 (20 failed
    verification, say) as timeline B. B's step 20 replaces A's, drained by the
    same node service that drained A's; B's own commits are never replaced."""
    url, shm = f"file://{tmp_path}/ckpt", str(tmp_path / "shm")
    drainer = Drainer(shm_dir=shm, events=Events())
    write_snapshot(shm, rank=0, step=10, world_size=1, tensors=model_state(10), durable_url=url, timeline="A", slot=0)
    assert drainer.drain_once()
    write_snapshot(shm, rank=0, step=20, world_size=1, tensors=model_state(1), durable_url=url, timeline="A", slot=1)
    assert drainer.drain_once()
    manifest = tmp_path / "ckpt" / step_dir(20) / ".hpresil" / "manifest.json"
    committed_a = manifest.read_text()
    # the restore of step 10 dropped A's step 20 from RAM; B saves step 20 again
    for suffix in ("json", "seal.json"):
        os.unlink(slot_path(shm, 0, 1, suffix))  # type: ignore[arg-type]
    write_snapshot(shm, rank=0, step=20, world_size=1, tensors=model_state(2), durable_url=url, timeline="B", slot=2)
    assert drainer.drain_once()
    assert manifest.read_text() != committed_a
    src = DurableSource(url)
    assert [r.step for r in src.steps()] == [20, 10]
    assert torch.equal(read_back(src, 20, 0)["model.w"], model_state(2)["model.w"])
    # a second commit of step 20 in timeline B (same timeline) leaves B's commit alone
    committed_b = manifest.read_text()
    write_snapshot(shm, rank=0, step=20, world_size=1, tensors=model_state(3), durable_url=url, timeline="B", slot=1)
    drainer.drain_once()
    assert manifest.read_text() == committed_b
    assert torch.equal(read_back(DurableSource(url), 20, 0)["model.w"], model_state(2)["model.w"])


def test_checkpointer_replaces_a_corrupted_durable_step_when_it_reaches_it_again(tmp_path: Any) -> None:
    """A flipped byte in the newest durable step: a fresh node (no RAM) restores the
    step before it, trains on, and its drain replaces the corrupted step."""
    from hpresil.checkpoint import Checkpointer

    url = f"file://{tmp_path}/ckpt"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)

    def run(shm: str, upto: int) -> tuple[int, Events]:
        ev = Events()
        ckpt = Checkpointer({"model": model}, durable=url, durable_every=10, every=10, shm_dir=shm, events=ev,
                            run_services=True)
        start = ckpt.restore()
        for step in range(start + 1, upto + 1):
            with torch.no_grad():
                model.weight.add_(0.5 ** (step % 7))
            ckpt.save(step)
            ckpt.wait()  # each durable step drained (a lagging drain skips to the newest)
        ckpt.close(keep_ram=False)
        return start, ev

    run(str(tmp_path / "shm1"), 20)
    trained = model.weight.detach().clone()
    rec = json.loads((tmp_path / "ckpt" / step_dir(20) / ".hpresil" / "rank0.json").read_text())
    w = next(e for e in rec["entries"] if e["key"] == "model.weight")
    with open(tmp_path / "ckpt" / step_dir(20) / data_file(0), "r+b") as f:
        f.seek(w["loc"]["data_offset"] + 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    start, ev = run(str(tmp_path / "shm2"), 20)
    assert start == 10 and ev.named("integrity_failed")
    assert torch.equal(model.weight, trained), "the rerun is bitwise the same"
    start, ev = run(str(tmp_path / "shm3"), 20)
    assert start == 20 and not ev.named("integrity_failed"), "step 20 was replaced by a sound copy"
    assert torch.equal(model.weight, trained)


def test_a_deleted_data_file_of_the_newest_step_is_reported_and_the_step_before_restored(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A committed step whose ``.distcp`` file is gone: restore falls back to the step
    before, emits ``integrity_failed`` naming the tier, step and file, and says so in
    its log line."""
    from hpresil.checkpoint import Checkpointer

    url = f"file://{tmp_path}/ckpt"
    model = torch.nn.Linear(4, 4)
    ckpt = Checkpointer({"model": model}, durable=url, durable_every=10, every=10, shm_dir=str(tmp_path / "shm1"),
                        events=Events(), run_services=True)
    ckpt.restore()
    for step in (10, 20):
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(step)
        ckpt.wait()
        if step == 10:
            at_10 = model.weight.detach().clone()
    ckpt.close(keep_ram=False)
    os.unlink(tmp_path / "ckpt" / step_dir(20) / data_file(0))
    ev = Events()
    fresh = Checkpointer({"model": model}, durable=url, durable_every=10, every=10, shm_dir=str(tmp_path / "shm2"),
                         events=ev, run_services=True)
    with caplog.at_level("INFO", logger="hpresil.checkpoint.restore"):
        assert fresh.restore() == 10
    fresh.close(keep_ram=False)
    assert torch.equal(model.weight, at_10)
    (bad,) = ev.named("integrity_failed")
    assert bad["tier"] == "durable" and bad["step"] == 20 and bad["file"] == f"{step_dir(20)}/{data_file(0)}"
    (restored,) = ev.named("checkpoint_restored")
    assert restored["step"] == 10 and "missing" in restored["skipped"][0]
    line = next(r.getMessage() for r in caplog.records if "restored step 10" in r.getMessage())
    assert "skipped newer step 20" in line and data_file(0) in line


def test_retention_keeps_newest_and_gcs_incomplete(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    shm = str(tmp_path / "shm")
    store = open_store(url)
    # an abandoned, uncommitted step from a crashed run
    store.write_bytes(f"{step_dir(1)}/{data_file(0)}", b"junk")
    drainer = Drainer(shm_dir=shm, events=Events())
    for step in (10, 20, 30, 40):
        write_snapshot(shm, rank=0, step=step, world_size=1, tensors=model_state(step), durable_url=url, keep=2)
        assert drainer.drain_once()
    assert [r.step for r in DurableSource(url).steps()] == [40, 30]
    assert sorted(os.listdir(tmp_path / "ckpt")) == [step_dir(30), step_dir(40)]


def test_newest_pending_step_wins(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    shm = str(tmp_path / "shm")
    for step in (1, 2, 3):
        write_snapshot(shm, rank=0, step=step, world_size=1, tensors=model_state(step), durable_url=url, slot=step - 1)
    write_snapshot(shm, rank=1, step=4, world_size=2, tensors=model_state(4), durable_url=None, slot=0)  # not durable
    assert Drainer(shm_dir=shm, events=Events()).drain_once()
    assert [r.step for r in DurableSource(url).steps()] == [3]


def test_malformed_manifest_is_skipped(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    drain_world(tmp_path, url, [model_state(1)], step=1)
    drain_world(tmp_path, url, [model_state(2)], step=2)
    with open(tmp_path / "ckpt" / step_dir(2) / ".hpresil" / "manifest.json", "w") as f:
        f.write("{not json")
    assert [r.step for r in DurableSource(url).steps()] == [1]


def test_flipped_byte_raises_integrity_error(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    state = model_state(3)
    drain_world(tmp_path, url, [state], step=9)
    src_events = Events()
    src = DurableSource(url, events=src_events)
    rec = json.loads((tmp_path / "ckpt" / step_dir(9) / ".hpresil" / "rank0.json").read_text())
    w = next(e for e in rec["entries"] if e["key"] == "model.w")
    path = tmp_path / "ckpt" / step_dir(9) / data_file(0)
    with open(path, "r+b") as f:
        f.seek(w["loc"]["data_offset"] + 17)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    entry = next(e for e in src.records(9)[0].entries if e.key == "model.w")
    with pytest.raises(IntegrityError, match="checksum"):
        src.read(9, 0, entry, torch.empty(entry.nbytes, dtype=torch.uint8))
    assert src_events.named("integrity_failed")[0]["key"] == "model.w"
    # other entries of the step are still readable
    b_entry = next(e for e in src.records(9)[0].entries if e.key == "model.b")
    buf = torch.empty(b_entry.nbytes, dtype=torch.uint8)
    src.read(9, 0, b_entry, buf)
    assert torch.equal(buf.view(torch.bfloat16), state["model.b"])


def test_drainer_waits_for_writer_lock_and_skips_replaced_slot(tmp_path: Any) -> None:
    url = f"file://{tmp_path}/ckpt"
    shm = str(tmp_path / "shm")
    write_snapshot(shm, rank=0, step=1, world_size=1, tensors=model_state(1), durable_url=url, slot=0)
    with open(slot_path(shm, 0, 0, "bin"), "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a writer owns the slot
        assert not Drainer(shm_dir=shm, events=Events()).drain_once()
    assert Drainer(shm_dir=shm, events=Events()).drain_once()


def test_node_service_drains_off_the_tick_and_on_stop(tmp_path: Any) -> None:
    from datetime import timedelta

    from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo

    url = f"file://{tmp_path}/ckpt"
    shm = str(tmp_path / "shm")
    ev = Events()
    drainer = Drainer(DrainConfig(scan_interval=timedelta(milliseconds=10)))  # the runtime's cls(config)
    drainer.start(RuntimeContext(run_id="r", node_id="n", shm_dir=shm, log_dir=str(tmp_path), events=ev))
    drainer.on_workers_started(
        WorkerGroupInfo(attempt=0, group_rank=0, group_world_size=1, world_size=2, global_ranks=(0, 1), pids=(1, 2))
    )
    try:
        for rank in (0, 1):
            write_snapshot(shm, rank=rank, step=4, world_size=2, tensors=model_state(rank), durable_url=url)
        deadline = time.monotonic() + 10
        while not ev.named("checkpoint_drained") and time.monotonic() < deadline:
            t0 = time.monotonic()
            drainer.tick()
            assert time.monotonic() - t0 < 0.05  # never blocks the runtime's service thread
            time.sleep(0.01)
        assert ev.named("checkpoint_drained")[0]["step"] == 4
        for rank in (0, 1):
            write_snapshot(shm, rank=rank, step=8, world_size=2, tensors=model_state(rank), durable_url=url)
    finally:
        drainer.stop(timedelta(seconds=10))  # drains what is pending
    assert [r.step for r in DurableSource(url).steps()] == [8, 4]


def test_runtime_keeps_shared_memory_when_the_final_snapshot_could_not_be_drained(tmp_path: Any) -> None:
    """The durable tier is unwritable when the job ends (its directory is under a
    regular file): the node runtime must not delete the RAM tier, the only copy;
    once a drain succeeded, the same end removes it."""
    from datetime import timedelta

    from hpresil.runtime.api import RuntimeConfig, WorkerGroupInfo
    from hpresil.runtime.node import NodeRuntime

    (tmp_path / "not-a-dir").write_text("a file where the durable tier's directory should be")
    results = {}
    for name, url in (("down", f"file://{tmp_path}/not-a-dir/ckpt"), ("up", f"file://{tmp_path}/ckpt")):
        rt = NodeRuntime(RuntimeConfig(shm_root=str(tmp_path / f"shm-{name}"), node_id="n0"), run_id="job",
                         log_dir=str(tmp_path / f"logs-{name}"),
                         services=[Drainer(DrainConfig(scan_interval=timedelta(milliseconds=10)))])
        rt.start()
        rt.on_workers_started(WorkerGroupInfo(attempt=0, group_rank=0, group_world_size=1, world_size=1,
                                              global_ranks=(0,), pids=(os.getpid(),)))
        write_snapshot(rt.shm.path, rank=0, step=6, world_size=1, tensors=model_state(0), durable_url=url)
        rt.stop(succeeded=True, timeout=timedelta(seconds=10))
        events = [json.loads(line) for line in open(tmp_path / f"logs-{name}" / "events.jsonl")]
        results[name] = (os.path.isdir(rt.shm.path), events[-1])
    kept, stop = results["down"]
    assert kept and stop["event"] == "runtime_stop" and stop["shm_kept"], stop
    assert "[6]" in stop["unsaved"][0], stop
    kept, stop = results["up"]
    assert not kept and not stop["shm_kept"] and "unsaved" not in stop, stop
    assert [r.step for r in DurableSource(f"file://{tmp_path}/ckpt").steps()] == [6]


# ------------------------------------------------------------------ open_store errors


@pytest.mark.parametrize(
    "url, err, hint",
    [
        ("", ConfigError, "file:///"),
        ("file://relative/path", ConfigError, "three slashes"),
        ("nosuchscheme://x/y", ConfigError, "unknown scheme"),
        ("s3://", ConfigError, "s3://BUCKET"),
    ],
)
def test_bad_urls_fail_fast(url: str, err: type, hint: str) -> None:
    with pytest.raises(err, match=hint):
        open_store(url)


def test_missing_s3fs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def fake(name: str, *a: Any, **k: Any) -> Any:
        if name == "s3fs":
            raise ImportError("No module named 's3fs'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ConfigError, match=r"pip install 'hpresil\[s3\]'"):
        open_store("s3://bucket/prefix")


# ------------------------------------------------------------------ S3 (SeaweedFS)


@pytest.fixture()
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    s3_server.start()  # no-op unless a previous test left it down
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_s3_roundtrip_and_dcp_load(s3_env: Any, tmp_path: Any) -> None:
    url = s3_env.url(f"rt-{uuid.uuid4().hex[:6]}")
    big = torch.randn(3 << 20)  # 12 MiB: a multipart upload
    state = {**model_state(5), "model.big": big}
    ev = drain_world(tmp_path, url, [state, state], step=11, values={"step": 11})
    assert ev.named("checkpoint_drained")[0]["committed"]
    src = DurableSource(url)
    assert [r.step for r in src.steps()] == [11]
    back = read_back(src, 11, 1)
    assert all(torch.equal(back[k], state[k]) for k in state)

    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    target = {"model": {k.split(".", 1)[1]: torch.zeros_like(v) for k, v in state.items()}, "step": 0}
    dcp.load(target, storage_reader=FsspecReader(f"{url}/{step_dir(11)}"))
    assert all(torch.equal(target["model"][k.split(".", 1)[1]], v) for k, v in state.items())
    assert target["step"] == 11


def test_s3_errors_fail_fast_with_fix(s3_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="does not exist.*aws s3 mb"):
        open_store("s3://no-such-bucket-hpresil/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID"):
        open_store(s3_env.url("x"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on discard
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL"):
        open_store(s3_env.url("x"))
    assert time.monotonic() - t0 < 15


def test_s3_server_killed_mid_upload_degrades_then_recovers(
    s3_env: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = s3_env.url(f"kill-{uuid.uuid4().hex[:6]}")
    shm = str(tmp_path / "shm")
    first = model_state(1)
    write_snapshot(shm, rank=0, step=1, world_size=1, tensors=first, durable_url=url, slot=0)
    ev = Events()
    cfg = DrainConfig(backoff_initial=__import__("datetime").timedelta(milliseconds=50))
    drainer = Drainer(cfg, shm_dir=shm, events=ev)
    assert drainer.drain_once()

    big = {"model.w": torch.randn(48 << 20 >> 2)}  # 48 MiB: takes a while on this server
    write_snapshot(shm, rank=0, step=2, world_size=1, tensors=big, durable_url=url, slot=1)
    from hpresil.checkpoint.durable.stores import s3 as durable_s3

    uploading = threading.Event()
    real_parts = durable_s3.S3Store._upload_parts

    async def parts(self: Any, *a: Any, **k: Any) -> Any:
        uploading.set()
        return await real_parts(self, *a, **k)

    monkeypatch.setattr(durable_s3.S3Store, "_upload_parts", parts)
    result: list[bool] = []
    th = threading.Thread(target=lambda: result.append(drainer.drain_once()))
    th.start()
    try:
        assert uploading.wait(30)
        time.sleep(0.05)
        s3_env.stop()  # SIGKILL while the parts are in flight
        th.join(60)
        assert result == [False]
        (deg,) = ev.named("tier_degraded")
        assert deg["tier"] == "durable" and deg["step"] == 2 and "upload" in deg["error"]
        # training side unaffected: the slot is unlocked and the snapshot intact
        with open(slot_path(shm, 0, 1, "bin"), "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert drainer.drain_once() is False  # still down: degrade again, no exception
    finally:
        s3_env.start()
    assert drainer.drain_once()
    src = DurableSource(url)
    assert [r.step for r in src.steps()] == [2, 1]
    assert torch.equal(read_back(src, 2, 0)["model.w"], big["model.w"])
    assert torch.equal(read_back(src, 1, 0)["model.w"], first["model.w"])


def test_store_registry_opens_by_scheme_and_takes_new_backends(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpresil.checkpoint.durable import stores

    assert isinstance(open_store(f"file://{tmp_path}/a"), LocalStore)
    assert isinstance(open_store("memory://hpresil-registry-test"), FsspecStore)  # any fsspec scheme: the fallback
    seen: list[tuple[str, str, dict[str, Any], float]] = []

    def opener(url: str, rest: str, options: dict[str, Any], probe_timeout: float) -> Any:
        seen.append((url, rest, options, probe_timeout))
        return LocalStore(str(tmp_path / "tuned"))

    monkeypatch.setattr(stores, "_OPENERS", dict(stores._OPENERS))  # registrations stay in this test
    register_store("tuned", opener)
    store = open_store("TUNED://bucket/run", probe_timeout=3.0, part_size=1)
    assert isinstance(store, LocalStore) and seen == [("TUNED://bucket/run", "bucket/run", {"part_size": 1}, 3.0)]
    with pytest.raises(ConfigError, match="not a URL scheme"):
        register_store("no/slash", opener)


def test_local_store_stops_writing_past_the_upload_bound(tmp_path: Any) -> None:
    store = open_store(f"file://{tmp_path}/d")
    with pytest.raises(StorageError, match="upload_timeout"):
        store.write_files([("f", [b"x" * 8, b"y" * 8])], timeout=-1.0)
    assert store.write_files([("f", [b"x" * 8])], timeout=60.0) == 8


@pytest.mark.slow
def test_record_upload_timeout_bounds_an_upload_to_a_frozen_s3(s3_env: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``CheckpointConfig.upload_timeout`` travels in the commit record, so a drainer
    built with its own 10-minute default abandons an upload to a SIGSTOPped S3
    server after the record's 1 s instead (and retries later)."""
    from hpresil.checkpoint.durable.stores import s3 as durable_s3

    url = s3_env.url(f"frozen-{uuid.uuid4().hex[:6]}")
    shm = str(tmp_path / "shm")
    state = {"model.w": torch.randn(16 << 20 >> 2)}
    write_snapshot(shm, rank=0, step=1, world_size=1, tensors=state, durable_url=url, slot=0, upload_timeout=1.0)
    real_parts = durable_s3.S3Store._upload_parts
    frozen: list[int] = []

    async def parts(self: Any, *a: Any, **k: Any) -> Any:
        if not frozen:  # freeze the server as the first part goes out
            os.kill(s3_env.proc.pid, signal.SIGSTOP)
            frozen.append(s3_env.proc.pid)
        return await real_parts(self, *a, **k)

    monkeypatch.setattr(durable_s3.S3Store, "_upload_parts", parts)
    ev = Events()
    drainer = Drainer(shm_dir=shm, events=ev)
    assert drainer.config.upload_timeout.total_seconds() == 600
    result: list[bool] = []
    th = threading.Thread(target=lambda: result.append(drainer.drain_once()), daemon=True)
    th.start()
    try:
        th.join(45)  # far below the drainer's own bound and botocore's 60 s read timeout
        assert not th.is_alive(), "the upload to the frozen server was not abandoned"
        assert result == [False] and frozen
        (deg,) = ev.named("tier_degraded")
        assert deg["tier"] == "durable" and deg["step"] == 1 and "Timeout" in deg["error"]
    finally:
        if frozen:
            os.kill(frozen[0], signal.SIGCONT)
    drainer._retry_at = 0.0
    assert drainer.drain_once()  # the server is back: the snapshot is still there to upload
    assert torch.equal(read_back(DurableSource(url), 1, 0)["model.w"], state["model.w"])


def test_s3_retention_deletes_each_old_step_once(s3_env: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """On a real S3 server, retention lists what is really there: a deleted step is
    not deleted (nor reported) again at the next commit, and the bucket ends with the
    kept steps only."""
    url = s3_env.url(f"keep-{uuid.uuid4().hex[:6]}")
    shm = str(tmp_path / "shm")
    drainer = Drainer(shm_dir=shm, events=Events())
    with caplog.at_level("INFO", logger="hpresil.checkpoint.durable.writer"):
        for step in range(10, 90, 10):
            write_snapshot(shm, rank=0, step=step, world_size=1, tensors=model_state(step), durable_url=url, keep=2)
            assert drainer.drain_once()
    gone: list[int] = []
    for r in caplog.records:
        if r.getMessage().startswith("durable retention"):
            doomed, stale = r.args[1], r.args[2]  # type: ignore[index]
            gone += [*doomed, *stale]
    assert sorted(gone) == list(range(10, 70, 10)), gone  # each old step deleted once
    store = open_store(url)
    assert sorted(n for n in store.list_dir("") if n.startswith("step")) == [step_dir(70), step_dir(80)]
    assert [r.step for r in DurableSource(url).steps()] == [80, 70]


@pytest.mark.slow
def test_a_frozen_s3_server_is_reported_stalled_and_restored_when_it_thaws(
        s3_env: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP of the S3 server mid-upload: ``tier_degraded`` (durable, stalled) once
    no part has gone through for ``stall_after``, ``tier_restored`` when SIGCONT lets
    the parts through, and the step commits."""
    from datetime import timedelta

    from hpresil.checkpoint.durable.stores import s3 as durable_s3

    url = s3_env.url(f"stall-{uuid.uuid4().hex[:6]}")
    shm = str(tmp_path / "shm")
    state = {"model.w": torch.randn(24 << 20 >> 2)}  # 3 parts of 8 MiB
    write_snapshot(shm, rank=0, step=1, world_size=1, tensors=state, durable_url=url, slot=0)
    real_parts = durable_s3.S3Store._upload_parts
    frozen: list[int] = []

    async def parts(self: Any, *a: Any, **k: Any) -> Any:
        if not frozen:
            os.kill(s3_env.proc.pid, signal.SIGSTOP)
            frozen.append(s3_env.proc.pid)
        return await real_parts(self, *a, **k)

    monkeypatch.setattr(durable_s3.S3Store, "_upload_parts", parts)
    ev = Events()
    drainer = Drainer(DrainConfig(stall_after=timedelta(seconds=1)), shm_dir=shm, events=ev)
    result: list[bool] = []
    th = threading.Thread(target=lambda: result.append(drainer.drain_once()), daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 30
        while not ev.named("tier_degraded") and time.monotonic() < deadline:
            drainer.tick()  # the node runtime ticks services every 50 ms
            time.sleep(0.05)
        (deg,) = ev.named("tier_degraded")
        assert deg["tier"] == "durable" and deg["reason"] == "stalled" and deg["step"] == 1 and th.is_alive()
    finally:
        if frozen:
            os.kill(frozen[0], signal.SIGCONT)
    th.join(60)
    assert result == [True]
    (restored,) = ev.named("tier_restored")
    assert restored["tier"] == "durable" and restored["step"] == 1 and restored["stalled_s"] >= 1
    assert ev.named("checkpoint_drained")[0]["committed"]
    assert torch.equal(read_back(DurableSource(url), 1, 0)["model.w"], state["model.w"])


@pytest.fixture()
def ftp_url(tmp_path: Any) -> Iterator[str]:
    """A real FTP server (pyftpdlib) on 127.0.0.1 with a writable user; yields its URL."""
    import subprocess
    import sys

    from _launch import free_port

    pytest.importorskip("pyftpdlib", reason="pip install pyftpdlib (a dev extra)")
    root = tmp_path / "ftp"
    root.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-w",
                             "-d", str(root), "-u", "hp", "-P", "secret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the FTP server did not start"
                time.sleep(0.05)
        yield f"ftp://hp:secret@127.0.0.1:{port}/ckpt"
    finally:
        proc.kill()
        proc.wait(10)


def test_any_fsspec_url_that_carries_its_host_works_end_to_end(ftp_url: str, tmp_path: Any) -> None:
    """``ftp://user:pass@host:port/path`` (host and credentials from the URL, as for
    sftp, hdfs, webhdfs): opened, drained, committed and read back."""
    store = open_store(ftp_url)
    assert isinstance(store, FsspecStore) and store.fs.host == "127.0.0.1"
    ev = drain_world(tmp_path, ftp_url, [model_state(3)], step=5, values={"step": 5})
    assert ev.named("checkpoint_drained")[0]["committed"]
    src = DurableSource(ftp_url)
    assert [r.step for r in src.steps()] == [5]
    assert torch.equal(read_back(src, 5, 0)["model.w"], model_state(3)["model.w"])


def test_rollback_marks_newer_durable_steps_and_retention_keeps_healthy_ones(tmp_path: Any) -> None:
    """Timeline A committed 10, 20, 30; a rollback to 10 marks 20 and 30. A
    restore then prefers 10, retention with keep=1 keeps 10 (the newest healthy
    step) and the newer marked ones, and B's commit of 20 clears its mark."""
    url, shm = f"file://{tmp_path}/ckpt", str(tmp_path / "shm")
    drainer = Drainer(shm_dir=shm, events=Events())
    for k, step in enumerate((10, 20, 30)):
        write_snapshot(shm, rank=0, step=step, world_size=1, tensors=model_state(step), durable_url=url,
                       timeline="A", slot=k, keep=1 if step == 10 else 3)
        assert drainer.drain_once()
    store = open_store(url)
    assert mark_unhealthy(store, 10, "divergence", "B") == [30, 20]
    src = DurableSource(url)
    assert [(r.step, r.health) for r in src.steps()] == [(30, "suspect"), (20, "suspect"), (10, "ok")]
    assert choose([{0: {(r.step, 1): [0] for r in src.steps()}}], 1,
                  {r.step: r.health for r in src.steps() if r.health != "ok"})[0] == 10
    assert DurableWriter(store).retain(1) == []  # 10 is the newest healthy step: nothing older to delete
    for slot in (1, 2):  # the rollback dropped A's newer snapshots from RAM
        for suffix in ("json", "seal.json"):
            os.unlink(slot_path(shm, 0, slot, suffix))  # type: ignore[arg-type]
    write_snapshot(shm, rank=0, step=20, world_size=1, tensors=model_state(2), durable_url=url, timeline="B", slot=1,
                   keep=1)
    assert drainer.drain_once()
    assert [(r.step, r.health) for r in DurableSource(url).steps()] == [(30, "suspect"), (20, "ok")]  # 10 retired
