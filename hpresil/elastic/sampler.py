"""A resumable sampler whose data order does not depend on the world size.

The order is one global sequence: epoch ``e`` is a permutation of
``range(num_samples)`` drawn from ``(seed, e)``, and the epochs follow each
other. The sampler's state is a single *global position* in that sequence
(samples consumed by the whole job), so a job that saved at world size 3 and
resumes at world size 2 continues exactly where the global order left off:
no sample is repeated or skipped.

Each global batch of ``global_batch`` positions is split into contiguous
shares, one per rank; :class:`~hpresil.elastic.batch.BatchPlan` splits a rank's
share into micro-batches for gradient accumulation.

Example::

    sampler = ElasticSampler(len(dataset), global_batch=512, seed=0)
    ckpt = hpresil.Checkpointer(state={"model": m, "optim": opt, "data": sampler})
    start = ckpt.restore()
    plan = plan_batch(512, world_size, max_micro_batch=16)
    for step in range(start, total):
        for micro in plan.split(sampler.next_batch(rank, world_size)):
            ...forward/backward on [dataset[i] for i in micro]...
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import Sampler

from hpresil.errors import ConfigError, StateMismatchError

__all__ = ["ElasticSampler", "epoch_permutation"]

log = logging.getLogger(__name__)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"hpresil-sampler:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(num_samples)``."""
    if not shuffle:
        return torch.arange(num_samples)
    gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(num_samples, generator=gen)


class ElasticSampler(Sampler[int]):
    """World-size-aware, resumable sampler (a stateful checkpoint entry).

    Args:
        num_samples: size of the dataset.
        global_batch: samples per optimizer step over the whole job.
        seed: seeds every epoch's permutation.
        shuffle: permute each epoch (else the identity order).

    Raises:
        ConfigError: ``num_samples`` or ``global_batch`` is not positive.
    """

    def __init__(self, num_samples: int, *, global_batch: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples <= 0:
            raise ConfigError(f"num_samples={num_samples} must be > 0")
        if global_batch <= 0:
            raise ConfigError(f"global_batch={global_batch} must be > 0")
        self.num_samples = int(num_samples)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        #: samples consumed by the whole job, over all epochs.
        self.position = 0
        #: the global batch of the last loaded checkpoint (``None`` before a load): a
        #: job whose default global batch depends on the world size keeps this one.
        self.restored_global_batch: int | None = None
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    # -- the global order ------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next sample belongs to."""
        return self.position // self.num_samples

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> list[int]:
        """Sample indices at global positions ``start .. start + count - 1`` (may span epochs)."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self._order(epoch)[offset:offset + take].tolist())
            pos += take
        return out

    # -- per rank ----------------------------------------------------------
    def share(self, world_size: int) -> int:
        """Samples of one global batch that each rank gets.

        Raises:
            ConfigError: ``global_batch`` is not a multiple of ``world_size``.
        """
        if world_size <= 0 or self.global_batch % world_size:
            raise ConfigError(
                f"global_batch={self.global_batch} is not divisible by world_size={world_size}: "
                f"{self.global_batch} % {world_size} = {self.global_batch % max(1, world_size)}; "
                "pick a global batch that every world size between MIN and MAX divides"
            )
        return self.global_batch // world_size

    def peek_batch(self, rank: int, world_size: int) -> list[int]:
        """This rank's share of the next global batch, without consuming it."""
        share = self.share(world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is outside world_size={world_size}")
        return self.global_indices(self.position + rank * share, share)

    def next_batch(self, rank: int, world_size: int) -> list[int]:
        """This rank's share of the next global batch; advances the global position
        by ``global_batch`` (every rank must call it once per step)."""
        out = self.peek_batch(rank, world_size)
        self.position += self.global_batch
        return out

    def __iter__(self) -> Iterator[int]:
        """This rank's indices for the rest of the current epoch's global batches
        (``torch.distributed`` rank and world size, else 0 and 1), starting at the
        current position. Iterating does not advance the position: call
        :meth:`advance` once per completed step (as :meth:`next_batch` does), so
        a data loader's prefetching never moves the saved position ahead of training."""
        rank, world_size = _dist_rank_world()
        share = self.share(world_size)
        pos = self.position
        end = (self.epoch + 1) * self.num_samples
        while pos < end:
            yield from self.global_indices(pos + rank * share, share)
            pos += self.global_batch

    def __len__(self) -> int:
        rank, world_size = _dist_rank_world()
        left = (self.epoch + 1) * self.num_samples - self.position
        return -(-left // self.global_batch) * self.share(world_size)

    def advance(self, steps: int = 1) -> None:
        """Marks ``steps`` global batches consumed."""
        self.position += steps * self.global_batch

    # -- checkpoint entry ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global position and what defines the order (the same on every rank)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Continues at the saved global position.

        Raises:
            StateMismatchError: the saved order (seed, dataset size, shuffle) differs.
        """
        for key in ("seed", "num_samples", "shuffle"):
            if key in sd and sd[key] != getattr(self, key):
                raise StateMismatchError(
                    f"sampler {key}: checkpoint has {sd[key]!r}, this run {getattr(self, key)!r}; "
                    "resume with the same data order or start a new run"
                )
        saved_batch = int(sd.get("global_batch", self.global_batch))
        self.restored_global_batch = saved_batch
        if saved_batch != self.global_batch:
            log.warning("sampler: global batch changed %d -> %d; continuing at position %d",
                        saved_batch, self.global_batch, int(sd["position"]))
        self.position = int(sd["position"])


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
