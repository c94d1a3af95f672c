"""A small MoE transformer with tensor and expert parallelism written out by hand.

* Attention and the dense MLP are tensor parallel (Megatron style): heads and
  the MLP's hidden units are split over the ``tp`` group; a column-parallel
  input (:class:`_CopyToTP`: identity forward, all-reduce backward) and a
  row-parallel output (:class:`_ReduceFromTP`: all-reduce forward) keep the
  residual stream replicated across the TP group.
* MoE layers route each token to its top-k experts (dropless: no capacity
  limit, so no token is dropped and results do not depend on batch packing).
  Experts are sharded over the ``ep`` group; tokens travel to their experts and
  back with ``all_to_all_single`` (gloo implements it on CPU, uneven splits
  included). With ETP = 1 the TP ranks of a replica hold the same tokens, so
  each dispatches only its 1/tp slice and the results are all-gathered
  (Megatron's token split across TP ranks).

Every rank builds the full weights from the seed and keeps its shard, so the
model is the same function of the seed whatever the degrees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(kw_only=True)
class MoEArgs:
    vocab_size: int = 64
    dim: int = 32
    n_layers: int = 2  # layer 0 dense MLP (TP), the others MoE (EP)
    n_heads: int = 4
    mlp_hidden: int = 64
    n_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 32
    max_seq_len: int = 16


@dataclasses.dataclass
class Groups:
    """Process groups and this rank's position in them (from hpresil.mesh)."""

    tp: Any
    ep: Any
    tp_rank: int
    tp_size: int
    ep_rank: int
    ep_size: int


