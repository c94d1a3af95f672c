"""The container entrypoint's signal path, without docker: SIGTERM to a running
``hpresil-run`` (as a scheduler or ``docker stop`` sends it to PID 1) must stop
the workers at a step they agree on, commit a final snapshot to the durable
tier and exit cleanly within the grace period."""

from __future__ import annotations

import pytest

from _goodput_run import RecordedRun, final_step, manifest, record_once


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    return record_once(tmp_path_factory)


pytestmark = pytest.mark.slow


def test_sigterm_takes_a_final_snapshot_to_durable(recorded_run) -> None:
    run = recorded_run
    assert run.returncode == 128 + 15, run.output[-4000:]
    # a one-line message instead of the agent's SignalException traceback
    assert "hpresil-run: stopped by SIGTERM" in run.output and "SignalException" not in run.output
    last = final_step(run)
    finals = [e for e in run.events if e["event"] == "checkpoint_saved" and e["step"] == last]
    # (a periodic snapshot of the same step that was not durable-flagged is followed by the final, durable one)
    assert sorted({e["rank"] for e in finals}) == [0, 1], "both ranks stopped at the same step"
    drained = [e for e in run.events if e["event"] == "checkpoint_drained" and e["step"] == last]
    assert drained and drained[-1]["committed"]
    assert manifest(run, last)
    stop = [e for e in run.events if e["event"] == "runtime_stop"]
    assert stop and stop[-1]["succeeded"] is False
    # the workers left on their own (no SIGKILL after --shutdown-timeout)
    assert not [e for e in run.events if e["event"] == "worker_exit" and e.get("attempt") == 1]
