"""No false positives: 200-step runs of the examples under hpresil-run with
every health check on (NaN/Inf, loss spikes set to roll back, replica
divergence) end without a single unhealthy snapshot, divergence or rollback:
llama with DDP and FSDP2, the TP+EP MoE example, DeepSpeed ZeRO-1/2/3."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

from _launch import REPO, base_env, events, hpresil_run

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(400)]

LLAMA = os.path.join(REPO, "examples", "llama")
STEPS = 200
_UNHEALTHY = {"snapshot_poisoned", "snapshot_suspect", "replica_divergence", "rollback"}

_RUNS: dict[str, tuple[int, list[str]]] = {
    "llama-ddp": (3, [os.path.join(LLAMA, "train.py"), "--preset", "tiny", "--steps", str(STEPS)]),
    "llama-fsdp2": (2, [os.path.join(LLAMA, "train.py"), "--preset", "tiny", "--steps", str(STEPS), "--fsdp"]),
    "moe": (4, [os.path.join(REPO, "examples", "moe", "train.py"), "--steps", str(STEPS)]),
    **{f"deepspeed-zero{z}": (2, [os.path.join(LLAMA, "train_deepspeed.py"), "--deepspeed",
                                  os.path.join(LLAMA, f"ds_zero{z}.json"), "--preset", "tiny", "--steps", str(STEPS)])
       for z in (1, 2, 3)},
}


@pytest.mark.parametrize("name", list(_RUNS))
def test_a_healthy_run_has_no_unhealthy_snapshot_and_no_rollback(tmp_path: Any, name: str) -> None:
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    nproc, cmd = _RUNS[name]
    env = base_env(tmp_path, HPRESIL_ON_SPIKE="rollback")
    proc = hpresil_run(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts", "0", *cmd], tmp_path, env=env,
                       timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found: list[dict[str, Any]] = []
    for root, _, files in os.walk(tmp_path / "hpresil-logs"):
        if "events.jsonl" in files:
            found += events(os.path.join(root, "events.jsonl"))
    sealed = [e for e in found if e["event"] == "checkpoint_sealed"]
    assert len({e["step"] for e in sealed}) > STEPS // 2, "the sealer judged too few snapshots to mean anything"
    bad = [e for e in found if e["event"] in _UNHEALTHY]
    assert not bad, bad[:5]