def _size(group: Any) -> int:
    return dist.get_world_size(group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        if _size(ctx.group) > 1:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.contiguous()
        if _size(group) > 1:
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SplitTokens(torch.autograd.Function):
    """This TP rank's slice of the tokens; backward all-gathers the slices' grads."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        return x.chunk(size)[rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _gather(grad.contiguous(), ctx.group, ctx.size), None, None, None


class _GatherTokens(torch.autograd.Function):
    """All TP ranks' slices; the computation after it is replicated, so backward keeps the own slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, rank: int, size: int) -> torch.Tensor:
        ctx.rank, ctx.size = rank, size
        return _gather(x.contiguous(), group, size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return grad.chunk(ctx.size)[ctx.rank].contiguous(), None, None, None


def _gather(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _full(gen: torch.Generator, *shape: int, fan_in: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) / math.sqrt(fan_in)


class Attention(nn.Module):
    def __init__(self, args: MoEArgs, g: Groups, gen: torch.Generator) -> None:
        super().__init__()
        if args.n_heads % g.tp_size:
            raise ValueError(f"n_heads={args.n_heads} must be divisible by tp={g.tp_size}")
        self.g, self.heads = g, args.n_heads // g.tp_size
        self.head_dim = args.dim // args.n_heads
        local = self.heads * self.head_dim
        qkv = _full(gen, 3, args.dim, args.dim, fan_in=args.dim)  # (q|k|v, out, in), column parallel
        self.wqkv = nn.Parameter(qkv[:, g.tp_rank * local:(g.tp_rank + 1) * local].reshape(3 * local, args.dim))
        wo = _full(gen, args.dim, args.dim, fan_in=args.dim)  # row parallel: split the input dim
        self.wo = nn.Parameter(wo[:, g.tp_rank * local:(g.tp_rank + 1) * local].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        x = _CopyToTP.apply(x, self.g.tp)
        q, k, v = F.linear(x, self.wqkv).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = F.linear(y.transpose(1, 2).reshape(b, s, -1), self.wo)
        return _ReduceFromTP.apply(y, self.g.tp)


class DenseMLP(nn.Module):
    def __init__(self, args: MoEArgs, g: Groups, gen: torch.Generator) -> None:
        super().__init__()
        self.g = g
        h = args.mlp_hidden // g.tp_size
        w1 = _full(gen, args.mlp_hidden, args.dim, fan_in=args.dim)
        w2 = _full(gen, args.dim, args.mlp_hidden, fan_in=args.mlp_hidden)
        self.w1 = nn.Parameter(w1[g.tp_rank * h:(g.tp_rank + 1) * h].clone())
        self.w2 = nn.Parameter(w2[:, g.tp_rank * h:(g.tp_rank + 1) * h].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _CopyToTP.apply(x, self.g.tp)
        return _ReduceFromTP.apply(F.linear(F.gelu(F.linear(x, self.w1)), self.w2), self.g.tp)


class MoE(nn.Module):
    """Top-k routed experts, dropless, sharded over the EP group."""

    def __init__(self, args: MoEArgs, g: Groups, gen: torch.Generator) -> None:
        super().__init__()
        if args.n_experts % g.ep_size:
            raise ValueError(f"n_experts={args.n_experts} must be divisible by ep={g.ep_size}")
        self.g, self.k, self.n_experts = g, args.top_k, args.n_experts
        self.local = args.n_experts // g.ep_size
        self.router = nn.Parameter(_full(gen, args.n_experts, args.dim, fan_in=args.dim))  # replicated
        w1 = _full(gen, args.n_experts, args.expert_hidden, args.dim, fan_in=args.dim)
        w2 = _full(gen, args.n_experts, args.dim, args.expert_hidden, fan_in=args.expert_hidden)
        mine = slice(g.ep_rank * self.local, (g.ep_rank + 1) * self.local)
        self.w1, self.w2 = nn.Parameter(w1[mine].clone()), nn.Parameter(w2[mine].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, g = x.shape, self.g
        tokens = x.reshape(-1, shape[-1])
        probs = F.softmax(F.linear(tokens, self.router), dim=-1)  # on all tokens: replicated over TP
        tokens = _SplitTokens.apply(tokens, g.tp, g.tp_rank, g.tp_size)
        probs = _SplitTokens.apply(probs, g.tp, g.tp_rank, g.tp_size)
        weight, expert = probs.topk(self.k, dim=-1)
        weight = weight / weight.sum(-1, keepdim=True)
        flat_expert = expert.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # (token, slot) pairs grouped by expert
        token_of = order // self.k
        per_expert = torch.bincount(flat_expert, minlength=self.n_experts)
        # Exchange how many tokens each rank sends to each of the receiver's experts.
        recv_counts = per_expert.new_empty(self.n_experts)
        dist.all_to_all_single(recv_counts, per_expert, group=g.ep)
        recv_counts = recv_counts.view(g.ep_size, self.local)  # [source rank, local expert]
        in_splits = per_expert.view(g.ep_size, self.local).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        received = _AllToAll.apply(tokens[token_of], out_splits, in_splits, g.ep)
        # Received rows are [source][local expert]; run each local expert on its rows.
        outputs, offset = [], 0
        for src in range(g.ep_size):
            for e in range(self.local):
                n = int(recv_counts[src, e])
                rows = received[offset:offset + n]
                outputs.append(F.linear(F.gelu(F.linear(rows, self.w1[e])), self.w2[e]))
                offset += n
        back = _AllToAll.apply(torch.cat(outputs), in_splits, out_splits, g.ep)
        flat_weight = weight.reshape(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(tokens).index_add(0, token_of, back * flat_weight)
        return _GatherTokens.apply(out, g.tp, g.tp_rank, g.tp_size).reshape(shape)


class Block(nn.Module):
    def __init__(self, args: MoEArgs, g: Groups, gen: torch.Generator, moe: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(args.dim), nn.RMSNorm(args.dim)
        self.attn = Attention(args, g, gen)
        self.ffn = MoE(args, g, gen) if moe else DenseMLP(args, g, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class MoETransformer(nn.Module):
    """Embedding, ``n_layers`` blocks (the first dense, the rest MoE), norm, output head."""

    def __init__(self, args: MoEArgs, g: Groups, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(args.vocab_size, args.dim, generator=gen) * 0.5)
        self.layers = nn.ModuleList(Block(args, g, gen, moe=i > 0) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim)
        self.out = nn.Parameter(_full(gen, args.vocab_size, args.dim, fan_in=args.dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        for layer in self.layers:
            x = layer(x)
        return F.linear(self.norm(x), self.out)

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters sharded over EP (replicated over the expert-data-parallel group)."""
        return [p for layer in self.layers if isinstance(layer.ffn, MoE) for p in (layer.ffn.w1, layer.ffn.w2)]
