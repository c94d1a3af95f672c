"""Test worker of the report, metrics and graceful-stop tests.

A tiny model trained with gloo all-reduces, checkpointed by hpresil; a fault
plan in $HPRESIL_FAULTS injects real faults, and SIGTERM stops it through
``Checkpointer.should_stop`` (final snapshot, then a clean exit).

argv: --steps N --every K --durable URL --durable-every D --sleep SECONDS
"""

import argparse
import time

import torch
import torch.distributed as dist

import hpresil
from hpresil.testing import maybe_inject

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--every", type=int, default=1)
p.add_argument("--durable", default=None)
p.add_argument("--durable-every", type=int, default=0)
p.add_argument("--sleep", type=float, default=0.02)
args = p.parse_args()

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Linear(32, 32)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = hpresil.Checkpointer(state={"model": model, "optim": opt}, every=args.every, durable=args.durable,
                            durable_every=args.durable_every)
start = ckpt.restore()
for step in range(start, args.steps):
    maybe_inject(step)
    loss = model(torch.randn(8, 32)).square().mean()
    loss.backward()
    for param in model.parameters():
        dist.all_reduce(param.grad)
    opt.step()
    opt.zero_grad()
    time.sleep(args.sleep)
    ckpt.save(step + 1)
    if ckpt.should_stop(step + 1):
        break
ckpt.close()
dist.destroy_process_group()
