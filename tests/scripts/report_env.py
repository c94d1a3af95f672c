"""Test worker: writes what it sees (rank, env, argv) to <out_dir>/rank<RANK>.json."""

import json
import os
import sys

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "HPRESIL_SHM_DIR", "HPRESIL_LOG_DIR", "HPRESIL_NODE_ID",
        "HPRESIL_EVENTS_FILE", "HPRESIL_RUN_ID", "HPRESIL_ATTEMPT"]
info = {k: os.environ.get(k) for k in keys}
info["argv"] = sys.argv[2:]
info["shm_dir_exists"] = bool(info["HPRESIL_SHM_DIR"]) and os.path.isdir(info["HPRESIL_SHM_DIR"])
info["main_module"] = __name__
with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(info, f)
print(f"rank {os.environ['RANK']} ok", flush=True)
