"""The reference example examples/llama: model unit checks and real 2-rank training runs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _launch import REPO, base_env

EXAMPLE = Path(REPO) / "examples" / "llama"
STEP_LINE = re.compile(r"^step (\d+) loss (\d+\.\d{4}) \((\d+) ms/step\)$", re.MULTILINE)


def _load_model_module():
    # A unique module name: other examples also have a model.py.
    spec = importlib.util.spec_from_file_location("llama_example_model", EXAMPLE / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


M = _load_model_module()


def tiny(**overrides):
    return M.ModelArgs.preset("tiny", **overrides)


# ---- model ---------------------------------------------------------------------------


def test_presets_have_the_documented_sizes():
    sizes = {name: M.count_parameters(M.Transformer(M.ModelArgs.preset(name))) for name in ("tiny", "small")}
    assert 0.1e6 < sizes["tiny"] < 0.4e6
    assert 2e6 < sizes["small"] < 5e6
    with pytest.raises(KeyError, match="unknown preset"):
        M.ModelArgs.preset("huge")


def test_forward_shape_and_deterministic_init():
    args = tiny()
    model = M.Transformer(args, seed=3)
    tokens = torch.randint(args.vocab_size, (2, 16))
    assert model(tokens).shape == (2, 16, args.vocab_size)
    same, other = M.Transformer(args, seed=3), M.Transformer(args, seed=4)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), name
        if p.ndim > 1:
            assert not torch.equal(p, r), name


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention(n_kv_heads):
    args = tiny(n_kv_heads=n_kv_heads)
    model = M.Transformer(args).eval()
    attn = model.layers[0].attention
    assert attn.wk.out_features == attn.wv.out_features == n_kv_heads * args.head_dim
    assert attn.wq.out_features == args.n_heads * args.head_dim
    tokens = torch.randint(args.vocab_size, (2, args.max_seq_len))
    with torch.no_grad():
        logits = model(tokens)
        # Causal: changing the last token leaves every earlier position's output alone.
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % args.vocab_size
        logits2 = model(changed)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :-1], logits2[:, :-1])
    assert not torch.allclose(logits[:, -1], logits2[:, -1])


def test_gqa_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="n_heads % n_kv_heads"):
        tiny(n_kv_heads=3)


def test_rope_is_position_dependent_and_relative():
    args = tiny()
    cos, sin = M.rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    q = torch.randn(args.head_dim).expand(1, 1, args.max_seq_len, args.head_dim)
    k = torch.randn(args.head_dim).expand(1, 1, args.max_seq_len, args.head_dim)
    rq, rk = M.apply_rope(q, cos, sin)[0, 0], M.apply_rope(k, cos, sin)[0, 0]
    # The same vector at different positions is rotated differently, by a rotation.
    assert not torch.allclose(rq[0], rq[5])
    torch.testing.assert_close(rq.norm(dim=-1), q[0, 0].norm(dim=-1))
    # Scores depend on the offset between positions only.
    torch.testing.assert_close(rq[7] @ rk[3], rq[12] @ rk[8], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rq[7] @ rk[3], rq[7] @ rk[6])


def test_rope_makes_the_model_see_positions(monkeypatch):
    # Causal attention without position information is blind to the order of
    # the prefix; with RoPE, shuffling the prefix changes the last position's output.
    # One layer: deeper, the prefix positions' own (causal) contexts change too.
    args = tiny(n_layers=1)
    model = M.Transformer(args).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randperm(args.vocab_size, generator=gen)[: args.max_seq_len].unsqueeze(0)
    shuffled = tokens.clone()
    shuffled[0, :-1] = tokens[0, :-1].flip(0)

    def last_logits() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model(tokens)[0, -1], model(shuffled)[0, -1]

    with_rope = last_logits()
    assert not torch.allclose(*with_rope, atol=1e-4)
    monkeypatch.setattr(M, "apply_rope", lambda x, cos, sin: x)
    torch.testing.assert_close(*last_logits())  # the control: no RoPE, no order


def test_rejects_sequences_longer_than_the_rope_tables():
    args = tiny()
    with pytest.raises(ValueError, match="max_seq_len"):
        M.Transformer(args)(torch.zeros(1, args.max_seq_len + 1, dtype=torch.long))


# ---- training runs -------------------------------------------------------------------

STEPS = 20


def train(tmp_path: Path, *extra: str, nproc: int = 2) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Runs train.py with the tiny preset; returns the saved state dict and the logged losses."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "final.pt"
    flags = ["--preset", "tiny", "--steps", str(STEPS), "--log-every", "1", "--out", str(out), *extra]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        launch = [sys.executable]
    env = base_env(tmp_path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [*launch, str(EXAMPLE / "train.py"), *flags],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(m.group(2)) for m in STEP_LINE.finditer(proc.stdout)]
    assert len(losses) == STEPS, proc.stdout
    return torch.load(out, weights_only=True), losses


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[float]]:
    return train(tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
def test_ddp_is_bitwise_deterministic_and_learns(ddp_run, tmp_path):
    first_sd, losses = ddp_run
    second_sd, second_losses = train(tmp_path)
    assert list(first_sd) == list(second_sd)
    for name, tensor in first_sd.items():
        assert torch.equal(tensor, second_sd[name]), f"{name} differs between identical runs"
    assert losses == second_losses
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_fsdp_saves_the_same_full_state_dict_as_ddp(ddp_run, tmp_path):
    ddp_sd, ddp_losses = ddp_run
    fsdp_sd, fsdp_losses = train(tmp_path, "--fsdp")
    assert list(fsdp_sd) == list(ddp_sd)
    for name, tensor in ddp_sd.items():
        got = fsdp_sd[name]
        assert type(got) is torch.Tensor and got.shape == tensor.shape and got.dtype == tensor.dtype, name
        # Same init, data and optimizer: only the reduction order differs.
        torch.testing.assert_close(got, tensor, rtol=1e-4, atol=1e-5)
    assert fsdp_losses[-1] < 0.8 * fsdp_losses[0], fsdp_losses


@pytest.mark.slow
def test_runs_as_a_single_process_without_torchrun(tmp_path):
    sd, losses = train(tmp_path, nproc=1)
    assert set(sd) >= {"tok_embeddings.weight", "output.weight", "norm.weight"}
    assert losses[-1] < losses[0]


# ---- devices ---------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a host without a GPU gives")
def test_device_cuda_without_a_gpu_names_the_fix(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE / "train.py"), "--preset", "tiny", "--steps", "1",
                           "--device", "cuda"], env=base_env(tmp_path), cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode != 0 and "--device cpu" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_is_bitwise_deterministic_and_learns(tmp_path):
    first, losses = train(tmp_path / "a", "--device", "cuda", nproc=1)
    second, again = train(tmp_path / "b", "--device", "cuda", nproc=1)
    assert losses == again and losses[-1] < losses[0]
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: DDP and FSDP2 over NCCL")
@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_cuda_ddp_and_fsdp2_train(tmp_path, mode):
    _, losses = train(tmp_path, "--device", "cuda", *mode, nproc=2)
    assert losses[-1] < 0.8 * losses[0], losses
