"""etcd-v2 rendezvous across every member of an etcd cluster, with torch's own classes.

torch's ``etcd-v2`` handler talks to one ``--rdzv-endpoint`` (``host:port``):
when that member dies the agents lose the rendezvous although the cluster still
has a quorum. :func:`create_etcd_v2_handler` builds the same handler — torch's
``EtcdRendezvousBackend``, ``EtcdStore`` and ``create_handler``, unchanged —
over a python-etcd client that knows every member
(``--rdzv-endpoint h1:2379,h2:2379,h3:2379``) and moves to the next one when a
request to a member fails. torch's ``--rdzv-conf`` keys keep their meaning
(``read_timeout``, ``protocol``, ``ssl_cert``, ``ssl_cert_key``, ``ca_cert``).

A cluster that lost its quorum cannot serve a rendezvous; :func:`quorum_report`
says how many members answer, for the error that ends such a job.

torch's ``EtcdStore`` implements ``set``/``get``/``add``/``check``/``wait`` only:
:mod:`hpresil.runtime.store_ops` builds what hpresil needs beyond that from them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

from hpresil.errors import ConfigError

__all__ = ["BACKEND", "create_etcd_v2_handler", "parse_endpoints", "quorum_report", "DEFAULT_PORT"]

log = logging.getLogger(__name__)

BACKEND = "etcd-v2"
DEFAULT_PORT = 2379
#: torch's key prefixes for the rendezvous state and the store (kept, so torch's tools find them).
STATE_PREFIX = "/torch/elastic/rendezvous"
STORE_PREFIX = "/torch/elastic/store"
#: A member a request failed on is skipped by the agent's other requests for this long.
_DOWN_FOR_S = 5.0


def parse_endpoints(endpoint: str) -> list[tuple[str, int]]:
    """``"h1:2379,h2,[::1]:2380"`` -> ``[("h1", 2379), ("h2", 2379), ("::1", 2380)]``.

    Raises:
        ConfigError: empty, or a port that is not a number in 1..65535.
    """
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in (endpoint or "").split(",")):
        if not part:
            continue
        host, port = part, str(DEFAULT_PORT)
        if part.startswith("["):  # [v6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":") or port
        elif part.count(":") == 1:
            host, port = part.split(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--rdzv-endpoint {endpoint!r}: {part!r} is not host[:port]; "
                              "pass e.g. etcd1:2379,etcd2:2379,etcd3:2379")
        out.append((host, int(port)))
    if not out:
        raise ConfigError("--rdzv-backend etcd-v2 needs --rdzv-endpoint host1:2379[,host2:2379,...] "
                          "(every member of the etcd cluster)")
    return out


def _client(params: RendezvousParameters) -> Any:
    try:
        import etcd  # python-etcd: torch's etcd-v2 backend needs it too
    except ImportError:
        raise ConfigError("--rdzv-backend etcd-v2 needs python-etcd: pip install python-etcd") from None
    members = parse_endpoints(params.endpoint)
    read_timeout = params.get_as_int("read_timeout", 60)
    if read_timeout is None or read_timeout <= 0:
        raise ConfigError(f"--rdzv-conf read_timeout={read_timeout}: takes a number of seconds > 0")
    protocol = str(params.get("protocol", "http")).strip().lower()
    if protocol not in ("http", "https"):
        raise ConfigError(f"--rdzv-conf protocol={protocol!r}: takes http or https")
    cert: Any = params.get("ssl_cert")
    if cert and params.get("ssl_cert_key"):
        cert = (cert, params.get("ssl_cert_key"))
    host: Any = tuple(members) if len(members) > 1 else members[0][0]
    try:
        return _failover_client(etcd)(host=host, port=members[0][1], read_timeout=read_timeout, protocol=protocol,
                                      cert=cert, ca_cert=params.get("ca_cert"), allow_reconnect=True)
    except Exception as exc:  # python-etcd raises EtcdException or urllib3's errors when no member answers
        raise RendezvousConnectionError(
            f"cannot reach the etcd cluster at {params.endpoint}: {exc}; {quorum_report(members, protocol)}") from exc


def _failover_client(etcd: Any) -> type:
    """python-etcd's ``Client`` with failover that threads can share.

    python-etcd fails over by popping members off one shared list: an agent's
    threads (torch's keep-alive, the liveness ring, the monitor loop) failing at
    the same moment pop it empty, and every later request fails although members
    are up. Here the next member is the one after the current in the configured
    list that no member marked down (a request to it failed in the last few seconds)
    in any thread, the list is never consumed, and a request gives up after as many
    tries as there are members.
    """

    class FailoverClient(etcd.Client):  # type: ignore[misc, name-defined]
        def __init__(self, **kwargs: Any) -> None:
            host, port, protocol = kwargs["host"], kwargs["port"], kwargs["protocol"]
            pairs = host if isinstance(host, tuple) else ((host, port),)
            self._members = [f"{protocol}://{h}:{p}" for h, p in pairs]
            self._tries = threading.local()
            self._lock = threading.Lock()
            self._down: dict[str, float] = {}  # member -> when a request to it last failed
            super().__init__(**kwargs)

        @property
        def machines(self) -> list[str]:
            return list(self._members)  # every member was given: no discovery round trip

        def api_execute(self, path: str, method: str, params: Any = None, timeout: Any = None) -> Any:
            self._tries.n = 0
            return super().api_execute(path, method, params=params, timeout=timeout)

        def _next_server(self, cause: Exception | None = None) -> str:
            self._tries.n = getattr(self._tries, "n", 0) + 1
            if self._tries.n > len(self._members):
                raise etcd.EtcdConnectionFailed(f"no etcd member answers ({', '.join(self._members)})", cause=cause)
            # The member that failed is the one in the error (another thread may have moved
            # _base_uri meanwhile); it is skipped by every thread for a while.
            pool = getattr(cause, "pool", None)
            failed = f"{self._protocol}://{pool.host}:{pool.port}" if pool is not None else self._base_uri
            now = time.monotonic()
            with self._lock:
                self._down[failed] = now
                start = self._members.index(failed) + 1 if failed in self._members else 0
                order = self._members[start:] + self._members[:start]
                up = [m for m in order if now - self._down.get(m, -1e9) > _DOWN_FOR_S]
            return (up or order)[0]

    return FailoverClient


def create_etcd_v2_handler(params: RendezvousParameters) -> Any:
    """torch's ``DynamicRendezvousHandler`` over torch's etcd backend and store,
    with a client that fails over between every member in ``params.endpoint``
    and a backoff after a lost compare-and-set (:class:`~hpresil.elastic.torch_rdzv.BackoffBackend`).

    Raises:
        ConfigError: the endpoint list or a ``--rdzv-conf`` value is invalid, or python-etcd is missing.
        RendezvousConnectionError: no member answers.
    """
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import EtcdRendezvousBackend
    from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore

    from hpresil.elastic.torch_rdzv import BackoffBackend

    client = _client(params)
    backend = BackoffBackend(EtcdRendezvousBackend(client, params.run_id, key_prefix=STATE_PREFIX))
    return create_handler(EtcdStore(client, STORE_PREFIX), backend, params)


def _member_health(host: str, port: int, protocol: str, timeout: float) -> bool | None:
    """``True``: the member answers and has a leader; ``False``: it answers without
    one (it lost its quorum); ``None``: it does not answer."""
    try:
        with urllib.request.urlopen(f"{protocol}://{host}:{port}/health", timeout=timeout) as r:  # noqa: S310
            return json.loads(r.read() or b"{}").get("health") in ("true", True)
    except urllib.error.HTTPError as exc:  # etcd answers 503 when it has no leader
        return False if exc.code == 503 else None
    except (OSError, ValueError):
        return None


def quorum_report(members: list[tuple[str, int]], protocol: str = "http", timeout: float = 1.0) -> str:
    """Which of ``members`` answer and whether they have a leader, against the quorum
    etcd needs: ``"1 of 3 etcd members answer (h:p), 0 with a leader; etcd serves only
    with a quorum of 2: ..."``."""
    health = {f"{h}:{p}": _member_health(h, p, protocol, timeout) for h, p in members}
    answering = [m for m, ok in health.items() if ok is not None]
    led = sum(1 for ok in health.values() if ok)
    quorum = len(members) // 2 + 1
    text = (f"{len(answering)} of {len(members)} etcd members answer ({', '.join(answering) or 'none'}), "
            f"{led} with a leader")
    if led >= quorum:
        return f"{text} (quorum {quorum})"
    return (f"{text}; etcd serves only with a quorum of {quorum}: restart the stopped members, or pass the "
            "endpoints of a healthy cluster with --rdzv-endpoint")
