"""Warm worker starts: workers forked from a process that already imported torch.

torchrun starts every worker as a fresh ``python -u script.py``, so every start
and every restart (after a failure, a hang, a rescale) pays the interpreter,
``import torch`` and the distributed/checkpoint imports again: 3-6 s per process
on a CPU host, the largest part of a restart. With warm start (``hpresil-run
--warm-start auto``, the default) ``hpresil-run`` hands torch's agent a function
entrypoint, :class:`ScriptMain`, with the ``forkserver`` start method; torch's own
``MultiprocessContext`` starts the workers. The fork server is started before the
first rendezvous and imports :data:`DEFAULT_PRELOAD` (plus ``--preload``) once,
while the rendezvous runs; every worker of every attempt is then forked from it
and runs the script as ``__main__`` the way ``python -u script.py`` (or ``-m``)
would: same ``sys.argv``, ``sys.path[0]``, environment, working directory, exit
status, unbuffered output, ``atexit`` handlers.

What differs from a fresh interpreter (use ``--warm-start off`` if it matters):

- stdin is ``/dev/null`` (the fork server closes it), so an interactive debugger
  in a worker needs ``off``;
- a variable that a preloaded module reads *at import* takes the launcher's
  value (every variable read later, e.g. by NCCL or the script, is the worker's);
- torch's ``MultiprocessContext`` reports the first failed worker of a node
  only, so a rank that fails *because* a peer died (a broken collective) waits
  :data:`PEER_LOSS_DELAY_S` before exiting, leaving the root cause to be seen first.

Warm start is off for ``--no-python``, ``--run-path`` (torch's own function
entrypoint, with the start method the user chose) and ``PYTHON_EXEC`` naming
another interpreter.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import io
import logging
import multiprocessing
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import Any, Sequence

from hpresil.errors import ConfigError

__all__ = ["DEFAULT_PRELOAD", "PEER_LOSS_DELAY_S", "ScriptMain", "preload_modules", "warm_entrypoint",
           "wait_until_warm"]

log = logging.getLogger(__name__)

#: Imported once by the fork server: torch and the parts of torch.distributed
#: that training scripts and hpresil's checkpointing import (seconds each).
#: ``torch._dynamo``: every optimizer's first ``add_param_group`` imports it
#: (with sympy), which alone takes seconds in a fresh process.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "torch",
    "torch._dynamo",
    "torch.optim",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "hpresil",
    "hpresil.checkpoint.checkpointer",
)

#: How long a worker whose collective broke because a peer died waits before it
#: exits, so that its agent sees the peer's death first (see the module docstring).
PEER_LOSS_DELAY_S = 0.5


def preload_modules(extra: str | None, script_args: Sequence[str] = ()) -> tuple[str, ...]:
    """The fork server's preload list: :data:`DEFAULT_PRELOAD` plus ``extra``
    (comma-separated module names, e.g. ``"transformers,numpy"``), plus ``s3fs``
    when it is installed and an ``s3://`` URL is among ``script_args`` (its
    import is ~0.5 s of every worker's durable-tier set-up otherwise).

    Raises:
        ConfigError: a name is not a dotted Python module name.
    """
    names = list(DEFAULT_PRELOAD)
    if any("s3://" in str(a) for a in script_args) and importlib.util.find_spec("s3fs") is not None:
        names.append("s3fs")
    for raw in (extra or "").split(","):
        name = raw.strip()
        if not name:
            continue
        if not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(f"--preload {extra!r}: {name!r} is not a module name; pass e.g. --preload transformers,numpy")
        if name not in names:
            names.append(name)
    return tuple(names)


class ScriptMain:
    """Runs a training script (or ``-m`` module) as ``__main__`` in a forked worker.

    A picklable callable: torch's ``MultiprocessContext`` sends it to the fork
    server for each worker. Pickling captures the launcher's environment at that
    moment and unpickling (in the new worker, before torch applies the worker's
    own variables) installs it, so a worker sees the environment a subprocess
    started at the same moment would.

    Args:
        target: the script path, or the module name when ``module`` is true.
        module: run ``target`` like ``python -m target``.
    """

    def __init__(self, target: str, *, module: bool = False) -> None:
        self.target = target
        self.module = module
        # torch's agent and logs name a function entrypoint by its __qualname__.
        self.__qualname__ = self.__name__ = target if module else os.path.basename(target)

    def __repr__(self) -> str:
        return f"ScriptMain({self.target!r}, module={self.module})"

    def __getstate__(self) -> dict[str, Any]:
        return {"target": self.target, "module": self.module, "environ": dict(os.environ)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["target"], module=state["module"])  # type: ignore[misc]
        environ = state.get("environ")
        if environ is not None:
            os.environ.clear()
            os.environ.update(environ)

    def __call__(self, *argv: str) -> None:
        _unbuffered_stdio()
        interrupted = False
        try:
            self._run(list(argv))
        except SystemExit as exc:
            code = _exit_status(exc.code)
            if code:
                raise SystemExit(code) from None
        except KeyboardInterrupt:
            interrupted = True
        except BaseException as exc:
            # What the interpreter would print, from the script's first frame on.
            traceback.print_exception(exc.with_traceback(_script_frames(exc.__traceback__)))
            if _is_peer_loss(exc):
                time.sleep(PEER_LOSS_DELAY_S)
            raise
        finally:
            _flush_and_run_exit_handlers()  # on every way out, as the interpreter's own exit would
        if interrupted:
            _die_by(signal.SIGINT)  # like CPython: an interrupted process dies of SIGINT

    def _run(self, argv: list[str]) -> None:
        sys.argv = [self.target, *argv]
        if self.module:
            sys.path[0] = os.getcwd()
            runpy.run_module(self.target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(self.target))
            runpy.run_path(self.target, run_name="__main__")


def _exit_status(code: object) -> int:
    """The process status CPython gives ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _script_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without the leading frames of this module and runpy."""
    first = tb
    while first is not None and (first.tb_frame.f_code.co_filename == __file__
                                 or "runpy" in first.tb_frame.f_code.co_filename):
        first = first.tb_next
    return first or tb


def _is_peer_loss(exc: BaseException) -> bool:
    from hpresil.run.failure import is_peer_loss

    return is_peer_loss(f"{type(exc).__name__}: {exc}")


def _unbuffered_stdio() -> None:
    """``python -u``: stdout and stderr written through to their file descriptors."""
    for name, errors in (("stdout", "strict"), ("stderr", "backslashreplace")):
        stream = getattr(sys, name)
        try:
            fd = stream.fileno()
            encoding = stream.encoding
        except (AttributeError, OSError, ValueError):
            continue
        raw = io.FileIO(fd, "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(raw, encoding=encoding, errors=errors, write_through=True))


def _flush_and_run_exit_handlers() -> None:
    # A forked multiprocessing child leaves through os._exit(): run what the
    # interpreter's own exit would (atexit handlers, e.g. logging's flush).
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _die_by(sig: signal.Signals) -> None:
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(1)
    os._exit(128 + int(sig))


def warm_entrypoint(args: argparse.Namespace, mode: str, preload: Sequence[str]) -> tuple[ScriptMain, list[str]] | None:
    """The warm entrypoint and its arguments for a parsed ``hpresil-run``
    command line, or ``None`` when warm start does not apply (see the module
    docstring). Starts the fork server: call it once, before the rendezvous.

    Args:
        args: the parsed command line.
        mode: ``auto`` or ``off`` (``--warm-start``).
        preload: the modules the fork server imports (:func:`preload_modules`).
    """
    if mode == "off":
        return None
    python = os.environ.get("PYTHON_EXEC", sys.executable)
    if args.no_python or args.run_path or os.path.realpath(python) != os.path.realpath(sys.executable):
        log.info("warm start off: %s", "--no-python" if args.no_python else "--run-path" if args.run_path
                 else f"PYTHON_EXEC={python} is not this interpreter")
        return None
    entry = ScriptMain(args.training_script, module=bool(args.module))
    try:
        start_fork_server(preload)
    except (OSError, AttributeError) as exc:
        log.warning("warm start off: the fork server cannot be started in this process (%s: %s); workers start "
                    "as fresh interpreters", type(exc).__name__, exc)
        return None
    return entry, list(args.training_script_args)


def start_fork_server(preload: Sequence[str]) -> None:
    """Starts the ``multiprocessing`` fork server with ``preload`` imported in it
    (in the background: the first fork waits for the imports to finish).

    Raises:
        OSError: it cannot be started.
    """
    from multiprocessing import forkserver

    _forget_inherited_fork_server()
    multiprocessing.set_forkserver_preload(list(preload))
    started = time.monotonic()
    forkserver.ensure_running()
    log.info("warm start: fork server started in %.3f s, preloading %s", time.monotonic() - started, ", ".join(preload))


def _forget_inherited_fork_server() -> None:
    """Drops a fork server this process inherited rather than started.

    A process forked after a launch in its parent (a test that launches twice,
    a notebook, a program embedding the launcher) inherits multiprocessing's
    record of the parent's fork server. That server is not this process's
    child, so ``ensure_running`` fails on it (``waitpid``: ``ChildProcessError``)
    and forking through it would mix the two launches. Forgetting the record
    makes ``ensure_running`` start a server of this process's own; the
    inherited descriptors are closed here (the parent keeps its own copies).

    Raises:
        AttributeError: this Python's ``multiprocessing.forkserver`` lacks the
            state this relies on (the caller turns warm start off).
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = server._forkserver_pid
    if pid is None:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
        return  # our own child (alive, or reaped now: ensure_running starts a new one)
    except ChildProcessError:
        pass
    log.info("warm start: this process inherited the fork server of process %d; starting its own", pid)
    if server._forkserver_alive_fd is not None:
        try:
            os.close(server._forkserver_alive_fd)
        except OSError:
            pass
    # A new lock too: a thread of the parent may have held the old one when this process was forked.
    server._lock = threading.Lock()
    server._forkserver_alive_fd = None
    server._forkserver_address = None
    server._forkserver_pid = None
    server._inherited_fds = None
    if hasattr(server, "_forkserver_authkey"):  # Python 3.14+
        server._forkserver_authkey = None


def _noop() -> None:
    pass


def wait_until_warm(timeout: float) -> bool:
    """Blocks until the fork server has imported its preload (one no-op worker
    forked from it); ``False`` when that took longer than ``timeout`` s."""
    proc = multiprocessing.get_context("forkserver").Process(target=_noop, name="hpresil-warm-probe")
    started = time.monotonic()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return False
    log.info("warm start: fork server ready after %.1f s more", time.monotonic() - started)
    return True
