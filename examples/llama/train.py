"""Reference training script: a small Llama on synthetic data, DDP or FSDP2, on CPU (gloo) or GPU (NCCL).

Launch with hpresil (restarts the job when a worker dies)::

    hpresil-run --standalone --nproc-per-node 2 examples/llama/train.py --steps 50

or with plain torchrun, or as a single process (world size 1)::

    torchrun --standalone --nproc-per-node 2 examples/llama/train.py --steps 50
    python examples/llama/train.py --steps 50 --preset tiny

Baseline without hpresil (what ``torchrun --max-restarts`` users have)::

    torchrun ... examples/llama/train.py --dcp s3://bucket/run --dcp-every 50 --pg-timeout 60

saves with plain ``torch.distributed.checkpoint`` every 50 steps and resumes
from the newest complete checkpoint (``dcp_baseline.py``). ``--step-log FILE``
makes rank 0 append one JSON line per completed step (bench/goodput.py).

``--device auto|cpu|cuda`` (default ``auto``: the process's GPU when CUDA is
available) picks where it trains; on CUDA the group is ``cpu:gloo,cuda:nccl``.
Add ``--fsdp`` to shard with FSDP2 (``fully_shard`` per block, then the root)
instead of replicating with DDP. To kill a worker mid-run, set a fault plan::

    HPRESIL_FAULTS='[{"rank": 1, "step": 20, "action": "kill"}]' hpresil-run ...

The run is deterministic: sample ``i`` of the synthetic dataset is a pure
function of ``(seed, i)`` and the sample order comes from
:class:`hpresil.elastic.ElasticSampler`, whose global position is saved with
every checkpoint. The same seed and world size give bitwise-identical final
parameters, and a resumed run sees exactly the data an uninterrupted run would
have seen. Elastic (``hpresil-run --nnodes MIN:MAX``): after a rescale the
global batch stays ``--global-batch`` (default: ``--batch-size`` x the first
world size, kept in the checkpoint) through gradient accumulation, with
micro-batches of at most ``--batch-size``, and the data order continues
without repeating or skipping a sample.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model import PRESETS, ModelArgs, Transformer, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: the shared --device helper
from _device import DEVICES, init_distributed, pick_device  # noqa: E402

try:
    import hpresil
    from hpresil.testing import maybe_inject
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import hpresil
    from hpresil.testing import maybe_inject
from hpresil.elastic import BatchPlan, ElasticSampler, plan_batch  # noqa: E402

# Successors per token in the synthetic Markov chain: the best achievable loss
# is ln(4) ~= 1.386, far below the ln(vocab) a fresh model starts at.
BRANCHING = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the data")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per forward pass (the micro-batch)")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per optimizer step over all ranks, kept "
                   "across rescales by gradient accumulation (default: --batch-size x the first world size)")
    p.add_argument("--dataset-size", type=int, default=1 << 16, help="sequences in the synthetic dataset (an epoch)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to train (auto: a GPU per local rank when there are enough, else the CPU)")
    p.add_argument("--out", type=Path, default=None, help="rank 0 saves the final full state_dict here")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--no-checkpoint", action="store_true", help="train without hpresil checkpointing")
    p.add_argument("--durable", default=None, help="durable tier URL (file:///dir, s3://bucket/prefix); "
                   "default $HPRESIL_DURABLE, else the job's log dir")
    p.add_argument("--ckpt-every", type=int, default=1, help="RAM snapshot every N steps")
    p.add_argument("--durable-every", type=int, default=20, help="drain to the durable tier every N steps (0: never)")
    p.add_argument("--dcp", default=None, metavar="URL", help="baseline without hpresil: plain dcp.save/dcp.load to URL "
                   "(s3://bucket/prefix, file:///dir) every --dcp-every steps, resume from the newest; implies --no-checkpoint")
    p.add_argument("--dcp-every", type=int, default=50, help="with --dcp: save every N steps")
    p.add_argument("--step-log", type=Path, default=None, help="rank 0 appends a JSON line per completed step (step, "
                   "time, world size, save blocking) and per start (restored step, restore time)")
    p.add_argument("--pg-timeout", type=float, default=None, metavar="SECONDS",
                   help="collective timeout (default: torch's, 30 min for gloo)")
    return p.parse_args(argv)


def transition_table(seed: int, vocab_size: int) -> torch.Tensor:
    """The fixed Markov chain: row ``t`` lists the ``BRANCHING`` tokens that may follow ``t``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (vocab_size, BRANCHING), generator=gen)


