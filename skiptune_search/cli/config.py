"""TOML configs: a file of option values for one command, checked key by key.

Keys are the command's long options without the dashes (``nfe = 19``, ``rho_min = 0.5``; dashes
and underscores are the same). Options given on the command line win over the file. Each value
must have the option's type (a TOML integer for an integer option, true/false for a flag, one of
the listed strings for a choice) and lie in the option's range. Options that let code from a file
run (``trust_pickle``; ``checkout``, a code base whose code builds the model, and its shortcuts
``edm_path``, where the unpickled code is imported from, and ``uvit_path``) are never taken from
a config file: only the command line can give them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

import click

# options a config file may not set: each one lets code from a file run
COMMAND_LINE_ONLY = {"trust_pickle": "--trust-pickle", "checkout": "--checkout", "edm_path": "--edm-path",
                     "uvit_path": "--uvit-path"}


class ConfigError(ValueError):
    """A config file is unreadable, names an option the command does not have, or gives one a
    value of the wrong type."""


def read_config(path: str | Path, allowed: Iterable[str]) -> dict:
    """The file's values keyed by option name (underscores), or a ConfigError naming the key."""
    from ..core.errors import SkiptuneError
    from ..core.files import read_toml

    path = Path(path)
    try:
        data = read_toml(path, "config file")  # bounded, UTF-8 whatever the locale says, no key twice
    except SkiptuneError as exc:
        raise ConfigError(str(exc)) from None
    allowed = sorted(allowed)
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in COMMAND_LINE_ONLY:
            raise ConfigError(f"{path}: key {key!r} is not allowed in a config file (it lets code from a file "
                              f"run); remove it and pass {COMMAND_LINE_ONLY[name]} on the command line")
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: key {key!r} holds a {'table' if isinstance(value, dict) else 'list'}; "
                              f"configs are flat 'key = value' lists")
        values[name] = value
    return values


def check_value(path: str | Path, key: str, value, param: click.Parameter, ctx: click.Context):
    """``value`` converted by ``param``'s type, or a ConfigError naming the key, the file and the
    expected type. TOML's own types must match: ``nfe = 5.7`` or ``trust = "yes"`` are errors, not
    rounded or read as true."""
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag or isinstance(kind, click.types.BoolParamType):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:  # strings, paths and choices
        ok, expected = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{path}: key {key!r} = {value!r} must be {expected}")
    try:
        return kind.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise ConfigError(f"{path}: key {key!r}: {exc.message}") from None
