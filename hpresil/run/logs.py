"""The agent's own logs: torch's formatting kept off the failure path, noise kept off the console.

torch's log formatter (``torch._logging._internal.TorchLogsFormatter``) imports
``torch._dynamo`` the first time it formats a record that carries an exception,
to read one config flag. The elastic agent logs every worker failure with
``logger.exception``, so without this filter an agent's first failure pays a full
``torch._dynamo`` import — 0.7–1.3 s on the 2-core test host, more on a busy
node — in its main thread, before it could stop, restart or tell the other
nodes anything (the agent does not need dynamo for anything else).

:func:`render_exceptions_eagerly` adds a logging filter to torch's distributed
loggers that renders the traceback into ``record.exc_text`` (exactly what a
formatter appends) and clears ``exc_info``. The lines printed are the same;
the import never happens. Plain :mod:`logging` configuration: torch's code and
handlers are untouched.

:func:`route_agent_logs` writes every agent record, tracebacks included, to
``agent.log`` in the job log directory, and keeps off the console the torch
records that repeat what hpresil says in one line (a worker's failure, with
torch's ``ProcessExitedException`` traceback; the SIGTERM sent to the rest of the
group; the error-file note of a launcher that has no parent).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["render_exceptions_eagerly", "EagerTraceback", "ConsoleTrim", "route_agent_logs", "trim_console", "unroute_agent_logs"]

#: Loggers that log exceptions in the agent process (created now if torch has not yet).
_LOGGERS = (
    "torch.distributed.elastic.multiprocessing.api",
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.agent.server.local_elastic_agent",
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
    "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
    "torch.distributed.elastic.multiprocessing.errors",
    "torch.distributed.elastic.multiprocessing.tail_log",
    "torch.distributed.run",
)


class EagerTraceback(logging.Filter):
    """Renders a record's exception into ``exc_text`` and drops ``exc_info``."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        return True


def render_exceptions_eagerly() -> list[str]:
    """Adds :class:`EagerTraceback` (once) to torch's distributed loggers: those
    in :data:`_LOGGERS` and every ``torch.distributed*`` logger that exists now.
    Returns the logger names it was added to."""
    names = set(_LOGGERS)
    names.update(n for n in logging.Logger.manager.loggerDict if n.startswith("torch.distributed"))
    added = []
    for name in sorted(names):
        logger = logging.getLogger(name)
        if not any(isinstance(f, EagerTraceback) for f in logger.filters):
            logger.addFilter(EagerTraceback())
            added.append(name)
    return added


#: Loggers whose handlers write records (the root, and torch's that do not propagate).
_HANDLING_LOGGERS = ("", "torch", "torch.distributed")


class ConsoleTrim(logging.Filter):
    """Drops, on a console handler, torch's records that the agent reports itself
    (:func:`hpresil.run.agent.HpresilAgent` logs one line per failed worker)."""

    #: logger name -> prefixes of the format strings dropped.
    DROPPED = {
        "torch.distributed.elastic.multiprocessing.api": ("failed (exitcode",),
        "torch.multiprocessing.spawn": ("Terminating process",),
        "torch.distributed.elastic.multiprocessing.errors.error_handler": ("no error file defined for parent",),
    }

    def filter(self, record: logging.LogRecord) -> bool:
        prefixes = self.DROPPED.get(record.name)
        return not (prefixes and isinstance(record.msg, str) and record.msg.startswith(prefixes))


def _is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stderr, sys.stdout)


def trim_console() -> None:
    """Adds :class:`ConsoleTrim` (once) to the console handlers of the loggers that
    handle records. ``hpresil-run``'s console script calls it: the console is its own."""
    for name in _HANDLING_LOGGERS:
        for console in logging.getLogger(name).handlers:
            if _is_console(console) and not any(isinstance(f, ConsoleTrim) for f in console.filters):
                console.addFilter(ConsoleTrim())


def route_agent_logs(log_dir: str) -> logging.Handler:
    """Adds ``<log_dir>/agent.log`` to the loggers that handle records: every
    agent record, tracebacks included. Returns the handler for :func:`unroute_agent_logs`."""
    handler = logging.FileHandler(os.path.join(log_dir, "agent.log"), delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _HANDLING_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


def unroute_agent_logs(handler: logging.Handler) -> None:
    """Undoes :func:`route_agent_logs` (a launcher run in-process, as tests do)."""
    for name in _HANDLING_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()
