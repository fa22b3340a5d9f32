"""Stopping on Ctrl-C and SIGTERM, even when the signal lands where Python drops exceptions.

The handlers raise at once (KeyboardInterrupt, or its subclass `Terminated` for SIGTERM), so a
run stops where it is. An exception raised while Python runs a finaliser (h5py closes objects
from weakref callbacks) is printed and dropped, though, and the run would go on; so the handlers
also leave the request here, and long loops call `check()` between steps to raise it again.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`, `docker stop`), stopping a command as Ctrl-C does."""


_pending: list[type[KeyboardInterrupt]] = []


def install() -> None:
    """Handle SIGINT and SIGTERM in this (main) thread; CLI entry point only."""

    def handler(signum: int, frame: FrameType | None) -> None:
        kind = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        _pending[:] = [kind]
        raise kind

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    default_hook = sys.unraisablehook

    def quiet_drop(info: Any) -> None:  # no "Exception ignored in ..." for a request kept here
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _pending):
            default_hook(info)

    sys.unraisablehook = quiet_drop


def check() -> None:
    """Raise a stop request that a signal left and that no one has acted on yet."""
    if _pending:
        raise _pending.pop()


def clear() -> None:
    """The request was acted on (or the command finished regardless)."""
    _pending.clear()
