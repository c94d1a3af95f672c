"""A standalone rendezvous store, so no training node hosts it.

With torch's c10d rendezvous backend, the agent whose address matches
``--rdzv-endpoint`` hosts the ``TCPStore`` that holds the rendezvous state. If
that node dies, every other agent's next rendezvous operation fails
(``RendezvousConnectionError``) and the whole job ends, however many nodes
survive. Run the store in a process that is not a training node (a login or
head node, a Kubernetes service) and make every agent a client::

    python -m hpresil.elastic.store --host 0.0.0.0 --port 29400      # on the head node
    hpresil-run --nnodes 2:16 --rdzv-backend c10d --rdzv-endpoint head:29400 \\
        --rdzv-conf is_host=false ... train.py                       # on every node

The workers do not use this store: ``hpresil-run`` sets
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, so each round's group rank 0 starts a
fresh store for its workers, and a lost rank-0 node is replaced by the next
round's rank 0. The store keeps no state worth persisting: if *it* dies, the
agents fail their next rendezvous operation and the job ends (restart it and
the job from the newest checkpoint), the same as torch's c10d backend.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from datetime import timedelta
from typing import Sequence

__all__ = ["serve", "main"]

log = logging.getLogger(__name__)


def serve(host: str, port: int, stop: threading.Event, ready: threading.Event | None = None) -> None:
    """Hosts a multi-tenant ``TCPStore`` on ``host:port`` until ``stop`` is set.

    Args:
        host: address to listen on.
        port: port (0: any free port; the chosen one is printed).
        stop: set it to shut the store down.
        ready: set once the store listens.
    """
    from torch.distributed import TCPStore

    store = TCPStore(host, port, is_master=True, wait_for_workers=False, multi_tenant=True,
                     timeout=timedelta(seconds=60), use_libuv=True)
    print(f"hpresil rendezvous store listening on {host}:{store.port}", flush=True)
    log.info("rendezvous store listening on %s:%d", host, store.port)
    if ready is not None:
        ready.set()
    stop.wait()
    del store


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m hpresil.elastic.store [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="python -m hpresil.elastic.store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=29400, help="port (default: 29400, torch's c10d default)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(args.host, args.port, stop)


if __name__ == "__main__":
    logging.basicConfig(level="INFO", stream=sys.stderr)
    main()
