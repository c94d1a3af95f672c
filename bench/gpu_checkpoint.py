"""Snapshot and restore costs against the physical floors, on a GPU or the CPU.

One process trains ``--layers`` x ``Linear(--width, --width)`` (fp32, AdamW,
fused on CUDA; TF32 on) on a ``--batch`` x ``--width`` input. In interleaved
rounds (a slow phase of the host hits every method alike) it times a step:

* ``none``: without checkpointing;
* ``hpresil_every1`` / ``hpresil_every10``: with ``Checkpointer.save`` every
  step / every 10 steps (RAM tier, overlapped copy; the sealer runs
  in-process unless ``--services off``), and the host time ``save`` blocks;
* ``blocking_every1``: ``save`` every step copying everything before it
  returns (``CheckpointConfig(overlap=False)``: what ``save`` did before);
* ``dcp_every1`` / ``dcp_every10``: DCP ``async_save`` with ``DefaultStager``
  (pinned memory and non-blocking copies on CUDA, staging on its own
  thread), waiting for the staging right before ``optimizer.step`` as
  torchtitan does (pytorch/pytorch#156207), one save in flight at a time,
  written under ``--dir``.

Then: the floors (``d2h_s``/``h2d_s``, the whole state to and from pinned
host memory on CUDA; ``memcpy_s``, into warm buffers on the CPU);
``restore_s``/``restore_noverify_s``, ``Checkpointer.restore`` from RAM into
the live tensors with and without checksum verification; ``first_saves_s``
and ``restart_saves_s``, the longest of the first three saves of a new job and
of a job restarted on the same RAM tier; ``torch_save_s``.

It prints one ``key=value`` per figure, then the ratios:
``step_ratio_every1`` (target on a GPU: <= 1.05), ``every1_vs_dcp_every1``,
``every1_vs_blocking_every1``, ``restore_vs_h2d`` (CPU: against memcpy),
``first_save_vs_steady``, ``save_blocking_vs_memcpy`` (host blocking of
``save`` over the memcpy floor; CUDA: over the device-to-host floor).

    python bench/gpu_checkpoint.py --device auto    # a GPU: 3 GiB of state
    python bench/gpu_checkpoint.py --device cpu     # 384 MiB on the CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hpresil.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from hpresil.checkpoint.ram.files import scan  # noqa: E402


class Job:
    """The model, optimizer and input of the benchmark."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        self.model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)]).to(device)
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6, fused=fused)
        self.x = torch.randn(args.batch, args.width, device=device)
        self.state = {"model": self.model, "optim": self.opt}

    def step(self) -> torch.Tensor:
        loss = self.model(self.x).square().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def tensors(self) -> list[torch.Tensor]:
        out = [p.detach() for p in self.model.parameters()]
        out += [v for s in self.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.numel() > 1]
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed_steps(job: Job, n: int, after: Callable[[int, torch.Tensor], None] | None = None) -> tuple[float, list[float]]:
    """Mean seconds per step over ``n`` steps, and the host seconds ``after`` blocked each step."""
    blocked = []
    job.sync()
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        loss = job.step()
        if after is not None:
            t = time.perf_counter()
            after(i, loss)
            blocked.append(time.perf_counter() - t)
    job.sync()
    return (time.perf_counter() - t0) / n, blocked


def floors(job: Job) -> dict[str, float]:
    tensors = job.tensors()
    out: dict[str, float] = {"state_gib": sum(t.numel() * t.element_size() for t in tensors) / 2**30}
    if job.device.type == "cuda":
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for name, pairs in (("d2h_s", list(zip(pinned, tensors))), ("h2d_s", list(zip(tensors, pinned)))):
            best = float("inf")
            for _ in range(3):
                job.sync()
                t0 = time.perf_counter()
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                job.sync()
                best = min(best, time.perf_counter() - t0)
            out[name] = best
        out["memcpy_s"] = out["d2h_s"]
    else:
        warm = [torch.empty_like(t) for t in tensors]
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for dst, src in zip(warm, tensors):
                dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        out["memcpy_s"] = out["h2d_s"] = best
    return out


