"""A DeepSpeed engine as an hpresil state mapping (see :mod:`.api` for the keys).

Every tensor handed to hpresil aliases the engine's live storage (fp32
partitions, Adam moments, module parameters), so a save copies them once into
the shared-memory arena and a restore writes them back in place. Plain values
(loss scale, counters, layout) are JSON; a value of another type is an error
naming it, never pickled.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from hpresil.errors import CheckpointError, ConfigError, ReshardError
from hpresil.integrations.deepspeed.api import (
    CLIENT,
    ENGINE,
    ENGINE_COUNTERS,
    MODULE,
    OPTIMIZER,
    SCHEDULER,
    WORLD_KEY,
    ZeroLayout,
)

__all__ = ["build_state", "zero_stage", "EngineCounters", "ZeroOptimizerState", "Zero3OptimizerState"]

log = logging.getLogger(__name__)

_PLAIN = (type(None), bool, int, float, str, torch.dtype)
_OPT_FLAGS = ("dynamic_loss_scale", "overflow", "clip_grad")


def _plain_fields(obj: Any, names: list[str] | None, where: str) -> dict[str, Any]:
    """``obj``'s attributes (all of ``vars(obj)`` when ``names`` is None) as
    JSON-storable values or tensors.

    Raises:
        CheckpointError: an attribute holds something else (named in the message).
    """
    items = vars(obj).items() if names is None else [(n, getattr(obj, n)) for n in names if hasattr(obj, n)]
    out: dict[str, Any] = {}
    for name, value in items:
        if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise CheckpointError(
                f"{where}.{name}: a {type(value).__qualname__}, which hpresil stores only as JSON or a tensor "
                "(never pickled); this DeepSpeed version added state the integration does not know, please report it"
            )
    return out


def _set_fields(obj: Any, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        setattr(obj, name, value)


class EngineCounters:
    """The engine's step counters (``global_steps`` drives DeepSpeed's own
    schedules, logging and ``save_checkpoint`` tags)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def state_dict(self) -> dict[str, int]:
        """The counters the engine has."""
        return {n: int(getattr(self.engine, n)) for n in ENGINE_COUNTERS if hasattr(self.engine, n)}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Puts the counters back."""
        for name, value in sd.items():
            if name in ENGINE_COUNTERS:
                setattr(self.engine, name, int(value))


class _ZeroState:
    """Common part of the ZeRO optimizer adapters: marker, layout, loss scale."""

    stage: int

    def __init__(self, opt: Any) -> None:
        import torch.distributed as dist

        self.opt = opt
        group = opt.dp_process_group
        self.layout = ZeroLayout(
            stage=self.stage,
            dp_world_size=dist.get_world_size(group=group),
            dp_rank=dist.get_rank(group=group),
            partition_numels=tuple(int(t.numel()) for t in self._fp32()),
        )
        # Its length is the data-parallel size: hpresil compares tensor shapes
        # before copying anything, so a snapshot cut for another size fails
        # there, on every rank, instead of reading partitions that do not fit.
        self.marker = torch.zeros(self.layout.dp_world_size, dtype=torch.uint8)

    def _fp32(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _base(self) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Live views of this rank's partition state (no copies)."""
        return {
            WORLD_KEY: self.marker,
            "layout": self.layout.to_json_obj(),
            "fp32_partitions": list(self._fp32()),
            "base": self._base(),
            "loss_scaler": {
                "fields": _plain_fields(self.opt.loss_scaler, None, "optimizer.loss_scaler"),
                "flags": _plain_fields(self.opt, list(_OPT_FLAGS), "optimizer"),
            },
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Checks the layout and puts the plain values back (the tensors were
        already restored in place by hpresil).

        Raises:
            ReshardError: the partitions were cut differently (another
                data-parallel size or ZeRO configuration).
        """
        try:
            saved = ZeroLayout.from_json_obj(sd["layout"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"optimizer.layout: not a ZeRO layout ({exc})") from exc
        diff = self.layout.differences(saved)
        if diff:
            raise ReshardError(
                "the snapshot's ZeRO partitions were cut differently: " + "; ".join(diff)
                + ". Restore with the ZeRO configuration and world size it was saved with"
            )
        scaler = sd["loss_scaler"]
        _set_fields(self.opt.loss_scaler, scaler["fields"])
        _set_fields(self.opt, scaler["flags"])
        self._after_load()

    def _after_load(self) -> None:
        pass


class ZeroOptimizerState(_ZeroState):
    """ZeRO stage 1/2 (``DeepSpeedZeroOptimizer``): the fp32 master partition
    of each group and the wrapped torch optimizer, whose parameters are those
    partitions. The bit16 parameters are the module's, saved under ``module``."""

    def __init__(self, opt: Any, stage: int) -> None:
        self.stage = stage
        super().__init__(opt)

    def _fp32(self) -> list[torch.Tensor]:
        return self.opt.single_partition_of_fp32_groups

    def _base(self) -> Any:
        # A torch optimizer: hpresil creates its state on restore if it has
        # none yet (DeepSpeed 1/2 create Adam moments on the first step).
        return self.opt.optimizer

    def _after_load(self) -> None:
        link = getattr(self.opt, "_link_all_hp_params", None)
        if callable(link):  # what DeepSpeed's own loader does after loading optimizer state
            link()


class _Stage3Base:
    """The torch optimizer wrapped by ZeRO-3, whose ``param_groups`` hold the
    fp32 partitions only while DeepSpeed steps or (de)serialises it."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        self.opt._set_fp32_optimizer_param_groups()
        try:
            return self.opt.optimizer.state_dict()
        finally:
            self.opt._clear_fp32_optimizer_param_groups()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.opt._set_fp32_optimizer_param_groups()
        try:
            self.opt.optimizer.load_state_dict(sd)
        finally:
            self.opt._clear_fp32_optimizer_param_groups()


class Zero3OptimizerState(_ZeroState):
    """ZeRO stage 3 (``DeepSpeedZeroOptimizer_Stage3``): fp32 partitions and the
    wrapped optimizer; the low-precision partitions (the parameters' ``ds_tensor``)
    are derived from the fp32 ones after a restore, as DeepSpeed's loader does.
    Persistent (small, always gathered) parameters must be gathered again
    afterwards: :meth:`gather_persistent`, a collective."""

    stage = 3

    def _fp32(self) -> list[torch.Tensor]:
        return self.opt.fp32_partitioned_groups_flat

    def _base(self) -> Any:
        return _Stage3Base(self.opt)

    def _after_load(self) -> None:
        opt = self.opt
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            lp = opt.fp16_partitioned_groups_flat[i]
            if fp32.numel():
                lp.data.copy_(fp32.data)
            for param, view in zip(opt.fp16_partitioned_groups[i], opt.unflatten(lp, opt.fp16_partitioned_groups[i])):
                param.data = view.data

    def gather_persistent(self) -> None:
        """Re-gathers the persistent parameters from the restored partitions (collective)."""
        self.opt.checkpoint_event_epilogue()


def zero_stage(engine: Any) -> int:
    """The engine's ZeRO stage (0 when ZeRO is off)."""
    return int(engine.zero_optimization_stage())


def _persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def build_state(engine: Any, client_state: Mapping[str, Any] | None) -> tuple[dict[str, Any], _ZeroState | None]:
    """The hpresil state of ``engine``, and its ZeRO adapter (``None`` at stage 0).

    Raises:
        ConfigError: an optimizer or offload mode this integration does not
            support (the message says which are).
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage = zero_stage(engine)
    opt = engine.optimizer
    zero: _ZeroState | None = None
    state: dict[str, Any] = {}
    if stage == 0:
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"ZeRO stage 0 with a {type(opt).__qualname__} optimizer is not supported: use ZeRO stage 1-3 "
                "for fp16/bf16 training, or fp32 with a torch optimizer"
            )
        state[MODULE] = engine.module
        state[OPTIMIZER] = opt
    elif stage in (1, 2):
        if not isinstance(opt, DeepSpeedZeroOptimizer):
            raise ConfigError(f"ZeRO stage {stage} engine with a {type(opt).__qualname__} optimizer: "
                              "only DeepSpeedZeroOptimizer is supported")
        zero = ZeroOptimizerState(opt, stage)
        state[MODULE] = engine.module
        state[OPTIMIZER] = zero
    elif stage == 3:
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

        if not isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            raise ConfigError(f"ZeRO-3 engine with a {type(opt).__qualname__} optimizer: "
                              "only DeepSpeedZeroOptimizer_Stage3 is supported")
        if getattr(opt, "swap_optimizer", False) or getattr(opt, "params_in_nvme_and_cpu", False):
            raise ConfigError("ZeRO-3 with NVMe offload (ZeRO-Infinity) is not supported: its state lives in swap "
                              "files; offload to \"cpu\" or none instead")
        zero = Zero3OptimizerState(opt)
        state[MODULE] = _persistent_buffers(engine.module)
        state[OPTIMIZER] = zero
    else:
        raise ConfigError(f"ZeRO stage {stage}: expected 0, 1, 2 or 3")
    if engine.lr_scheduler is not None:
        state[SCHEDULER] = engine.lr_scheduler
    state[ENGINE] = EngineCounters(engine)
    if client_state:
        state[CLIENT] = client_state
    return state, zero
