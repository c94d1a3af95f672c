"""The chaos fault matrix: node faults.

Two simulated nodes: ``hpresil-run`` agents on 127.0.0.1 (``--nnodes 2``, one
worker each, c10d rendezvous served by node A, peer replication on), running
the llama example as in tests/chaos/test_chaos_workers.py (a RAM snapshot every 5 steps
here). Node B's agent is SIGKILLed
alone, or node B dies whole with its RAM and node A's replicas of its rank are
corrupted; a replacement agent for node B joins after node A declared it lost.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from chaos_harness import (
    STEPS, Agent, assert_bitwise, committed, corrupt_slot, final_state, free_port, hold, named, ram_slots, reference,
    restores, shm_root, train_args, two_node_args, verify_durable, wait_for,
)
from hpresil.checkpoint.peer.api import replica_root

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]

HOLD = 15
#: How long the workers sleep at step HOLD: past node A's verdict on a lost node B
#: (3 s of stale liveness) and its restart, so they never train on with a broken node.
SLEEP = 10.0


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory):
    return reference(tmp_path_factory)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class _Job:
    """Nodes A (serves the rendezvous store) and B of one job; B can be replaced."""

    def __init__(self, tmp, shm: str) -> None:
        self.tmp, self.shm = tmp, shm
        self.port, self.rdzv_id = free_port(), f"chaos-{uuid.uuid4().hex[:8]}"
        self.durable = str(tmp / "durable")
        # A RAM snapshot every 5 steps: with every step, the replicator (a lagging peer
        # streams for up to a second on 2 busy cores) and the sealer can hold every slot
        # the writer may take, and a save, durable ones included, is skipped.
        self.script = train_args(str(tmp / "final-job.pt"), f"file://{self.durable}", ckpt_every=5)
        # In their first attempt both workers stop at step 10 until it is committed (see
        # release_10), then sleep at step HOLD: the job holds still while the test breaks a node.
        faults = [*hold(10), *hold(HOLD, sleep=SLEEP)]
        self.a = self._agent("A", host=True, faults=faults)
        self.b = self._agent("B", host=False, faults=faults)
        self.agents = [self.a, self.b]

    def _agent(self, name: str, *, host: bool, faults=()) -> Agent:
        node = "nodeA" if name == "A" else "nodeB"
        return Agent(self.tmp, name, two_node_args(self.port, self.rdzv_id, host=host), self.script,
                     shm=os.path.join(self.shm, node), node_id=node, faults=faults)

    def replace_b(self) -> Agent:
        """Starts a replacement agent for node B once node A declared it lost."""
        wait_for(lambda: named(self.a.events(), "workers_restart", reason="node_lost"), 60, "node B declared lost",
                 self.agents)
        b2 = self._agent("B2", host=False)
        self.agents.append(b2)
        return b2

    def release_10(self) -> None:
        """Lets the workers go on once durable step 10 is committed."""
        wait_for(lambda: self.a.held() and self.b.held() and 10 in committed(self.durable), 120,
                 "held at step 10, committed", self.agents)
        self.a.release()
        self.b.release()

    def held(self) -> bool:
        """Both workers at step HOLD with their snapshots sealed."""
        return all(named(n.events(), "checkpoint_sealed", step=HOLD) for n in (self.a, self.b))

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


def test_node_agent_sigkill_replacement_restores_from_ram(tmp_path, ref) -> None:
    """Node B's agent alone is SIGKILLed while the job holds at step 15 (its
    worker, in its own session, is orphaned: it dies at its next collective,
    which the test waits for). Node A notices the stale liveness counter
    (``workers_restart`` cause membership, reason node_lost) and restarts into a
    new rendezvous round; a replacement agent for node B (same node id and
    shared-memory root: the host is fine, its agent died) joins, and both ranks
    restore step 15 from their nodes' RAM tiers."""
    with shm_root() as shm:
        job = _Job(tmp_path, shm)
        try:
            job.release_10()
            wait_for(job.held, 120, f"both nodes at step {HOLD}", job.agents)
            orphan = job.b.worker_pids()
            job.b.kill_agent()
            b2 = job.replace_b()
            evs_a, evs_b2 = job.a.finish(), b2.finish()
            # it wakes from its sleep into a collective whose peer is gone, and exits
            wait_for(lambda: all(_exited(pid) for pid in orphan), 2 * SLEEP + 30,
                     f"node B's orphaned worker {orphan} to exit", job.agents)
        finally:
            job.close()
    lost = named(evs_a, "workers_restart", cause="membership", reason="node_lost")
    assert lost and lost[0]["lost_nodes"] == [1], named(evs_a, "workers_restart")
    restored = {(e["rank"], e["tier"], e["step"]) for e in restores(evs_a, attempt=1) + restores(evs_b2, attempt=0)}
    assert restored == {(0, "ram", HOLD), (1, "ram", HOLD)}, restored
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(job.durable)[-1] == STEPS
    verify_durable(f"file://{job.durable}", STEPS)


def test_corrupted_peer_replica_falls_back_to_durable(tmp_path, ref) -> None:
    """Node B dies whole (agent and worker SIGKILLed, its RAM deleted) while the
    job holds at step 15; bytes are flipped in every replica of rank 1 that
    node A received (steps 10 and 15). The replacement node B has no RAM, so
    rank 1 reads node A's replicas, which fail their checksums
    (``integrity_failed``, tier peer); the ranks fall back to step 10: rank 0
    from its RAM (the RAM tier keeps the newest snapshot flagged for the
    durable tier), rank 1 from the durable tier."""
    with shm_root() as shm:
        job = _Job(tmp_path, shm)
        try:
            a_dir = None

            def replicated():
                nonlocal a_dir
                a_dir = a_dir or job.a.shm_dir()
                got = [i for i in ram_slots(replica_root(a_dir), 1) if i.seal is not None]
                return job.held() and any(i.record.step == HOLD for i in got) and got

            job.release_10()
            replicas = wait_for(replicated, 120, f"node A holding rank 1's replica of step {HOLD}", job.agents)
            job.b.kill_node()
            shutil.rmtree(os.path.join(shm, "nodeB"))
            for info in replicas:
                corrupt_slot(replica_root(a_dir), info)
            b2 = job.replace_b()
            evs_a, evs_b2 = job.a.finish(), b2.finish()
        finally:
            job.close()
    bad = named(evs_b2, "integrity_failed", tier="peer", rank=1)
    assert {e["step"] for e in bad} >= {HOLD}, bad
    restored = {(e["rank"], e["tier"], e["step"]) for e in restores(evs_a, attempt=1) + restores(evs_b2, attempt=0)}
    assert restored == {(0, "ram", 10), (1, "durable", 10)}, restored
    assert_bitwise(final_state(tmp_path, "job"), ref)
    assert committed(job.durable)[-1] == STEPS
    verify_durable(f"file://{job.durable}", STEPS)
