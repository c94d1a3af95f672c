"""A one-process DeepSpeed engine (gloo, CPU) at ZeRO stage ``argv[1]``:
each snapshot must equal the engine's state as of ``save`` although
``engine.step()`` runs right after it, while the copy is in flight (the copy
is slowed down so the step surely starts during it). Prints ``OK <n>``
(n: optimizers whose step waits for the copy)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import tempfile
import time

import torch

from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.ram import copier as ram
from hpresil.checkpoint.ram.source import RamSource


def main(stage: int) -> None:
    import deepspeed

    from hpresil.integrations.deepspeed import DeepSpeedCheckpointer

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo is enough
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 1000000, "allgather_bucket_size": 1000000},
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    real = ram.memcpy

    def slow(dst: torch.Tensor, src: torch.Tensor) -> None:
        time.sleep(0.005)  # per tensor: the step is surely called while this copy runs
        real(dst, src)

    ram.memcpy = slow
    x = torch.randn(8, 256)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        ckpt = DeepSpeedCheckpointer(engine, durable_every=0, run_services=False, shm_dir=shm)
        assert ckpt.restore() == 0
        for step in range(1, 5):
            engine.backward(engine(x).square().mean())
            engine.step()
            engine.backward(engine(x).square().mean())  # the next step's gradients, before the save
            want = {l.key: l.value.detach().clone() for l in flatten(ckpt.state).leaves if l.is_tensor}
            ckpt.save(step)
            engine.step()  # at once: the copy is in flight
            ckpt.checkpointer.wait()
            src = RamSource(shm, verify=False)
            src.steps()
            record = src.records(step)[0]
            for e in record.entries:
                if e.kind != "tensor" or e.key not in want:
                    continue
                buf = torch.empty(e.nbytes, dtype=torch.uint8)
                src.read(step, 0, e, buf)
                got = buf.view(getattr(torch, e.dtype)).view(e.shape)
                assert torch.equal(got, want[e.key].reshape(got.shape)), f"step {step}: {e.key} differs from save()"
            src.close()
        print("OK", len(ckpt.checkpointer.fence.optimizers), flush=True)
        ckpt.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
