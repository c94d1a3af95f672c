"""Contract of the DeepSpeed integration.

:class:`~hpresil.integrations.deepspeed.DeepSpeedCheckpointer` saves a
``deepspeed.DeepSpeedEngine`` through :class:`hpresil.Checkpointer`: the
engine's state becomes an ordinary hpresil state mapping whose tensors alias
the engine's live tensors, so ``save(step)`` is the same memcpy into the
shared-memory arena as for plain PyTorch state (no ``torch.save``, no pickle)
and ``restore()`` copies the bytes back in place.

Snapshot keys (DCP-style, nested mappings joined with ``.``), per ZeRO stage:

===========================  =========================================================
key                          what
===========================  =========================================================
``module.*``                 stages 0-2: ``engine.module.state_dict()`` (replicated:
                             the durable tier writes one copy); stage 3: persistent
                             buffers only (parameters live in the partitions)
``optimizer.*``              stage 0: the torch optimizer's ``state_dict()``
``optimizer.fp32_partitions``  stages 1-3: this rank's fp32 master partition per group
``optimizer.base.*``         stages 1-3: the wrapped torch optimizer (Adam moments of
                             the partition, hyper-parameters as JSON)
``optimizer.dp_world_size``  stages 1-3: a ``uint8`` marker of length = data-parallel
                             size; a snapshot of another size fails before any byte
                             is copied (see below)
``optimizer.layout``         stages 1-3: :class:`ZeroLayout` as JSON
``optimizer.loss_scaler``    loss-scaler fields and ``dynamic_loss_scale``/``overflow``/
                             ``clip_grad`` (JSON)
``lr_scheduler.*``           ``engine.lr_scheduler.state_dict()`` when there is one
``engine.*``                 ``global_steps``, ``global_samples``, ``skipped_steps``,
                             ``micro_steps``
``client.*``                 the ``client_state`` mapping given to the checkpointer
===========================  =========================================================

Low-precision parameters are not stored for stages 1-3 where DeepSpeed derives
them from the fp32 masters (stage 3: ``lp = fp32`` cast, as DeepSpeed's own
loader does); for stages 1-2 the module's parameters are stored because they
are the replicated, portable part (and reading them back needs no collective).

World size. ZeRO-1/2/3 partitions are specific to the data-parallel size
they were cut for (flat buffers padded to a multiple of it); DeepSpeed itself
re-partitions only through its offline *universal checkpoint* conversion.
A restore that would read a snapshot saved at another world size raises
:class:`hpresil.errors.ReshardError` on every rank, naming both sizes and the
fix. ZeRO stage 0 (plain data parallel) state is replicated and restores at
any world size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ZeroLayout", "WORLD_KEY", "MODULE", "OPTIMIZER", "SCHEDULER", "ENGINE", "CLIENT", "ENGINE_COUNTERS"]

MODULE = "module"
OPTIMIZER = "optimizer"
SCHEDULER = "lr_scheduler"
ENGINE = "engine"
CLIENT = "client"
#: Key (under ``optimizer``) of the data-parallel size marker tensor.
WORLD_KEY = "dp_world_size"
#: Engine attributes saved under ``engine.*``.
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class ZeroLayout:
    """How a ZeRO optimizer cut its flat parameter groups on this rank.

    Attributes:
        stage: ZeRO stage (1, 2 or 3).
        dp_world_size: data-parallel size the partitions were cut for.
        dp_rank: this rank's index in the data-parallel group.
        partition_numels: elements of this rank's fp32 partition, per group.
    """

    stage: int
    dp_world_size: int
    dp_rank: int
    partition_numels: tuple[int, ...]

    def to_json_obj(self) -> dict[str, Any]:
        """The layout as JSON data."""
        return {"stage": self.stage, "dp_world_size": self.dp_world_size, "dp_rank": self.dp_rank,
                "partition_numels": list(self.partition_numels)}

    @classmethod
    def from_json_obj(cls, obj: Any) -> "ZeroLayout":
        """Parses :meth:`to_json_obj`'s output.

        Raises:
            KeyError, TypeError, ValueError: not a layout.
        """
        return cls(stage=int(obj["stage"]), dp_world_size=int(obj["dp_world_size"]), dp_rank=int(obj["dp_rank"]),
                   partition_numels=tuple(int(n) for n in obj["partition_numels"]))

    def differences(self, saved: "ZeroLayout") -> list[str]:
        """What differs between ``saved`` and this (current) layout, in words."""
        out = []
        for name in ("stage", "dp_world_size", "dp_rank", "partition_numels"):
            a, b = getattr(saved, name), getattr(self, name)
            if a != b:
                out.append(f"{name}: saved {a}, engine {b}")
        return out
