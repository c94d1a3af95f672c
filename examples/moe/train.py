"""MoE example: tensor + expert parallelism laid out by hpresil.mesh, checkpointed by hpresil.

Four ranks (TP=2 for attention and the dense MLP, EP=2 for the experts,
DP=2), on CPU with gloo or on GPUs with NCCL (``--device auto|cpu|cuda``,
default ``auto``)::

    hpresil-run --standalone --nproc-per-node 4 examples/moe/train.py --steps 40

The same degrees on two GB200 NVL72 racks (prints the layout and exits; no GPUs needed)::

    python examples/moe/train.py --simulate-topology nvl72x2 --tp 4 --ep 8

The batch of a step is a pure function of ``(seed, step, dp rank, dp size)`` and
all reductions run in a fixed order, so a run killed and resumed from its
checkpoint ends with bitwise the parameters of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import Groups, MoEArgs, MoETransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared --device helper
from _device import DEVICES, init_distributed, pick_device  # noqa: E402

try:
    import hpresil
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import hpresil
from hpresil.mesh import MeshConfig, compute_layout
from hpresil.testing import maybe_inject
from hpresil.topology import load_map, simulated

BRANCHING = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--tp", type=int, default=None, help="tensor parallel degree (default: 2 when world >= 2)")
    p.add_argument("--ep", type=int, default=None, help="expert parallel degree (default: 2 when world >= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="sequences per data-parallel replica")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=None, help="each rank saves its final local state_dict in this dir")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train (auto: a GPU per local rank when there are enough, else the CPU)")
    p.add_argument("--durable", default=None, help="durable tier URL (default: $HPRESIL_DURABLE or the log dir)")
    p.add_argument("--simulate-topology", default=None, metavar="SPEC",
                   help="print how --tp/--ep lay out on a simulated cluster (e.g. nvl72x2, nvl36x4, p5x4) and exit")
    return p.parse_args(argv)


def make_batch(seed: int, step: int, replica: int, replicas: int, batch: int, args: MoEArgs) -> torch.Tensor:
    """Tokens ``(batch, seq + 1)`` of one data-parallel replica: a fixed random Markov chain."""
    table = torch.randint(args.vocab_size, (args.vocab_size, BRANCHING), generator=torch.Generator().manual_seed(seed))
    digest = hashlib.blake2b(f"{seed}:{step}:{replica}:{replicas}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    tokens = torch.empty(batch, args.max_seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(args.vocab_size, (batch,), generator=gen)
    choices = torch.randint(BRANCHING, (batch, args.max_seq_len), generator=gen)
    for t in range(args.max_seq_len):
        tokens[:, t + 1] = table[tokens[:, t], choices[:, t]]
    return tokens


def degrees(args: argparse.Namespace, world: int) -> MeshConfig:
    tp = args.tp if args.tp is not None else (2 if world % 2 == 0 else 1)
    ep = args.ep if args.ep is not None else (2 if world % 2 == 0 else 1)
    return MeshConfig(tp=tp, ep=ep)


def simulate(args: argparse.Namespace) -> None:
    topo = simulated(args.simulate_topology)
    layout = compute_layout(degrees(args, topo.world_size), topo)
    print(layout)
    print(f"rank 0 sits at {layout.coords(0)}; its EP group: {layout.groups('ep')[0].tolist()}")


def train(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    rank, world = init_distributed(device)
    layout = compute_layout(degrees(args, world), load_map(world))  # hpresil: the mesh helper
    dense, expert = layout.dense_mesh(device.type), layout.expert_mesh(device.type)
    if rank == 0:
        print(layout, flush=True)
    groups = Groups(tp=dense.get_group("tp"), ep=expert.get_group("ep"),
                    tp_rank=dense.get_local_rank("tp"), tp_size=layout.config.tp,
                    ep_rank=expert.get_local_rank("ep"), ep_size=layout.config.ep)
    dp_group, edp_group = dense.get_group("dp"), expert.get_group("edp")
    replica = dense.get_local_rank("dp")

    margs = MoEArgs()
    model = MoETransformer(margs, groups, seed=args.seed).to(device)
    experts = {id(p) for p in model.expert_parameters()}
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)

    # hpresil: the whole checkpoint integration (each rank saves its own shards).
    ckpt = hpresil.Checkpointer(state={"model": model, "optim": optim}, durable=args.durable)
    start = ckpt.restore()

    t0 = time.perf_counter()
    for done in ckpt.steps(start + 1, args.steps + 1):  # range() that a rollback rewinds
        step = done - 1
        maybe_inject(step, state=model)
        tokens = make_batch(args.seed, step, replica, layout.dp, args.batch_size, margs).to(device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # dense grads over DP, expert grads over expert-DP
            dist.all_reduce(p.grad, group=edp_group if id(p) in experts else dp_group)
            p.grad /= layout.dp
        optim.step()
        ckpt.save(step + 1, loss=loss.detach())
        if step % args.log_every == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean, group=dp_group)
            if rank == 0:
                print(f"step {step} loss {mean.item() / layout.dp:.4f}", flush=True)
    if rank == 0:
        print(f"done: steps {start}..{args.steps} in {time.perf_counter() - t0:.1f} s", flush=True)
    ckpt.close()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out / f"rank{rank}.pt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.simulate_topology:
        simulate(args)
        return
    torch.use_deterministic_algorithms(True)
    train(args)
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