def batch_seed(seed: int, step: int, rank: int, world_size: int) -> int:
    # A hash rather than arithmetic so nearby (step, rank) pairs get unrelated streams.
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}:{world_size}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_batch(
    table: torch.Tensor, *, seed: int, step: int, rank: int, world_size: int, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, ``(batch_size, seq_len)`` each, for one rank and step."""
    gen = torch.Generator().manual_seed(batch_seed(seed, step, rank, world_size))
    tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(table.shape[0], (batch_size,), generator=gen)
    choices = torch.randint(BRANCHING, (batch_size, seq_len), generator=gen)
    for t in range(seq_len):
        tokens[:, t + 1] = table[tokens[:, t], choices[:, t]]
    return tokens[:, :-1], tokens[:, 1:]


def sample_seed(seed: int, sample: int) -> int:
    digest = hashlib.blake2b(f"{seed}:sample:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_samples(table: torch.Tensor, *, seed: int, ids: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, ``(len(ids), seq_len)`` each: sample ``i``
    of the dataset is a pure function of ``(seed, i)``."""
    starts, choices = [], []
    for i in ids:
        gen = torch.Generator().manual_seed(sample_seed(seed, i))
        starts.append(torch.randint(table.shape[0], (1,), generator=gen))
        choices.append(torch.randint(BRANCHING, (seq_len,), generator=gen))
    tokens = torch.empty(len(ids), seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.cat(starts)
    picks = torch.stack(choices)
    for t in range(seq_len):
        tokens[:, t + 1] = table[tokens[:, t], picks[:, t]]
    return tokens[:, :-1], tokens[:, 1:]


def grad_sync(train_model: nn.Module, fsdp: bool, sync: bool) -> contextlib.AbstractContextManager:
    """Skips the gradient all-reduce of a micro-batch that is not the step's last."""
    if fsdp:
        train_model.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()  # type: ignore[operator]


def lr_at(step: int, *, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak`` at ``total``.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # No weight decay on norm scales: decaying them towards 0 fights the normalisation.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


class LossLog:
    """Every ``every`` steps (and at the last one): the loss over the global batch
    and the time per step since the previous report, printed by rank 0.

    Call it on every rank after each step: the decision depends on the step
    only, so all ranks join the all-reduce together.
    """

    def __init__(self, rank: int, world_size: int, *, every: int, total: int, start_step: int) -> None:
        self.rank, self.world_size, self.every, self.total = rank, world_size, every, total
        self.t_log, self.last_logged = time.perf_counter(), start_step - 1

    def __call__(self, step: int, loss: torch.Tensor) -> None:
        if step % self.every and step != self.total - 1:
            return
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= self.world_size
        now = time.perf_counter()
        if step <= self.last_logged:  # a rollback rewound the loop
            self.last_logged = step - 1
        ms = 1000.0 * (now - self.t_log) / (step - self.last_logged)
        self.t_log, self.last_logged = now, step
        if self.rank == 0:
            print(f"step {step} loss {mean_loss.item():.4f} ({ms:.0f} ms/step)", flush=True)


def full_state_dict(model: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The unsharded model state on CPU (a collective under FSDP: call on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class StepLog:
    """Appends one JSON line per record to ``path`` (``None``: does nothing); ``t`` is Unix time."""

    def __init__(self, path: Path | None) -> None:
        self.fd = None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **fields: object) -> None:
        if self.fd is not None:  # one write per line: O_APPEND keeps lines whole across processes
            os.write(self.fd, (json.dumps({"t": time.time(), **fields}) + "\n").encode())


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
    """Builds the model and runs steps ``start_step..args.steps`` in the joined process group."""
    margs: ModelArgs = ModelArgs.preset(args.preset)
    # Every rank builds identical weights from the seed, so no broadcast is needed.
    model = Transformer(margs, seed=args.seed).to(device)
    n_params = count_parameters(model)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train_model: nn.Module = model
    else:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optim = build_optimizer(model, args.lr)
    table = transition_table(args.seed, margs.vocab_size)

    # `model` is the unwrapped module (FSDP2 shards in place): its state_dict
    # keys are the same under DDP and FSDP, which keeps checkpoints portable.
    # The sampler's global position travels with the checkpoint: after a
    # rescale the data order continues exactly where it stopped.
    sampler = ElasticSampler(args.dataset_size, global_batch=args.global_batch or args.batch_size * world_size,
                             seed=args.seed)
    state = {"model": model, "optim": optim, "data": sampler}
    start_step = 0
    ckpt = baseline = None
    t_restore = time.perf_counter()
    if args.dcp:  # the baseline without hpresil: plain DCP to durable storage
        from dcp_baseline import DcpCheckpoint

        baseline = DcpCheckpoint(args.dcp, model=model, optim=optim, sampler=sampler, every=args.dcp_every)
        start_step = baseline.restore()
    elif not args.no_checkpoint:  # hpresil: these lines and ckpt.save() below are the whole integration
        ckpt = hpresil.Checkpointer(state=state, durable=args.durable, every=args.ckpt_every,
                                    durable_every=args.durable_every)
        start_step = ckpt.restore()  # 0 when no tier holds a checkpoint yet
    if not args.global_batch and sampler.restored_global_batch:
        sampler.global_batch = sampler.restored_global_batch  # the first run's, whatever the world size now
    plan: BatchPlan = plan_batch(sampler.global_batch, world_size, max_micro_batch=args.batch_size)
    step_log = StepLog(args.step_log if rank == 0 else None)
    step_log.write(event="start", step=start_step, world=world_size, restore_s=time.perf_counter() - t_restore)

    if rank == 0:
        print(
            f"llama {args.preset}: {n_params / 1e6:.2f}M params, world size {world_size}, "
            f"{'FSDP2' if args.fsdp else 'DDP'} on {device.type}, steps {start_step}..{args.steps}, global batch "
            f"{plan.global_batch} = {plan.micro_batch} x {world_size} x {plan.accum_steps} accumulation steps",
            flush=True,
        )
    loss_log = LossLog(rank, world_size, every=args.log_every, total=args.steps, start_step=start_step)
    t_start = time.perf_counter()
    # ckpt.steps() is range() that a rollback (a NaN, a spike, diverged replicas) rewinds.
    done_steps = ckpt.steps(start_step + 1, args.steps + 1) if ckpt is not None else range(start_step + 1, args.steps + 1)
    for done in done_steps:
        step = done - 1  # the step this iteration computes; its snapshot is labelled `done`
        maybe_inject(step, state=model)
        lr = lr_at(step, peak=args.lr, warmup=args.warmup, total=args.steps)
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        micro_batches = plan.split(sampler.next_batch(rank, world_size))
        for (_, last), ids in zip(plan.micro_steps(), micro_batches):
            inputs, targets = make_samples(table, seed=args.seed, ids=ids, seq_len=margs.max_seq_len)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with grad_sync(train_model, args.fsdp, last or plan.accum_steps == 1):
                logits = train_model(inputs)
                micro_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) * plan.loss_scale
                micro_loss.backward()
            loss += micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        t_save = time.perf_counter()
        if ckpt is not None:
            ckpt.save(step + 1, loss=loss)  # after the step, so a restore resumes at the next one
        elif baseline is not None:
            baseline.save(step + 1)
        step_log.write(step=step + 1, world=world_size, save_s=time.perf_counter() - t_save)

        loss_log(step, loss)

    elapsed = time.perf_counter() - t_start
    n_done = args.steps - start_step
    if rank == 0 and n_done > 0:
        print(f"done: {n_done} steps in {elapsed:.1f} s ({n_done / elapsed:.2f} steps/s)", flush=True)
    if ckpt is not None:
        ckpt.close()  # waits for pending durable uploads
    if args.out is not None:
        sd = full_state_dict(model, args.fsdp)
        if rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save(sd, args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Deterministic kernels and a fixed reduction order: same seed and world
    # size must give bitwise-identical weights.
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    rank, world_size = init_distributed(device, args.pg_timeout)
    train(args, rank, world_size, device)
    # DDP's reducer must be gone before the process group is destroyed: the
    # reducer's destructor holds the GIL, and if it drops the group's last
    # reference, gloo's destructor waits for a worker thread that is itself
    # waiting for the GIL (pytorch/pytorch#56297). collect() frees any cycles.
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
