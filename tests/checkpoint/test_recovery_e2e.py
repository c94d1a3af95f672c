"""End to end: the llama example under hpresil-run, a real fault, recovery from the
RAM tier, and final parameters bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
import torch

from _launch import REPO, base_env, events, hpresil_run
from hpresil.testing import Fault, to_env

pytestmark = pytest.mark.slow

TRAIN = os.path.join(REPO, "examples", "llama", "train.py")
STEPS = 30
FAST_HANG = ["--hang-step-floor", "1", "--hang-grace", "1", "--monitor-interval", "0.1", "--hang-busy-timeout", "1"]


def _train(tmp_path, name: str, faults: list[Fault]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    run = tmp_path / name
    env = base_env(tmp_path, warm=True, **to_env(faults))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--log-dir", str(run),
                        *FAST_HANG, TRAIN, "--preset", "tiny", "--steps", str(STEPS), "--durable-every", "10",
                        "--durable", f"file://{run}/durable", "--out", str(run / "final.pt")], tmp_path, env=env,
                       timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(run / "final.pt", weights_only=True), events(run / "events.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    sd, _ = _train(tmp_path_factory.mktemp("ref"), "clean", [])
    return sd


@pytest.mark.parametrize("action", ["kill", "hang"])
def test_fault_recovers_from_ram_bitwise(tmp_path, reference, action: str) -> None:
    sd, evs = _train(tmp_path, action, [Fault(rank=1, step=17, action=action)])
    restored = [e for e in evs if e["event"] == "checkpoint_restored" and e["attempt"] == 1]
    assert restored and {e["tier"] for e in restored} == {"ram"}
    assert {e["step"] for e in restored} == {17}, "resumes at the newest snapshot: the step the fault hit"
    if action == "hang":
        hang = [e for e in evs if e["event"] == "hang_detected"]
        assert len(hang) == 1 and hang[0]["suspects"] == [1]
    assert sd.keys() == reference.keys()
    for k in sd:
        assert torch.equal(sd[k], reference[k]), f"{k} differs from the uninterrupted run"
    drained = [e for e in evs if e["event"] == "checkpoint_drained" and e.get("committed")]
    assert {e["step"] for e in drained} >= {30}
    manifest = tmp_path / action / "durable" / f"step_{30:010d}" / ".hpresil" / "manifest.json"
    assert json.loads(manifest.read_text())
