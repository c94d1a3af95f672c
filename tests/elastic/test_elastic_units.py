"""Unit tests of hpresil.elastic: the sampler, the batch plan, liveness and
restart classification (pure functions), and the agent-side liveness thread
against a real TCPStore."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch

from hpresil.elastic import ElasticConfig, ElasticSampler, plan_batch
from hpresil.elastic.api import LOST_EPOCH_KEY, LOST_KEY
from hpresil.elastic.membership import (
    Liveness, LivenessTracker, keep_alive_interval, lost_after_from_rdzv, restart_cause, tuned_rdzv_configs,
)
from hpresil.errors import ConfigError, StateMismatchError

# ---- sampler ------------------------------------------------------------------------


def _run(sampler: ElasticSampler, worlds: list[tuple[int, int]]) -> list[int]:
    """Runs ``steps`` at each world size, saving and reloading the sampler at
    every change (as a restore does); returns the samples of each step, all ranks."""
    seen: list[int] = []
    for world, steps in worlds:
        ranks = []
        for r in range(world):  # each rank restores its own sampler from the saved state
            s = ElasticSampler(sampler.num_samples, global_batch=sampler.global_batch, seed=sampler.seed)
            s.load_state_dict(sampler.state_dict())
            ranks.append(s)
        for _ in range(steps):
            batch = [i for s in ranks for i in s.next_batch(ranks.index(s), world)]
            assert len(batch) == sampler.global_batch
            seen.extend(batch)
        assert len({s.position for s in ranks}) == 1
        sampler.load_state_dict(ranks[0].state_dict())
    return seen


@pytest.mark.parametrize("worlds", [
    [(3, 4), (2, 5), (3, 6)],
    [(4, 3), (1, 2), (6, 7), (2, 1), (3, 9)],
    [(12, 10)],
])
def test_sampler_continues_the_global_order_across_world_sizes(worlds):
    n, g = 50, 12
    seen = _run(ElasticSampler(n, global_batch=g, seed=3), worlds)
    ref = ElasticSampler(n, global_batch=g, seed=3)
    assert seen == ref.global_indices(0, len(seen)), "the order does not depend on the world sizes"
    # Each epoch is a permutation: no sample repeated or skipped within an epoch.
    for e in range(len(seen) // n):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))


def test_sampler_epochs_differ_and_depend_on_the_seed():
    a = ElasticSampler(40, global_batch=4, seed=1)
    e0, e1 = a.global_indices(0, 40), a.global_indices(40, 40)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(40))
    assert ElasticSampler(40, global_batch=4, seed=2).global_indices(0, 40) != e0
    assert ElasticSampler(40, global_batch=4, shuffle=False).global_indices(38, 4) == [38, 39, 0, 1]


def test_sampler_state_and_errors():
    s = ElasticSampler(20, global_batch=6, seed=0)
    s.next_batch(0, 3)
    assert s.state_dict()["position"] == 6 and s.epoch == 0
    with pytest.raises(ConfigError, match="not divisible by world_size=4"):
        s.next_batch(0, 4)
    with pytest.raises(StateMismatchError, match="seed"):
        ElasticSampler(20, global_batch=6, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(StateMismatchError, match="num_samples"):
        ElasticSampler(21, global_batch=6, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ConfigError):
        ElasticSampler(0, global_batch=6)


def test_sampler_iter_yields_this_ranks_share_without_advancing():
    s = ElasticSampler(12, global_batch=4, seed=0, shuffle=False)
    s.advance(1)
    assert list(s) == [4, 5, 6, 7, 8, 9, 10, 11] and len(s) == 8  # world 1: the whole rest of the epoch
    assert s.position == 4


def test_sampler_is_a_checkpoint_entry(tmp_path):
    """Saved and restored by hpresil.Checkpointer (plain values), position intact."""
    import hpresil

    s = ElasticSampler(30, global_batch=6, seed=5)
    w = torch.nn.Parameter(torch.ones(3))
    ckpt = hpresil.Checkpointer(state={"w": w, "data": s}, shm_dir=str(tmp_path / "shm"), durable_every=0,
                                run_services=True)
    for step in range(4):
        s.next_batch(0, 1)
        ckpt.save(step + 1)
    ckpt.wait()
    s.advance(10)  # diverge, then restore
    assert ckpt.restore() == 4 and s.position == 24
    ckpt.close(keep_ram=False)


# ---- batch plan ---------------------------------------------------------------------


@pytest.mark.parametrize("world,accum", [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_plan_keeps_the_global_batch(world, accum):
    plan = plan_batch(12, world, micro_batch=2)
    assert plan.accum_steps == accum and plan.micro_batch * world * plan.accum_steps == 12
    share = list(range(plan.per_rank))
    micro = plan.split(share)
    assert [i for m in micro for i in m] == share and all(len(m) == 2 for m in micro)
    assert [last for _, last in plan.micro_steps()] == [False] * (accum - 1) + [True]
    assert plan.loss_scale == pytest.approx(1 / accum)


def test_plan_max_micro_batch_takes_fewest_accumulation_steps():
    assert plan_batch(24, 2, max_micro_batch=5).micro_batch == 4  # 12 per rank: 3 x 4
    assert plan_batch(24, 3, max_micro_batch=8).accum_steps == 1
    assert plan_batch(24, 3).micro_batch == 8


def test_plan_errors_give_the_formula():
    with pytest.raises(ConfigError, match="not divisible by world_size 5"):
        plan_batch(12, 5, micro_batch=2)
    with pytest.raises(ConfigError, match=r"micro_batch 4 x world_size 2 x accum_steps"):
        plan_batch(12, 2, micro_batch=4)
    with pytest.raises(ConfigError, match="has 5 samples"):
        plan_batch(12, 2, micro_batch=2).split([0] * 5)


def test_accumulated_gradient_equals_the_full_batch_gradient():
    """What the constant global batch buys: the same gradient at any world size."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 1)
    w0 = torch.randn(5, 1)

    def grad(world: int) -> torch.Tensor:
        plan = plan_batch(12, world, micro_batch=2)
        total = torch.zeros_like(w0)
        for r in range(world):  # ranks; summed like an all-reduce
            w = w0.clone().requires_grad_()
            for micro in plan.split(list(range(r * plan.per_rank, (r + 1) * plan.per_rank))):
                loss = ((x[micro] @ w - y[micro]) ** 2).sum() / 12
                loss.backward()
            total += w.grad
        return total

    for world in (1, 2, 3, 6):
        torch.testing.assert_close(grad(world), grad(1))


