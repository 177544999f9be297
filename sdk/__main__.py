"""The console entries ``rrise`` (also ``python -m rrise``) and ``rrise-export``.

They import the CLI only once they run, inside a ``KeyboardInterrupt`` guard: a Ctrl-C in the
first fraction of a second (while numpy, typer and the commands load) ends with one line,
"interrupted before the command started; nothing was done", and exit status 130, not a traceback.
``import rrise`` itself loads only the version, so the guard is in place before anything heavy.
Once the CLI has loaded, :func:`rrise.cli.main` and each command handle Ctrl-C themselves.
"""

from __future__ import annotations

import sys

__all__ = ["INTERRUPTED", "entry", "export_entry"]

INTERRUPTED = "error: interrupted before the command started; nothing was done\n"


def _interrupted() -> None:
    """Say that nothing was done and exit 130 (128 + SIGINT), without importing anything."""
    try:
        sys.stderr.write(INTERRUPTED)
        sys.stderr.flush()
    finally:
        raise SystemExit(130)


def entry() -> None:
    """``rrise``: load the CLI under the guard, then run it (it guards parsing and the command)."""
    try:
        from rrise.cli import main
    except KeyboardInterrupt:
        _interrupted()
    main()


def export_entry() -> None:
    """``rrise-export``: load its CLI under the guard, then run it."""
    try:
        from rrise.export.cli import main
    except KeyboardInterrupt:
        _interrupted()
    main()


if __name__ == "__main__":
    entry()