class Saver:
    """One way to checkpoint during the timed steps: ``save(i, loss)`` after step ``i``."""

    def __init__(self, name: str, save: Callable[[int, torch.Tensor], Any], every: int = 1) -> None:
        self.name, self._save, self.every, self.step = name, save, every, 0
        self.times: list[float] = []  # seconds per step, one per round
        self.blocked: list[float] = []  # host seconds per save call

    def run(self, job: Job, n: int) -> None:
        def after(i: int, loss: torch.Tensor) -> None:
            self.step += 1
            if self.step % self.every == 0:
                self._save(self.step, loss)

        mean, blocked = timed_steps(job, n, after)
        self.times.append(mean)
        self.blocked += blocked[self.every - 1 :: self.every] if self.every > 1 else blocked


def hpresil_saver(job: Job, root: str, services: bool, overlap: bool, every: int, out: dict[str, float]) -> tuple[Saver, Any]:
    """A warmed Checkpointer (every slot prepared and used); a new job's first saves go into ``out``."""
    shm = tempfile.mkdtemp(dir=root, prefix="ram-")
    # The comparison runs keep 2 slots: host memory is 7 x the state, not 9 x.
    slots = 3 if overlap and every == 1 else 2
    ckpt = Checkpointer(state=job.state, shm_dir=shm, run_services=services,
                        config=CheckpointConfig(durable_every=0, overlap=overlap, every=every, slots=slots))
    ckpt.restore()  # nothing there yet: starts preparing the arena
    saver = Saver(("hpresil" if overlap else "blocking") + f"_every{every}", lambda i, loss: ckpt.save(i, loss=loss), every)
    if overlap and every == 1:  # a new job: the first three saves, whatever the arena's state
        _, first = timed_steps(job, 3, lambda i, loss: ckpt.save(i, loss=loss))
        out["first_saves_s"] = max(first)
    deadline = time.monotonic() + 120
    while len(scan(shm, [0])) < slots and time.monotonic() < deadline:  # steady state: every slot prepared and used
        saver.step += every
        job.step()
        ckpt.save(saver.step)
        ckpt.wait()
    return saver, ckpt


def restores(job: Job, ckpt: Checkpointer, out: dict[str, float]) -> None:
    """Restore from RAM into the live tensors, and the first saves of the restarted job."""
    shm, step = ckpt.shm_dir, max(i.record.step for i in scan(ckpt.shm_dir, [0]))
    ckpt.wait()
    ckpt.close(keep_ram=True)
    for verify in (True, False):
        again = Checkpointer(state=job.state, shm_dir=shm, durable_every=0, run_services=False, verify_on_restore=verify)
        job.sync()
        t0 = time.perf_counter()
        got = again.restore()
        job.sync()
        out["restore_s" if verify else "restore_noverify_s"] = time.perf_counter() - t0
        assert got > 0, "nothing restored"
        if verify:  # the restart: the same RAM tier, a new Checkpointer that maps and pins it again
            _, restart = timed_steps(job, 3, lambda i, loss: again.save(step + i, loss=loss))
            out["restart_saves_s"] = max(restart)
            again.wait()
        again.close(keep_ram=True)


