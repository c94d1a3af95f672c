"""Whether every node of a job writes to the same durable store.

A durable step commits only when one store holds every rank's marker (see
:mod:`~hpresil.checkpoint.durable.writer`). A URL that names a node-local
place (the default ``<log-dir>/checkpoints`` when each node has its own log
directory, a ``file://`` path on local disk) therefore never commits in a
multi-node job, and each drain says only ``committed: false``. The check here
finds that at start: rank 0 writes a marker, each node's first rank looks for
it in its own view of the store, and all ranks agree on one flag.
"""

from __future__ import annotations

import logging
from typing import Callable

from hpresil.checkpoint.durable.layout import META_DIR
from hpresil.checkpoint.durable.stores.api import DurableStore
from hpresil.errors import StorageError

__all__ = ["marker_path", "shared_by_all_nodes"]

log = logging.getLogger(__name__)


def marker_path(token: str) -> str:
    """Where rank 0 leaves the marker named ``token`` (no step directory: retention ignores it)."""
    return f"{META_DIR}/shared/{token}"


def shared_by_all_nodes(
    store: DurableStore | None,
    *,
    rank: int,
    node_leader: bool,
    token: str,
    any_rank: Callable[[bool], bool],
) -> bool:
    """Whether every node sees rank 0's marker in ``store``. Collective: every rank calls it.

    Args:
        store: this rank's durable store, ``None`` where it could not be opened
            (that rank then has nothing to compare).
        rank: this rank; rank 0 writes the marker and removes it afterwards.
        node_leader: this rank looks for the marker (the first rank of each node).
        token: a name all ranks agreed on (the restore's timeline id).
        any_rank: whether any rank passes ``True`` (an all-reduce; also the ordering
            point between rank 0's write and the others' look).
    """
    path = marker_path(token)
    wrote = False
    if rank == 0 and store is not None:
        try:
            store.write_bytes(path, b"hpresil: every node of the job must see this file\n")
            wrote = True
        except (StorageError, OSError) as exc:
            log.debug("cannot write the shared-store marker %s: %s", path, exc)
    if any_rank(rank == 0 and not wrote):
        return True  # nothing to compare against: the drain reports the store's own trouble
    missing = False
    if node_leader and rank != 0 and store is not None:
        try:
            missing = store.size(path) is None
        except (StorageError, OSError) as exc:
            log.debug("cannot look for the shared-store marker %s: %s", path, exc)
    shared = not any_rank(missing)
    if rank == 0 and store is not None:
        try:
            store.delete([path])
        except (StorageError, OSError) as exc:
            log.debug("cannot remove the shared-store marker %s: %s", path, exc)
    return shared
