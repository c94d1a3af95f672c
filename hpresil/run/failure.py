"""The root-cause report ``hpresil-run`` prints when the job fails.

torch's ``@record`` prints a table of every failed rank; this report leads
with the one that failed first, says how it died (exit code or signal), and
quotes its Python traceback: from the error file when the worker recorded one
(``@record`` or ``import hpresil``), else from the tail of its stderr log.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Callable, Mapping

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from hpresil.checkpoint.ram.files import write_atomic

__all__ = ["explain_failure", "exception_line", "failure_summary", "guard_error_files", "summarise_exception",
           "is_peer_loss", "pick_root_cause", "process_running", "TRACEBACK_HEADER",
           "traceback_from_stderr", "traceback_from_error_file"]

_MAX_LINES = 40
#: The first line of every Python traceback.
TRACEBACK_HEADER = "Traceback (most recent call last):"

#: What a rank prints when it failed *because* a peer died: its collective lost the
#: connection. Such a rank is a consequence, not the root cause.
_PEER_LOSS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited or there was a network error",
    "NCCL communicator was aborted",
    "DistNetworkError",
    "DistBackendError",
)


def is_peer_loss(text: str) -> bool:
    """Whether an error text says a collective lost its peer (a consequence of
    another rank's failure, not a root cause)."""
    return any(marker in text for marker in _PEER_LOSS)


def traceback_from_stderr(path: str | None, max_lines: int = _MAX_LINES) -> str | None:
    """The last Python traceback in a worker's stderr log, if any."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    start = text.rfind(TRACEBACK_HEADER)
    if start < 0:
        return None
    lines = text[start:].rstrip().splitlines()
    return "\n".join(lines[-max_lines:] if len(lines) > max_lines else lines)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel (a zombie then counts as running)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _unreadable(path: str) -> bytes | None:
    """The first bytes of ``path`` when it exists but is not a JSON object (a
    worker died while writing it, or wrote garbage); ``None`` otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        return None
    try:
        if isinstance(json.loads(raw.decode("utf-8")), dict):
            return None
    except (UnicodeDecodeError, ValueError):
        pass
    return raw[:200]


def _replace_with_note(path: str, raw: bytes) -> bool:
    """Replaces the unreadable error file ``path`` with a valid one in torch's
    format that says so and quotes its first bytes ``raw``; False when it cannot."""
    note = {"message": {
        "message": f"the worker's error file was unreadable (half-written when it died?): {raw!r}",
        "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))},
    }}
    try:
        write_atomic(path, json.dumps(note))
    except OSError:
        return False
    return True


def guard_error_files(files: Mapping[int, str], pids: Callable[[], Mapping[int, int]], checked: set[str]) -> list[str]:
    """Repairs the workers' error files torch is about to parse: each file that
    appeared is checked once (added to ``checked``); one that is not a JSON
    object is replaced by a valid note in torch's format, quoting its first
    bytes, once its writer is gone (torch's agent would otherwise fail to parse
    it and end the job), and left for the next call while it may still be
    being written.

    Args:
        files: local rank -> error file path (torch's ``PContext.error_files``).
        pids: returns local rank -> worker pid (called only when a file is bad).
        checked: paths already found valid or repaired; updated.

    Returns:
        The paths replaced.
    """
    fixed: list[str] = []
    running: Mapping[int, int] | None = None
    for local_rank, path in files.items():
        if path in checked or not os.path.exists(path):
            continue  # the common case: one stat per worker and poll
        raw = _unreadable(path)
        if raw is None:
            checked.add(path)
            continue
        if running is None:
            try:
                running = pids()
            except Exception:  # noqa: BLE001 - a closed context: its processes are gone
                running = {}
        pid = running.get(local_rank)
        if pid is not None and process_running(pid):
            continue  # still writing it
        if _replace_with_note(path, raw):
            fixed.append(path)
        checked.add(path)
    return fixed


def traceback_from_error_file(failure: ProcessFailure) -> str | None:
    """The traceback a worker wrote to its elastic error file, if any."""
    data = failure.error_file_data
    if not data:
        return None
    try:
        message = data["message"]
        if isinstance(message, str):
            message = json.loads(message)
        extra = message.get("extraInfo", {})
        stack = extra.get("py_callstack")
        return stack.rstrip() if stack else message.get("message")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def exception_line(lines: list[str]) -> str | None:
    """The exception line of the last traceback in ``lines`` (``KeyError: 'x'``):
    the first unindented line after that traceback's frames."""
    start = max((i for i, line in enumerate(lines) if line.startswith(TRACEBACK_HEADER)), default=-1)
    if start < 0:
        return None
    for line in lines[start + 1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return None


def summarise_exception(line: str, limit: int = 200) -> str:
    """An exception line made short: a broken collective says so (its text is long and
    the same on every survivor), anything else is cut at ``limit`` characters."""
    line = line.strip()
    if is_peer_loss(line):
        return f"{line.split(':', 1)[0]}: a collective lost its peer (a consequence of another failure)"
    return line if len(line) <= limit else line[:limit] + "..."


def failure_summary(failure: ProcessFailure, stderr_path: str | None = None) -> str:
    """How a worker ended, in one line: ``was killed by SIGKILL``, ``exited with code 1:
    KeyError: 'x'`` (the exception from its error file or its stderr log)."""
    how = _how(failure)
    tb = _traceback(failure, stderr_path) if failure.exitcode >= 0 else None
    if not tb:
        return how
    lines = tb.rstrip().splitlines()
    return f"{how}: {summarise_exception(exception_line(lines) or lines[-1])}"


def _how(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def _traceback(failure: ProcessFailure, stderr_path: str | None) -> str | None:
    return traceback_from_error_file(failure) or traceback_from_stderr(stderr_path)


def pick_root_cause(
    exc: ChildFailedError, stderr_paths: dict[int, str] | None = None
) -> tuple[int, ProcessFailure]:
    """The failed rank most likely to have caused the others to fail.

    torch orders failures by timestamp alone, at one-second granularity, so a
    rank whose collective broke because its peer was SIGKILLed often ties with
    (or precedes) the peer. Ranks whose traceback shows a lost peer connection
    rank last, as do ranks stopped with SIGTERM/SIGINT (how the agent stops
    the rest of the group); then the earliest; on a tie a signal death
    (SIGKILL, SIGSEGV, ...: unexplained by any peer) comes before an exception.
    """
    paths = stderr_paths or {}

    def key(rank: int) -> tuple[bool, float, bool, int]:
        failure = exc.failures[rank]
        tb = _traceback(failure, paths.get(rank)) or ""
        # SIGTERM/SIGINT is how the agent (or a scheduler) stops the rest of a group.
        stopped = failure.exitcode in (-signal.SIGTERM, -signal.SIGINT)
        secondary = stopped or is_peer_loss(tb)
        return secondary, float(failure.timestamp or 0), failure.exitcode >= 0, rank

    rank = min(exc.failures, key=key)
    return rank, exc.failures[rank]


def explain_failure(
    exc: ChildFailedError,
    max_restarts: int,
    restarts_used: int,
    stderr_paths: dict[int, str] | None = None,
) -> str:
    """Formats the report for a failed job.

    Args:
        exc: the error the elastic launcher raised.
        max_restarts: the ``--max-restarts`` in force.
        restarts_used: restarts spent on failures before giving up.
        stderr_paths: stderr log of each failed global rank, when captured.

    Returns:
        A multi-line report naming the first failed rank, how it died, its
        traceback, and what to do.
    """
    rank, failure = pick_root_cause(exc, stderr_paths)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(failure.timestamp)) if failure.timestamp else "?"
    lines = [
        "",
        f"hpresil-run: job failed; {restarts_used} of --max-restarts {max_restarts} restarts used",
        f"  root cause: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {_how(failure)} at {when}",
    ]
    others = sorted(r for r in exc.failures if r != rank)
    if others:
        lines.append(f"  also stopped: ranks {', '.join(map(str, others))} (failed too, or stopped by the agent)")
    tb = _traceback(failure, (stderr_paths or {}).get(rank))
    if tb:
        lines.append("  traceback of the root cause:")
        lines.extend("    " + line for line in tb.splitlines())
    elif failure.exitcode < 0:
        lines.append("  no traceback: the process was killed by a signal (OOM killer, scheduler, or a fault)")
    else:
        lines.append("  no traceback captured: run with --tracebacks auto, or import hpresil in the script")
    lines.append("  fix: " + _fix(failure, tb, max_restarts))
    return "\n".join(lines)


#: Exceptions that come from the script or its inputs: a restart meets them again.
_DETERMINISTIC = (
    "SyntaxError", "IndentationError", "ImportError", "ModuleNotFoundError", "NameError", "AttributeError",
    "TypeError", "ValueError", "KeyError", "IndexError", "AssertionError", "FileNotFoundError",
    "NotADirectoryError", "IsADirectoryError", "PermissionError", "ZeroDivisionError", "RecursionError",
    "NotImplementedError", "UnboundLocalError", "JSONDecodeError", "ConfigError", "StateMismatchError",
    "ReshardError",
)


def _exception_name(tb: str | None) -> str | None:
    """The type of the exception a traceback ends with (``pkg.mod.Error: msg`` -> ``Error``)."""
    if not tb:
        return None
    last = tb.rstrip().splitlines()[-1].strip()
    head = last.split(":", 1)[0].strip()
    return head.rsplit(".", 1)[-1] if head.replace(".", "").replace("_", "").isalnum() else None


def _fix(failure: ProcessFailure, tb: str | None, max_restarts: int) -> str:
    """What to do, by the kind of failure: an error in the script is not cured by restarting."""
    name = _exception_name(tb)
    if name in _DETERMINISTIC:
        return (f"{name} is an error in the script, its arguments or its data, and meets every restart again: "
                "correct it (--max-restarts only helps against transient faults: a lost node, a hung "
                "collective, a killed process)")
    if failure.exitcode < 0:
        if max_restarts == 0:
            return (f"the process was killed ({failure.signal_name()}); if that was a transient fault, pass "
                    "--max-restarts N to restart from the last snapshot; check the kernel log for the OOM killer")
        return (f"every restart ended the same way ({failure.signal_name()}): look for what kills it (OOM "
                "killer, a scheduler limit) or raise --max-restarts")
    if max_restarts == 0:
        return "correct the error above; to survive transient faults, pass --max-restarts N"
    return "every restart failed; correct the error above, or raise --max-restarts if the faults are transient"
