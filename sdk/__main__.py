"""The console entries ``rrise`` (also ``python -m rrise``) and ``rrise-export``.

They import the CLI only once they run, inside a ``KeyboardInterrupt`` guard: a Ctrl-C in the
first fraction of a second (while numpy, typer and the commands load) ends with one line,
"interrupted before the command started; nothing was done", and exit status 130, not a traceback.
``import rrise`` itself loads only the version, so the guard is in place before anything heavy.
Once the CLI has loaded, :func:`rrise.cli.main` and each command handle Ctrl-C themselves; once
the command has ended (its result written), a late Ctrl-C no longer cuts the exit short.

An interrupted run exits with status 130 at once (:func:`os._exit`, streams flushed). Under
``python -m``, CPython remembers a KeyboardInterrupt that passed through code run by ``exec`` of a
string (dataclasses and namedtuples are made that way, also while a module loads) and, however the
program then exits, kills itself by SIGINT at the very end: the status would not be the 130 promised.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["INTERRUPTED", "entry", "export_entry"]

INTERRUPTED = "error: interrupted before the command started; nothing was done\n"


def _exit_now(status: int) -> None:
    """Ignore SIGINT, flush stdout and stderr, then end the process with ``status`` (no interpreter
    shutdown)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing reaches it
            stream.flush()
    os._exit(status)


def _interrupted() -> None:
    """Say that nothing was done and exit 130 (128 + SIGINT), without importing anything."""
    try:
        sys.stderr.write(INTERRUPTED)
    finally:
        _exit_now(130)


def _run(main: Callable[[], None]) -> None:
    """Run a loaded CLI; when it ends, however it ends, ignore SIGINT for the rest of the exit.

    An interrupted command (status 130, its message already written) exits at once."""
    try:
        main()
    except SystemExit as exc:
        if exc.code == 130:
            _exit_now(130)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def entry() -> None:
    """``rrise``: load the CLI under the guard, then run it (it guards parsing and the command)."""
    try:
        from rrise.cli import main
    except KeyboardInterrupt:
        _interrupted()
    _run(main)


def export_entry() -> None:
    """``rrise-export``: load its CLI under the guard, then run it."""
    try:
        from rrise.export.cli import main
    except KeyboardInterrupt:
        _interrupted()
    _run(main)


if __name__ == "__main__":
    entry()