def dcp_saver(job: Job, root: str, every: int) -> tuple[Saver, Callable[[], None]]:
    """DCP async_save with DefaultStager, staging waited for before optimizer.step (torchtitan)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = job.device.type == "cuda"
    stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=cuda))
    pending: dict[str, Any] = {}

    def before_step(*_: Any) -> None:  # the staging must finish before the weights change
        staging = pending.pop("staging", None)
        if staging is not None:
            staging.result()

    hook = job.opt.register_step_pre_hook(before_step)
    target = tempfile.mkdtemp(dir=root, prefix="dcp-")

    def save(i: int, loss: torch.Tensor) -> None:
        upload = pending.pop("upload", None)
        if upload is not None:
            upload.result()  # one save in flight at a time
        sd = {"model": job.model.state_dict(), "optim": job.opt.state_dict()}
        resp = dcp.async_save(sd, checkpoint_id=os.path.join(target, f"step{i % 2}"), async_stager=stager, no_dist=True)
        pending["staging"], pending["upload"] = resp.staging_completion, resp.upload_completion

    def close() -> None:
        if "upload" in pending:
            pending.pop("upload").result()
        hook.remove()
        stager.close()

    saver = Saver(f"dcp_every{every}", save, every)
    saver.run(job, 2 * every)  # warm: the stager's buffers
    saver.times.clear()
    saver.blocked.clear()
    return saver, close


def torch_save(job: Job, root: str) -> float:
    path = os.path.join(root, "torch_save.pt")
    t0 = time.perf_counter()
    torch.save({"model": job.model.state_dict(), "optim": job.opt.state_dict()}, path)
    took = time.perf_counter() - t0
    os.unlink(path)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--layers", type=int, default=None, help="Linear layers (default: 16 on CUDA, 8 on CPU)")
    p.add_argument("--width", type=int, default=None, help="features per layer (default: 4096 on CUDA, 2048 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="input rows (default: 16384 on CUDA, 256 on CPU)")
    p.add_argument("--steps", type=int, default=24, help="timed steps per configuration, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the configurations")
    p.add_argument("--services", choices=("on", "off"), default="on", help="seal in-process (as outside hpresil-run)")
    p.add_argument("--dir", default="/dev/shm", help="where DCP and torch.save write, and the RAM tier lives")
    p.add_argument("--no-dcp", action="store_true", help="skip the DCP and torch.save baselines")
    args = p.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    args.layers = args.layers or (16 if cuda else 8)
    args.width = args.width or (4096 if cuda else 2048)
    args.batch = args.batch or (16384 if cuda else 256)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    job = Job(args, device)
    for _ in range(3):
        job.step()  # the optimizer state exists from here on
    root = tempfile.mkdtemp(dir=args.dir, prefix="hpresil-bench-")
    args.dir = root
    try:
        r: dict[str, float] = floors(job)
        services = args.services == "on"
        base = Saver("none", lambda i, loss: None)
        savers = [base]
        closers: list[Callable[[], None]] = []
        for overlap, every in ((True, 1), (True, 10), (False, 1)):
            saver, ckpt = hpresil_saver(job, root, services, overlap, every, r)
            savers.append(saver)
            closers.append(ckpt.close)
            if overlap and every == 1:
                main_ckpt = ckpt
        if not args.no_dcp:
            for every in (1, 10):
                saver, close = dcp_saver(job, root, every)
                savers.append(saver)
                closers.append(close)
        # Interleaved rounds: a slow phase of the host affects every method alike.
        per_round = max(1, args.steps // args.rounds)
        for _ in range(args.rounds):
            for saver in savers:
                saver.run(job, per_round)
        for saver in savers:
            r[f"{saver.name}_step_s"] = statistics.median(saver.times)
            if saver.blocked and saver is not base:
                r[f"{saver.name}_save_s"] = statistics.median(saver.blocked)
        for close in closers[1:]:
            close()
        restores(job, main_ckpt, r)
        if not args.no_dcp:
            r["torch_save_s"] = torch_save(job, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"device={device.type} state_gib={r['state_gib']:.3f} layers={args.layers} width={args.width} batch={args.batch}")
    for key in sorted(k for k in r if k != "state_gib"):
        print(f"{key}={r[key]:.6f}")
    base = r["none_step_s"]
    print(f"step_ratio_every1={r['hpresil_every1_step_s'] / base:.3f}")
    print(f"step_ratio_every10={r['hpresil_every10_step_s'] / base:.3f}")
    print(f"step_ratio_blocking_every1={r['blocking_every1_step_s'] / base:.3f}")
    print(f"every1_vs_blocking_every1={r['hpresil_every1_step_s'] / r['blocking_every1_step_s']:.3f}")
    if "dcp_every1_step_s" in r:
        print(f"step_ratio_dcp_every1={r['dcp_every1_step_s'] / base:.3f}")
        print(f"step_ratio_dcp_every10={r['dcp_every10_step_s'] / base:.3f}")
        print(f"every1_vs_dcp_every1={r['hpresil_every1_step_s'] / r['dcp_every1_step_s']:.3f}")
        print(f"torch_save_vs_memcpy={r['torch_save_s'] / r['memcpy_s']:.3f}")
    print(f"restore_vs_h2d={r['restore_s'] / r['h2d_s']:.3f}")
    print(f"restore_noverify_vs_h2d={r['restore_noverify_s'] / r['h2d_s']:.3f}")
    steady = max(r["hpresil_every1_save_s"], 1e-9)
    print(f"first_save_vs_steady={r['first_saves_s'] / steady:.3f}")
    print(f"restart_save_vs_steady={r['restart_saves_s'] / steady:.3f}")
    print(f"save_blocking_vs_memcpy={r['hpresil_every1_save_s'] / r['memcpy_s']:.3f}")
    print(f"blocking_save_vs_memcpy={r['blocking_every1_save_s'] / r['memcpy_s']:.3f}")


if __name__ == "__main__":
    main()
