"""Resharding on restore: box intersection, tier choice, and FSDP2 2→1→2 ranks."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
import torch._dynamo  # noqa: F401  (fully_shard imports it lazily; import once before forking)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hpresil.checkpoint.api import CommitRecord, Entry, SnapshotRef, SnapshotSource
from hpresil.checkpoint.flatten import dtype_name
from hpresil.checkpoint.restore import _Reader, choose
from hpresil.errors import StorageError

import _procs  # noqa: F401  (its fork server preloads torch for the FSDP2 workers)


class DictSource(SnapshotSource):
    """An in-memory SnapshotSource: ``chunks[rank][key] = (tensor, global_offset, global_shape)``."""

    tier = "durable"

    def __init__(self, step: int, world: int, chunks: dict[int, dict[str, tuple[torch.Tensor, list[int], list[int]]]]) -> None:
        self.step, self.world, self.chunks = step, world, chunks
        self.reads: list[tuple[int, str]] = []

    def steps(self) -> list[SnapshotRef]:
        return [SnapshotRef(tier="durable", step=self.step, world_size=self.world, ranks=frozenset(self.chunks))]

    def records(self, step: int) -> dict[int, CommitRecord]:
        out = {}
        for rank, entries in self.chunks.items():
            es = [
                Entry(key=k, kind="tensor", dtype=dtype_name(t.dtype), shape=list(t.shape), global_shape=gs,
                      global_offset=off, nbytes=t.numel() * t.element_size(), replicated=list(t.shape) == gs)
                for k, (t, off, gs) in entries.items()
            ]
            out[rank] = CommitRecord(version=1, commit_id=f"c{rank}", run_id="r", step=step, rank=rank, world_size=self.world,
                                     slot=0, nbytes=0, durable=False, durable_url=None, keep=1, entries=es, created=0.0)
        return out

    def read(self, step: int, rank: int, entry: Entry, out: torch.Tensor) -> None:
        self.reads.append((rank, entry.key))
        out.copy_(self.chunks[rank][entry.key][0].contiguous().view(-1).view(torch.uint8))


def _split(full: torch.Tensor, dim: int, parts: int) -> list[tuple[torch.Tensor, list[int]]]:
    out, start = [], 0
    for piece in torch.tensor_split(full, parts, dim=dim):
        off = [0] * full.dim()
        off[dim] = start
        out.append((piece.clone(), off))
        start += piece.shape[dim]
    return out


@pytest.mark.parametrize(("save_dim", "save_parts", "load_dim", "load_parts"), [(0, 3, 1, 2), (1, 2, 0, 4), (0, 2, 0, 1), (0, 1, 0, 3)])
def test_box_intersection_reshards_any_split(save_dim: int, save_parts: int, load_dim: int, load_parts: int) -> None:
    full = torch.arange(7 * 5, dtype=torch.float64).reshape(7, 5)
    chunks = {r: {"w": (t, off, [7, 5])} for r, (t, off) in enumerate(_split(full, save_dim, save_parts))}
    source = DictSource(3, save_parts, chunks)
    reader = _Reader(source, 3, source.records(3), rank=0, same_world=False)
    for target_view, off in _split(full, load_dim, load_parts):
        target = torch.full_like(target_view, -1.0)
        reader.fill("w", target, off)
        assert torch.equal(target, target_view)


def test_replicated_entry_reads_one_copy_and_incomplete_coverage_fails() -> None:
    full = torch.randn(4, 3)
    source = DictSource(1, 2, {0: {"b": (full, [0, 0], [4, 3])}, 1: {"b": (full.clone(), [0, 0], [4, 3])}})
    reader = _Reader(source, 1, source.records(1), rank=1, same_world=True)
    target = torch.zeros(2, 3)
    reader.fill("b", target, [2, 0])
    assert torch.equal(target, full[2:]) and source.reads == [(1, "b")]  # own rank's copy, once

    half = DictSource(1, 2, {0: {"w": (full[:2].clone(), [0, 0], [4, 3])}})
    with pytest.raises(StorageError, match="covers 3 of 6"):
        _Reader(half, 1, half.records(1), rank=0, same_world=False).fill("w", torch.zeros(2, 3), [1, 0])


def test_choose_newest_step_every_rank_can_load_from_some_tier() -> None:
    # Rank 1's node was replaced: its RAM is empty, durable has steps 10 and 20 (all ranks).
    ram0 = {(30, 2): [0], (20, 2): [0]}
    durable = {(20, 2): [0, 1], (10, 2): [0, 1]}
    step, ws, plan = choose([{0: ram0, 1: durable}, {0: {}, 1: durable}], world=2)
    assert (step, ws) == (20, 2) and plan == {0: [0, 1], 1: [1]}
    # At another world size a tier must hold every saved rank.
    assert choose([{0: {(5, 2): [0]}}], world=1) is None
    assert choose([{0: {(5, 2): [0, 1]}}], world=1)[:2] == (5, 2)
    assert choose([{0: {}}, {0: {}}], world=2) is None


# -- FSDP2 over gloo: save on 2 ranks, restore on 1, save, restore on 2 ------------------------


def _fsdp_state(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))  # 7 rows: uneven shards
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4, 5, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _full(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    from hpresil.checkpoint.flatten import flatten

    out = {}
    for leaf in flatten(state).leaves:
        if leaf.is_tensor:
            out[leaf.key] = leaf.dtensor.full_tensor() if leaf.dtensor is not None else leaf.value.clone()
    return out


def _fsdp_worker(rank: int, world: int, workdir: str, phase: str) -> None:
    import torch.distributed as dist

    from hpresil.checkpoint import Checkpointer

    torch.set_num_threads(1)  # forked from a process whose thread pool is gone
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rdzv-{phase}", rank=rank, world_size=world)
    try:
        model, opt = _fsdp_state(world)
        state = {"model": model, "optim": opt}
        ckpt = Checkpointer(state=state, shm_dir=f"{workdir}/shm", durable_every=0, run_services=True)
        if phase == "save2":
            assert ckpt.restore() == 0
            for step in range(3):
                _train(model, opt, step)
                ckpt.save(step + 1)
        else:
            step = ckpt.restore()
            expected = torch.load(f"{workdir}/full-{step}.pt")
            got = _full(state)
            assert set(got) == set(expected), set(got) ^ set(expected)
            for key in got:
                assert torch.equal(got[key], expected[key]), f"{phase}: {key} differs after restore of step {step}"
            assert ckpt.last_restore is not None and ckpt.last_restore.tier == "ram"
            _train(model, opt, step)
            ckpt.save(step + 1)
        ckpt.wait()
        full = _full(state)
        if rank == 0:
            torch.save(full, f"{workdir}/full-{ckpt.last_restore.step + 1 if phase != 'save2' else 3}.pt")
        ckpt.close(keep_ram=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_save_on_2_restore_on_1_then_on_2() -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir="/dev/shm") as workdir:
        for world, phase in ((2, "save2"), (1, "load1"), (2, "load2")):
            # the fork server (tests/_procs.py preloads torch in it): fork is unsafe after CUDA started
            mp.start_processes(_fsdp_worker, args=(world, workdir, phase), nprocs=world, join=True,
                               start_method="forkserver")
        assert os.path.exists(f"{workdir}/full-5.pt")
