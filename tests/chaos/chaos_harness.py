"""Harness of the chaos fault matrix (tests/chaos/test_chaos_*.py, ``make chaos``).

Every case runs the llama example (``examples/llama/train.py --preset tiny``,
2 workers) under real ``hpresil-run`` agents, injects a real fault (a signal,
garbage bytes, a full filesystem, a dead S3 server) and checks what the job
did about it. This module holds what the cases share:

* :class:`Agent`: one ``hpresil-run`` process (a simulated node) in its own
  session, with its own shared-memory root, log dir and events; it can be
  SIGKILLed alone (the agent) or together with its workers (the node).
* :func:`reference`: the final parameters of an uninterrupted run with the same
  seed, computed once per pytest session and cached in its base temp dir.
* fault tools: :func:`flip_bytes`, :func:`tmpfs` (a tiny filesystem, skipped
  when mounting is not permitted), :class:`KillInWindow` (SIGKILLs a process
  the moment a polled condition holds: a RAM slot locked by its writer, a
  durable step with data but no manifest).
* checks: :func:`assert_bitwise`, :func:`restores`, :func:`verify_durable`
  (reads every entry of a committed durable step through hpresil's own reader,
  which verifies each checksum).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import pytest
import torch

from _launch import REPO, base_env, free_port
from elastic_nodes import wait_for  # noqa: F401 - the chaos tests import it from here
from hpresil.testing import Fault, to_env

__all__ = [
    "DURABLE_EVERY", "FAST", "PAUSE", "STEPS", "TRAIN", "Agent", "Fault", "KillInWindow", "assert_bitwise",
    "committed", "corrupt_slot", "exclusive_flocks", "fill", "final_state", "flip_bytes", "free_port", "frozen", "hold",
    "named", "newest_saved", "ram_slots", "reference", "remount", "restores", "shm_root", "standalone", "tmpfs",
    "train_args", "two_node_args", "verify_durable", "wait_for",
]

TRAIN = os.path.join(REPO, "examples", "llama", "train.py")
STEPS = 30
DURABLE_EVERY = 10
#: Fast failure handling: the agent polls its workers every 0.1 s; a stopped
#: worker is hung after 1 s, a running one after 3 s without progress (the floor
#: of the calibrated step timeout: on 2 busy cores the tail of a run, DDP teardown
#: and the final torch.save, can take over a second); SIGTERM -> SIGKILL after 1 s.
# --hang-busy-timeout 1: a rank spinning or asleep outside collectives is busy, not stuck, for 600 s by
# default; the matrix kills it after 1 s so that it still measures detection.
FAST = ["--monitor-interval", "0.1", "--hang-step-floor", "3", "--hang-stopped-timeout", "1", "--hang-grace", "1",
        "--hang-busy-timeout", "1"]
#: For cases that hold the job still on purpose while the test breaks something
#: (see :func:`hold`): no hang watchdog.
PAUSE = ["--monitor-interval", "0.1", "--hang-detection", "off"]


def train_args(out: str | None, durable: str, *, steps: int = STEPS, durable_every: int = DURABLE_EVERY,
               ckpt_every: int = 1) -> list[str]:
    """The example's arguments: tiny preset, a RAM snapshot every ``ckpt_every`` steps,
    durable every ``durable_every``; rank 0 saves the final state dict to ``out``."""
    args = [TRAIN, "--preset", "tiny", "--steps", str(steps), "--ckpt-every", str(ckpt_every),
            "--durable-every", str(durable_every), "--durable", durable, "--log-every", "10"]
    return args + (["--out", out] if out else [])


@contextlib.contextmanager
def shm_root() -> Iterator[str]:
    """A fresh directory on /dev/shm for a case's RAM tier, removed afterwards."""
    path = os.path.join("/dev/shm", f"hpresil-chaos-{uuid.uuid4().hex[:10]}")
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Agent:
    """One ``hpresil-run`` process (a simulated node) and its workers.

    Args:
        tmp: the case's temp dir.
        name: tag of this process (its log dir and agent log are named after it).
        launcher: ``hpresil-run`` arguments before the script.
        script: the script and its arguments.
        shm: the ``--shm-root`` of this node.
        node_id: ``--node-id`` (default: ``name``).
        faults: fault plan for the workers (``$HPRESIL_FAULTS``).
        env: extra environment.
    """

    def __init__(self, tmp: Any, name: str, launcher: Sequence[str], script: Sequence[str], *, shm: str,
                 node_id: str | None = None, faults: Sequence[Fault] = (), env: dict[str, str] | None = None) -> None:
        self.name = name
        self.node_id = node_id or name
        self.shm_root = shm
        self.log_dir = os.path.join(str(tmp), f"logs-{name}")
        environ = base_env(tmp, warm=True, HPRESIL_SHM_ROOT=shm, **to_env(list(faults)), **(env or {}))
        self.cmd = [sys.executable, "-m", "hpresil.run", "--node-id", self.node_id, "--shm-root", shm,
                    "--log-dir", self.log_dir, *launcher, *script]
        self._log_path = os.path.join(str(tmp), f"agent-{name}.log")
        self._log = open(self._log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=environ, cwd=str(tmp), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def events_path(self) -> str:
        return os.path.join(self.log_dir, "events.jsonl")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """This node's events (those called ``name``); a torn last line is skipped."""
        out = []
        try:
            with open(self.events_path) as f:
                for line in f:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    if name is None or ev.get("event") == name:
                        out.append(ev)
        except FileNotFoundError:
            pass
        return out

    def shm_dir(self) -> str:
        """This node's job shared-memory directory, ``<shm-root>/<run id>/<node id>``."""
        start = self.events("runtime_start")
        assert start, f"{self.name} has not started its runtime"
        return start[0]["shm_dir"]

    def worker_pids(self) -> list[int]:
        """The pids of the newest worker group."""
        starts = self.events("workers_start")
        return list(starts[-1]["pids"]) if starts else []

    def kill_rank(self, rank: int) -> int:
        """SIGKILLs the worker of global ``rank`` in the newest group; returns its pid."""
        start = self.events("workers_start")[-1]
        pid = start["pids"][start["ranks"].index(rank)]
        os.kill(pid, signal.SIGKILL)
        return pid

    def held(self) -> bool:
        """Whether every worker of the newest group is stopped (see :func:`hold`)."""
        pids = self.worker_pids()
        return bool(pids) and all(_state(pid) == "T" for pid in pids)

    def release(self) -> None:
        """SIGCONTs the workers of the newest group (ends a :func:`hold`)."""
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def kill_agent(self) -> None:
        """SIGKILLs the agent process alone (its workers live in their own sessions)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def kill_node(self) -> None:
        """SIGKILLs the agent and every worker it started: the node is gone."""
        pids = [p for e in self.events("workers_start") for p in e["pids"]]
        for pid in [self.proc.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        """Waits for the agent to exit; fails with its log tail on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s\n{self.tail()}") from None

    def tail(self, n: int = 5000) -> str:
        self._log.flush()
        with open(self._log_path, errors="replace") as f:
            return f"--- {self.name} (rc={self.proc.poll()}) ---\n" + f.read()[-n:]

    def finish(self, timeout: float = 150) -> list[dict[str, Any]]:
        """Waits for the job to end, asserts it succeeded, returns this node's events."""
        rc = self.wait(timeout)
        assert rc == 0, self.tail()
        return self.events()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Kills what is left of this node (agent and workers) and closes its log."""
        if self.proc.poll() is None:
            self.kill_node()
        for pid in [p for e in self.events("workers_start") for p in e["pids"]]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def hold(step: int, ranks: Sequence[int] = (0, 1), *, sleep: float = 0.0, attempt: int = 0) -> list[Fault]:
    """Faults that stop every worker (SIGSTOP to itself) when it reaches ``step``
    in start ``attempt`` of the worker group: the job holds still, with the
    snapshots of steps up to ``step`` saved, until the test calls
    :meth:`Agent.release`. With ``sleep`` the workers sleep that long instead,
    their threads running (the in-process drainer of a degraded RAM tier). Use
    with :data:`PAUSE` (a stopped or sleeping worker is otherwise a hang)."""
    if sleep:
        return [Fault(rank=r, step=step, action="sleep", seconds=sleep, attempt=attempt) for r in ranks]
    return [Fault(rank=r, step=step, action="stop", attempt=attempt) for r in ranks]


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def standalone(tmp: Any, name: str, *, shm: str, durable: str, faults: Sequence[Fault] = (),
               launcher: Sequence[str] = FAST, max_restarts: int = 2, steps: int = STEPS,
               durable_every: int = DURABLE_EVERY, env: dict[str, str] | None = None) -> Agent:
    """A one-node job of 2 workers; rank 0 writes ``<tmp>/final-<name>.pt`` at the end."""
    out = os.path.join(str(tmp), f"final-{name}.pt")
    return Agent(tmp, name, ["--standalone", "--nproc-per-node", "2", "--max-restarts", str(max_restarts), *launcher],
                 train_args(out, durable, steps=steps, durable_every=durable_every), shm=shm, faults=faults, env=env)


def two_node_args(port: int, rdzv_id: str, *, host: bool, max_restarts: int = 3,
                  launcher: Sequence[str] = PAUSE) -> list[str]:
    """Launcher arguments of one of 2 simulated nodes (1 worker each) on 127.0.0.1, c10d rendezvous;
    the node with ``host=True`` serves the rendezvous store."""
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", rdzv_id, "--rdzv-conf", f"is_host={str(host).lower()}",
            "--max-restarts", str(max_restarts), "--peer-host", "127.0.0.1", *launcher]


def final_state(tmp: Any, name: str) -> dict[str, torch.Tensor]:
    """The final state dict rank 0 of job ``name`` saved."""
    return torch.load(os.path.join(str(tmp), f"final-{name}.pt"), weights_only=True)


# ---------------------------------------------------------------- reference


def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final parameters of an uninterrupted run (same seed, preset, steps and
    world size); computed once per pytest session, whichever module asks first."""
    base = tmp_path_factory.getbasetemp() / "chaos-reference"
    path = base / "final-clean.pt"
    if not path.exists():
        base.mkdir(parents=True, exist_ok=True)
        with shm_root() as shm:
            with standalone(base, "clean", shm=shm, durable=f"file://{base}/durable", max_restarts=0,
                            launcher=PAUSE) as agent:
                agent.finish()
    return torch.load(path, weights_only=True)


def assert_bitwise(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Every parameter equal bit for bit to the uninterrupted run's."""
    assert got.keys() == ref.keys()
    for key in ref:
        assert torch.equal(got[key], ref[key]), f"{key} differs from the uninterrupted run"


# ---------------------------------------------------------------- events


def restores(events: list[dict[str, Any]], attempt: int | None = None) -> list[dict[str, Any]]:
    """``checkpoint_restored`` events (of one restart ``attempt``)."""
    return [e for e in events if e["event"] == "checkpoint_restored" and (attempt is None or e["attempt"] == attempt)]


def newest_saved(events: list[dict[str, Any]], attempt: int) -> int:
    """The newest step every rank saved to RAM in ``attempt``: what a restart must
    restore. (Usually the step a fault hit; one less when the rank's save of that
    step was skipped because readers held every slot it may take, which a busy
    machine makes possible.)"""
    saved: dict[int, int] = {}
    for e in events:
        if e["event"] == "checkpoint_saved" and e["attempt"] == attempt and e["tier"] == "ram":
            saved[e["rank"]] = max(saved.get(e["rank"], 0), e["step"])
    return min(saved.values())


def named(events: list[dict[str, Any]], name: str, **fields: Any) -> list[dict[str, Any]]:
    """Events called ``name`` whose fields equal ``fields``."""
    return [e for e in events if e["event"] == name and all(e.get(k) == v for k, v in fields.items())]


def committed(durable_dir: str) -> list[int]:
    """Steps of a ``file://`` durable tier whose manifest exists, ascending."""
    paths = glob.glob(os.path.join(durable_dir, "step_*", ".hpresil", "manifest.json"))
    return sorted(int(p.split("step_")[1].split("/")[0]) for p in paths)


def verify_durable(url: str, step: int, storage_options: dict[str, Any] | None = None) -> int:
    """Reads every tensor entry of every rank of committed ``step`` through
    :class:`~hpresil.checkpoint.durable.source.DurableSource`, which checks each checksum.

    Returns:
        The bytes verified.

    Raises:
        IntegrityError, StorageError: the step is corrupt, incomplete or not committed.
    """
    from hpresil.checkpoint.durable.source import DurableSource
    from hpresil.checkpoint.durable.stores import open_store

    store = open_store(url, **(storage_options or {}))
    try:
        source = DurableSource(store)
        assert step in {r.step for r in source.steps()}, f"durable step {step} is not committed in {url}"
        total = 0
        for rank, record in source.records(step).items():
            for entry in record.entries:
                if entry.kind == "tensor":
                    source.read(step, rank, entry, torch.empty(entry.nbytes, dtype=torch.uint8))
                    total += entry.nbytes
        return total
    finally:
        store.close()


# ---------------------------------------------------------------- fault tools


def flip_bytes(path: str, offset: int, n: int = 64) -> None:
    """XORs ``n`` bytes of ``path`` at ``offset`` with 0xFF (in place, same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        assert data, f"{path} has no byte at {offset}"
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    """Mounts a tmpfs of ``size`` (e.g. ``"4m"``) on ``path``; skips the test when
    mounting is not permitted (no root, no CAP_SYS_ADMIN)."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs on {path} (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def remount(path: str, size: str) -> None:
    """Resizes the tmpfs mounted on ``path``."""
    subprocess.run(["mount", "-o", f"remount,size={size}", path], check=True, capture_output=True)


def fill(path: str, leave: int) -> int:
    """Writes a ballast file on the filesystem of ``path`` until ``leave`` bytes remain free."""
    st = os.statvfs(path)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(os.path.join(path, "ballast"), "wb") as f:
        f.write(b"\0" * size)
    return size


def exclusive_flocks(pid: int) -> set[int]:
    """Inodes on which ``pid`` holds an exclusive ``flock`` (from /proc/locks)."""
    inodes = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # "1: FLOCK  ADVISORY  WRITE 15499 00:1b:21073 0 EOF" ("->" marks a blocked waiter)
            if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "WRITE":
                continue
            if parts[4] == str(pid):
                inodes.add(int(parts[5].rsplit(":", 1)[1]))
    return inodes


def frozen(pid: int, check: Callable[[], Any], pause: float = 0.002) -> Callable[[], tuple[int, Any] | None]:
    """A :class:`KillInWindow` probe that SIGSTOPs ``pid``, evaluates ``check()``
    while the process is stopped, and either returns ``(pid, what check saw)`` with
    the process still stopped, so the SIGKILL lands in exactly the state checked,
    or SIGCONTs it and lets it run ``pause`` seconds before the next look."""

    def probe() -> tuple[int, Any] | None:
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 1.0
        while _state(pid) not in ("T", "t", "Z", "") and time.monotonic() < deadline:
            time.sleep(0)
        try:
            seen = check()
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
        if seen:
            return pid, seen
        os.kill(pid, signal.SIGCONT)
        time.sleep(pause)
        return None

    return probe


class KillInWindow:
    """A thread that SIGKILLs a process the moment ``probe()`` returns its pid.

    ``probe`` is called in a loop (see :func:`frozen`) until it returns a pid,
    ``stop()`` is called or ``timeout`` passes. What the probe saw is kept in
    ``seen``.
    """

    def __init__(self, probe: Callable[[], tuple[int, Any] | None], timeout: float) -> None:
        self.probe = probe
        self.timeout = timeout
        self.killed: int | None = None
        self.seen: Any = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-kill", daemon=True)

    def start(self) -> "KillInWindow":
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                hit = self.probe()
                if hit is not None:
                    pid, self.seen = hit
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
                    return
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)




# ---------------------------------------------------------------- RAM tier files


def ram_slots(shm_dir: str, rank: int) -> list[Any]:
    """``SlotInfo`` of every committed slot of ``rank`` under ``shm_dir`` (the RAM
    tier, or a replica root), oldest first; ``seal`` is set once it is sealed."""
    from hpresil.checkpoint.ram.files import scan

    return sorted(scan(shm_dir, [rank]), key=lambda i: i.record.step)


def corrupt_slot(shm_dir: str, info: Any, n: int = 64) -> str:
    """Flips ``n`` bytes inside the first tensor entry of a committed slot's arena
    (its record and seal stay as they are: only a checksum can tell)."""
    record = info.load_record(shm_dir)
    entry = next(e for e in record.entries if e.kind == "tensor" and e.nbytes >= n)
    path = info.path(shm_dir, "bin")
    flip_bytes(path, entry.offset, n)
    return entry.key
