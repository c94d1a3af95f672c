"""Keeps torch's log formatting off the agent's failure path.

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
"""

from __future__ import annotations

import logging

__all__ = ["render_exceptions_eagerly", "EagerTraceback"]

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
