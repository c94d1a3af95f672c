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
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["set_if_absent", "multi_get", "is_not_implemented"]

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
