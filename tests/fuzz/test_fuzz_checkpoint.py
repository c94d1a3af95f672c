"""Fuzz pass over the checkpoint files hpresil reads back (untrusted input).

A real Checkpointer saves two steps to the RAM tier (sealed by the real
sealer) and drains them to a file:// durable tier (real drainer). Each input
then mutates one file (flipped bits, inserted/deleted bytes, truncation at
every boundary, JSON with wrong types, huge or negative numbers, NaN, deep
nesting) and restores a fresh state through the real restore engine. The
restore must either load a state equal bit for bit to what was saved at the
step it reports, or refuse (``None``, or an ``HpresilError``); a state that
differs is a silent load, and zero are allowed. The untouched files are put
back after every input.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import pytest
import torch

from fuzzing import Fuzzer, Tally, deadline, quiet
from hpresil import errors
from hpresil.checkpoint import Checkpointer
from hpresil.checkpoint.stateful import HANG_KEY, HangCalibration as _HangCalibration
from hpresil.checkpoint.durable.source import DurableSource
from hpresil.checkpoint.durable.layout import MANIFEST, data_file, rank_json, step_dir
from hpresil.checkpoint.durable.stores.local import LocalStore
from hpresil.checkpoint.flatten import flatten
from hpresil.checkpoint.ram.files import scan
from hpresil.checkpoint.ram.source import RamSource
from hpresil.checkpoint.restore import restore_state
from hpresil.testing import RecordingSink

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

STEPS = (4, 5)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with quiet():
        yield
#: The error types a restore may end with (anything else escaped from deep inside).
HPRESIL_ERRORS = set(errors.__all__) | {"FrameError", "AuthError"}


def _state(seed: int) -> dict[str, Any]:
    """A small training state: tensors of several dtypes, plain values of every JSON codec tag."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16)},
        "count": torch.tensor(seed * 1000 + 7, dtype=torch.int64),
        "odd": torch.arange(3, dtype=torch.int8) + seed,
        "meta": {"epoch": seed, "name": f"run-{seed}", "pair": (seed, 0.5), "blob": bytes([seed, 0, 255])},
    }


def _values(state: dict[str, Any]) -> dict[str, Any]:
    """Every leaf as comparable bytes/reprs (tensors by raw bytes, so NaN compares)."""
    out: dict[str, Any] = {}
    for leaf in flatten({k: v for k, v in state.items() if k != HANG_KEY}).leaves:
        v = leaf.value
        if isinstance(v, torch.Tensor):
            out[leaf.key] = (str(v.dtype), tuple(v.shape), bytes(v.contiguous().reshape(-1).view(torch.uint8).tolist()))
        else:
            out[leaf.key] = (type(v).__name__, repr(v))
    hang = state.get(HANG_KEY)
    out[HANG_KEY] = repr(sorted((hang._loaded or {}).items()))
    return out


