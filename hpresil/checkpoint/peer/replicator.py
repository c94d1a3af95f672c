"""The replicator: a node service that copies sealed RAM snapshots to peer nodes.

It runs in the node runtime, never in the training process, so ``save()``
keeps its blocking time. At start it opens the node's
:class:`~hpresil.checkpoint.peer.server.PeerServer`. After every (re)start of the worker
group it settles the job secret, publishes ``{node, host, port, domain}``
under ``hpresil/peer/node/<group rank>`` in the round's rendezvous store,
reads the other nodes' entries, and computes its targets with
:func:`~hpresil.checkpoint.peer.placement.place`. Then, every ``scan_interval``, the
newest sealed snapshot of each local rank is offered to one sender thread
per target; a sender streams what its peer lacks (newest only: a peer that
fell behind skips intermediate steps).

A slow or dead peer never blocks anything but its own sender thread: the
snapshot stays local-only, a ``tier_degraded`` event (tier ``peer``) says
so, and the sender retries after an exponential backoff; the first success
afterwards is logged and reported with ``recovered: true``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

from hpresil.checkpoint.ram.files import SlotInfo, scan, write_atomic
from hpresil.events import NullEventLog
from hpresil.events.api import EventSink
from hpresil.checkpoint.peer import secret as job_secret
from hpresil.checkpoint.peer.api import ReplicatorConfig, peer_dir
from hpresil.checkpoint.peer.client import PeerClient
from hpresil.checkpoint.peer.placement import place
from hpresil.checkpoint.peer.server import PeerServer
from hpresil.runtime.api import NodeService, RuntimeContext, WorkerGroupInfo

__all__ = ["Replicator"]

log = logging.getLogger(__name__)

_NODE_KEY = "hpresil/peer/node/"


class _Sender:
    """Pushes the newest snapshot of each rank to one peer, on its own thread."""

    def __init__(self, owner: "Replicator", peer: dict[str, Any]) -> None:
        self.owner = owner
        self.peer = peer
        self.name = str(peer["node"])
        self._want: dict[int, SlotInfo] = {}
        self._sent: dict[int, str] = {}  # rank -> commit id the peer holds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._failures = 0
        self._retry_at = 0.0
        self._client: PeerClient | None = None
        self._thread = threading.Thread(target=self._loop, name=f"hpresil-peer-send-{self.name}", daemon=True)
        self._thread.start()

    def offer(self, newest: dict[int, SlotInfo]) -> None:
        with self._lock:
            self._want = {r: i for r, i in newest.items() if self._sent.get(r) != i.record.commit_id}
        if self._want:
            self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            delay = self._retry_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            with self._lock:
                work = sorted(self._want.values(), key=lambda i: i.rank)
            for info in work:
                if self._stop.is_set():
                    return
                if not self._send(info):
                    self._wake.set()  # retry after the backoff
                    break

    def _send(self, info: SlotInfo) -> bool:
        owner = self.owner
        secret = owner.secret()
        if secret is None:
            return False
        t0 = time.perf_counter()
        try:
            if self._client is None:
                cfg = owner.config
                self._client = PeerClient(self.peer["host"], int(self.peer["port"]), secret, owner.node,
                                          connect_timeout=cfg.connect_timeout, io_timeout=cfg.io_timeout,
                                          max_header=cfg.max_header_bytes)
            status = self._client.put(owner.shm_dir, info)
        except Exception as exc:  # noqa: BLE001 - any failure degrades to local-only
            if self._client is not None:
                self._client.close()
                self._client = None
            self._degraded(info, f"{type(exc).__name__}: {exc}")
            return False
        duration = time.perf_counter() - t0
        rank, step = info.rank, info.record.step
        if status in ("sent", "have", "gone"):
            with self._lock:
                if status != "gone":
                    self._sent[rank] = info.record.commit_id
                if self._want.get(rank) is info:
                    del self._want[rank]
        if status == "sent":
            recovered = self._failures > 0
            if recovered:
                log.info("replication to %s recovered after %d failed attempts", self.name, self._failures)
            self._failures, self._retry_at = 0, 0.0
            nbytes = info.record.nbytes
            log.debug("replicated rank %d step %d to %s (%d bytes in %.3fs)", rank, step, self.name, nbytes, duration)
            owner.events.emit("checkpoint_replicated", tier="peer", step=step, rank=rank, peer=self.name, bytes=nbytes,
                              duration_s=round(duration, 6),
                              mb_per_s=round(nbytes / 1e6 / duration, 1) if duration > 0 else 0.0,
                              lag_s=round(max(0.0, time.time() - info.record.created), 3), recovered=recovered)
            return True
        if status in ("have", "gone"):
            return True
        self._degraded(info, f"peer refused: {status}")
        return False

    def _degraded(self, info: SlotInfo, error: str) -> None:
        cfg = self.owner.config
        self._failures += 1
        delay = min(cfg.backoff_max.total_seconds(), cfg.backoff_initial.total_seconds() * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        log.warning("replication of rank %d step %d to %s failed (attempt %d, retry in %.1fs); the snapshot stays "
                    "local-only: %s", info.rank, info.record.step, self.name, self._failures, delay, error)
        self.owner.events.emit("tier_degraded", tier="peer", peer=self.name, step=info.record.step, rank=info.rank,
                               error=error[:500], attempt=self._failures, retry_in_s=delay)


class Replicator(NodeService):
    """Node service: the peer server plus replication of sealed snapshots.

    Args:
        config: settings (``None``: defaults, replicas=1).
    """

    name = "replicator"

    def __init__(self, config: ReplicatorConfig | None = None) -> None:
        self.config = config or ReplicatorConfig()
        self.shm_dir = ""
        self.node = ""
        self.events: EventSink = NullEventLog()
        self.server: PeerServer | None = None
        self.host = ""
        self.port = 0
        self._secret: bytes | None = None
        self._secret_from_env = False
        self._group: WorkerGroupInfo | None = None
        self._generation = 0
        self._senders: dict[str, _Sender] = {}
        self._cache: dict[str, Any] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_scan = 0.0
        self._thread: threading.Thread | None = None

    def secret(self) -> bytes | None:
        """The job secret, once known."""
        return self._secret

    # -- NodeService -----------------------------------------------------
    def start(self, ctx: RuntimeContext) -> None:
        """Starts the peer server and the replicator thread.

        Raises:
            ConfigError: ``$HPRESIL_JOB_SECRET_FILE`` is unreadable.
            OSError: the server cannot bind its address.
        """
        self.shm_dir, self.node, self.events = ctx.shm_dir, ctx.node_id, ctx.events
        self._secret = job_secret.from_env()
        self._secret_from_env = self._secret is not None
        os.makedirs(peer_dir(self.shm_dir), mode=0o700, exist_ok=True)
        self.server = PeerServer(self.shm_dir, self.secret, self.config, self.events, node=self.node)
        _, self.port = self.server.start()
        self.host = self.config.advertise or self.config.host or socket.getfqdn()
        self._thread = threading.Thread(target=self._loop, name="hpresil-replicator", daemon=True)
        self._thread.start()

    def on_workers_started(self, group: WorkerGroupInfo) -> None:
        """A new round: discover the peers again (on the replicator's thread)."""
        self._group = group
        self._generation += 1
        self._wake.set()

    def on_workers_stopped(self, group: WorkerGroupInfo) -> None:
        """The last snapshots of a stopped group still get replicated."""
        self._wake.set()

    def tick(self) -> None:
        """Wakes the replicator thread when a scan is due; never blocks."""
        now = time.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self.config.scan_interval.total_seconds()
            self._wake.set()

    def stop(self, timeout: timedelta) -> None:
        """Stops senders (abandoning transfers in flight), the thread and the server."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, timeout.total_seconds()))
        for sender in self._senders.values():
            sender.stop(max(0.1, timeout.total_seconds() / 2))
        self._senders.clear()
        if self.server is not None:
            self.server.stop()
        self._group = None  # its store: nothing of the round outlives the runtime

    # -- work ------------------------------------------------------------
    def _loop(self) -> None:
        seen = 0
        while not self._stop.is_set():
            self._wake.wait(self.config.scan_interval.total_seconds())
            self._wake.clear()
            try:
                if self._generation != seen and self._group is not None:
                    seen = self._generation
                    self._discover(self._group, seen)
                self._offer()
            except Exception:  # noqa: BLE001 - never let the thread die
                log.exception("replicator pass failed; retrying")

    def _discover(self, group: WorkerGroupInfo, generation: int) -> None:
        store = group.store
        timeout = self.config.discovery_timeout.total_seconds()
        try:
            if not self._secret_from_env:
                if store is None:
                    self._secret = self._secret or job_secret.agree(_LocalStore(), 0, None, timeout)
                else:
                    self._secret = job_secret.agree(store, group.group_rank, self._secret, timeout, self._stop)
                job_secret.write_file(self.shm_dir, self._secret)
        except Exception as exc:  # noqa: BLE001
            log.warning("peer replication off for this round: no job secret (%s)", exc)
            self.events.emit("tier_degraded", tier="peer", error=f"job secret: {exc}")
            return
        me = {"node": self.node, "host": self.host, "port": self.port, "domain": self.config.domain,
              "group_rank": group.group_rank}
        write_atomic(os.path.join(peer_dir(self.shm_dir), "node.json"), json.dumps({**me, "attempt": group.attempt}))
        for sender in self._senders.values():
            sender.stop(1.0)
        self._senders.clear()
        if group.group_world_size < 2 or store is None:
            return
        store.set(f"{_NODE_KEY}{group.group_rank}", json.dumps(me))  # also when not sending: others send here
        if self.config.replicas == 0:
            return
        nodes: dict[int, dict[str, Any]] = {group.group_rank: me}
        deadline = time.monotonic() + timeout
        while len(nodes) < group.group_world_size and time.monotonic() < deadline:
            if self._stop.is_set() or self._generation != generation:
                return
            for g in range(group.group_world_size):
                key = f"{_NODE_KEY}{g}"
                if g not in nodes and store.check([key]):
                    nodes[g] = json.loads(store.get(key))
            if len(nodes) < group.group_world_size:
                time.sleep(0.02)
        missing = sorted(set(range(group.group_world_size)) - set(nodes))
        if missing:
            log.warning("peer discovery: nodes %s did not publish an address within %.0fs", missing, timeout)
            self.events.emit("tier_degraded", tier="peer", error=f"nodes {missing} did not publish their address")
        domains = [nodes.get(g, {}).get("domain") or _topology_domain(store, g) for g in range(group.group_world_size)]
        targets = place(group.group_rank, group.group_world_size, self.config.replicas, domains)
        for g in targets:
            if g in nodes:
                self._senders[str(nodes[g]["node"])] = _Sender(self, nodes[g])
        log.info("node %s (group rank %d) replicates to %s", self.node, group.group_rank,
                 [f"{nodes[g]['node']}@{nodes[g]['host']}:{nodes[g]['port']}" for g in targets if g in nodes])

    def _offer(self) -> None:
        if not self._senders:
            return
        group = self._group
        ranks = list(group.global_ranks) if group is not None else None
        newest: dict[int, SlotInfo] = {}
        for info in scan(self.shm_dir, ranks, self._cache):
            if info.seal is None or info.seal.health != "ok":
                continue  # a peer keeps its healthy replica rather than an unhealthy newer one
            old = newest.get(info.rank)
            if old is None or old.record.created < info.record.created:
                newest[info.rank] = info
        if newest:
            for sender in self._senders.values():
                sender.offer(newest)


def _topology_domain(store: Any, group_rank: int) -> str | None:
    """The NVLink domain the topology service published for a node, if any."""
    key = f"hpresil/topology/node/{group_rank}"
    try:
        if store.check([key]):
            domain = json.loads(bytes(store.get(key)).decode()).get("domain")
            return str(domain) if domain else None
    except Exception:  # noqa: BLE001 - placement works without domains
        pass
    return None


class _LocalStore:
    """A store of one: the secret of a node that has no rendezvous store."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self._data.setdefault(key, desired.encode())
