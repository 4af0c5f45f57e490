"""Method registry: ``method.name`` -> class."""

from __future__ import annotations

import difflib

from ..errors import ConfigError

METHODS: dict = {}


def register_method(cls):
    METHODS[cls.name] = cls
    return cls


def get_method(name: str):
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}' (config key method.name).{hint} "
                         f"Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
