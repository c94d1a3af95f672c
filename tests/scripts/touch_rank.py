"""Test worker: touches <dir>/<RANK>; --fail makes it raise; --check-elastic records
torch.distributed.is_torchelastic_launched(); --init-env joins a gloo group via env://."""

import argparse
import os

import torch.distributed as dist

parser = argparse.ArgumentParser()
parser.add_argument("--touch-dir")
parser.add_argument("--fail", action="store_true")
parser.add_argument("--check-elastic")
parser.add_argument("--init-env", action="store_true")
args = parser.parse_args()
if args.fail:
    raise RuntimeError("failing on purpose")
assert os.environ.get("TEST_SENTINEL_PARENT") == "FOOBAR", "parent environment must reach workers"
if args.init_env:
    dist.init_process_group("gloo", init_method="env://")
    dist.barrier()
    dist.destroy_process_group()
if args.check_elastic:
    with open(args.check_elastic, "w") as f:
        f.write(str(dist.is_torchelastic_launched()))
if args.touch_dir:
    open(os.path.join(args.touch_dir, os.environ["RANK"]), "w").close()
