"""``hpresil-run --net-env p5``: the workers see the preset's values, the user's value is kept,
and events.jsonl records the changes, the detection and the warnings."""

from __future__ import annotations

import json

from _launch import base_env, events, hpresil_run

SCRIPT = """
import json, os
names = ["FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "FI_EFA_USE_HUGE_PAGE", "NCCL_SOCKET_IFNAME", "NCCL_ALGO",
         "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
print("ENV " + json.dumps({n: os.environ.get(n) for n in names}), flush=True)
"""


def test_net_env_preset_reaches_workers_and_events(tmp_path) -> None:
    script = tmp_path / "print_env.py"
    script.write_text(SCRIPT)
    logs = tmp_path / "logs"
    env = base_env(tmp_path, FI_EFA_USE_HUGE_PAGE="1", NCCL_ALGO="Ring")
    for name in ("FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "NCCL_SOCKET_IFNAME", "LD_LIBRARY_PATH"):
        env.pop(name, None)
    proc = hpresil_run(["--standalone", "--nproc-per-node", "1", "--net-env", "p5", "--log-dir", str(logs),
                        "--tee", "3", str(script)], tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "ENV {" in l)
    seen = json.loads(line.split("ENV ", 1)[1])
    # p5 preset on a host without the aws-ofi-nccl plugin: the pre-1.7 values
    assert seen["FI_PROVIDER"] == "efa" and seen["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert seen["FI_EFA_USE_HUGE_PAGE"] == "1" and seen["NCCL_ALGO"] == "Ring"  # the user's values win
    assert seen["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and seen["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    evs = events(logs / "events.jsonl")
    changed = {e["name"]: e for e in evs if e["event"] == "env_change"}
    assert changed["FI_PROVIDER"]["new"] == "efa" and changed["FI_PROVIDER"]["old"] is None
    assert changed["FI_PROVIDER"]["reason"] and "FI_EFA_USE_HUGE_PAGE" not in changed
    net = [e for e in evs if e["event"] == "net_env"]
    assert len(net) == 1 and net[0]["mode"] == "p5" and net[0]["facts"]["family"] == "p5"
    warned = {e["rule"]: e for e in evs if e["event"] == "env_warning"}
    assert {"fi-huge-page-on", "nccl-algo-forced"} <= set(warned)
    assert warned["nccl-algo-forced"]["value"] == "Ring" and warned["nccl-algo-forced"]["source"]
    assert "net-env warning: NCCL_ALGO=Ring" in proc.stderr
