"""What the Checkpointer adds to every checkpoint besides the user's state,
and the stateful helpers it offers: the hang watchdog's calibration, the
steps a spike rollback skips (:class:`~hpresil.checkpoint.rollback.SkipList`),
random number generator states, the default RAM tier directory and the
timeline id ranks agree on at each restore."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sys
from typing import Any, Mapping

import torch

from hpresil import _env
from hpresil.hang.heartbeat import get as heartbeat_get

__all__ = ["HANG_KEY", "SKIP_KEY", "HangCalibration", "RNGState", "agree_timeline", "default_shm_dir"]


def default_shm_dir() -> str:
    """Where snapshots go without ``hpresil-run``: one directory per job and host.

    The job is ``$TORCHELASTIC_RUN_ID`` (shared by the workers of one
    ``torchrun`` launch and kept across its restarts), else ``$HPRESIL_RUN_ID``,
    else a hash of the working directory and script, so rerunning the same
    script resumes from RAM.
    """
    run_id = _env.get("TORCHELASTIC_RUN_ID") or _env.get(_env.RUN_ID)
    if run_id is None:
        script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        run_id = "local-" + hashlib.sha1(f"{os.getcwd()}\0{script}".encode()).hexdigest()[:12]
    from hpresil.runtime.shm import safe_component

    return os.path.join("/dev/shm/hpresil", safe_component(run_id), safe_component(socket.gethostname()))


#: The state keys hpresil adds (optional on restore: snapshots without them still load).
HANG_KEY = "hpresil_hang"
SKIP_KEY = "hpresil_skip"


def agree_timeline() -> str:
    """A random id all ranks share from this restore on (rank 0's, broadcast as raw bytes)."""
    ident = torch.frombuffer(bytearray(os.urandom(16)), dtype=torch.uint8).clone()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.broadcast(ident, src=0)
    return bytes(ident.tolist()).hex()


class HangCalibration:
    """The hang watchdog's calibration (slowest step and checkpoint seen) as a
    stateful entry of every checkpoint."""

    def __init__(self) -> None:
        self._loaded: dict[str, float] | None = None

    def state_dict(self) -> dict[str, float]:
        hb = heartbeat_get()
        return hb.calibration() if hb is not None else {"step_max": 0.0, "ckpt_max": 0.0, "n_steps": 0.0}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self._loaded = {k: float(v) for k, v in sd.items()}

    def agree(self) -> None:
        """Seeds this worker's heartbeat with the maximum over all ranks (one tiny all-reduce)."""
        loaded = self._loaded
        hb = heartbeat_get()
        if loaded is None or hb is None:
            return
        values = torch.tensor([loaded.get("step_max", 0.0), loaded.get("ckpt_max", 0.0), loaded.get("n_steps", 0.0)],
                              dtype=torch.float64)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        hb.seed({"step_max": float(values[0]), "ckpt_max": float(values[1]), "n_steps": float(values[2])})


class RNGState:
    """Random number generator states (Python, torch CPU, CUDA) as a stateful
    object, so ``state={"rng": RNGState()}`` saves them on every save and puts
    them back on restore. Stored as plain per-rank values (never replicated)."""

    def state_dict(self) -> dict[str, Any]:
        """The current generator states."""
        sd: dict[str, Any] = {"python": random.getstate(), "torch": bytes(torch.get_rng_state().numpy())}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            sd["cuda"] = [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()]
        return sd

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restores the generator states."""
        random.setstate(sd["python"])
        torch.set_rng_state(torch.frombuffer(bytearray(sd["torch"]), dtype=torch.uint8))
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in sd["cuda"]])
