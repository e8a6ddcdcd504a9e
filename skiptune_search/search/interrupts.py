"""Ctrl-C (SIGINT) and SIGTERM during a search, delivered where a trial can end cleanly.

Once ``install``ed, a signal always sets ``state.seen`` (so a library that swallows the
KeyboardInterrupt in a clean-up path cannot make a search go on as if nothing happened), and it
raises KeyboardInterrupt at once only where that is safe: while a trial samples, or outside a
search. Inside Optuna's own bookkeeping (creating a trial, writing its state) it waits for the next
safe point, so no trial is ever left RUNNING by an interrupted process: the one under way is marked
failed (it does not count, and a resumed search runs it again).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class state:  # noqa: N801 - a namespace of the process's one signal state
    seen = False
    signum: int | None = None
    immediate = True


def install() -> None:
    def handler(signum, frame):
        state.seen, state.signum = True, signum
        if state.immediate:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def check() -> None:
    """Raise KeyboardInterrupt if a signal came while it could not be delivered."""
    if state.seen:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal inside only sets ``state.seen``."""
    before, state.immediate = state.immediate, False
    try:
        yield
    finally:
        state.immediate = before


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """A signal inside raises KeyboardInterrupt at once (and one that came before, on entry)."""
    before, state.immediate = state.immediate, True
    try:
        check()
        yield
    finally:
        state.immediate = before
