"""TOML configs: a file of option values for one command, checked key by key.

Keys are the command's long options without the dashes (``nfe = 19``, ``rho_min = 0.5``; dashes
and underscores are the same). Options given on the command line win over the file.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Iterable


class ConfigError(ValueError):
    """A config file is unreadable or names an option the command does not have."""


def read_config(path: str | Path, allowed: Iterable[str]) -> dict:
    """The file's values keyed by option name (underscores), or a ConfigError naming the key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:  # TOML is UTF-8 whatever the locale says
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    allowed = sorted(allowed)
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        if isinstance(value, dict):
            raise ConfigError(f"{path}: key {key!r} holds a table; configs are flat 'key = value' lists")
        values[name] = value
    return values
