"""Test worker: counts steps in a file per rank; a fault plan in $HPRESIL_FAULTS kills it.

argv: <out_dir> <steps>. Each step appends the step number to
<out_dir>/rank<RANK>.attempt<N>; the run ends with a gloo barrier so all ranks
really ran together.
"""

import os
import sys
import time

import torch.distributed as dist

from hpresil.testing import maybe_inject

out_dir, steps = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
with open(os.path.join(out_dir, f"rank{rank}.attempt{attempt}"), "a") as log:
    for step in range(steps):
        maybe_inject(step)
        dist.barrier()
        log.write(f"{step}\n")
        log.flush()
        time.sleep(0.01)
dist.destroy_process_group()