class Artifacts:
    """A RAM tier and a durable tier holding :data:`STEPS`, made by the real code."""

    def __init__(self, shm: str, durable: str) -> None:
        self.shm, self.durable = shm, durable
        self.saved: dict[int, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.fresh = _values({**_state(99), HANG_KEY: _HangCalibration()})

    def record(self) -> None:
        for root in (self.shm, self.durable):
            for d, _, names in os.walk(root):
                for n in names:
                    with open(os.path.join(d, n), "rb") as f:
                        self.files[os.path.join(d, n)] = f.read()

    def ram_file(self, step: int, suffix: str) -> str:
        info = next(i for i in scan(self.shm) if i.record.step == step)
        return info.path(self.shm, suffix)

    def durable_file(self, step: int, name: str) -> str:
        return os.path.join(self.durable, step_dir(step), name)

    def put_back(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.files[path])

    def reset_durable(self) -> None:
        """The durable tier exactly as recorded (a drain under test may have added or pruned steps)."""
        for name in os.listdir(self.durable):
            if os.path.join(self.durable, name) not in {os.path.dirname(os.path.dirname(p)) for p in self.files}:
                shutil.rmtree(os.path.join(self.durable, name))
        for path, data in self.files.items():
            if path.startswith(self.durable):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Artifacts]:
    shm = tempfile.mkdtemp(dir="/dev/shm", prefix="hpresil-fuzz-")
    durable = str(tmp_path_factory.mktemp("fuzz-durable"))
    try:
        a = Artifacts(shm, durable)
        state = _state(1)
        ckpt = Checkpointer(state, shm_dir=shm, durable=f"file://{durable}", every=1, durable_every=1, keep=3,
                            run_services=True, events=RecordingSink())
        for step in STEPS:
            fresh = _state(step)
            for key in ("count", "odd"):
                state[key].copy_(fresh[key])
            state["model"]["w"].copy_(fresh["model"]["w"])
            state["model"]["b"].copy_(fresh["model"]["b"])
            state["meta"].clear()  # in place: the Checkpointer holds the same containers
            state["meta"].update(fresh["meta"])
            assert ckpt.save(step)
            ckpt.wait()
            a.saved[step] = _values({**state, HANG_KEY: _HangCalibration()})
            a.saved[step][HANG_KEY] = repr(sorted({"step_max": 0.0, "ckpt_max": 0.0, "n_steps": 0.0}.items()))
        ckpt.close(keep_ram=True)
        assert sorted(i.record.step for i in scan(shm) if i.seal is not None) == list(STEPS)
        assert sorted(os.listdir(durable)) == [step_dir(s) for s in STEPS]
        a.record()
        outcome = _restore(a, ("ram", "durable"), "unmodified")
        assert outcome == ("accepted", "ram"), outcome
        yield a
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def _masked(exc: BaseException, what: str) -> None:
    """restore_state turns an unexpected exception on a rank into a CheckpointError
    naming its type: that is a bug found, not a refusal."""
    m = re.search(r"failed on rank \d+: (\w+): ", str(exc))
    if type(exc) is errors.CheckpointError and m and m.group(1) not in HPRESIL_ERRORS:
        raise AssertionError(f"restore failed with an unexpected {m.group(1)} for input [{what}]: {exc}") from exc


def _restore(a: Artifacts, tiers: tuple[str, ...], what: str) -> tuple[str, str]:
    """Restores a fresh state from ``tiers``; returns (outcome, how)."""
    state = {**_state(99), HANG_KEY: _HangCalibration()}
    sources: list[Any] = []
    if "ram" in tiers:
        sources.append(RamSource(a.shm))
    if "durable" in tiers:
        sources.append(DurableSource(LocalStore(a.durable, fsync=False)))
    try:
        with deadline(10, what):
            result = restore_state(state, sources, events=RecordingSink())
    except errors.HpresilError as exc:
        _masked(exc, what)
        return "rejected", type(exc).__name__  # raised: nothing is passed off as restored
    got = _values(state)
    if result is None:
        if got != a.fresh:
            return "silent", f"{what}: nothing restored, yet the state changed"
        return "rejected", "none"
    want = a.saved.get(result.step)
    if want is None or got != want:
        diff = sorted(set(got) ^ set(want or {}) | {k for k in got if want and k in want and got[k] != want[k]})
        return "silent", f"{what}: restored step {result.step} from {result.tier} differs in {diff}"
    return "accepted", result.tier if result.step == STEPS[-1] else f"{result.tier}@{result.step}"


def _run(a: Artifacts, tally: Tally, path: str, inputs: Iterator[tuple[str, bytes]], tiers: tuple[str, ...]) -> None:
    name = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
    try:
        for what, data in inputs:
            with open(path, "wb") as f:
                f.write(data)
            outcome, how = _restore(a, tiers, f"{name}: {what}")
            tally.add(outcome, how)
    finally:
        a.put_back(path)


def _json_inputs(fz: Fuzzer, original: bytes, count: int) -> Iterator[tuple[str, bytes]]:
    obj = json.loads(original)
    for what, text in fz.json_mutants(obj, count):
        yield what, text.encode()


# -- RAM tier -----------------------------------------------------------------------------------

def test_fuzz_ram_commit_record(art: Artifacts) -> None:
    """The commit record (``slot<K>.json``) of the newest snapshot."""
    tally = Tally("RAM commit record")
    path = art.ram_file(STEPS[-1], "json")
    original = art.files[path]
    fz = Fuzzer(11)
    _run(art, tally, path, fz.byte_mutants(original, 120), ("ram", "durable"))
    _run(art, tally, path, Fuzzer.truncations(original, 80), ("ram", "durable"))
    _run(art, tally, path, _json_inputs(fz, original, 160), ("ram", "durable"))
    tally.check(330)


