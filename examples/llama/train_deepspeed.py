"""The llama example trained by a DeepSpeed engine (ZeRO 0-3), CPU/gloo, checkpointed by hpresil.

Same model, synthetic data and learning-rate schedule as ``train.py``; the
training loop is DeepSpeed's (``engine.backward``/``engine.step``) and the
whole engine state goes through hpresil's RAM -> peer -> durable tiers::

    pip install -e '.[deepspeed]'
    hpresil-run --standalone --nproc-per-node 2 examples/llama/train_deepspeed.py \\
        --deepspeed examples/llama/ds_zero2.json --steps 50

Kill rank 1 at step 20 and watch the restart resume from RAM::

    HPRESIL_FAULTS='[{"rank": 1, "step": 20, "action": "kill"}]' \\
      hpresil-run --standalone --nproc-per-node 2 --max-restarts 1 \\
      examples/llama/train_deepspeed.py --deepspeed examples/llama/ds_zero3.json --steps 50

The config's ``train_micro_batch_size_per_gpu`` is replaced by ``--batch-size``.
Same seed and world size give bitwise-identical engine state, interrupted or not.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import PRESETS, ModelArgs, Transformer, count_parameters  # noqa: E402
from train import LossLog, build_optimizer, lr_at, make_batch, transition_table  # noqa: E402  (also makes hpresil importable)

from hpresil.checkpoint.flatten import encode_json, flatten  # noqa: E402
from hpresil.testing import maybe_inject  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", type=Path, required=True, help="DeepSpeed config JSON (ds_zero{1,2,3}.json here)")
    p.add_argument("--steps", type=int, default=100, help="total optimizer steps")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model size")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the data")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--out", type=Path, default=None,
                   help="each rank saves its engine state (what hpresil checkpoints) to OUT/rank<R>.pt")
    p.add_argument("--log-every", type=int, default=10, help="print the loss every N steps")
    p.add_argument("--no-checkpoint", action="store_true", help="train without hpresil checkpointing")
    p.add_argument("--durable", default=None, help="durable tier URL (default $HPRESIL_DURABLE, else the log dir)")
    p.add_argument("--ckpt-every", type=int, default=1, help="RAM snapshot every N steps")
    p.add_argument("--durable-every", type=int, default=20, help="drain to the durable tier every N steps (0: never)")
    p.add_argument("--ds-shm-comm", action="store_true",
                   help="let DeepSpeed JIT-compile its CPU shared-memory all-reduce kernel (minutes, once per machine)")
    return p.parse_args(argv)


def init_distributed(shm_comm: bool) -> tuple[int, int]:
    """Joins the launcher's job (or a one-process one) through DeepSpeed, over gloo."""
    import deepspeed

    if not shm_comm:
        # On the CPU accelerator DeepSpeed builds a C++ all-reduce kernel with
        # ninja at the first init_distributed (2-3 minutes on 2 cores, needs a
        # compiler); gloo's all-reduce is all this example needs.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def engine_snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Copies of every tensor hpresil checkpoints for this engine, and its plain values as JSON."""
    flat = flatten(state)
    tensors = {leaf.key: leaf.value.detach().clone() for leaf in flat.leaves if leaf.is_tensor}
    plain = {leaf.key: encode_json(leaf.value, leaf.key) for leaf in flat.leaves if not leaf.is_tensor}
    return {"tensors": tensors, "plain": json.dumps(plain, sort_keys=True)}


def train(args: argparse.Namespace, rank: int, world_size: int) -> None:
    import deepspeed

    from hpresil.integrations.deepspeed import DeepSpeedCheckpointer
    from hpresil.integrations.deepspeed.state import build_state

    margs = ModelArgs.preset(args.preset)
    model = Transformer(margs, seed=args.seed)  # identical on every rank: no broadcast needed
    n_params = count_parameters(model)
    optim = build_optimizer(model, args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_at(s, peak=args.lr, warmup=args.warmup, total=args.steps) / args.lr)
    config = json.loads(args.deepspeed.read_text())
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config.pop("train_batch_size", None)  # derived from the two above and the world size
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=schedule, config=config)
    table = transition_table(args.seed, margs.vocab_size)

    start_step = 0
    ckpt = None
    if not args.no_checkpoint:  # hpresil: these lines and ckpt.save() below are the whole integration
        ckpt = DeepSpeedCheckpointer(engine, durable=args.durable, every=args.ckpt_every,
                                     durable_every=args.durable_every)
        start_step = ckpt.restore()

    if rank == 0:
        print(f"llama {args.preset}: {n_params / 1e6:.2f}M params, world size {world_size}, DeepSpeed "
              f"ZeRO-{engine.zero_optimization_stage()}, steps {start_step}..{args.steps}", flush=True)
    loss_log = LossLog(rank, world_size, every=args.log_every, total=args.steps, start_step=start_step)
    t_start = time.perf_counter()
    steps = ckpt.steps(start_step + 1, args.steps + 1) if ckpt is not None else range(start_step + 1, args.steps + 1)
    for done in steps:  # range() that a rollback rewinds
        step = done - 1
        maybe_inject(step, state=engine.module)
        inputs, targets = make_batch(table, seed=args.seed, step=step, rank=rank, world_size=world_size,
                                     batch_size=args.batch_size, seq_len=margs.max_seq_len)
        logits = engine(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        engine.backward(loss)
        engine.step()  # clips, steps the optimizer and the LR schedule
        if ckpt is not None:
            ckpt.save(step + 1, loss=loss.detach())  # after the step, so a restore resumes at the next one
        loss_log(step, loss)

    elapsed = time.perf_counter() - t_start
    if rank == 0 and args.steps > start_step:
        n = args.steps - start_step
        print(f"done: {n} steps in {elapsed:.1f} s ({n / elapsed:.2f} steps/s)", flush=True)
    if ckpt is not None:
        ckpt.close()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        state, _ = build_state(engine, None)
        torch.save(engine_snapshot(state), args.out / f"rank{rank}.pt")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    rank, world_size = init_distributed(args.ds_shm_comm)
    train(args, rank, world_size)
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
