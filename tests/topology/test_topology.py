"""Topology discovery backends, the topology-aware node order, and hpresil-run
giving the nodes of an NVLink domain contiguous global ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _launch import base_env, free_port
from hpresil.errors import ConfigError, TopologyError
from hpresil.testing import RecordingSink
from hpresil.topology import NodeTopology, TopologyConfig, TopologyMap, discover, node_order, rank_bases, simulated
from hpresil.topology import backends as disc


def _n(host: str, domain: str, tray: int | None = None) -> NodeTopology:
    return NodeTopology(host=host, domain=domain, tray=tray, source="fake")


# ---- discovery -------------------------------------------------------------------------


def test_env_override_wins_over_everything():
    env = {disc.ENV_DOMAIN: "rack7", disc.ENV_TRAY: "3", disc.ENV_FAKE: '{"h": "other"}',
           "NVIDIA_COM_GPU_CLIQUE": "uuid.1"}
    assert discover("h", TopologyConfig(nvml=False), env) == NodeTopology(host="h", domain="rack7", tray=3, source="env")
    with pytest.raises(TopologyError, match="HPRESIL_TOPOLOGY_TRAY"):
        discover("h", TopologyConfig(nvml=False), {disc.ENV_DOMAIN: "r", disc.ENV_TRAY: "x"})


def test_fake_map_by_node_id(tmp_path):
    spec = {"a": "rack1", "b": {"domain": "rack2", "tray": 5}}
    env = {disc.ENV_FAKE: json.dumps(spec)}
    assert discover("a", TopologyConfig(nvml=False), env).domain == "rack1"
    b = discover("b", TopologyConfig(nvml=False), env)
    assert (b.domain, b.tray, b.source) == ("rack2", 5, "fake")
    assert discover("c", TopologyConfig(nvml=False), env).source == "host"  # not in the map
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(spec))
    assert discover("a", TopologyConfig(nvml=False), {disc.ENV_FAKE: str(path)}).domain == "rack1"
    with pytest.raises(TopologyError):
        discover("a", TopologyConfig(nvml=False), {disc.ENV_FAKE: "[1, 2]"})


def test_kubernetes_labels_from_env_and_labels_file(tmp_path):
    cfg = TopologyConfig(nvml=False)
    clique = discover("h", cfg, {"NVIDIA_COM_GPU_CLIQUE": "6f1c0a52-aaaa-bbbb-cccc-0123456789ab.32766"})
    assert (clique.domain, clique.clique, clique.source) == ("6f1c0a52-aaaa-bbbb-cccc-0123456789ab", "32766", "k8s")
    assert discover("h", cfg, {"TOPOLOGY_K8S_AWS_ULTRASERVER_ID": "us-123"}).domain == "us-123"
    labels = tmp_path / "labels"
    labels.write_text('app="train"\ntopology.k8s.aws/ultraserver-id="us-9"\n')
    assert discover("h", cfg, {disc.ENV_LABELS_FILE: str(labels)}).domain == "us-9"
    assert disc.label_env_name("nvidia.com/gpu.clique") == "NVIDIA_COM_GPU_CLIQUE"


def test_slurm_block_topology():
    out = textwrap.dedent("""\
        BlockName=b1 BlockIndex=0 Nodes=gb[001-018] BlockSize=18
        BlockName=b2 BlockIndex=1 Nodes=gb[019-036] BlockSize=18
        AggregatedBlock=b1,b2 Nodes=gb[001-036]
    """)
    assert disc.parse_slurm_blocks(out, "gb020") == ("b2", 1)
    assert disc.parse_slurm_blocks(out, "cpu01") is None
    assert disc.expand_hostlist("gb[001-003,007],login1,x[9-10]-ib") == [
        "gb001", "gb002", "gb003", "gb007", "login1", "x9-ib", "x10-ib"]

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    env = {"SLURMD_NODENAME": "gb003", "SLURM_JOB_ID": "42"}
    found = disc.from_slurm("h", env, TopologyConfig(), run=fake_run) if disc.shutil.which("scontrol") else None
    if found is not None:  # only where scontrol exists; the parser is covered above
        assert (found.domain, found.tray) == ("b1", 2)


class _FakeInfo:
    def __init__(self, state: int, uuid: bytes, clique: int) -> None:
        self.state, self.status, self.clusterUuid, self.cliqueId = state, 0, uuid, clique


class _FakeNvml:
    """Stands in for the pynvml module's calls (the real library needs a GPU driver)."""

    def __init__(self, states: list[int], supported: bool = True) -> None:
        self.states, self.supported, self.shutdown = states, supported, False

    def nvmlInit(self): pass
    def nvmlShutdown(self): self.shutdown = True
    def nvmlDeviceGetCount(self): return len(self.states)
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def c_nvmlGpuFabricInfoV_t(self): return _FakeInfo(0, bytes(16), 0)

    def nvmlDeviceGetGpuFabricInfoV(self, handle, ref):
        if not self.supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        info = ref._obj
        info.state, info.clusterUuid, info.cliqueId = self.states[handle], bytes(range(1, 17)), 7


def test_nvml_fabric_info_only_when_completed(monkeypatch):
    monkeypatch.setattr(disc.ctypes, "byref", lambda obj: type("R", (), {"_obj": obj})())
    nv = _FakeNvml([2, 3])  # GPU 0 still in progress, GPU 1 completed
    found = disc.from_nvml("h", nv)
    assert found is not None and found.source == "nvml" and found.clique == "7"
    assert found.domain == "01020304-0506-0708-090a-0b0c0d0e0f10" and nv.shutdown
    assert disc.from_nvml("h", _FakeNvml([1, 2])) is None
    assert disc.from_nvml("h", _FakeNvml([3], supported=False)) is None  # H100: no multi-node fabric


