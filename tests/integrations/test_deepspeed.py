"""DeepSpeed integration: ZeRO-2/3 engines under hpresil-run, a worker SIGKILLed,
restored from RAM bitwise; a restore at another world size fails clearly; and
hpresil imports without DeepSpeed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _launch import REPO, base_env, events
from hpresil.testing import fail_at, to_env

TRAIN = os.path.join(REPO, "examples", "llama", "train_deepspeed.py")
STEPS = 8
KILL_AT = 5
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')",
)


def test_hpresil_imports_without_deepspeed(tmp_path) -> None:
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "deepspeed" or name.startswith("deepspeed."):
                    raise ImportError("deepspeed blocked by the test")
        sys.meta_path.insert(0, Block())
        import hpresil, hpresil.integrations.deepspeed as ds
        assert hpresil.Checkpointer and ds.DeepSpeedCheckpointer and ds.ZeroLayout
        assert not any(m == "deepspeed" or m.startswith("deepspeed.") for m in sys.modules), "deepspeed imported"
        try:
            import deepspeed
        except ImportError:
            print("blocked")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=base_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "blocked"


def _launch(tmp_path, name: str, stage: int, nproc: int = 2, faults=(), restarts: int = 1, durable: str = "") -> subprocess.Popen:
    run = tmp_path / name
    env = base_env(tmp_path, **to_env(list(faults)))
    flags = ["--durable-every", "0"]
    if durable:
        flags = ["--durable-every", str(STEPS), "--durable", durable]
    cmd = [sys.executable, "-m", "hpresil.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", str(restarts), "--log-dir", str(run), TRAIN,
           "--deepspeed", os.path.join(REPO, "examples", "llama", f"ds_zero{stage}.json"), "--preset", "tiny",
           "--steps", str(STEPS), "--log-every", "1", "--out", str(run / "out"), *flags]
    return subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, ok: bool = True) -> str:
    out, _ = proc.communicate(timeout=240)
    assert (proc.returncode == 0) == ok, out[-5000:]
    return out


def _assert_same_engine_state(ref, got) -> None:
    for rank in (0, 1):
        a = torch.load(ref / "out" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(got / "out" / f"rank{rank}.pt", weights_only=True)
        assert a["tensors"].keys() == b["tensors"].keys()
        assert any(k.startswith("optimizer.fp32_partitions.") for k in a["tensors"])
        assert any(k.startswith("optimizer.base.state.") for k in a["tensors"])
        for key, tensor in a["tensors"].items():
            assert torch.equal(tensor, b["tensors"][key]), f"rank {rank} {key} differs from the uninterrupted run"
        plain = json.loads(b["plain"])
        assert plain["engine.global_steps"] == STEPS
        assert json.loads(a["plain"]) == plain


def _check_recovered(run) -> None:
    evs = events(run / "events.jsonl")
    restored = [e for e in evs if e["event"] == "checkpoint_restored" and e["attempt"] == 1]
    assert {e["rank"] for e in restored} == {0, 1}
    assert {(e["tier"], e["step"]) for e in restored} == {("ram", KILL_AT)}, restored


@pytest.mark.slow
@needs_deepspeed
def test_zero2_kill_restore_bitwise(tmp_path) -> None:
    ref = _launch(tmp_path, "ref", 2)
    hit = _launch(tmp_path, "kill", 2, faults=[fail_at(rank=1, step=KILL_AT)])
    _finish(ref)
    _finish(hit)
    _check_recovered(tmp_path / "kill")
    _assert_same_engine_state(tmp_path / "ref", tmp_path / "kill")


@pytest.mark.chaos  # in `make chaos`, not in CI's `make test` (ZeRO-2 above covers the kill/restore path)
@pytest.mark.slow
@needs_deepspeed
def test_zero3_kill_restore_bitwise_and_reshard_error(tmp_path) -> None:
    durable = f"file://{tmp_path}/durable"
    ref = _launch(tmp_path, "ref", 3)
    hit = _launch(tmp_path, "kill", 3, faults=[fail_at(rank=0, step=KILL_AT)], durable=durable)
    _finish(ref)
    _finish(hit)
    _check_recovered(tmp_path / "kill")
    _assert_same_engine_state(tmp_path / "ref", tmp_path / "kill")
    # One rank now: the durable step-8 snapshot holds partitions cut for two.
    out = _finish(_launch(tmp_path, "shrink", 3, nproc=1, restarts=0, durable=durable), ok=False)
    assert "ReshardError" in out and "data-parallel size 2; this job has 1" in out, out[-3000:]
    assert "restart with world size 2" in out


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.chaos), 2, 3])  # ZeRO-1 shares ZeRO-2's code path
def test_overlapped_snapshot_equals_the_engine_as_of_save(tmp_path, stage: int) -> None:
    """engine.step() right after save(): the wrapped optimizer's step waits for
    the copy, so every snapshot holds the state as of save (ZeRO-1/2/3)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "scripts", "ds_overlap.py"), str(stage)],
                          env=base_env(tmp_path), cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK 1" in proc.stdout, proc.stdout[-2000:]
