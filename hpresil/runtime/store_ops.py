"""Store operations hpresil needs, on every torch ``Store``.

``TCPStore`` has ``compare_set`` and ``multi_get``; torch's ``EtcdStore`` (the
``etcd-v2`` rendezvous) has only ``set``, ``get``, ``add``, ``check`` and
``wait``, and the C++ trampoline answers the others with ``Not implemented``.
These helpers use the native operation and, where it is missing, build the same
result from the five basic ones:

* :func:`set_if_absent` — the first value written wins and every caller gets it
  (``compare_set(key, "", value)``). Without ``compare_set``: ``add`` on a
  claim counter elects the one writer (etcd's ``add`` is a compare-and-swap
  loop, atomic across members); the others ``get`` the key, which waits for it.
* :func:`multi_get` — one round trip where the store has it, else one ``get``
  per key.
* :func:`read_counter` — a counter's value without waiting for a missing key:
  ``add(key, 0)`` is one round trip on a TCPStore, but on etcd ``add`` is a
  compare-and-swap (a failed create, a read and a write through raft, even for
  0); there ``check`` and ``get`` read it without a write.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["set_if_absent", "multi_get", "is_not_implemented", "read_counter", "writes_to_add"]

#: Suffix of the claim counter that elects the writer of a key without ``compare_set``.
CLAIM_SUFFIX = "/hpresil-claim"


def is_not_implemented(exc: BaseException) -> bool:
    """Whether ``exc`` is a store saying it lacks an operation (a Python ``Store``
    subclass such as ``EtcdStore`` behind torch's C++ trampoline)."""
    return isinstance(exc, (RuntimeError, NotImplementedError)) and (
        isinstance(exc, NotImplementedError) or "Not implemented" in str(exc))


def set_if_absent(store: Any, key: str, value: str | bytes) -> bytes:
    """Writes ``value`` at ``key`` unless some caller wrote first; returns the value that stands.

    Raises:
        whatever the store raises, e.g. a timeout of ``get`` when the elected
        writer died before writing (the store's own timeout bounds the wait).
    """
    try:
        return bytes(store.compare_set(key, "", value))
    except Exception as exc:  # noqa: BLE001 - only "not implemented" falls back
        if not is_not_implemented(exc):
            raise
    if int(store.add(key + CLAIM_SUFFIX, 1)) == 1:
        store.set(key, value)
        return value.encode() if isinstance(value, str) else bytes(value)
    return bytes(store.get(key))


def multi_get(store: Any, keys: Sequence[str]) -> list[bytes]:
    """The values of ``keys`` (each waits until it exists, as ``get`` does)."""
    if len(keys) > 1:
        try:
            return [bytes(v) for v in store.multi_get(list(keys))]
        except Exception as exc:  # noqa: BLE001
            if not is_not_implemented(exc):
                raise
    return [bytes(store.get(k)) for k in keys]


def writes_to_add(store: Any) -> bool:
    """Whether ``store`` (or the store a ``PrefixStore`` chain wraps) turns every
    ``add`` into a consensus write (torch's ``EtcdStore``)."""
    seen = 0
    while store is not None and seen < 16:
        if type(store).__name__ == "EtcdStore":
            return True
        store, seen = getattr(store, "underlying_store", None), seen + 1
    return False


def read_counter(store: Any, key: str, write_free: bool | None = None) -> int:
    """The counter at ``key`` (0 when missing), never waiting for it.

    Args:
        write_free: read with ``check``/``get`` instead of ``add(key, 0)``
            (default: :func:`writes_to_add`; pass it to skip the lookup per call).
    """
    if write_free is None:
        write_free = writes_to_add(store)
    if not write_free:
        return int(store.add(key, 0))
    return int(bytes(store.get(key)).decode()) if store.check([key]) else 0
