"""Overlapped snapshots: which tensors a snapshot's copy may still be reading
while training goes on, and the wait right before they change.

``save(step)`` copies the state in two parts. Tensors that only an optimizer
step modifies — the parameters and the state of every ``torch.optim.Optimizer``
found in the checkpointed state, plus tensors an integration names (DeepSpeed:
the engine's module parameters) — are *guarded*: their copy is enqueued on a
side CUDA stream (CPU tensors: on a background thread) and ``save`` returns,
so the copy overlaps the next forward and backward. A step pre-hook on each of
those optimizers makes the optimizer's step wait for the copy: on the GPU a
stream wait (``wait_event``, never a host synchronize), on the CPU a join of
the copy thread. Every other tensor — module buffers that forward may update
(BatchNorm statistics), a loss scaler's scale, tensors the user holds — is
copied before ``save`` returns (on CUDA: the current stream waits on the GPU
for that first part only).

The rule a training loop must keep: between ``save`` and the next optimizer
step, nothing but that optimizer step modifies parameters or optimizer state
in place (a weight clamp belongs after ``optimizer.step()``, not before it).
A state whose optimizer is not in the checkpointed state has nothing guarded
and keeps today's ordering: everything is copied before ``save`` returns.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from hpresil.checkpoint.flatten import Leaf, _is_dtensor
from hpresil.checkpoint.ram.arena import ALIGN, align

__all__ = ["StepFence", "expected_state_bytes", "find_optimizers"]

log = logging.getLogger(__name__)


def find_optimizers(state: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` objects in ``state``'s values (walking
    nested mappings and lists, not state dicts)."""
    found: list[torch.optim.Optimizer] = []
    stack: list[Any] = list(state.values())
    while stack:
        value = stack.pop()
        if isinstance(value, torch.optim.Optimizer):
            if not any(value is o for o in found):
                found.append(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return found


#: Tensors per parameter that an optimizer's first step creates, by class name
#: (the optimizers torch ships): what the RAM arena is prepared for before then.
_STATE_TENSORS = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adadelta": 2, "Adagrad": 1,
                  "RMSprop": 1, "SGD": 1, "ASGD": 2, "Rprop": 2}


def expected_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes the first step of each optimizer without state yet will add to
    the arena (its per-parameter tensors, aligned as the layout aligns them;
    0 for an unknown optimizer), so the arena can be prepared for them before
    that step."""
    total = 0
    for opt in optimizers:
        per = _STATE_TENSORS.get(type(opt).__name__, 0)
        if opt.state or not per:
            continue
        for group in opt.param_groups:
            if type(opt).__name__ == "SGD" and not group.get("momentum"):
                continue
            per_group = per + (1 if group.get("amsgrad") else 0)
            for p in group["params"]:
                local = p.to_local() if _is_dtensor(p) else p
                total += per_group * align(local.numel() * local.element_size()) + ALIGN  # + its step scalar
    return total


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (0 for an empty one)."""
    if _is_dtensor(t):
        t = t.to_local()
    try:
        return t.untyped_storage().data_ptr() if t.numel() else 0
    except RuntimeError:  # a tensor without storage (meta, functional wrappers)
        return 0


class StepFence:
    """Step pre-hooks that wait for the snapshot copy in flight.

    Args:
        wait: makes the caller's stream (or thread) wait for the copy in flight
            (:meth:`hpresil.checkpoint.ram.writer.RamWriter.fence`).
    """

    def __init__(self, wait: Callable[[], None]) -> None:
        self._wait = wait
        self._optimizers: list[tuple[torch.optim.Optimizer, list[torch.Tensor]]] = []
        self._handles: list[Any] = []

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose step waits for the copy."""
        return [opt for opt, _ in self._optimizers]

    def attach(self, optimizer: torch.optim.Optimizer, extra: Iterable[torch.Tensor] = ()) -> None:
        """Makes ``optimizer.step`` wait for the copy in flight, and lets the
        copy of its parameters, its state and ``extra`` (tensors that change
        only after that step begins) overlap training."""
        for i, (opt, tensors) in enumerate(self._optimizers):
            if opt is optimizer:
                self._optimizers[i] = (opt, [*tensors, *extra])
                return
        if not hasattr(optimizer, "register_step_pre_hook"):
            log.warning("%s has no step pre-hooks: its tensors are copied before save returns", type(optimizer).__qualname__)
            return
        self._handles.append(optimizer.register_step_pre_hook(self._hook))
        self._optimizers.append((optimizer, list(extra)))

    def _hook(self, *_: Any) -> None:
        self._wait()

    def guarded(self, leaves: Sequence[Leaf]) -> list[bool] | None:
        """Per tensor leaf (in order): whether an attached optimizer's step
        guards it; ``None`` when nothing is attached."""
        if not self._optimizers:
            return None
        ptrs: set[int] = set()
        for opt, extra in self._optimizers:
            for group in opt.param_groups:
                ptrs.update(_storage(p) for p in group["params"])
            for per_param in opt.state.values():
                if isinstance(per_param, Mapping):
                    ptrs.update(_storage(v) for v in per_param.values() if isinstance(v, torch.Tensor))
            ptrs.update(_storage(t) for t in extra)
        ptrs.discard(0)
        return [_storage(l.value) in ptrs for l in leaves if isinstance(l.value, torch.Tensor)]

    def close(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizers = [], []
