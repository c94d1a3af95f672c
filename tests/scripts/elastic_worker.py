"""Test worker for elastic rescale: a replicated linear model trained on a
finite dataset through ElasticSampler + plan_batch (constant global batch),
checkpointed every step to RAM and to a file:// durable tier.

argv: --out DIR --steps N --durable URL [--global-batch G] [--micro-batch M]
[--step-sleep S] [--every K] [--durable-every K]. The run ends after N steps,
or earlier at the first step where any rank sees DIR/stop (agreed by an all-reduce).
Appends one JSON line per event to DIR/records.jsonl:
  {"kind": "restore", node, attempt, rank, world, step, position, digest}
  {"kind": "step", node, attempt, rank, world, step, ids, accum, digest}
``digest`` is the SHA-256 of the whole state (parameters, optimizer state,
sampler position) after restoring / after saving that step.
"""

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

import hpresil
from hpresil.elastic import ElasticSampler, plan_batch

NUM_SAMPLES = 90


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(8, generator=gen)
    return x, x.sum().reshape(1) * 0.5


def digest(model: torch.nn.Module, opt: torch.optim.Optimizer, sampler: ElasticSampler) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    for pstate in opt.state.values():
        for k in sorted(pstate):
            v = pstate[k]
            h.update(v.detach().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(str(sampler.position).encode())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--step-sleep", type=float, default=0.15)
    p.add_argument("--durable", required=True)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--durable-every", type=int, default=4)
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node, attempt = os.environ.get("HPRESIL_NODE_ID", "?"), int(os.environ.get("HPRESIL_ATTEMPT", "0"))
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sampler = ElasticSampler(NUM_SAMPLES, global_batch=args.global_batch, seed=7)
    plan = plan_batch(args.global_batch, world, micro_batch=args.micro_batch)
    ckpt = hpresil.Checkpointer(state={"model": model, "optim": opt, "data": sampler}, durable=args.durable,
                                every=args.every, durable_every=args.durable_every)
    start = ckpt.restore()
    path = os.path.join(args.out, "records.jsonl")

    def record(**fields: object) -> None:
        line = json.dumps({"t": time.time(), "node": node, "attempt": attempt, "rank": rank, "world": world, **fields}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    record(kind="restore", step=start, position=sampler.position, digest=digest(model, opt, sampler),
           tier=ckpt.last_restore.tier if ckpt.last_restore else None)
    for step in range(start, args.steps):
        ids = sampler.next_batch(rank, world)
        opt.zero_grad(set_to_none=True)
        for micro in plan.split(ids):
            xs, ys = zip(*(sample(i) for i in micro))
            loss = torch.nn.functional.mse_loss(model(torch.stack(xs)), torch.stack(ys), reduction="sum")
            (loss / args.global_batch).backward()
        for prm in model.parameters():
            dist.all_reduce(prm.grad)
        opt.step()
        ckpt.save(step + 1)
        record(kind="step", step=step, ids=ids, accum=plan.accum_steps, digest=digest(model, opt, sampler))
        time.sleep(args.step_sleep)
        stop = torch.tensor([float(os.path.exists(os.path.join(args.out, "stop")))])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            break
    ckpt.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