def test_config_validation():
    with pytest.raises(ConfigError, match="--topology"):
        TopologyConfig(mode="sometimes")


# ---- node order -------------------------------------------------------------------------


def test_node_order_groups_domains_keeps_node0_first_and_puts_short_domains_last():
    # Hostname order interleaves racks; rack C is short (a tray missing).
    nodes = [_n("n5", "B"), _n("n1", "A"), _n("n2", "B"), _n("n3", "C"), _n("n10", "A"), _n("n4", "A"),
             _n("n6", "C"), _n("n7", "B")]
    order = node_order(nodes, [4] * 8)
    assert [nodes[i].domain for i in order] == ["B"] * 3 + ["A"] * 3 + ["C"] * 2
    assert order[0] == 0  # the rendezvous' node 0 keeps global rank 0 (it serves MASTER_ADDR)
    assert [nodes[i].host for i in order[3:6]] == ["n1", "n4", "n10"]  # natural host order
    bases = rank_bases(order, [4] * 8)
    assert sorted(bases) == list(range(0, 32, 4)) and bases[0] == 0


def test_node_order_uses_trays_and_is_a_permutation_at_scale():
    rng = np.random.default_rng(0)
    nodes = [_n(f"gb{i:04d}", f"rack{i // 18}", tray=int(i % 18)) for i in range(4096)]
    perm = rng.permutation(len(nodes))
    shuffled = [nodes[i] for i in perm]
    order = node_order(shuffled, [4] * len(nodes), first=0)
    assert sorted(order) == list(range(len(nodes)))
    domains = [shuffled[i].domain for i in order]
    # Contiguous: each domain appears as one run.
    runs = [d for k, d in enumerate(domains) if k == 0 or domains[k - 1] != d]
    assert len(runs) == len(set(domains))
    # Inside a (non-first) domain, trays ascend.
    second = [shuffled[i].tray for i in order if shuffled[i].domain == runs[1]]
    assert second == sorted(second)


def test_simulated_specs_and_map_round_trip(tmp_path):
    t = simulated("nvl72x2")
    assert (t.world_size, t.gpus_per_node, len(t.domain_names)) == (144, 4, 2)
    assert t.domain_sizes.tolist() == [72, 72]
    assert simulated("p5x4").domain_sizes.tolist() == [8] * 4
    assert simulated("nvl36x4").domain_sizes.tolist() == [36] * 4
    short = simulated("nvl72x4,missing=5")
    assert short.domain_sizes.tolist() == [68, 68, 68, 64]
    for bad in ("nvl72", "nvl72x2,foo=1", "nvl70x2"):
        with pytest.raises(ConfigError):
            simulated(bad)
    path = str(tmp_path / "topology.json")
    short.save(path)
    again = TopologyMap.load(path)
    assert np.array_equal(again.domain_of, short.domain_of) and np.array_equal(again.node_of, short.node_of)


def test_service_assign_through_a_real_store(tmp_path):
    # Three agents in threads share one TCPStore, as after a rendezvous.
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.agent.server.api import Worker

    from hpresil.runtime.api import RuntimeContext
    from hpresil.topology.service import TopologyService

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    domains = {0: "rackB", 1: "rackA", 2: "rackB"}
    results: dict[int, list[int]] = {}

    def agent(group_rank: int) -> None:
        store = TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
        svc = TopologyService(TopologyConfig(nvml=False))
        shm = tmp_path / f"n{group_rank}"
        shm.mkdir()
        env = {disc.ENV_DOMAIN: domains[group_rank]}
        svc.node = discover(f"host{group_rank}", svc.config, env)
        svc._ctx = RuntimeContext(run_id="r", node_id=f"host{group_rank}", shm_dir=str(shm), log_dir=str(shm),
                                  events=RecordingSink())
        workers = [Worker(local_rank=i, global_rank=2 * group_rank + i, role_rank=2 * group_rank + i,
                          world_size=6, role_world_size=6) for i in range(2)]
        results[group_rank] = [w.global_rank for w in svc.assign(store, group_rank, 3, workers)]

    threads = [threading.Thread(target=agent, args=(g,)) for g in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == {0: [0, 1], 2: [2, 3], 1: [4, 5]}  # rackB (node 0's) first, then rackA
    topo = TopologyMap.load(str(tmp_path / "n1" / "topology.json"))
    assert list(topo.domain_names) == ["rackB", "rackA"] and topo.domain_of.tolist() == [0, 0, 0, 0, 1, 1]


# ---- hpresil-run, three simulated nodes -------------------------------------------------

WORKER = """
import json, os, sys
from hpresil.topology import load_map
topo = load_map()
rank = int(os.environ["RANK"])
out = {"node": os.environ["HPRESIL_NODE_ID"], "domain": topo.domain_names[int(topo.domain_of[rank])],
       "map_node": topo.node_names[int(topo.node_of[rank])]}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_hpresil_run_gives_domains_contiguous_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    fake = {"n1": "rackA", "n2": "rackB", "n3": "rackA"}  # hostname order interleaves the racks
    port = free_port()
    env = base_env(tmp_path, HPRESIL_TOPOLOGY_FAKE=json.dumps(fake))
    procs = [subprocess.Popen([sys.executable, "-m", "hpresil.run", "--nnodes", "3", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "topo",
                               "--node-id", node, "--log-dir", str(tmp_path / node), str(script), str(out)],
                              env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in fake]
    logs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(3)]
    domains = [s["domain"] for s in seen]
    assert domains[0] == domains[1] or domains[1] == domains[2]  # one run per domain
    assert sorted(domains) == ["rackA", "rackA", "rackB"]
    for s in seen:  # the map the worker reads agrees with where it really runs
        assert s["map_node"] == s["node"] and s["domain"] == fake[s["node"]]
