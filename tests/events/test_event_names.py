"""Every event name hpresil emits is registered in EVENT_NAMES (the report,
metrics and docs read that list)."""

from __future__ import annotations

import pathlib
import re

import hpresil
from hpresil.events.api import EVENT_NAMES


def test_every_emitted_event_name_is_registered() -> None:
    root = pathlib.Path(hpresil.__file__).parent
    emitted: dict[str, str] = {}
    for path in root.rglob("*.py"):
        for m in re.finditer(r"\b_?emit\(\s*[\"']([a-z_]+)[\"']", path.read_text()):
            emitted.setdefault(m.group(1), str(path.relative_to(root)))
    assert len(emitted) > 15  # the pattern still finds the calls
    missing = {name: where for name, where in emitted.items() if name not in EVENT_NAMES}
    assert not missing, f"add these to hpresil/events/api.py EVENT_NAMES: {missing}"
