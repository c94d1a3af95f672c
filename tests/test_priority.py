"""Background threads of the node runtime run at a lower priority than training."""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta

import pytest

from hpresil.checkpoint.sealer import Sealer
from hpresil.errors import ConfigError
from hpresil.runtime.priority import BACKGROUND_NICE_ENV, DEFAULT_BACKGROUND_NICE, background_nice, lower_this_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priorities are Linux-only")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_background_nice_parses_and_names_the_fix() -> None:
    assert background_nice({}) == DEFAULT_BACKGROUND_NICE
    assert background_nice({BACKGROUND_NICE_ENV: " 0 "}) == 0
    assert background_nice({BACKGROUND_NICE_ENV: "19"}) == 19
    for bad in ("20", "-1", "ten", "1.5", "nan"):
        with pytest.raises(ConfigError, match="use an integer nice value 0..19"):
            background_nice({BACKGROUND_NICE_ENV: bad})


def test_only_the_calling_thread_is_lowered() -> None:
    main_before = _nice(threading.get_native_id())
    seen: dict[str, int | None] = {}

    def body() -> None:
        seen["returned"] = lower_this_thread(main_before + 5 if main_before + 5 <= 19 else 19)
        seen["actual"] = _nice(threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen["returned"] == seen["actual"] == min(19, main_before + 5)
    assert _nice(threading.get_native_id()) == main_before  # the agent's own thread keeps its priority


def test_zero_and_already_lower_leave_the_thread_alone() -> None:
    out: list[int | None] = []

    def body() -> None:
        out.append(lower_this_thread(0))
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        out.append(lower_this_thread(10))  # an operator's higher nice value is kept

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [None, 15]


def test_sealer_thread_runs_at_the_background_nice(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKGROUND_NICE_ENV, "12")
    base = _nice(threading.get_native_id())
    sealer = Sealer(str(tmp_path), interval=timedelta(milliseconds=10))
    sealer.start_background()
    try:
        thread = sealer._thread
        assert thread is not None and thread.native_id is not None
        deadline = time.monotonic() + 5
        while _nice(thread.native_id) != max(12, base) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _nice(thread.native_id) == max(12, base)
        assert _nice(threading.get_native_id()) == base
    finally:
        sealer.stop(timedelta(seconds=2))
