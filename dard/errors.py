"""The errors and the one wording that config, models and every module below them share (so that
none of them imports the other to say it)."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names every invalid field (``section.key: why``)."""


def unknown(value: Any, choices, what: str = "") -> str:
    """The one wording of a value that is not among ``choices``."""
    return f"unknown {what + ' ' if what else ''}{value!r} (choose from {', '.join(map(str, choices))})"
