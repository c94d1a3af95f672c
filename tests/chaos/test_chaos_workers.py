"""The chaos fault matrix: worker faults on one node.

Each case runs the llama example (tiny preset, 2 workers, 30 steps, a RAM
snapshot every step, durable every 10) under ``hpresil-run``, injects one real
fault and asserts: the fault was detected (its event), the job restored from
the right tier at the right step, training completed, the last good durable
checkpoint is intact, and the final parameters equal bit for bit those of an
uninterrupted run with the same seed. Every case of the matrix can be bitwise:
none changes the world size (a resharded restore would change the reduction
order). Run the matrix with ``make chaos``; ``-m ci`` runs its fast subset.
Shared tools: tests/chaos/chaos_harness.py.
"""

from __future__ import annotations

import pytest

from chaos_harness import (
    STEPS, Fault, assert_bitwise, committed, final_state, named, newest_saved, reference, restores, shm_root,
    standalone, verify_durable,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]

FAULT_STEP = 17


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory):
    return reference(tmp_path_factory)


def _run(tmp_path, faults: list[Fault]) -> tuple[list[dict], str]:
    durable = tmp_path / "durable"
    with shm_root() as shm, standalone(tmp_path, "job", shm=shm, durable=f"file://{durable}", faults=faults) as agent:
        return agent.finish(), str(durable)


def _check_recovered_from_ram(tmp_path, ref, evs: list[dict], durable: str) -> None:
    restored = restores(evs, attempt=1)
    assert sorted(e["rank"] for e in restored) == [0, 1], restored
    assert {e["tier"] for e in restored} == {"ram"}, restored
    step = newest_saved(evs, attempt=0)  # FAULT_STEP, or one less if a rank's save of it was skipped
    assert FAULT_STEP - 1 <= step <= FAULT_STEP
    assert {e["step"] for e in restored} == {step}, "the newest snapshot every rank holds"
    assert [e["cause"] for e in named(evs, "workers_restart")] == ["failure"]
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(durable)[-1] == STEPS
    for step in committed(durable):
        verify_durable(f"file://{durable}", step)


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_sigkill(tmp_path, ref, rank: int) -> None:
    """A worker SIGKILLed at step 17 (each rank in turn): torch's agent sees the
    signal, hpresil restarts the group, every rank restores step 17 from RAM."""
    evs, durable = _run(tmp_path, [Fault(rank=rank, step=FAULT_STEP, action="kill")])
    exits = named(evs, "worker_exit", rank=rank, attempt=0)
    assert exits and exits[0]["signal"] == "SIGKILL", named(evs, "worker_exit")
    _check_recovered_from_ram(tmp_path, ref, evs, durable)


@pytest.mark.parametrize("action, reason", [("stop", "stopped"), ("spin", "not_in_collective")],
                         ids=["sigstop", "gil_spin"])
def test_worker_hang(tmp_path, ref, action: str, reason: str) -> None:
    """Rank 1 SIGSTOPped, or spinning in Python with the GIL held (a C extension
    stuck in a loop), at step 17 while rank 0 waits in DDP's all-reduce: the
    watchdog (in the agent, so the GIL does not matter) names rank 1, kills the
    group, and the restart restores step 17 from RAM."""
    evs, durable = _run(tmp_path, [Fault(rank=1, step=FAULT_STEP, action=action)])
    hangs = named(evs, "hang_detected")
    assert len(hangs) == 1 and hangs[0]["suspects"] == [1] and hangs[0]["reason"] == reason, hangs
    _check_recovered_from_ram(tmp_path, ref, evs, durable)