# ---- membership ---------------------------------------------------------------------


def test_tracker_declares_a_peer_lost_after_its_counter_stops():
    t = LivenessTracker(group_rank=0, group_world_size=3, lost_after=3.0, now=0.0)
    assert t.observe(1.0, {1: 1, 2: 1}) == frozenset()
    assert t.observe(2.0, {1: 2, 2: 1}) == frozenset()
    assert t.observe(3.9, {1: 3, 2: 1}) == frozenset()  # peer 2 silent for 2.9 s
    assert t.observe(4.0, {1: 4, 2: 1}) == {2}
    assert t.observe(5.0, {1: 5, 2: 9}) == {2}, "lost stays lost for the round"


def test_tracker_never_loses_done_peers_or_itself():
    t = LivenessTracker(group_rank=1, group_world_size=3, lost_after=1.0, now=0.0)
    assert t.peers == [0, 2]
    t.observe(0.5, {0: 1, 2: 1}, done=[2])
    assert t.observe(10.0, {0: 1, 2: 1}) == {0}


def test_tracker_loses_a_peer_that_never_beats():
    t = LivenessTracker(group_rank=0, group_world_size=2, lost_after=2.0, now=0.0)
    assert t.observe(1.9, {}) == frozenset() and t.observe(2.0, {}) == {1}


def test_tracker_watches_its_ring_successors_and_adopts_other_verdicts():
    t = LivenessTracker(group_rank=4, group_world_size=6, lost_after=1.0, now=0.0)
    assert t.peers == [0, 5]  # 5 and 0 follow 4 in the ring
    assert LivenessTracker(group_rank=0, group_world_size=6, lost_after=1.0, now=0.0, watch=None).peers == [1, 2, 3, 4, 5]
    assert t.observe(5.0, {0: 7, 5: 7}) == frozenset()  # node 2 is silent, but 4 does not watch it
    t.observe(5.5, {0: 8, 5: 8}, done=[5])
    assert t.adopt([2, 4, 5, 99, -1]) == {2}, "never itself, a done peer or a rank outside the round"


def test_restart_cause():
    assert restart_cause(failed=True, lost=[2], waiting=0) == ("membership", "node_lost")
    assert restart_cause(failed=False, lost=[1], waiting=0) == ("membership", "node_lost")
    # a failure while a node waits to join: the join's restart broke the collectives
    assert restart_cause(failed=True, lost=[], waiting=1) == ("membership", "node_joined")
    assert restart_cause(failed=True, lost=[], waiting=0) == ("failure", "worker_failed")
    assert restart_cause(failed=False, lost=[], waiting=0) == ("membership", "requested")
    assert restart_cause(failed=False, lost=[], waiting=1) == ("membership", "node_joined")


