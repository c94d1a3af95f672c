"""Fuzz pass over the environment and the small files hpresil reads: every ``HPRESIL_*`` variable the node runtime and the workers read
(through the public reader the code calls), the ``$HPRESIL_FAULTS`` plan,
label/secret files named by variables, ``scontrol`` output, and the heartbeat
records in shared memory that the hang watchdog and the progress service read.

Each value must be accepted or refused with an :class:`~hpresil.errors.HpresilError`
naming the variable; heartbeat records, written by workers, are never refused
by raising: the watchdog and the progress service must keep running whatever
a record holds (a worker scribbling over its record must not take the node
runtime down).
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import pytest

from fuzzing import Fuzzer, Tally, deadline, quiet
from hpresil import errors

pytestmark = pytest.mark.fuzz

#: Raw values tried for every variable (what an environment can hold: strings).
VALUES = (
    "", " ", "0", "1", "-1", "2", "30", "1.5", "0.001", "1e-9", "1e3", "1e9", "1e12", "1e400", "-1e400", "inf", "-inf",
    "nan", "0x10", "1_000", "abc", "on", "off", "auto", "leave", "warn", "yes", "TRUE", "none", "null", "[]", "{}",
    "[[[[[[[[", "[" * 3000, '{"a": 1}', '{"devices": 8}', '{"devices": -1}', '{"devices": 1e400}', '{"xid": [[0]]}',
    '{"xid": [[0, 79, "x"]]}', '{"lost": [99]}', '{"ecc": {"0": "x"}}', '{"fabric": {"0": 7}}', '{"devices": 2, "temperature": {"5": 90}}',
    '{"node-a": "d1"}', '{"node-a": {"domain": "d", "tray": "x"}}', '{"node-a": {"domain": [1], "tray": 1e400}}',
    '{"node-a": {"domain": "d", "tray": null, "clique": {}}}', "9" * 40, "/nonexistent/file", "/dev/null", ".",
    "\u00e9\u202e", "a" * 5000, "file:///", "file://relative", "s3://", "s3:///x", "memory://x", "gb[001-003]",
    '[{"rank": 0, "step": 5}]', '[{"rank": "0", "step": 5}]', '[{"rank": 0, "step": 5, "action": "nope"}]',
    '[{"rank": 0, "step": 5, "seconds": "x"}]', '[{"rank": 0}]', '[1]', '[{"rank": 0, "step": 5, "extra": 1}]',
    '[{"rank": -1, "step": 5}]', '[{"rank": 1e400, "step": 5}]', '[{"rank": 0, "step": [5]}]',
)


def _values(fz: Fuzzer, valid: tuple[str, ...], count: int) -> Iterator[tuple[str, str]]:
    """The shared odd values, then byte mutants of the variable's valid values."""
    for v in VALUES:
        yield f"{v[:40]!r}", v
    for _ in range(count):
        what, data = fz.mutate_bytes(fz.rng.choice(valid).encode())
        yield what, data.decode("utf-8", "replace").replace("\0", "")


def _call(tally: Tally, what: str, fn: Callable[[], Any]) -> None:
    """Runs one input: accepted, or refused with an HpresilError; anything else fails the test."""
    try:
        with deadline(5, what):
            fn()
    except errors.HpresilError as exc:
        assert str(exc), what
        tally.add("rejected", type(exc).__name__)
    except Exception as exc:
        tally.bug(exc, what)
    else:
        tally.add("accepted", "read")


def _run(tally: Tally, name: str, reader: Callable[[dict[str, str]], Any], inputs: Iterator[tuple[str, str]],
         base: Mapping[str, str] | None = None) -> None:
    for what, value in inputs:
        env = {**(base or {}), name: value}
        _call(tally, f"{name}={value[:200]!r} ({what})", lambda: reader(env))


@pytest.fixture(autouse=True)
def _quiet(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)  # relative paths a value names land here
    for name in [n for n in os.environ if n.startswith("HPRESIL_")]:
        monkeypatch.delenv(name)
    with quiet():
        yield


