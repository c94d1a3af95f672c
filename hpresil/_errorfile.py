"""Records an uncaught exception in the elastic error file.

torchrun (and ``hpresil-run``) show a worker's traceback in the failure
report only if the worker wrote it to ``$TORCHELASTIC_ERROR_FILE``, which
normally takes ``@record`` on the script's main. Importing hpresil installs
an equivalent ``sys.excepthook`` — only inside an elastic worker, only when
no other hook is installed, and chaining to the default hook.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from types import TracebackType

__all__ = ["install"]


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    # Same JSON shape as torch's ErrorHandler.record_exception, which needs
    # sys.exc_info() and so cannot be called from an excepthook.
    data = {
        "message": {
            "message": f"{exc_type.__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(exc_type, exc, tb)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    try:
        if path and not os.path.exists(path):  # @record may have written it already
            # Written aside and linked into place: the agent reads the file as soon as
            # the process is gone and must never see it half-written (a worker can be
            # SIGKILLed mid-write); link() also never replaces one @record wrote meanwhile.
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
    except OSError:  # never mask the user's exception with ours
        pass
    sys.__excepthook__(exc_type, exc, tb)


def install() -> bool:
    """Installs the hook; returns whether it did."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE") or sys.excepthook is not sys.__excepthook__:
        return False
    sys.excepthook = _hook
    return True
