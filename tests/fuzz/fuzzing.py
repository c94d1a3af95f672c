"""Deterministic, seeded mutation of what hpresil reads from outside its process
(untrusted input), shared by the ``tests/fuzz/test_fuzz_*.py`` files.

Every fuzz target starts from a real, valid artifact made by the real code (a
RAM snapshot, a durable commit, a frame a real client sends, a valid command
line) and feeds mutants of it to the real reader. For each mutant a test
records one outcome in a :class:`Tally`:

* ``rejected``: refused with an :class:`~hpresil.errors.HpresilError` (or the
  reader's documented clean refusal: ``None``, a skipped tier, exit status 2,
  a closed connection);
* ``accepted``: accepted, and what was loaded equals the original bit for bit;
* ``silent``: accepted but what was loaded differs: a silent load of
  corrupted state, which :meth:`Tally.check` fails on.

Any other exception escapes to pytest with the input that caused it, and
:func:`deadline` turns a hang into a failure naming the input.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
from typing import Any, Iterator

__all__ = ["Fuzzer", "Tally", "deadline", "quiet", "FuzzHang", "NASTY", "DEEP"]

#: JSON values that break readers: wrong types, huge, negative, NaN, empty, odd strings.
NASTY: tuple[Any, ...] = (
    None, True, False, 0, -1, -(2**63) - 1, 2**31, 2**63, 2**64 + 7, 10**30, 0.5, -0.0, 1e308, -1e308,
    math.nan, math.inf, -math.inf, "", "0", "-1", "nan", "x" * 300, "\u0000\u202e\udcff", "../../etc/passwd",
    [], [None], [-1, 2**70], {}, {"__tuple__": 5}, {"__bytes__": "!!"}, {"__dict__": [[1]]}, {"__dtype__": "nope"},
    {"op": None},
)
#: Placeholder replaced by :data:`DEEP_TEXT` after serialisation (json.dumps cannot nest that deep).
DEEP = "\u0001deep\u0001"
DEEP_TEXT = "[" * 5000 + "]" * 5000


class FuzzHang(AssertionError):
    """A single input took longer than its :func:`deadline`."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fails with :class:`FuzzHang` naming ``what`` when the block runs longer
    than ``seconds`` (main thread only: SIGALRM)."""
    def _fire(signum: int, frame: object) -> None:
        raise FuzzHang(f"input hung for more than {seconds} s: {what}")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def quiet(name: str = "hpresil") -> Iterator[None]:
    """Silences the ``name`` loggers: thousands of refused inputs would log
    thousands of warnings (each refusal is still asserted on)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(old)


def _dumps(obj: Any, compact: bool = True) -> str:
    text = json.dumps(obj, separators=(",", ":") if compact else None)
    return text.replace(json.dumps(DEEP), DEEP_TEXT)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside ``obj`` (the root included)."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


