"""The baseline without hpresil: plain ``torch.distributed.checkpoint`` to durable storage.

What a user has today with ``torchrun --max-restarts``: every ``every`` steps
all ranks ``dcp.save`` the model, the optimizer and the data position to
``<url>/step_<N>`` (DCP picks its fsspec writer for ``s3://``/``file://``
URLs), blocking training until the save is complete; at start the newest
*complete* checkpoint is loaded (DCP writes ``.metadata`` last, after every
rank's data, so a directory without it is a save that crashed). Rank 0 lists
the storage and broadcasts the step, so all ranks load the same one; after a
save it deletes all but the newest ``keep`` complete checkpoints.

Only tensors are saved: the optimizer's per-parameter state (``step``,
moments), not its ``param_groups``, which the script rebuilds from its
arguments (the learning rate is a pure function of the step). DCP would
pickle the non-tensor values and unpickle them at load, and nothing here
loads pickles from storage. ``train.py --dcp URL --dcp-every N`` uses this
instead of ``hpresil.Checkpointer``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)

PREFIX = "step_"


class DcpCheckpoint:
    """Periodic blocking ``dcp.save`` and resume from the newest complete checkpoint.

    Args:
        url: directory URL of the checkpoints (``s3://bucket/prefix``, ``file:///dir``).
        model: the unwrapped model (DDP's ``module``, or the FSDP2-sharded model).
        optim: its optimizer.
        sampler: an object with ``state_dict()``/``load_state_dict()`` holding ``position``
            and ``global_batch`` (``hpresil.elastic.ElasticSampler``).
        every: save after every ``every``-th step.
        keep: complete checkpoints kept (older ones are deleted by rank 0 after a save).
    """

    def __init__(self, url: str, *, model: nn.Module, optim: torch.optim.Optimizer, sampler: Any, every: int,
                 keep: int = 2) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"every={every} and keep={keep} must both be >= 1")
        self.url = url.rstrip("/")
        self.model, self.optim, self.sampler = model, optim, sampler
        self.every, self.keep = every, keep

    # -- storage -------------------------------------------------------------
    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        fs.invalidate_cache()  # s3fs caches listings; another process may have written since
        return fs, root.rstrip("/")

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint (``.metadata`` present), ascending.

        Raises:
            OSError: the storage cannot be listed (e.g. it is unreachable).
        """
        fs, root = self._fs()
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and fs.exists(f"{root}/{name}/.metadata"):
                steps.append(int(name[len(PREFIX):]))
        return sorted(steps)

    def path(self, step: int) -> str:
        """Checkpoint directory of ``step``."""
        return f"{self.url}/{PREFIX}{step:08d}"

    # -- state ---------------------------------------------------------------
    def _state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # get_state_dict initialises an empty optimizer state (a step at lr 0),
        # so a fresh process has tensors for dcp.load to fill in place.
        msd, osd = get_state_dict(self.model, self.optim)
        sd = self.sampler.state_dict()
        state = {
            "model": msd,
            "optim": osd["state"],
            "data": {"position": torch.tensor(int(sd["position"])), "global_batch": torch.tensor(int(sd["global_batch"]))},
        }
        return state, osd

    def restore(self) -> int:
        """Loads the newest complete checkpoint on every rank; returns its step (0 if none).

        Raises:
            OSError: the storage cannot be listed or read (rank 0 raises; the others then
                fail in the broadcast).
        """
        step = torch.zeros(1, dtype=torch.long)
        if dist.get_rank() == 0:
            steps = self.complete_steps()
            step[0] = steps[-1] if steps else 0
        dist.broadcast(step, 0)
        if int(step) == 0:
            return 0
        state, osd = self._state()
        dcp.load(state, checkpoint_id=self.path(int(step)))
        set_state_dict(self.model, self.optim, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": osd["param_groups"]})
        self.sampler.load_state_dict({"position": int(state["data"]["position"]),
                                      "global_batch": int(state["data"]["global_batch"])})
        return int(step)

    def save(self, step: int) -> float:
        """Saves after step ``step`` when it is due; returns the blocking seconds (0.0 when not due).

        Raises:
            Exception: whatever DCP or the storage raise (the job fails and torchrun restarts it).
        """
        if step % self.every:
            return 0.0
        t0 = time.perf_counter()
        state, _ = self._state()
        dcp.save(state, checkpoint_id=self.path(step))
        if dist.get_rank() == 0:
            self._prune()
        return time.perf_counter() - t0

    def _prune(self) -> None:
        fs, root = self._fs()
        for old in self.complete_steps()[: -self.keep]:
            fs.rm(f"{root}/{PREFIX}{old:08d}", recursive=True)
