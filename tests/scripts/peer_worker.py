"""Test worker for peer replication: per-rank state, a RAM snapshot every step.

argv: <out_dir> <steps> <pause_at>. A fresh run (nothing to restore) trains to
``pause_at``, records the state saved at each step in ``saved_r<rank>_s<step>.pt``
and then idles without collectives until the test kills or restarts it. A
restored run records what it restored (``restored_r<rank>.json``/``.pt``) and
trains to ``steps``.
"""

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from hpresil.checkpoint import Checkpointer

out, steps, pause_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", timeout=timedelta(seconds=30))
rank = dist.get_rank()
torch.manual_seed(1234 + rank)
state = {"w": torch.randn(512, 129), "pos": {"rank": rank, "seen": 0}}
ckpt = Checkpointer(state=state, durable_every=0)
start = ckpt.restore()
if start:
    res = ckpt.last_restore
    torch.save(state["w"].clone(), os.path.join(out, f"restored_r{rank}.pt"))
    with open(os.path.join(out, f"restored_r{rank}.json"), "w") as f:
        json.dump({"step": res.step, "tier": res.tier, "node": os.environ.get("HPRESIL_NODE_ID"), "pos": state["pos"]}, f)
for step in range(start + 1, steps + 1):
    t = torch.tensor([float(step)])
    dist.all_reduce(t)
    state["w"].mul_(0.99).add_(t.item() * 1e-3 + rank)
    state["pos"]["seen"] = step
    ckpt.save(step)
    if not start:
        torch.save(state["w"].clone(), os.path.join(out, f"saved_r{rank}_s{step}.pt"))
    if not start and step == pause_at:
        open(os.path.join(out, f"paused_r{rank}_{os.environ.get('HPRESIL_NODE_ID')}"), "w").close()
        time.sleep(90)  # the test kills or restarts us long before
        sys.exit(3)
ckpt.close()
dist.destroy_process_group()
with open(os.path.join(out, f"done_r{rank}"), "w") as f:
    f.write(str(steps))