def _with_environ(env: dict[str, str], fn: Callable[[], Any]) -> Any:
    """Runs a reader that takes no mapping (it reads ``os.environ``)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return fn()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_fuzz_runtime_variables(tmp_path: Any) -> None:
    """The node runtime's variables: hang detection, GPU health (and its fake
    backend), progress, topology overrides, the peer tier's secret, failure
    domain, durable URL, net-env mode."""
    from hpresil.checkpoint.api import CheckpointConfig
    from hpresil.checkpoint.durable.stores import open_store
    from hpresil.hang.config import HANG_OPTIONS, hang_config_from_env
    from hpresil.health.api import ENV_ACTION, ENV_FAKE, ENV_INTERVAL, ENV_MODE, HealthConfig
    from hpresil.health.service import select_backend
    from hpresil.netenv import NetEnvConfig
    from hpresil.checkpoint.peer import secret
    from hpresil.checkpoint.peer.api import DOMAIN_ENV, SECRET_ENV, SECRET_FILE_ENV, ReplicatorConfig
    from hpresil.report.progress import ENV_INTERVAL as PROGRESS, ProgressConfig
    from hpresil.topology.api import TopologyConfig
    from hpresil.topology.backends import ENV_DOMAIN, ENV_FAKE as TOPO_FAKE, ENV_LABELS_FILE, ENV_TRAY, discover

    topo = TopologyConfig(nvml=False)

    def durable(env: dict[str, str]) -> None:
        url = _with_environ(env, lambda: CheckpointConfig(durable_every=1).durable)
        if url is None:
            return
        path = url[len("file://"):] if url.startswith("file://") else None
        if path is not None and os.path.isabs(path) and not os.path.abspath(path).startswith(str(tmp_path)):
            return  # a mutated absolute path: opening it would create a directory outside the test's
        open_store(url, probe_timeout=1.0).close()

    readers: list[tuple[str, Callable[[dict[str, str]], Any], tuple[str, ...]]] = [
        *((env_var, hang_config_from_env, ("on", "30", "2.5")) for _, env_var, _, _ in HANG_OPTIONS),
        (ENV_MODE, HealthConfig.from_env, ("auto", "off")),
        (ENV_INTERVAL, HealthConfig.from_env, ("30", "0.5")),
        (ENV_ACTION, HealthConfig.from_env, ("leave", "warn")),
        (ENV_FAKE, select_backend, ('{"devices": 8, "xid": [[3, 79, 2.0]]}', '{"devices": 2, "lost": [1], "ecc": {"0": 3}}')),
        (PROGRESS, lambda env: _with_environ(env, ProgressConfig.from_env), ("5", "0.2")),
        (ENV_DOMAIN, lambda env: discover("node-a", topo, env), ("rack-7",)),
        (ENV_TRAY, lambda env: discover("node-a", topo, {**env, ENV_DOMAIN: "rack"}), ("3", "17")),
        (TOPO_FAKE, lambda env: discover("node-a", topo, env), ('{"node-a": "d1"}', '{"node-a": {"domain": "d", "tray": 2}}')),
        (ENV_LABELS_FILE, lambda env: discover("node-a", topo, env), ("labels",)),
        (SECRET_ENV, lambda env: _with_environ(env, secret.from_env), ("s3cret",)),
        (SECRET_FILE_ENV, lambda env: _with_environ(env, secret.from_env), ("secret.txt",)),
        (DOMAIN_ENV, lambda env: _with_environ(env, ReplicatorConfig), ("rack-1",)),
        ("HPRESIL_DURABLE", durable, (f"file://{tmp_path}/ckpt", "ckpt")),
        ("HPRESIL_NET_ENV", lambda env: NetEnvConfig(mode=env["HPRESIL_NET_ENV"]), ("auto", "p5", "off")),
    ]
    with open("labels", "w") as f:
        f.write('nvidia.com/gpu.clique="d1.3"\n')
    with open("secret.txt", "w") as f:
        f.write("s3cret\n")
    tally = Tally("runtime HPRESIL_* variables")
    fz = Fuzzer(51)
    for name, reader, valid in readers:
        _run(tally, name, reader, _values(fz, valid, 25))
    tally.check(len(readers) * (len(VALUES) + 20))


def test_fuzz_worker_variables(tmp_path: Any) -> None:
    """What hpresil-run gives its workers (``HPRESIL_SHM_DIR``, ``_LOG_DIR``,
    ``_NODE_ID``, ``_EVENTS_FILE``, ``_RUN_ID``, ``_ATTEMPT``) as the worker-side
    readers use them: the event sink, the default RAM-tier directory, the peer
    tier's wait for its node runtime, the fault plan's attempt."""
    from hpresil import _env
    from hpresil.checkpoint.stateful import default_shm_dir
    from hpresil.events import worker_sink
    from hpresil.checkpoint.peer.source import PeerSource
    from hpresil.testing import faults

    os.makedirs("shm/peer")
    with open("shm/peer/node.json", "w") as f:
        f.write('{"node": "n", "host": "h", "port": 1, "attempt": 3}')

    def sink(env: dict[str, str]) -> None:
        _with_environ(env, lambda: worker_sink().emit("fuzz", value=1))

    def node_info(env: dict[str, str]) -> None:
        src = PeerSource("shm", rank=0, world_size=1, ready_timeout=timedelta(0))
        _with_environ(env, src._node_info)

    def fault_attempt(env: dict[str, str]) -> None:
        plan = '[{"rank": 0, "step": 3, "action": "raise", "attempt": -1}]'
        _with_environ({**env, faults.ENV_VAR: plan}, lambda: faults.maybe_inject(2, rank=0))  # never the planned step

    readers: list[tuple[str, Callable[[dict[str, str]], Any], tuple[str, ...]]] = [
        (_env.EVENTS_FILE, sink, ("events.jsonl", "logs/events.jsonl")),
        (_env.NODE_ID, sink, ("node-3",)),
        (_env.RUN_ID, lambda env: _with_environ(env, default_shm_dir), ("run-1",)),
        (_env.ATTEMPT, node_info, ("0", "3")),
        (_env.ATTEMPT, fault_attempt, ("0", "3")),
    ]
    tally = Tally("worker HPRESIL_* variables")
    fz = Fuzzer(52)
    base = {_env.EVENTS_FILE: "events.jsonl"}
    for name, reader, valid in readers:
        _run(tally, name, reader, _values(fz, valid, 25), base=base if name != _env.EVENTS_FILE else None)
    tally.check(len(readers) * (len(VALUES) + 20))


def test_fuzz_topology_map_file(tmp_path: Any) -> None:
    """``<shm_dir>/topology.json``, the rank-level map the agents write for their
    workers, damaged, then loaded the way a worker does (``$HPRESIL_SHM_DIR``)."""
    import json

    from hpresil import _env
    from hpresil.topology import load_map
    from hpresil.topology.api import MAP_FILE, NodeTopology, TopologyMap

    nodes = [NodeTopology(host=f"node-{i}", domain=f"rack-{i // 2}") for i in range(4)]
    path = str(tmp_path / MAP_FILE)
    TopologyMap.from_nodes(nodes, [2, 2, 2, 2]).save(path)
    original = open(path, "rb").read()
    tally = Tally("topology map file")
    fz = Fuzzer(57)
    inputs = [*fz.byte_mutants(original, 80), *Fuzzer.truncations(original, 40),
              *((w, t.encode()) for w, t in fz.json_mutants(json.loads(original), 120))]
    for what, data in inputs:
        with open(path, "wb") as f:
            f.write(data)
        _call(tally, f"topology.json {data[:80]!r} ({what})",
              lambda: _with_environ({_env.SHM_DIR: str(tmp_path)}, lambda: load_map(world_size=8, local_world_size=2)))
    tally.check(200)


def test_fuzz_fault_plans() -> None:
    """``$HPRESIL_FAULTS``: JSON mutants of a real plan (``faults.to_env``),
    parsed the way a worker does at every step (never reaching a planned step)."""
    from hpresil.testing import faults

    plan = faults.to_env([faults.fail_at(rank=1, step=5), faults.hang_at(rank=0, step=9, gil=True),
                          faults.Fault(rank=2, step=3, action="sleep", seconds=0.5, attempt=-1)])[faults.ENV_VAR]
    tally = Tally("HPRESIL_FAULTS plans")
    fz = Fuzzer(53)
    import json

    inputs = [*((w, t) for w, t in fz.json_mutants(json.loads(plan), 300)), *fz.byte_mutants(plan.encode(), 100),
              *Fuzzer.truncations(plan.encode(), 60)]

    def inject(env: dict[str, str]) -> None:
        _with_environ(env, lambda: faults.maybe_inject(10**6 + 1, rank=0))  # parses, matches nothing

    _run(tally, faults.ENV_VAR, inject,
         ((w, t if isinstance(t, str) else t.decode("utf-8", "replace").replace("\0", "")) for w, t in inputs))
    tally.check(400)


def test_fuzz_label_secret_and_scontrol_text(tmp_path: Any) -> None:
    """Files and command output behind the variables: a Kubernetes downward-API
    labels file, the job secret file, and ``scontrol show topology`` output."""
    from hpresil.checkpoint.peer import secret
    from hpresil.topology.api import TopologyConfig
    from hpresil.topology.backends import ENV_LABELS_FILE, discover, parse_slurm_blocks

    topo = TopologyConfig(nvml=False)
    tally = Tally("labels file, secret file, scontrol output")
    fz = Fuzzer(54)
    labels = b'nvidia.com/gpu.clique="4f1c.2"\ntopology.k8s.aws/ultraserver-id="us-9"\nkubernetes.io/hostname="node-a"\n'
    secret_text = b"0123456789abcdef0123456789abcdef\n"
    path = str(tmp_path / "file")
    for original, reader in ((labels, lambda: discover("node-a", topo, {ENV_LABELS_FILE: path})),
                             (secret_text, lambda: _with_environ({"HPRESIL_JOB_SECRET_FILE": path}, secret.from_env))):
        for what, data in [*fz.byte_mutants(original, 100), *Fuzzer.truncations(original, 30),
                           ("binary", bytes(range(256)))]:
            with open(path, "wb") as f:
                f.write(data)
            _call(tally, f"file {data[:60]!r} ({what})", reader)
    scontrol = ("BlockName=b1 BlockIndex=0 Nodes=gb[001-018] BlockSize=18\n"
                "BlockName=b2 BlockIndex=1 Nodes=gb[019-036],gb040 BlockSize=18\n")
    for what, data in [*fz.byte_mutants(scontrol.encode(), 150), *Fuzzer.truncations(scontrol.encode(), 40)]:
        text = data.decode("utf-8", "replace")
        _call(tally, f"scontrol {text!r} ({what})", lambda: parse_slurm_blocks(text, "gb020"))
    tally.check(400)


# -- heartbeat records ---------------------------------------------------------------------------

_PID = slice(36, 40)  # the pid field of hang.api.RECORD


def _beat_record(fz: Fuzzer, valid: bytes, pid: int) -> tuple[str, bytes]:
    """A byte mutant of a real record, or a record of odd field values; both carry
    ``pid`` (the worker's), so the watchdog trusts them."""
    from hpresil.hang.api import RECORD, RECORD_SIZE

    r = fz.rng
    if r.random() < 0.5:
        what, data = fz.mutate_bytes(valid[:_PID.start] + struct.pack("<I", pid) + valid[_PID.stop:])
        return what, (data + bytes(RECORD_SIZE))[:RECORD_SIZE] if r.random() < 0.8 else data
    odd_f = (0.0, -1.0, 1e308, -1e308, float("nan"), float("inf"), -float("inf"), time.time() + 1e9, 1e-300, time.time())
    odd_i = (0, 1, -1, 2**31 - 1, 2**62, -(2**62))
    fields = [r.choice((2, 4, 10**6)), r.choice(odd_i), r.choice(odd_f), r.choice(odd_f), r.choice((0, 1, 2, 3, 4, 7, 2**32 - 1)),
              pid, r.choice(odd_f), r.choice(odd_f), r.choice(odd_f), r.choice((0, 1, 5, 2**32 - 1)), r.choice((0, 1, 3)),
              r.choice(odd_f), r.choice(odd_f), r.choice((0, 1, -1, 2**31 - 1)), r.choice(odd_f), bytes(r.randrange(256) for _ in range(16))]
    return "fields " + ",".join(str(f)[:10] for f in fields[:15]), RECORD.pack(*fields).ljust(RECORD_SIZE, b"\0")


def test_fuzz_heartbeat_records(tmp_path: Any) -> None:
    """Records written by a real worker's :class:`~hpresil.hang.heartbeat.Heartbeat`,
    then scribbled over; the watchdog and the progress service tick on them.

    The "worker" is a ``sleep`` process of this test (the records carry its pid):
    when a scribbled record makes a phase look overdue, the watchdog diagnoses
    and kills it, as it would a hung worker, and the next input gets a new one.
    """
    from hpresil.hang.api import HangConfig
    from hpresil.hang.heartbeat import Heartbeat, record_path
    from hpresil.hang.probe import read_beat
    from hpresil.hang.watchdog import Watchdog
    from hpresil.report.progress import ProgressConfig, ProgressService
    from hpresil.runtime.api import RuntimeContext, WorkerGroupInfo
    from hpresil.testing import RecordingSink

    shm, logs = str(tmp_path / "shm"), str(tmp_path / "logs")
    path = record_path(shm, 0)
    hb = Heartbeat(path, rank=0)  # the real writer: a few steps and a checkpoint
    for step in range(1, 4):
        hb.beat(step)
    with hb.phase_scope("checkpoint"):
        pass
    valid = open(path, "rb").read()
    sink = RecordingSink()
    ctx = RuntimeContext(run_id="r", node_id="n0", shm_dir=shm, log_dir=logs, events=sink)
    config = HangConfig(step_floor=timedelta(seconds=60), init_timeout=timedelta(seconds=600),
                        grace=timedelta(seconds=0.2), gather_timeout=timedelta(0))
    watchdog, progress = Watchdog(config), ProgressService(ProgressConfig(interval=timedelta(microseconds=1)))
    watchdog.start(ctx)
    progress.start(ctx)
    tally = Tally("heartbeat records")
    fz = Fuzzer(55)
    worker = subprocess.Popen(["sleep", "60"])
    try:
        for attempt in range(160):
            if worker.poll() is not None:  # killed as hung by an earlier input
                worker = subprocess.Popen(["sleep", "60"])
            what, data = _beat_record(fz, valid, worker.pid)
            group = WorkerGroupInfo(attempt=attempt, group_rank=0, group_world_size=1, world_size=1, global_ranks=(0,),
                                    pids=(worker.pid,))
            with open(path, "wb") as f:
                f.write(data)
            with deadline(5, what):
                beat = read_beat(path)
                watchdog.on_workers_started(group)
                progress.on_workers_started(group)
                for _ in range(2):
                    watchdog.tick()
                    progress.tick()
                progress.on_workers_stopped(group)
                watchdog.on_workers_stopped(group)
            tally.add("accepted" if beat is not None else "rejected", "detected" if watchdog._handled is group else "read")
        watchdog.stop(timedelta(seconds=10))
        assert watchdog._handling is None or not watchdog._handling.is_alive()
    finally:
        worker.kill()
        worker.wait()
    tally.check(160)
    assert all(isinstance(e, str) for e in sink.names())
