"""Workers' stderr on the console, with the tracebacks of a recovered failure folded to one line.

A worker that dies prints a traceback, and so does every survivor whose collective
lost it (gloo's ``Connection closed by peer``, NCCL's abort). When the job recovers,
those tracebacks are noise on the console: what matters is one line per failure
and per recovery. When the job fails for good, the report
(:func:`hpresil.run.failure.explain_failure`) quotes the root cause's traceback.

:class:`WorkerConsole` copies each worker's ``stderr.log`` (torch's per-attempt
log, which keeps every line) to the console with torch's ``[role N]:`` prefix. A
block that starts with ``Traceback (most recent call last):`` is held back:

* the worker lives on for :attr:`ConsoleConfig.hold_s` (a traceback the script
  handled, a warning): the block is printed in full, late but never lost;
* the attempt ends in a restart: one line, the exception and the log's path;
* the job fails for good: one line for each rank but the root cause, whose
  traceback the failure report quotes;
* the job succeeds or the agent stops: printed in full.

Used only when the user chose no ``--redirects``/``--tee`` (``--tracebacks auto``);
otherwise torch's own tail is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import TextIO

from hpresil.run.failure import TRACEBACK_HEADER, exception_line, summarise_exception

__all__ = ["ConsoleConfig", "WorkerConsole"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class ConsoleConfig:
    """How worker stderr reaches the console.

    Attributes:
        hold_s: how long a traceback is held while its worker lives on; after that it
            is printed in full (a handled exception). A worker that dies is seen by
            the agent well within this (its monitor interval).
        poll_s: how often the logs are read.
    """

    hold_s: float = 5.0
    poll_s: float = 0.05

    def __post_init__(self) -> None:
        if self.hold_s < 0 or self.poll_s <= 0:
            raise ValueError(f"ConsoleConfig: hold_s must be >= 0 and poll_s > 0 (got {self.hold_s}, {self.poll_s})")


class _Stream:
    """One worker's stderr log: what was read of it, and the block held back."""

    def __init__(self, path: str, prefix: str, rank: int) -> None:
        self.path = path
        self.prefix = prefix
        self.rank = rank
        self._file: object | None = None
        self._partial = b""
        self.held: list[str] = []
        self.held_since = 0.0

    def read(self, final: bool = False) -> list[str]:
        """Complete lines written since the last read (and, when ``final``, the
        unterminated rest)."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - read across polls, closed by close()
            except FileNotFoundError:
                return []
        data = b""
        while chunk := self._file.read(_CHUNK):  # type: ignore[attr-defined]
            data += chunk
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if final and self._partial:
            lines.append(self._partial)
            self._partial = b""
        return [line.decode("utf-8", errors="replace") for line in lines]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # type: ignore[attr-defined]
            self._file = None


class WorkerConsole:
    """Copies the workers' stderr logs to ``dst``, holding tracebacks back (module doc).

    Args:
        dst: the console (``sys.stderr`` when ``None``, looked up when written).
        config: hold and poll times.
    """

    def __init__(self, dst: TextIO | None = None, config: ConsoleConfig | None = None) -> None:
        self.config = config or ConsoleConfig()
        self._dst = dst
        self._lock = threading.Lock()
        self._streams: list[_Stream] = []
        self._pending: list[_Stream] = []  # streams of a stopped attempt whose outcome is not known yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hpresil-console", daemon=True)
        self._thread.start()

    def start_attempt(self, files: dict[int, str], prefixes: dict[int, str], ranks: dict[int, int]) -> None:
        """Follows a new attempt's stderr logs: ``files``, ``prefixes`` and global
        ``ranks`` keyed by local rank."""
        with self._lock:
            self._streams = [_Stream(path, prefixes[local], ranks[local]) for local, path in sorted(files.items())]

    def end_attempt(self, restarting: bool) -> None:
        """The attempt's workers are stopped: reads their logs to the end. A restart
        folds each held traceback to one line; otherwise the held blocks wait for
        :meth:`close` (the job's outcome)."""
        with self._lock:
            for stream in self._streams:
                self._pump(stream, final=True)
                stream.close()
            ended, self._streams = self._streams, []
            held = [s for s in ended if s.held]
            if restarting:
                for stream in self._pending + held:
                    self._summarise(stream)
                self._pending = []
            else:
                self._pending.extend(held)

    def close(self, failed: bool = False, root_rank: int | None = None) -> None:
        """Ends the job's output. ``failed``: every held traceback becomes one line
        except the root cause's, which the failure report quotes; otherwise (success,
        a stop signal) held blocks are printed in full."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for stream in self._streams:
                self._pump(stream, final=True)
                stream.close()
            self._pending.extend(s for s in self._streams if s.held)
            self._streams = []
            for stream in self._pending:
                if not failed:
                    self._release(stream)
                elif stream.rank == root_rank:
                    stream.held = []
                else:
                    self._summarise(stream)
            self._pending = []

    def _loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            with self._lock:
                for stream in self._streams:
                    try:
                        self._pump(stream)
                    except OSError as exc:  # a log on a full or vanished disk: skip this poll
                        log.debug("cannot read %s: %s", stream.path, exc)

    def _pump(self, stream: _Stream, final: bool = False) -> None:
        now = time.monotonic()
        for line in stream.read(final=final):
            if stream.held:
                stream.held.append(line)
            elif line.startswith(TRACEBACK_HEADER):
                stream.held, stream.held_since = [line], now
            else:
                self._write(stream.prefix, [line])
        if stream.held and not final and now - stream.held_since >= self.config.hold_s:
            self._release(stream)

    def _release(self, stream: _Stream) -> None:
        self._write(stream.prefix, stream.held)
        stream.held = []

    def _summarise(self, stream: _Stream) -> None:
        what = summarise_exception(exception_line(stream.held) or stream.held[-1])
        self._write(stream.prefix, [f"{what}  [traceback in {stream.path}]"])
        stream.held = []

    def _write(self, prefix: str, lines: list[str]) -> None:
        dst = self._dst or sys.stderr
        try:
            dst.write("".join(f"{prefix}{line}\n" for line in lines))
            dst.flush()
        except (OSError, ValueError):  # a closed console must not stop the agent
            pass
