"""Worker processes for tests.

``fork`` is unsafe once a process has started CUDA or autograd's device
threads ("Unable to handle autograd's threading in combination with
fork-based multiprocessing" on a CUDA host), so tests use the fork server:
torch and hpresil are imported once in the server, and each child forks from
that clean process and imports its target's module. A fork server child
inherits the server's environment, not the test's: :func:`process` hands the
test's current environment (``monkeypatch.setenv`` included) to the child.
"""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import BaseContext
from typing import Any, Callable, Sequence

__all__ = ["PROCS", "process"]

PROCS: BaseContext = multiprocessing.get_context("forkserver")
PROCS.set_forkserver_preload(["torch", "hpresil.checkpoint"])  # type: ignore[attr-defined]


def _run(env: dict[str, str], target: Callable[..., Any], args: Sequence[Any]) -> None:
    os.environ.clear()
    os.environ.update(env)
    target(*args)


def process(target: Callable[..., Any], args: Sequence[Any] = ()) -> Any:
    """A not yet started process running ``target(*args)`` in this test's environment."""
    return PROCS.Process(target=_run, args=(dict(os.environ), target, tuple(args)))
