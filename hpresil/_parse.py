"""Parsing of environment-variable values shared by every ``HPRESIL_*`` reader.

One table of boolean spellings, so ``HPRESIL_KEEP_SHM=on`` and
``HPRESIL_HANG=1`` mean the same everywhere.
"""

from __future__ import annotations

from hpresil.errors import ConfigError

__all__ = ["TRUE", "FALSE", "parse_bool"]

#: Spellings of true (compared lower-cased, stripped).
TRUE = frozenset({"1", "true", "yes", "on"})
#: Spellings of false; an empty value is false.
FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(raw: str, source: str, fix: str = "set it to 1 or 0") -> bool:
    """``raw`` as a boolean.

    Args:
        raw: the value as written (``"On"``, ``"0"``, ...).
        source: what it came from (a flag or variable name), for the message.
        fix: how to fix an invalid value, appended to the message.

    Raises:
        ConfigError: ``raw`` is none of :data:`TRUE` or :data:`FALSE`.
    """
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{source}={raw!r} is not a boolean; {fix}")