def test_rdzv_tuning_only_fills_unset_keys_of_dynamic_backends():
    configs, added = tuned_rdzv_configs("c10d", {"last_call_timeout": "7", "timeout": 900})
    assert configs == {"last_call_timeout": "7", "timeout": 900, "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}
    assert [k for k, _, _ in added] == ["keep_alive_interval", "keep_alive_max_attempt"]
    assert tuned_rdzv_configs("static", {}) == ({}, [])
    assert lost_after_from_rdzv(configs, [k for k, _, _ in added]) == timedelta(seconds=3)
    assert lost_after_from_rdzv({}) == timedelta(seconds=15)  # torch's defaults
    assert lost_after_from_rdzv({"keep_alive_interval": "2"}) == timedelta(seconds=6)  # the user's tolerance


def test_the_tuned_keep_alive_grows_with_the_job_and_the_loss_verdict_does_not():
    """Every keep-alive rewrites torch's whole rendezvous state: the interval keeps
    them at KEEPALIVES_PER_S per second in all; a lost node is evicted from the
    rendezvous (hpresil.elastic.evict), so the liveness verdict stays at 3 s."""
    assert [keep_alive_interval(n) for n in (1, 3, 64, 65, 128, 1920, 2048, 16384)] == [1, 1, 1, 2, 2, 30, 30, 30]
    assert [keep_alive_interval(n, "etcd-v2") for n in (3, 16, 17, 64, 256, 480, 2048)] == [1, 1, 2, 4, 16, 30, 30]
    configs, added = tuned_rdzv_configs("etcd-v2", {}, max_nodes=64)
    assert configs["keep_alive_interval"] == "4" and configs["keep_alive_max_attempt"] == "3"
    assert lost_after_from_rdzv(configs, [k for k, _, _ in added]) == timedelta(seconds=3)
    user, added = tuned_rdzv_configs("c10d", {"keep_alive_interval": "10"}, max_nodes=2048)
    assert user["keep_alive_interval"] == "10" and lost_after_from_rdzv(user, [k for k, _, _ in added]) == \
        timedelta(seconds=30)


def test_elastic_config_validates_ordering():
    with pytest.raises(ConfigError, match="lost_after"):
        ElasticConfig(refresh_interval=timedelta(seconds=2), lost_after=timedelta(seconds=1))


def test_liveness_over_a_real_store_detects_a_silent_peer():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cfg = ElasticConfig(refresh_interval=timedelta(milliseconds=20), lost_after=timedelta(milliseconds=200))
    nodes = [Liveness(store, r, 3, cfg).start() for r in range(3)]
    try:
        time.sleep(0.3)
        assert all(not n.view().lost for n in nodes)
        nodes[2].finish()  # node 2's workers succeeded: its silence is not a loss
        nodes[2].stop()
        nodes[1].stop()  # node 1 dies
        assert nodes[0].wait_for_loss(5.0) == {1}
        assert nodes[0].view().done == {2} and nodes[0].view().store_ok
    finally:
        for n in nodes:
            n.stop()


def test_an_agent_that_stops_waiting_for_a_verdict_still_reads_the_one_a_rejoining_watcher_published():
    """node 1 watches node 2, declares it lost, publishes the verdict and re-joins;
    node 0 (not a watcher of node 2 here) gives up waiting because a node waits in
    the rendezvous, and must still learn the loss: its restart is a loss, not a join."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cfg = ElasticConfig(refresh_interval=timedelta(seconds=30), lost_after=timedelta(seconds=60))
    waiting = Liveness(store, 0, 3, cfg).start()  # its beats are 30 s apart: only the final read can see it
    try:
        store.set(LOST_KEY.format(index=store.add(LOST_EPOCH_KEY, 1)), "2")  # what watcher.beat() publishes
        assert waiting.wait_for_loss(5.0, give_up=lambda: True) == {2}
    finally:
        waiting.stop()


class _CountingStore:
    """Forwards to a store and counts the requests; only the calls every torch Store
    has (etcd's ``EtcdStore`` has no ``append``, ``compare_set`` or ``multi_get``)."""

    def __init__(self, store):
        self.store, self.calls = store, 0

    def __getattr__(self, name):
        if name not in ("add", "set", "get", "check"):
            raise AttributeError(f"{name}: not a call every torch Store supports")
        fn = getattr(self.store, name)

        def call(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return call


def test_liveness_verdicts_reach_every_node_at_constant_store_cost():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # lost_after well above a loaded CI host's scheduling hiccups: no false verdict before the kill
    cfg = ElasticConfig(refresh_interval=timedelta(milliseconds=50), lost_after=timedelta(seconds=1))
    n = 8
    counting = [_CountingStore(store) for _ in range(n)]
    nodes = [Liveness(counting[r], r, n, cfg) for r in range(n)]
    try:
        for node in nodes:  # every counter exists before any thread runs
            node.beat()
        before = counting[0].calls
        nodes[0].beat()  # measured while no liveness thread runs (its own would add its requests)
        assert counting[0].calls - before == 4, "a beat bumps its counter, reads its 2 watched peers and one epoch"
        for node in nodes:
            node.start()
        time.sleep(0.3)
        assert all(not node.view().lost for node in nodes)
        nodes[5].stop()  # node 5 dies: only nodes 3 and 4 watch it
        for r in (0, 1, 2, 3, 4, 6, 7):
            assert nodes[r].wait_for_loss(5.0) == {5}, f"node {r} never learned that node 5 was lost"
    finally:
        for node in nodes:
            node.stop()


def test_liveness_without_a_store_judges_nobody():
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=1))
    cfg = ElasticConfig(refresh_interval=timedelta(milliseconds=20), lost_after=timedelta(milliseconds=100))
    live = Liveness(client, 0, 2, cfg)
    live.beat()
    del server  # the store host dies
    time.sleep(0.3)
    live.beat()
    live.beat()
    assert not live.view().store_ok and not live.view().lost
