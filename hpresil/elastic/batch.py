"""Constant global batch across world sizes, through gradient accumulation.

``micro_batch x world_size x accum_steps = global_batch``: when the job
shrinks from 3 to 2 ranks, each rank runs more micro-batches per optimizer
step, so the optimizer sees the same batch size (and the same learning-rate
schedule stays valid).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence, TypeVar

from hpresil.errors import ConfigError

__all__ = ["BatchPlan", "plan_batch"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPlan:
    """How one optimizer step's global batch is split at a world size.

    Attributes:
        global_batch: samples per optimizer step over the whole job.
        world_size: ranks.
        micro_batch: samples per forward/backward on one rank.
        accum_steps: micro-batches per rank per optimizer step.
    """

    global_batch: int
    world_size: int
    micro_batch: int
    accum_steps: int

    @property
    def per_rank(self) -> int:
        """Samples per rank per optimizer step (``micro_batch x accum_steps``)."""
        return self.micro_batch * self.accum_steps

    @property
    def loss_scale(self) -> float:
        """Factor for each micro-batch's mean loss, so the accumulated gradient
        (averaged over ranks by DDP/FSDP) is the mean over the global batch."""
        return 1.0 / self.accum_steps

    def split(self, rank_share: Sequence[T]) -> list[list[T]]:
        """Splits a rank's share of the global batch into ``accum_steps`` micro-batches.

        Raises:
            ConfigError: the share does not have ``per_rank`` items.
        """
        if len(rank_share) != self.per_rank:
            raise ConfigError(f"a rank's share has {len(rank_share)} samples, the plan {self.per_rank} "
                              f"(= micro_batch {self.micro_batch} x accum_steps {self.accum_steps})")
        m = self.micro_batch
        return [list(rank_share[k * m:(k + 1) * m]) for k in range(self.accum_steps)]

    def micro_steps(self) -> Iterator[tuple[int, bool]]:
        """``(index, is_last)`` per micro-batch: skip the gradient all-reduce
        (``model.no_sync()``, FSDP2 ``set_requires_gradient_sync(False)``) unless last."""
        for k in range(self.accum_steps):
            yield k, k == self.accum_steps - 1


def plan_batch(
    global_batch: int, world_size: int, *, micro_batch: int | None = None, max_micro_batch: int | None = None
) -> BatchPlan:
    """The accumulation plan keeping ``global_batch`` constant at ``world_size``.

    Give ``micro_batch`` to fix the micro-batch size, or ``max_micro_batch`` to
    take the fewest accumulation steps whose micro-batch fits (neither: one
    micro-batch per rank).

    Raises:
        ConfigError: the sizes do not divide; the message gives the formula and values.
    """
    if global_batch <= 0 or world_size <= 0:
        raise ConfigError(f"global_batch={global_batch} and world_size={world_size} must be > 0")
    if micro_batch is not None and max_micro_batch is not None:
        raise ConfigError("pass micro_batch or max_micro_batch, not both")
    if global_batch % world_size:
        raise ConfigError(
            f"global_batch {global_batch} is not divisible by world_size {world_size} "
            f"(global_batch = micro_batch x world_size x accum_steps; {global_batch} % {world_size} = "
            f"{global_batch % world_size}); choose a global batch every allowed world size divides"
        )
    per_rank = global_batch // world_size
    if micro_batch is not None:
        if micro_batch <= 0 or per_rank % micro_batch:
            raise ConfigError(
                f"global_batch {global_batch} != micro_batch {micro_batch} x world_size {world_size} x accum_steps "
                f"for any integer accum_steps ({per_rank} samples per rank, {per_rank} % {micro_batch} = "
                f"{per_rank % micro_batch if micro_batch > 0 else 'n/a'})"
            )
        return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=micro_batch,
                         accum_steps=per_rank // micro_batch)
    if max_micro_batch is None:
        return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=per_rank, accum_steps=1)
    if max_micro_batch <= 0:
        raise ConfigError(f"max_micro_batch={max_micro_batch} must be > 0")
    for accum in range(1, per_rank + 1):
        if per_rank % accum == 0 and per_rank // accum <= max_micro_batch:
            return BatchPlan(global_batch=global_batch, world_size=world_size, micro_batch=per_rank // accum,
                             accum_steps=accum)
    raise AssertionError("unreachable: accum_steps = per_rank always fits")  # pragma: no cover
