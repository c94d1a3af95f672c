"""examples/moe: TP + EP on 4 gloo ranks under hpresil-run, a killed rank, and a bitwise resume;
``--simulate-topology`` prints the NVL72 layout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from _launch import REPO, base_env, events, hpresil_run
from hpresil.testing import fail_at, to_env

EXAMPLE = Path(REPO) / "examples" / "moe"
STEPS = 8


def _load(name: str):
    # Unique module names: examples/llama also has a model.py.
    sys.path.insert(0, str(EXAMPLE))
    saved = sys.modules.pop("model", None)
    try:
        spec = importlib.util.spec_from_file_location(f"moe_example_{name}", EXAMPLE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("model", None)
        if saved is not None:
            sys.modules["model"] = saved


def test_moe_layer_matches_a_dense_computation_on_one_rank():
    import torch.distributed as dist
    import torch.nn.functional as F

    M = _load("model")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        g = M.Groups(tp=group, ep=group, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1)
        args = M.MoEArgs()
        moe = M.MoE(args, g, torch.Generator().manual_seed(1))
        x = torch.randn(2, 8, args.dim, generator=torch.Generator().manual_seed(2))
        got = moe(x)
        tokens = x.reshape(-1, args.dim)
        probs = F.softmax(tokens @ moe.router.T, -1)
        w, e = probs.topk(args.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        every = torch.stack([F.linear(F.gelu(F.linear(tokens, moe.w1[i])), moe.w2[i]) for i in range(args.n_experts)], 1)
        want = (every[torch.arange(tokens.shape[0])[:, None], e] * w[..., None]).sum(1)
        torch.testing.assert_close(got.reshape(-1, args.dim), want, rtol=1e-5, atol=1e-6)
        got.sum().backward()
        assert moe.router.grad is not None and moe.w1.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


def test_simulate_topology_prints_the_nvl72_layout(capsys):
    train = _load("train")
    train.main(["--simulate-topology", "nvl72x2", "--tp", "4", "--ep", "8"])
    out = capsys.readouterr().out
    assert "144 ranks on 36 nodes (4 GPUs/node) in 2 NVLink domains" in out
    assert "its EP group: [0, 1, 2, 3, 4, 5, 6, 7]" in out
    ep_row = next(line for line in out.splitlines() if line.strip().startswith("ep "))
    assert ep_row.split()[4] == "0"  # no EP group crosses a rack


def _run(tmp_path: Path, name: str, faults) -> tuple[list[dict[str, torch.Tensor]], list[dict]]:
    run = tmp_path / name
    env = base_env(tmp_path, **to_env(faults))
    proc = hpresil_run(["--standalone", "--nproc-per-node", "4", "--max-restarts", "1", "--log-dir", str(run),
                        "--monitor-interval", "0.1", str(EXAMPLE / "train.py"), "--steps", str(STEPS),
                        "--log-every", "1", "--durable", f"file://{run}/durable", "--out", str(run / "out")],
                       tmp_path, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return [torch.load(run / "out" / f"rank{r}.pt", weights_only=True) for r in range(4)], events(run / "events.jsonl")


@pytest.mark.slow
@pytest.mark.chaos  # in `make chaos`, not in CI's `make test`
def test_killed_rank_resumes_bitwise(tmp_path):
    reference, _ = _run(tmp_path, "clean", [])
    # Ranks hold different shards: TP halves of attention/MLP, EP halves of the experts.
    assert not torch.equal(reference[0]["layers.0.attn.wo"], reference[1]["layers.0.attn.wo"])
    assert not torch.equal(reference[0]["layers.1.ffn.w1"], reference[1]["layers.1.ffn.w1"])
    assert torch.equal(reference[0]["layers.1.ffn.router"], reference[3]["layers.1.ffn.router"])
    resumed, evs = _run(tmp_path, "fault", [fail_at(rank=1, step=5)])
    restored = [e for e in evs if e["event"] == "checkpoint_restored" and e.get("attempt") == 1]
    assert {e["step"] for e in restored} == {5} and {e["tier"] for e in restored} == {"ram"}
    for rank in range(4):
        assert reference[rank].keys() == resumed[rank].keys()
        for key, tensor in reference[rank].items():
            assert torch.equal(tensor, resumed[rank][key]), f"rank {rank} {key} differs from the uninterrupted run"
