"""State → flat leaves and back.

The user's ``state`` is a mapping whose values may be tensors, nested
mappings/lists, plain Python values, or *stateful* objects (anything with
``state_dict()`` and ``load_state_dict()``: modules, optimizers, schedulers,
data loaders). Flattening follows DCP (``torch.distributed.checkpoint``):
stateful objects are replaced by their ``state_dict()``, mappings are walked,
lists are walked only when they contain tensors or mappings, everything else
is a leaf, and a leaf's key is its path joined with ``.``
(``optim.state.0.exp_avg``). Keeping DCP's keys lets the durable tier write
checkpoints that ``torch.distributed.checkpoint.load`` reads directly.

A tensor leaf is the rank's *local* data: a DTensor contributes its local
shard plus its global shape and offset, so a restore at another world size
can reshard. Plain values are stored as JSON through a small codec (tuples,
bytes, sets and non-string dict keys are tagged objects) and never pickled.
"""

from __future__ import annotations

import base64
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import torch

from hpresil.errors import CheckpointError, IntegrityError, StateMismatchError

#: Keys hpresil adds to the state itself (the hang calibration, the steps a
#: spike rollback skips); snapshots written without them (older versions, raw
#: RamWriter) still restore.
OPTIONAL_PREFIXES = ("hpresil_hang.", "hpresil_skip.")

__all__ = [
    "Leaf",
    "FlatState",
    "flatten",
    "is_stateful",
    "encode_json",
    "decode_json",
    "dtype_name",
    "dtype_from_name",
    "init_optimizer_state",
    "prepare",
    "apply_loaded",
]

