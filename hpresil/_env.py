"""Names of the environment variables ``hpresil-run`` sets for its workers.

Workers read these to find the node runtime's resources. Kept in one place so
the launcher and the library never disagree on a name.
"""

from __future__ import annotations

import os

__all__ = ["SHM_DIR", "LOG_DIR", "NODE_ID", "EVENTS_FILE", "RUN_ID", "ATTEMPT", "get"]

#: Shared-memory directory of this job on this node (RAM tier lives here).
SHM_DIR = "HPRESIL_SHM_DIR"
#: The job's log directory on this node (events, stack dumps, checkpoints default).
LOG_DIR = "HPRESIL_LOG_DIR"
#: Id of this node in events and in the shared-memory path.
NODE_ID = "HPRESIL_NODE_ID"
#: The node's ``events.jsonl``.
EVENTS_FILE = "HPRESIL_EVENTS_FILE"
#: The rendezvous run id.
RUN_ID = "HPRESIL_RUN_ID"
#: How many times this node's worker group has been (re)started, starting at 0.
ATTEMPT = "HPRESIL_ATTEMPT"


def get(name: str) -> str | None:
    """Returns the variable, or ``None`` when unset or empty."""
    value = os.environ.get(name)
    return value or None
