"""The five-line API for DeepSpeed engines: :class:`DeepSpeedCheckpointer`."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any, Iterator, Mapping

import torch

from hpresil.checkpoint.api import CheckpointConfig
from hpresil.checkpoint.checkpointer import Checkpointer
from hpresil.checkpoint.rollback import RollbackPolicy
from hpresil.errors import ReshardError, StateMismatchError
from hpresil.events.api import EventSink
from hpresil.integrations.deepspeed.api import OPTIMIZER, WORLD_KEY
from hpresil.integrations.deepspeed.state import Zero3OptimizerState, build_state, zero_stage

__all__ = ["DeepSpeedCheckpointer"]

log = logging.getLogger(__name__)

_MARKER_MISMATCH = re.compile(re.escape(f"{OPTIMIZER}.{WORLD_KEY}") + r": snapshot has \w+\[(\d+)\]")


class DeepSpeedCheckpointer:
    """Tiered checkpointing (RAM -> peer -> durable) of a DeepSpeed engine.

    Example::

        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config="zero2.json")
        ckpt = DeepSpeedCheckpointer(engine, durable="s3://bucket/run1", every=1)
        start = ckpt.restore()
        for step in range(start, total):
            ...forward, engine.backward(loss), engine.step()...
            ckpt.save(step + 1)
        ckpt.close()

    It replaces ``engine.save_checkpoint``/``engine.load_checkpoint``: the
    engine's module (stages 0-2), ZeRO partitions, wrapped optimizer, loss
    scaler, LR scheduler, step counters and ``client_state`` are saved by a
    copy into shared memory; see :mod:`hpresil.integrations.deepspeed.api` for
    the keys and what restores at another world size.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` (after ``deepspeed.initialize``).
        client_state: extra state saved and restored with the engine (values as
            for :class:`hpresil.Checkpointer`: tensors, JSON data, objects with
            ``state_dict()``/``load_state_dict()``); restored in place.
        durable, every, durable_every, keep, slots, verify_on_restore, config,
            shm_dir, run_services, events, rollback: as for :class:`hpresil.Checkpointer`.

    Raises:
        ConfigError: an unsupported optimizer or offload mode, or an invalid setting.
        StorageError: the durable store cannot be reached.
    """

    def __init__(
        self,
        engine: Any,
        *,
        client_state: Mapping[str, Any] | None = None,
        durable: str | None = None,
        every: int = 1,
        durable_every: int = 50,
        keep: int = 3,
        slots: int = 3,
        verify_on_restore: bool = True,
        config: CheckpointConfig | None = None,
        shm_dir: str | None = None,
        run_services: bool | None = None,
        events: EventSink | None = None,
        rollback: RollbackPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.stage = zero_stage(engine)
        self.state, self._zero = build_state(engine, client_state)
        self.checkpointer = Checkpointer(
            self.state, durable=durable, every=every, durable_every=durable_every, keep=keep, slots=slots,
            verify_on_restore=verify_on_restore, config=config, shm_dir=shm_dir, run_services=run_services,
            events=events, rollback=rollback,
        )
        inner = getattr(engine.optimizer, "optimizer", None)
        if self._zero is not None and isinstance(inner, torch.optim.Optimizer) and self.checkpointer.config.overlap:
            # engine.step() changes the module's parameters and the ZeRO partitions only
            # once the wrapped optimizer's step began: their snapshot copy may overlap the
            # next forward and backward (hpresil.checkpoint.fence).
            self.checkpointer.fence.attach(inner, extra=list(engine.module.parameters()))
        if isinstance(self._zero, Zero3OptimizerState):  # after every restore, a rollback's too
            self.checkpointer.on_restored = lambda step: self._zero.gather_persistent()  # type: ignore[union-attr]

    def save(self, step: int, *, loss: Any = None) -> bool:
        """Snapshots the engine as of ``step`` (after ``engine.step()``); a no-op
        unless ``step % every == 0``. Must be called on every rank.

        Args:
            loss: this step's loss, for the health checks (see :meth:`hpresil.Checkpointer.save`).

        Returns:
            Whether a snapshot was taken.

        Raises:
            CheckpointError: a state value cannot be stored (the message names it).
            UnhealthyStateError: the state went bad and the policy says stop.
        """
        return self.checkpointer.save(step, loss=loss)

    def steps(self, start: int, stop: int) -> Iterator[int]:
        """The loop's steps, rewound by a rollback (see :meth:`hpresil.Checkpointer.steps`)."""
        return self.checkpointer.steps(start, stop)

    def rollback(self, before: int | None = None) -> int:
        """Restores the newest healthy snapshot older than ``before`` (see
        :meth:`hpresil.Checkpointer.rollback`). Collective."""
        return self.checkpointer.rollback(before)

    def restore(self) -> int:
        """Restores the engine in place from the newest snapshot every rank can
        load and returns its step (0: none, the engine is untouched).

        Collective: every rank must call it, after ``deepspeed.initialize``.

        Raises:
            ReshardError: the newest snapshot was saved at another data-parallel
                size and holds ZeRO partitions, which cannot be re-cut here.
            StateMismatchError: the snapshot does not fit the engine (another
                model, ZeRO stage or client state; names the keys).
            CheckpointError: restoring failed on some rank.
        """
        try:
            step = self.checkpointer.restore()
        except StateMismatchError as exc:
            if self._zero is None or f"{OPTIMIZER}.{WORLD_KEY}" not in str(exc):
                raise
            raise self._reshard_error(str(exc)) from exc
        return step

    def _reshard_error(self, message: str) -> ReshardError:
        found = _MARKER_MISMATCH.search(message)
        saved = found.group(1) if found else "the saved one"
        now = self._zero.layout.dp_world_size if self._zero is not None else "?"
        return ReshardError(
            f"the newest checkpoint holds ZeRO-{self.stage} partitions cut for data-parallel size {saved}; this job "
            f"has {now}, and DeepSpeed cannot re-partition ZeRO state in place. Fix: restart with world size {saved} "
            "(--nnodes x --nproc-per-node; a fixed --nnodes N:N keeps elastic restarts at that size), or convert "
            "offline: restore at that size, engine.save_checkpoint(dir), python -m deepspeed.checkpoint.ds_to_universal, "
            "then load it with the config's checkpoint.load_universal=true"
        )

    def wait(self, timeout: timedelta = timedelta(seconds=60)) -> None:
        """Waits until the snapshots taken so far are committed and sealed."""
        self.checkpointer.wait(timeout)

    def close(self, *, keep_ram: bool | None = None) -> None:
        """Finishes background work (pending durable uploads) and releases the RAM tier."""
        self.checkpointer.close(keep_ram=keep_ram)

    def __enter__(self) -> "DeepSpeedCheckpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