def _is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor, without importing torch.distributed.tensor
    (seconds of start-up) when nothing created one: a DTensor can only exist if
    its module was imported."""
    # Another thread (the drainer's warm-up) may be importing it right now: a
    # module without its class yet cannot have made a DTensor either.
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(value, cls)



Path = tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class Leaf:
    """One leaf of the flattened state.

    Attributes:
        key: the DCP key (path joined with ``.``).
        path: the path with its original key types.
        value: the local ``torch.Tensor`` (detached, may alias live state), or
            the plain Python value.
        parent: the container holding the leaf (to put restored values back).
        slot: the leaf's key or index in ``parent``.
        dtensor: the DTensor the local tensor belongs to, if any.
        global_shape: shape of the whole tensor.
        global_offset: where ``value`` starts in the whole tensor.
        replicated: every rank holds the whole tensor.
    """

    key: str
    path: Path
    value: Any
    parent: Any
    slot: Any
    dtensor: Any = None
    global_shape: tuple[int, ...] = ()
    global_offset: tuple[int, ...] = ()
    replicated: bool = True

    @property
    def is_tensor(self) -> bool:
        """True for tensor leaves."""
        return isinstance(self.value, torch.Tensor)


@dataclasses.dataclass(slots=True)
class FlatState:
    """The flattened state and what is needed to put values back.

    Attributes:
        leaves: every leaf, in traversal order.
        containers: every walked container by path (a stateful object's path
            maps to its ``state_dict()``), so entries absent from the state can
            be inserted (see :meth:`insert`).
        statefuls: ``(path, object, {"sd": its state dict})`` in post-order,
            so nested objects are loaded before the objects that contain them.
    """

    leaves: list[Leaf]
    containers: dict[Path, Any]
    statefuls: list[tuple[Path, Any, Any]]

    def by_key(self) -> dict[str, Leaf]:
        """The leaves indexed by key."""
        return {leaf.key: leaf for leaf in self.leaves}

    def insert(self, path: Path, value: Any) -> None:
        """Puts ``value`` at ``path``, creating missing mappings on the way
        (an optimizer's ``state[0]`` before its first step).

        Raises:
            CheckpointError: no walked container is a prefix of ``path``.
        """
        for cut in range(len(path) - 1, 0, -1):
            node = self.containers.get(path[:cut])
            if node is not None:
                break
        else:
            raise CheckpointError(f"{'.'.join(map(str, path))}: no container in the state to restore it into")
        for part in path[cut:-1]:
            child = _get(node, part)
            if child is None:
                child = {}
                _set(node, part, child)
            node = child
        _set(node, path[-1], value)


def _get(node: Any, part: Any) -> Any:
    if isinstance(node, list):
        return node[part] if isinstance(part, int) and part < len(node) else None
    return node.get(part)


def _set(node: Any, part: Any, value: Any) -> None:
    if isinstance(node, list) and part == len(node):
        node.append(value)
    else:
        node[part] = value


def is_stateful(obj: Any) -> bool:
    """True when ``obj`` has callable ``state_dict`` and ``load_state_dict``."""
    return (
        not isinstance(obj, torch.Tensor)
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


def _is_terminal(value: Any) -> bool:
    # DCP's rule: a list is walked when it holds tensors or walkable containers.
    if isinstance(value, Mapping) or is_stateful(value):
        return False
    if not isinstance(value, list):
        return True
    for item in value:
        if isinstance(item, torch.Tensor) or is_stateful(item):
            return False
        if isinstance(item, (Mapping, list)) and not _is_terminal(item):
            return False
    return True


def flatten(state: Mapping[str, Any]) -> FlatState:
    """Flattens ``state``, calling ``state_dict()`` on stateful objects.

    Args:
        state: the user's state mapping (string keys at the top level).

    Returns:
        The leaves, the walked containers and the stateful objects.

    Raises:
        CheckpointError: a key contains ``.``-ambiguous types, a tuple holds
            tensors, or a DTensor has a ``Partial`` placement.
    """
    leaves: list[Leaf] = []
    statefuls: list[tuple[Path, Any, Any]] = []
    containers: dict[Path, Any] = {(): state}

    def walk(path: Path, value: Any, parent: Any, slot: Any) -> None:
        # The user's containers are never replaced: a stateful object's state
        # dict is walked in place of the object, and restored plain values are
        # written back into whichever container (user's or state dict) held them.
        if is_stateful(value):
            # The holder lets a restore replace a state dict that is itself a leaf.
            holder = {"sd": value.state_dict()}
            walk(path, holder["sd"], holder, "sd")
            statefuls.append((path, value, holder))
            return
        if isinstance(value, Mapping):
            containers[path] = value
            for k, v in list(value.items()):
                walk(path + (k,), v, value, k)
            return
        if not _is_terminal(value):
            containers[path] = value
            for i, v in enumerate(value):
                walk(path + (i,), v, value, i)
            return
        key = ".".join(str(p) for p in path)
        if isinstance(value, torch.Tensor):
            leaves.append(_tensor_leaf(key, path, value, parent, slot))
        elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
            raise CheckpointError(f"{key}: a tuple holding tensors cannot be checkpointed; use a list")
        else:
            leaves.append(Leaf(key=key, path=path, value=value, parent=parent, slot=slot))

    for top, value in state.items():
        if not isinstance(top, str):
            raise CheckpointError(f"state key {top!r} must be a string")
        walk((top,), value, state, top)
    return FlatState(leaves=leaves, containers=containers, statefuls=statefuls)


def _tensor_leaf(key: str, path: Path, value: torch.Tensor, parent: Any, slot: Any) -> Leaf:
    if _is_dtensor(value):
        if any(p.is_partial() for p in value.placements):
            raise CheckpointError(f"{key}: DTensor with a Partial placement; redistribute it to Shard/Replicate first")
        local = value.to_local().detach()
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        if tuple(local.shape) != tuple(shape):
            raise CheckpointError(f"{key}: local shard shape {tuple(local.shape)} != DTensor layout {tuple(shape)}")
        return Leaf(
            key=key,
            path=path,
            value=local,
            parent=parent,
            slot=slot,
            dtensor=value,
            global_shape=tuple(value.shape),
            global_offset=tuple(offset),
            replicated=all(p.is_replicate() for p in value.placements),
        )
    local = value.detach()
    return Leaf(
        key=key,
        path=path,
        value=local,
        parent=parent,
        slot=slot,
        global_shape=tuple(local.shape),
        global_offset=(0,) * local.dim(),
    )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``.

    Raises:
        IntegrityError: not a torch dtype (a damaged or foreign layout).
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise IntegrityError(f"unknown dtype {name!r} in the snapshot's layout")
    return dtype


# JSON codec. Tags are single-key objects; a real dict that looks like a tag
# (or has non-string keys) is stored as an item list so decoding is unambiguous.
_TUPLE, _BYTES, _SET, _DICT, _DTYPE = "__tuple__", "__bytes__", "__set__", "__dict__", "__dtype__"
_TAGS = frozenset({_TUPLE, _BYTES, _SET, _DICT, _DTYPE})


def encode_json(value: Any, key: str = "") -> Any:
    """Encodes a plain Python value as JSON-compatible data.

    Raises:
        CheckpointError: the value (or something inside it) has a type that
            cannot be stored without pickle; the message names the key.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [encode_json(v, key) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [encode_json(v, key) for v in value]}
    if isinstance(value, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (set, frozenset)):
        return {_SET: [encode_json(v, key) for v in value]}
    if isinstance(value, torch.dtype):
        return {_DTYPE: dtype_name(value)}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS):
            return {k: encode_json(v, key) for k, v in value.items()}
        return {_DICT: [[encode_json(k, key), encode_json(v, key)] for k, v in value.items()]}
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return encode_json(item(), key)
    raise CheckpointError(
        f"{key or 'state'}: cannot store a {type(value).__qualname__} without pickle; "
        "convert it to JSON types, a tensor, or an object with state_dict()/load_state_dict()"
    )


