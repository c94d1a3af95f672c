"""A small Llama-architecture transformer in plain PyTorch.

RMSNorm, rotary position embeddings, grouped-query attention through
``scaled_dot_product_attention`` and a SwiGLU MLP: the same blocks as Llama 2/3,
sized by the presets in :data:`PRESETS` so that the example trains on a laptop
CPU (``tiny``, ``small``) or serves as a benchmark load (``base``).

Initialisation draws from a private :class:`torch.Generator`, so two processes
that build the model with the same seed hold bitwise-identical weights whatever
the global RNG state is; data-parallel training relies on that.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelArgs", "PRESETS", "RMSNorm", "Attention", "FeedForward", "TransformerBlock", "Transformer", "count_parameters"]


@dataclasses.dataclass(kw_only=True, slots=True)
class ModelArgs:
    """Shape of a :class:`Transformer`.

    Attributes:
        dim: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: query heads per block.
        n_kv_heads: key/value heads per block (grouped-query attention);
            ``n_heads`` must be a multiple of it.
        vocab_size: number of token ids.
        ffn_dim: hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the rotary tables cover.
        norm_eps: epsilon of RMSNorm.
        rope_theta: base of the rotary frequencies.
        tie_embeddings: share the token embedding with the output head.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim % n_heads must be 0, got {self.dim} % {self.n_heads} = {self.dim % self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads % n_kv_heads must be 0, got {self.n_heads} % {self.n_kv_heads} = "
                f"{self.n_heads % self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim = dim / n_heads must be even for RoPE, got {self.dim} / {self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides: object) -> ModelArgs:
        """The named preset from :data:`PRESETS`, with fields overridden.

        Raises:
            KeyError: ``name`` is not a preset.
        """
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; use one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, ModelArgs] = {
    # ~0.2M parameters: unit tests and multi-process tests.
    "tiny": ModelArgs(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=256, max_seq_len=32),
    # ~3M parameters: the default of the demo, a few steps/s at 2 ranks on 2 CPU cores.
    "small": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, ffn_dim=688, max_seq_len=64,
        tie_embeddings=True,
    ),
    # ~100M parameters: checkpoint and recovery benchmarks.
    "base": ModelArgs(
        dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=16384, ffn_dim=2048, max_seq_len=256
    ),
}


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so low-precision activations keep their scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine tables of shape ``(max_seq_len, head_dim // 2)``."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs of ``x`` (``batch, heads, seq, head_dim``) by position."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Explicit repeat rather than SDPA's enable_gqa, which torch < 2.5 lacks.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention and MLP, each on a residual branch."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only Llama-style language model.

    Args:
        args: the model's shape.
        seed: seed of the weight initialisation.
    """

    def __init__(self, args: ModelArgs, *, seed: int = 0) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleList keeps the blocks individually addressable for fully_shard.
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        # Non-persistent: derived from args, so they stay out of checkpoints.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights(seed)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Re-initialises every parameter from ``seed`` (GPT-2/Llama scheme)."""
        gen = torch.Generator().manual_seed(seed)
        # Residual-branch outputs are scaled down with depth so the stream's
        # variance stays O(1) at initialisation.
        out_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():  # shared (tied) weights appear once
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, seq, vocab_size)`` for ``tokens`` of shape ``(batch, seq)``.

        Raises:
            ValueError: the sequence is longer than ``args.max_seq_len``.
        """
        if tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
