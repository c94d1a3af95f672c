"""The agent's failure log lines do not import torch._dynamo (hpresil.run.logs)."""

from __future__ import annotations

import logging
import subprocess
import sys

from _launch import REPO
from hpresil.run.logs import EagerTraceback

_SCRIPT = """
import logging, sys
import torch
from torch.distributed.elastic.multiprocessing import api
{install}
try:
    raise RuntimeError("worker 4242 died")
except RuntimeError:
    api.logger.exception("failed (exitcode: 1) local_rank: 0")
print("DYNAMO", "torch._dynamo" in sys.modules)
"""


def _run(install: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRIPT.format(install=install)], capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})


def test_filter_renders_the_traceback_and_drops_exc_info() -> None:
    try:
        raise ValueError("boom 17")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "msg", None, sys.exc_info())
    assert EagerTraceback().filter(record) is True
    assert record.exc_info is None and "ValueError: boom 17" in (record.exc_text or "")
    assert logging.Formatter().format(record).endswith("ValueError: boom 17")


def test_failure_log_line_keeps_its_traceback_without_importing_dynamo() -> None:
    plain = _run("")
    assert "DYNAMO True" in plain.stdout, "torch's formatter no longer imports dynamo: hpresil.run.logs can go"
    eager = _run("from hpresil.run.logs import render_exceptions_eagerly; render_exceptions_eagerly()")
    assert "DYNAMO False" in eager.stdout, eager.stderr
    for out in (plain.stderr, eager.stderr):
        assert "failed (exitcode: 1) local_rank: 0" in out and "RuntimeError: worker 4242 died" in out
        assert "Traceback (most recent call last)" in out