class Fuzzer:
    """Seeded mutants of one valid input; the same seed gives the same inputs.

    Args:
        seed: the seed (each target uses its own).
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- byte level ------------------------------------------------------
    def mutate_bytes(self, data: bytes) -> tuple[str, bytes]:
        """One random byte-level mutation: bit flip, byte set, insert, delete,
        duplicated or zeroed run, or a 0xff run."""
        rng = self.rng
        buf = bytearray(data)
        n = len(buf)
        kind = rng.choice(("flip", "flip", "flip", "set", "insert", "delete", "dup", "zero", "ff"))
        if n == 0:
            kind = "insert"
        pos = rng.randrange(max(1, n))
        if kind == "flip":
            bit = rng.randrange(8)
            buf[pos] ^= 1 << bit
            return f"flip bit {bit} of byte {pos}", bytes(buf)
        if kind == "set":
            value = rng.choice((0, 0xFF, ord('"'), ord("}"), ord(","), ord("9"), ord("-"), rng.randrange(256)))
            buf[pos] = value
            return f"set byte {pos} to {value:#x}", bytes(buf)
        if kind == "insert":
            value = bytes([rng.randrange(256) for _ in range(rng.choice((1, 1, 2, 8)))])
            buf[pos:pos] = value
            return f"insert {value!r} at {pos}", bytes(buf)
        width = rng.choice((1, 1, 4, 16, 64))
        if kind == "delete":
            del buf[pos : pos + width]
            return f"delete {width} bytes at {pos}", bytes(buf)
        if kind == "dup":
            buf[pos:pos] = buf[pos : pos + width]
            return f"duplicate {width} bytes at {pos}", bytes(buf)
        fill = 0 if kind == "zero" else 0xFF
        buf[pos : pos + width] = bytes([fill]) * len(buf[pos : pos + width])
        return f"{kind} {width} bytes at {pos}", bytes(buf)

    def byte_mutants(self, data: bytes, count: int) -> Iterator[tuple[str, bytes]]:
        """``count`` mutants, each one to three stacked byte-level mutations."""
        for _ in range(count):
            what, out = [], data
            for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
                desc, out = self.mutate_bytes(out)
                what.append(desc)
            if out != data:
                yield "; ".join(what), out

    @staticmethod
    def truncations(data: bytes, limit: int | None = None) -> Iterator[tuple[str, bytes]]:
        """``data`` cut at every boundary (every length 0..len-1); with
        ``limit``, at most that many, evenly spread and always including 0 and len-1."""
        cuts = range(len(data))
        if limit is not None and len(data) > limit:
            step = len(data) / limit
            cuts = sorted({int(i * step) for i in range(limit)} | {len(data) - 1})  # type: ignore[assignment]
        for cut in cuts:
            yield f"truncated to {cut} of {len(data)} bytes", data[:cut]

    # -- JSON level ------------------------------------------------------
    def json_mutants(self, obj: Any, count: int, compact: bool = True) -> Iterator[tuple[str, str]]:
        """``count`` structure-aware mutants of a JSON value, as text: a value
        replaced by a nasty one (:data:`NASTY`, deep nesting), a key removed or
        added, a container emptied, a number nudged, a string altered."""
        paths = _paths(obj)
        for _ in range(count):
            mutant = json.loads(json.dumps(obj))
            path = self.rng.choice(paths)
            desc, mutant = self._mutate_at(mutant, path)
            yield desc, _dumps(mutant, compact)

    def _mutate_at(self, mutant: Any, path: tuple[Any, ...]) -> tuple[str, Any]:
        rng = self.rng
        here = "/".join(map(str, path)) or "<root>"
        value = _get(mutant, path)
        choice = rng.random()
        if isinstance(value, dict) and value and choice < 0.25:
            key = rng.choice(list(value))
            del value[key]
            return f"remove key {key!r} at {here}", mutant
        if isinstance(value, dict) and choice < 0.35:
            value[rng.choice(("x", "__tuple__", "version", "op", ""))] = rng.choice(NASTY)
            return f"add a key at {here}", mutant
        if isinstance(value, list) and value and choice < 0.3:
            op = rng.choice(("pop", "dup", "clear", "reverse"))
            if op == "pop":
                value.pop(rng.randrange(len(value)))
            elif op == "dup":
                value.append(value[0])
            elif op == "clear":
                value.clear()
            else:
                value.reverse()
            return f"{op} list at {here}", mutant
        if isinstance(value, bool) and choice < 0.5:
            new: Any = not value
        elif isinstance(value, int) and not isinstance(value, bool) and choice < 0.5:
            new = value + rng.choice((1, -1, 2, 7, -value - 1, 2**32, 2**62))
        elif isinstance(value, float) and choice < 0.5:
            new = value * rng.choice((2.0, -1.0, 0.0, 1e300, 1.0000001))
        elif isinstance(value, str) and value and choice < 0.5:
            i = rng.randrange(len(value))
            new = value[:i] + rng.choice(("0", "a", "-", " ", "Z", "")) + value[i + 1 :]
        elif choice < 0.92:
            new = rng.choice(NASTY)
        else:
            new = DEEP
        if not path:
            return f"replace <root> with {_short(new)}", new
        parent = _get(mutant, path[:-1])
        parent[path[-1]] = new
        return f"replace {here} with {_short(new)}", mutant


def _short(value: Any) -> str:
    text = "deep nesting" if value == DEEP else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass
class Tally:
    """Outcomes of one fuzz target.

    Attributes:
        target: what was fuzzed.
        counts: outcome (``rejected``, ``accepted``, ``silent``) -> inputs.
        details: ``"outcome: how"`` -> inputs (which tier served, which error refused).
        silent: descriptions of inputs that were loaded but differ from the original.
        bugs: inputs that raised something other than a clean refusal (one per exception site).
    """

    target: str
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    details: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    silent: list[str] = dataclasses.field(default_factory=list)
    bugs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        """Inputs recorded."""
        return sum(self.counts.values())

    def add(self, outcome: str, how: str = "") -> None:
        """Records one input's outcome and, for the summary, how it came about
        (for ``silent``: the input and what differed)."""
        assert outcome in ("rejected", "accepted", "silent"), outcome
        self.counts[outcome] += 1
        if outcome == "silent":
            self.silent.append(how)
        elif how:
            self.details[f"{outcome}: {how}"] += 1

    def bug(self, exc: BaseException, what: str) -> None:
        """Records an input that raised ``exc`` instead of being refused cleanly (the
        first input per raising line is kept, so one run lists every distinct bug)."""
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)
        mine = [f for f in frames if "/hpresil/" in f.filename] or frames
        where = f"{type(exc).__name__} at {mine[-1].filename.rsplit('/hpresil/', 1)[-1]}:{mine[-1].lineno}" if mine else type(exc).__name__
        self.bugs.setdefault(where, f"{what}: {exc}"[:300])

    def check(self, min_inputs: int = 1) -> None:
        """Asserts zero silent loads and that enough inputs ran; prints the tally."""
        shown = ", ".join(f"{k} {v}" for k, v in self.details.most_common(8))
        print(f"\nfuzz {self.target}: {self.total} inputs {dict(sorted(self.counts.items()))} [{shown}]")
        assert not self.bugs, f"{self.target}: inputs not refused cleanly:\n" + "\n".join(f"{k}: {v}" for k, v in self.bugs.items())
        assert self.total >= min_inputs, f"{self.target}: only {self.total} inputs ran"
        assert not self.silent, f"{self.target}: {len(self.silent)} silent load(s) of corrupted state: {self.silent[:5]}"
