"""The health checks' device path, where CUDA exists: the NaN/Inf check runs
as norms on the snapshot's copy stream (the sealer only confirms what they
flag), and a CUDA loss is read after its copy, never by a host synchronize."""

from __future__ import annotations

import json

import pytest
import torch

from hpresil.checkpoint import Checkpointer
from hpresil.checkpoint.api import slot_path
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.rollback import RollbackPolicy
from hpresil.testing import RecordingSink

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()


def test_device_norms_flag_a_nan_and_the_seal_confirms_it(shm: str) -> None:
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    events = RecordingSink()
    ckpt = Checkpointer({"model": net, "optim": opt}, shm_dir=shm, durable_every=0, events=events, run_services=True,
                        rollback=RollbackPolicy(on_nonfinite="warn"))
    for step in (1, 2):
        loss = net(torch.ones(4, 64, device="cuda")).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 2:
            with torch.no_grad():
                net[2].weight[0, 0] = float("nan")
        ckpt.save(step, loss=loss.detach())
        ckpt.wait()
    infos = {i.record.step: i for i in scan(shm)}
    record = json.loads(open(slot_path(shm, 0, infos[2].slot, "json")).read())
    assert record["checked"] and record["nonfinite"] == ["model.2.weight"]  # the device found it
    assert infos[1].seal is not None and infos[1].seal.health == "ok"
    assert infos[2].seal is not None and infos[2].seal.poisoned == ["model.2.weight"]  # the sealer confirmed it
    assert [e["step"] for e in events.named("snapshot_poisoned")] == [2]
    ckpt.close(final_durable=False)


def test_a_cuda_loss_is_recorded_without_a_host_synchronize(shm: str) -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ckpt = Checkpointer({"model": net, "optim": opt}, shm_dir=shm, durable_every=0, events=RecordingSink(),
                        run_services=True)
    losses = []
    for step in (1, 2, 3):
        loss = net(torch.full((4, 64), float(step), device="cuda")).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step > 1:  # the first save allocates and registers its slots
            torch.cuda.set_sync_debug_mode("error")
        try:
            ckpt.save(step, loss=loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        losses.append(float(loss.item()))
        ckpt.wait()
    recorded = {i.record.step: i.record.loss for i in scan(shm)}
    assert [recorded[s] for s in (1, 2, 3)] == pytest.approx(losses)
    ckpt.close(final_durable=False)
