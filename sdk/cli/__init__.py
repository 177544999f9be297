"""The ``rrise`` command line, one module per family of commands, each command bound to its typed
options (:mod:`rrise.options`): the stages on a work folder (:mod:`.stages`), ``build``, ``run``,
``subscribe``, ``inspect``/``keys`` and ``audit``; ``rrise export`` is ``rrise-export``. Every
command imports its stage when it runs: ``rrise --help`` needs no torch."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

import typer

from . import audit, build, keys, run, stages, subscribe
from .app import COMMAND_ORDER, app, interrupt_reported
from .argv import optional_values, spread_vector_options
from .stage_options import AugmentName, DatasetName, ProfileName, RuleName, ScoreName

__all__ = [
    "COMMAND_ORDER",
    "AugmentName",
    "DatasetName",
    "ProfileName",
    "RuleName",
    "ScoreName",
    "app",
    "main",
    "optional_values",
    "spread_vector_options",
]

COMMAND_MODULES = (audit, build, keys, run, stages, subscribe)  # each registers its commands on `app`


def _mount_export() -> None:
    """`rrise export` is `rrise-export`: the same commands, flat form, options and help (no torch
    at import)."""
    from rrise.export.cli import app as export_app

    app.add_typer(export_app, name="export")


_mount_export()


def main(argv: list[str] | None = None) -> None:
    """Run the ``rrise`` command line on ``argv`` (default: ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    interrupt_reported.clear()
    previous_hook, sys.unraisablehook = sys.unraisablehook, _interrupt_not_lost(sys.unraisablehook)
    try:
        app(args=spread_vector_options(optional_values(args)), prog_name="rrise")
    except KeyboardInterrupt:  # Ctrl-C before a command started (e.g. while the CLI is built)
        typer.secho("error: interrupted before the command started; nothing was done", err=True, fg="red")
        raise SystemExit(130) from None
    except SystemExit as exc:  # typer's own exit 130 on a Ctrl-C (parsing options, a short command)
        if exc.code == 130 and not interrupt_reported:
            typer.secho("error: interrupted", err=True, fg="red")
        raise
    finally:
        sys.unraisablehook = previous_hook


def _interrupt_not_lost(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An unraisable-exception hook that re-sends a Ctrl-C swallowed by native code (the option
    parser builds validators in a compiled library, which can only print an interrupt it receives
    as "Exception ignored … Traceback"): the signal comes again and ends the command as usual."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            return
        previous(unraisable)

    return hook