def test_fuzz_ram_seal(art: Artifacts) -> None:
    """The seal (``slot<K>.seal.json``): checksums and the commit they belong to."""
    tally = Tally("RAM seal")
    path = art.ram_file(STEPS[-1], "seal.json")
    original = art.files[path]
    fz = Fuzzer(12)
    _run(art, tally, path, fz.byte_mutants(original, 60), ("ram", "durable"))
    _run(art, tally, path, Fuzzer.truncations(original), ("ram", "durable"))
    _run(art, tally, path, _json_inputs(fz, original, 80), ("ram", "durable"))
    tally.check(350)


def test_fuzz_ram_arena(art: Artifacts) -> None:
    """The arena (``slot<K>.bin``): the raw tensor bytes."""
    tally = Tally("RAM arena")
    path = art.ram_file(STEPS[-1], "bin")
    original = art.files[path]
    fz = Fuzzer(13)
    flips = []
    for _ in range(130):  # in-place damage: same length, so only the checksums can tell
        what, data = fz.mutate_bytes(original)
        if len(data) == len(original) and data != original:
            flips.append((what, data))
    _run(art, tally, path, iter(flips), ("ram",))
    _run(art, tally, path, Fuzzer.truncations(original, 40), ("ram", "durable"))
    tally.check(100)


# -- durable tier -------------------------------------------------------------------------------

def test_fuzz_durable_manifest(art: Artifacts) -> None:
    """The commit marker ``.hpresil/manifest.json``."""
    tally = Tally("durable manifest")
    path = art.durable_file(STEPS[-1], MANIFEST)
    original = art.files[path]
    fz = Fuzzer(21)
    _run(art, tally, path, fz.byte_mutants(original, 60), ("durable",))
    _run(art, tally, path, Fuzzer.truncations(original, 150), ("durable",))
    _run(art, tally, path, _json_inputs(fz, original, 100), ("durable",))
    tally.check(300)


def test_fuzz_durable_rank_record(art: Artifacts) -> None:
    """A rank's marker ``.hpresil/rank<R>.json`` (layout, checksums, locations, plain values)."""
    tally = Tally("durable rank record")
    path = art.durable_file(STEPS[-1], rank_json(0))
    original = art.files[path]
    fz = Fuzzer(22)
    _run(art, tally, path, fz.byte_mutants(original, 80), ("durable",))
    _run(art, tally, path, Fuzzer.truncations(original, 60), ("durable",))
    _run(art, tally, path, _json_inputs(fz, original, 100), ("durable",))
    tally.check(220)


def test_fuzz_durable_data_and_metadata(art: Artifacts) -> None:
    """The DCP data file ``__0_0.distcp`` and ``.metadata`` (never read by hpresil)."""
    tally = Tally("durable data file and .metadata")
    fz = Fuzzer(23)
    path = art.durable_file(STEPS[-1], data_file(0))
    original = art.files[path]
    _run(art, tally, path, fz.byte_mutants(original, 100), ("durable",))
    _run(art, tally, path, Fuzzer.truncations(original, 40), ("durable",))
    path = art.durable_file(STEPS[-1], ".metadata")
    _run(art, tally, path, fz.byte_mutants(art.files[path], 20), ("durable",))
    tally.check(150)


def test_fuzz_drain_never_commits_a_damaged_record(art: Artifacts, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RAM record damaged after it was sealed, drained again to the durable tier
    (the step's durable copy removed first): whatever the drainer commits must
    restore to the state that was saved, or not be offered at all."""
    from hpresil.checkpoint.durable.drain import DrainConfig, Drainer

    monkeypatch.chdir(tmp_path)  # a damaged durable_url could name a relative directory
    tally = Tally("drain of a damaged RAM record")
    path = art.ram_file(STEPS[-1], "json")
    original = art.files[path]
    fz = Fuzzer(24)
    inputs = [*fz.byte_mutants(original, 30), *_json_inputs(fz, original, 30)]
    config = DrainConfig(storage_options={"fsync": False})
    try:
        for what, data in inputs:
            shutil.rmtree(os.path.join(art.durable, step_dir(STEPS[-1])))
            with open(path, "wb") as f:
                f.write(data)
            with deadline(10, what):
                Drainer(config, shm_dir=art.shm, events=RecordingSink()).drain_once()  # never raises: failures are events
            outcome, how = _restore(art, ("durable",), f"drained {what}")
            tally.add(outcome, how)
            art.reset_durable()
    finally:
        art.put_back(path)
        art.reset_durable()
    assert not os.listdir(tmp_path)
    tally.check(50)