def decode_json(data: Any) -> Any:
    """Inverse of :func:`encode_json`."""
    if isinstance(data, list):
        return [decode_json(v) for v in data]
    if isinstance(data, dict):
        if len(data) == 1:
            tag, inner = next(iter(data.items()))
            if tag == _TUPLE:
                return tuple(decode_json(v) for v in inner)
            if tag == _BYTES:
                return base64.b64decode(inner)
            if tag == _SET:
                return {decode_json(v) for v in inner}
            if tag == _DTYPE:
                return dtype_from_name(inner)
            if tag == _DICT:
                return {_hashable(decode_json(k)): decode_json(v) for k, v in inner}
        return {k: decode_json(v) for k, v in data.items()}
    return data


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# -- back: matching a snapshot's layout to the state and loading it ---------


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _prefix(path: Path) -> str:
    return ".".join(str(p) for p in path) + "."


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Creates an optimizer's per-parameter state the way the optimizer itself
    would, by one ``step()`` with zero gradients and learning rate 0 (DCP's
    ``_init_optim_state`` does the same). The state then has the optimizer's
    own dtypes, devices and DTensor placements (FSDP2), ready to be filled in
    place. Parameters are unchanged bit for bit: every update is multiplied by
    the zero learning rate; gradients and learning rates are put back.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    lrs = [group.get("lr") for group in opt.param_groups]
    try:
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        opt.step()
    finally:
        for group, lr in zip(opt.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g


def prepare(
    state: Mapping[str, Any],
    meta: Any,
    records: Mapping[int, Any],
    *,
    same_world: bool,
    rank: int,
) -> tuple[FlatState, list[Any]]:
    """Flattens ``state`` for a restore from a snapshot with layout ``meta``
    (a :class:`~hpresil.checkpoint.api.CommitRecord`) and checks they match.

    Snapshot entries the state lacks are handled like this: an optimizer with
    no state yet (before its first step) gets its state created by
    :func:`init_optimizer_state` and is flattened again; remaining plain values
    and unsharded tensors are returned to be built from the snapshot and
    inserted at their path; anything else under a module, or a sharded tensor
    with no counterpart, is an unexpected key.

    Returns:
        The flattened state and the entries to build.

    Raises:
        StateMismatchError: missing or unexpected keys, or a tensor whose
            dtype or global shape differs; the message names each.
    """
    saved = {e.key: e for e in meta.entries}
    flat = flatten(state)
    extra = [k for k in saved if k not in flat.by_key()]
    if extra:
        grown = False
        for path, obj, _ in flat.statefuls:
            if isinstance(obj, torch.optim.Optimizer) and not obj.state:
                if any(k.startswith(_prefix(path) + "state.") for k in extra):
                    init_optimizer_state(obj)
                    grown = True
        if grown:
            flat = flatten(state)
            extra = [k for k in saved if k not in flat.by_key()]
    tmpl = flat.by_key()
    module_prefixes = [_prefix(p) for p, obj, _ in flat.statefuls if isinstance(obj, torch.nn.Module)]
    problems: list[str] = []
    missing = [k for k in tmpl if k not in saved and not k.startswith(OPTIONAL_PREFIXES)]
    if missing:
        problems.append(f"missing from the snapshot: {_names(missing)}")
    unexpected, build = [], []
    for key in extra:
        if key.startswith(OPTIONAL_PREFIXES) and key.split(".", 1)[0] not in state:
            continue  # hpresil's own entry, restored into a state without it (restore_state used directly)
        e = saved[key]
        sharded = e.kind == "tensor" and not e.replicated and e.shape != e.global_shape
        if e.path is None or sharded or any(key.startswith(p) for p in module_prefixes):
            unexpected.append(key)
        else:
            build.append(e)
    if unexpected:
        problems.append(f"unexpected in the snapshot (not in the state): {_names(unexpected)}")
    for key, leaf in tmpl.items():
        e = saved.get(key)
        if e is None:
            continue  # only optional keys get here: they keep their current value
        if leaf.is_tensor != (e.kind == "tensor"):
            problems.append(f"{key}: snapshot holds a {e.kind} value, the state a {'tensor' if leaf.is_tensor else 'plain value'}")
        elif leaf.is_tensor:
            want = (dtype_name(leaf.value.dtype), list(leaf.global_shape))
            if want != (e.dtype, e.global_shape):
                problems.append(f"{key}: snapshot has {e.dtype}{e.global_shape}, state has {want[0]}{want[1]}")
    if problems:
        raise StateMismatchError("; ".join(problems))
    return flat, build


def _is_fsdp_hook(hook: Any) -> bool:
    fn = getattr(hook, "hook", hook)
    return (getattr(fn, "__module__", "") or "").startswith("torch.distributed.fsdp._fully_shard")


def _restored_in_place(module: torch.nn.Module, leaves: list[Leaf]) -> bool:
    """True when filling ``leaves`` already updated ``module`` completely, so
    ``load_state_dict`` would only copy every byte a second time: every leaf is
    a tensor aliasing a parameter or buffer, and no submodule customises
    loading (FSDP2's own hooks only re-shard, which in-place copies satisfy)."""
    ptrs = set()
    for t in [*module.parameters(), *module.buffers()]:
        local = t.to_local() if _is_dtensor(t) else t
        ptrs.add(local.data_ptr())
    for leaf in leaves:
        if not leaf.is_tensor or (leaf.value.numel() and leaf.value.data_ptr() not in ptrs):
            return False
    for m in module.modules():
        if type(m)._load_from_state_dict is not torch.nn.Module._load_from_state_dict:
            return False
        hooks = [*m._load_state_dict_pre_hooks.values(), *m._load_state_dict_post_hooks.values()]
        if not all(_is_fsdp_hook(h) for h in hooks):
            return False
    return True


def apply_loaded(flat: FlatState, meta: Any, build: list[Any], built: Mapping[str, Any]) -> None:
    """Finishes a restore after the tensors were filled in place: writes the
    plain values, inserts the built entries, then calls ``load_state_dict`` on
    stateful objects (innermost first)."""
    saved = {e.key: e for e in meta.entries}
    for leaf in flat.leaves:
        if not leaf.is_tensor and leaf.key in saved:  # optional keys absent from the snapshot stay
            leaf.parent[leaf.slot] = decode_json(saved[leaf.key].value)
    for e in build:
        flat.insert(tuple(e.path), built[e.key])
    for path, obj, holder in flat.statefuls:
        if isinstance(obj, torch.nn.Module):
            mine = [leaf for leaf in flat.leaves if leaf.path[: len(path)] == path]
            if _restored_in_place(obj, mine):
                continue
        obj.load_state_dict(holder["sd"])
