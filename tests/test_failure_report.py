"""Root-cause selection in the failure report (hpresil/run/failure.py)."""

from __future__ import annotations

import signal

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from hpresil.run.failure import explain_failure, pick_root_cause

_GLOO_PEER_LOSS = """Traceback (most recent call last):
  File "train.py", line 20, in <module>
    dist.barrier()
RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242
"""


def _failure(tmp_path, rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
    failure = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode,
                             error_file=str(tmp_path / f"missing{rank}.json"))
    failure.timestamp = timestamp
    return failure


def test_peer_loss_is_not_the_root_cause_even_when_earlier(tmp_path) -> None:
    stderr1 = tmp_path / "stderr1.log"
    stderr1.write_text(_GLOO_PEER_LOSS)
    failures = {0: _failure(tmp_path, 0, -signal.SIGKILL, 101), 1: _failure(tmp_path, 1, 1, 100)}
    exc = ChildFailedError("train.py", failures)
    assert exc.get_first_failure()[0] == 1  # torch's choice: the earliest timestamp
    rank, failure = pick_root_cause(exc, {1: str(stderr1)})
    assert rank == 0 and failure.exitcode == -signal.SIGKILL
    report = explain_failure(exc, max_restarts=0, restarts_used=0, stderr_paths={1: str(stderr1)})
    assert "root cause: rank 0 (local rank 0, pid 1000) was killed by SIGKILL" in report
    assert "also stopped: ranks 1" in report


def test_same_second_tie_prefers_the_signal_death(tmp_path) -> None:
    failures = {1: _failure(tmp_path, 1, 1, 100), 0: _failure(tmp_path, 0, -signal.SIGKILL, 100)}
    assert pick_root_cause(ChildFailedError("train.py", failures))[0] == 0


def test_earliest_real_error_wins(tmp_path) -> None:
    stderr = {r: tmp_path / f"stderr{r}.log" for r in (0, 1)}
    stderr[0].write_text("Traceback (most recent call last):\nValueError: bad batch\n")
    stderr[1].write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
    failures = {0: _failure(tmp_path, 0, 1, 105), 1: _failure(tmp_path, 1, 1, 103)}
    rank, _ = pick_root_cause(ChildFailedError("train.py", failures), {r: str(p) for r, p in stderr.items()})
    assert rank == 1


def test_rank_stopped_by_the_agent_is_not_the_root_cause(tmp_path) -> None:
    stderr1 = tmp_path / "stderr1.log"
    stderr1.write_text("Traceback (most recent call last):\nValueError: distinctive\n")
    failures = {0: _failure(tmp_path, 0, -signal.SIGTERM, 100), 1: _failure(tmp_path, 1, 1, 100)}
    rank, _ = pick_root_cause(ChildFailedError("train.py", failures), {1: str(stderr1)})
    assert rank == 1
